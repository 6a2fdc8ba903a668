#!/bin/bash
# Host set-up for the Firezone gateway (after Firezone's rust/docker-init-gateway.sh), run as root before each start
# (systemd: ExecStartPre=+...). Idempotent: running it again changes nothing.
#
#  - sysctls: IPv4/IPv6 forwarding, src_valid_mark, IPv6 enabled;
#  - accept forwarding to and from the TUN device;
#  - MASQUERADE only for the tunnel source ranges 100.64.0.0/11 and fd00:2021:1111::/107,
#    on every interface but the TUN device.
#
# Uses nft when installed (one table, `inet firezone_gateway`, replaced atomically), else
# iptables/ip6tables (-C check before -I/-A). actors/checks.py:apply_host_setup does the
# same for `setup_host: true`; tests/unit/test_systemd_unit.py checks both agree.
# Note: an accept in our nft table cannot override a drop in another table's forward chain
# (e.g. Docker's FORWARD policy DROP); such hosts need the accept rules there as well.
set -euo pipefail

TUN_NAME="${FIREZONE_TUN_NAME:-tun-firezone}"
IPV4_RANGE="100.64.0.0/11"
IPV6_RANGE="fd00:2021:1111::/107"
TABLE="firezone_gateway"

if [[ ! "$TUN_NAME" =~ ^[A-Za-z0-9_.-]{1,15}$ ]]; then
    echo "gateway-init: invalid FIREZONE_TUN_NAME '$TUN_NAME'" >&2
    exit 2
fi

set_sysctl() {
    local path="/proc/sys/${1//.//}"
    # Absent (e.g. IPv6 disabled on the kernel command line): nothing to do.
    [ -e "$path" ] || return 0
    if [ "$(cat "$path")" != "$2" ]; then
        echo "$2" > "$path"
        echo "gateway-init: $1=$2"
    fi
}

set_sysctl net.ipv4.ip_forward 1
set_sysctl net.ipv4.conf.all.src_valid_mark 1
set_sysctl net.ipv6.conf.all.disable_ipv6 0
set_sysctl net.ipv6.conf.all.forwarding 1
set_sysctl net.ipv6.conf.default.forwarding 1

if command -v nft >/dev/null 2>&1; then
    nft -f - <<NFT
table inet $TABLE
delete table inet $TABLE
table inet $TABLE {
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "$TUN_NAME" accept
    oifname "$TUN_NAME" accept
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname != "$TUN_NAME" ip saddr $IPV4_RANGE masquerade
    oifname != "$TUN_NAME" ip6 saddr $IPV6_RANGE masquerade
  }
}
NFT
    exit 0
fi

ensure_rule() {  # ensure_rule BINARY TABLE CHAIN ADD-ACTION RULE...
    local bin=$1 table=$2 chain=$3 action=$4
    shift 4
    command -v "$bin" >/dev/null 2>&1 || { echo "gateway-init: $bin not found" >&2; return 0; }
    "$bin" -t "$table" -C "$chain" "$@" 2>/dev/null && return 0
    if [ "$action" = insert ]; then
        "$bin" -t "$table" -I "$chain" 1 "$@"
    else
        "$bin" -t "$table" -A "$chain" "$@"
    fi
}

if ! command -v iptables >/dev/null 2>&1 && ! command -v ip6tables >/dev/null 2>&1; then
    echo "gateway-init: neither nft nor iptables found; add FORWARD/MASQUERADE rules yourself" >&2
    exit 1
fi
for pair in "iptables $IPV4_RANGE" "ip6tables $IPV6_RANGE"; do
    read -r bin range <<<"$pair"
    ensure_rule "$bin" filter FORWARD insert -i "$TUN_NAME" -j ACCEPT
    ensure_rule "$bin" filter FORWARD insert -o "$TUN_NAME" -j ACCEPT
    ensure_rule "$bin" nat POSTROUTING append -s "$range" ! -o "$TUN_NAME" -j MASQUERADE
done
