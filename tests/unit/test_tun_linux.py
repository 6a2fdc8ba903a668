"""Reading the kernel's TX drops of the TUN from /proc/net/dev (no root needed)."""

from __future__ import annotations

from pathlib import Path

from actors.io.tun_linux import kernel_tx_drops

# The kernel's layout: 8 receive columns, then 8 transmit columns (drop is the 4th).
DEV_TABLE = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1234      10    0    0    0     0          0         0     1234      10    0    0    0     0       0          0
tun-firezone: 987654  321    1    2    0     0          0         0 123456789   98765    0 4394    0     0       0          0
"""  # noqa: E501


def test_the_transmit_drop_column_of_the_named_device(tmp_path: Path) -> None:
    table = tmp_path / "dev"
    table.write_text(DEV_TABLE)
    assert kernel_tx_drops("tun-firezone", str(table)) == 4394
    assert kernel_tx_drops("lo", str(table)) == 0


def test_an_unknown_device_or_an_unreadable_table_is_none(tmp_path: Path) -> None:
    table = tmp_path / "dev"
    table.write_text(DEV_TABLE)
    assert kernel_tx_drops("tun-other", str(table)) is None
    assert kernel_tx_drops("tun-firezone", str(tmp_path / "missing")) is None
    table.write_text("tun-firezone: 1 2 3\n")  # truncated
    assert kernel_tx_drops("tun-firezone", str(table)) is None
