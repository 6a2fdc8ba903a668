"""``python -m bench``: the end-to-end benchmark suite (issue 7); root, namespaces.

Measurements (``--only`` names): ``tcp`` (routed / wireguard-go / gateway, interleaved),
``udp`` (rate sweep and gateway CPU per packet), ``setup`` (authorize_flow -> first
packet), ``reset`` (reset -> rejoined with the new key), ``scale`` (N simulated clients),
``blast`` (the gateway alone: UDP rate sweeps up and down with a fast sender, CPU per packet).
Prints medians with min/max and the ratios, and writes ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.blast import QUICK_RATES, RATES, run_blast
from bench.net import bench_net
from bench.report import Results
from bench.reset import run_reset
from bench.scale import run_scale
from bench.setup_latency import run_setup
from bench.throughput import run_tcp, run_udp

NAMES = ("tcp", "udp", "setup", "reset", "blast", "scale")


def log(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 3 minutes)")
    parser.add_argument("--repeat", type=int, help="repetitions of tcp/udp/reset/blast "
                        "(default 3, quick 1)")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME",
                        help=f"run only these: {', '.join(NAMES)}")
    parser.add_argument("--scale", type=int, nargs="+", metavar="N",
                        help="client counts (default 100 1000 5000, quick 100 1000)")
    parser.add_argument("--scale-workers", type=int, default=2, metavar="K",
                        help="processes the simulated clients are spread over (default 2)")
    parser.add_argument("--scale-budget", type=float, metavar="S",
                        help="seconds to connect the N clients (default 240, quick 60)")
    parser.add_argument("--scale-window", type=float, metavar="S",
                        help="seconds of each steady-state window (default 15, quick 5)")
    parser.add_argument("--flows", type=int, help="set-up flows (default 100, quick 30)")
    parser.add_argument("--blast-rates", type=int, nargs="+", metavar="KPPS",
                        help="blast offered rates in thousands of packets/s "
                        f"(default {' '.join(str(r // 1000) for r in RATES)}, quick "
                        f"{' '.join(str(r // 1000) for r in QUICK_RATES)})")
    parser.add_argument("--blast-seconds", type=float,
                        help="seconds per blast step (default 3, quick 2)")
    parser.add_argument("--blast-no-gso", action="store_true",
                        help="blast sender: one sendto per datagram instead of UDP GSO")
    parser.add_argument("--output", help="JSON path (default bench/results/latest.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so every namespace and process is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    quick = args.quick
    repeat = args.repeat or (1 if quick else 3)
    only = set(args.only or NAMES)
    results = Results()
    results.info = {"quick": quick, "repeat": repeat, "only": sorted(only),
                    "argv": list(argv if argv is not None else sys.argv[1:])}
    started = time.monotonic()

    if only & {"tcp", "udp", "setup", "reset"}:
        log("== network: namespaces, coturn, dev portal, wireguard-go pair, gateway, dev client")
        with bench_net() as net:
            if "tcp" in only:
                log(f"== tcp: iperf3, {repeat} repetition(s), configurations interleaved")
                run_tcp(net, results, repeat=repeat, seconds=2 if quick else 5, log=log)
            if "udp" in only:
                rates = [5000, 10000, 20000, 40000, 80000, 120000]
                log(f"== udp: iperf3 through the gateway at {rates} packets/s")
                run_udp(net, results, rates=rates, seconds=2 if quick else 4,
                        repeat=repeat, log=log)
            if "setup" in only:
                flows = args.flows or (30 if quick else 100)
                log(f"== setup: {flows} flows")
                run_setup(net, results, flows=flows, log=log)
            if "reset" in only:
                log(f"== reset: {repeat} time(s)")
                run_reset(net, results, repeat=repeat, log=log)
    if "blast" in only:
        rates = [k * 1000 for k in args.blast_rates] if args.blast_rates else list(
            QUICK_RATES if quick else RATES)
        log(f"== blast: the gateway alone, one simulated client, {rates} packets/s up and down")
        with bench_net(devclient=False, wireguard=False) as net:
            run_blast(net, results, rates=rates, seconds=args.blast_seconds or (2 if quick else 3),
                      repeat=repeat, gso=not args.blast_no_gso, log=log)
    if "scale" in only:
        sizes = args.scale or ([100, 1000] if quick else [100, 1000, 5000])
        log(f"== scale: N = {sizes}")
        run_scale(results, sizes=sizes, window_s=args.scale_window or (5 if quick else 15),
                  connect_budget=args.scale_budget or (60 if quick else 240),
                  workers=args.scale_workers, log=log)

    results.info["duration_s"] = round(time.monotonic() - started, 1)
    print()
    print(results.table())
    path = results.write(Path(args.output) if args.output else None)
    print(f"\nwrote {path} ({results.info['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
