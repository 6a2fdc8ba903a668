"""The devclient's command channel, CLI parsing and portal framing helpers."""

from __future__ import annotations

import argparse
import json
import os
import urllib.parse
from pathlib import Path

import pytest

from devclient.__main__ import build_parser
from devclient.control import CommandFifo, Quit, Request, Roam, parse_command
from devclient.portal import decode_frame, encode_frame, login_url, redact


@pytest.mark.parametrize(
    ("line", "command"),
    [("roam", Roam()), ("  ROAM \n", Roam()), ("quit", Quit()),
     ("request web", Request("web")), ("request 1b2c-uuid", Request("1b2c-uuid"))],
)
def test_parse_command(line: str, command: object) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize("line", ["", "   ", "request", "request a b", "roam now", "fly"])
def test_parse_command_rejects(line: str) -> None:
    with pytest.raises(ValueError):
        parse_command(line)


def test_fifo_reads_whole_lines_across_writers(tmp_path: Path) -> None:
    path = str(tmp_path / "cmd")
    fifo = CommandFifo(path)
    try:
        assert fifo.read_lines() == []
        with open(path, "w") as writer:
            writer.write("roam\nrequest w")
        assert fifo.read_lines() == ["roam"]  # the partial line waits for its end
        with open(path, "w") as writer:  # a second writer after the first went away
            writer.write("eb\n\nquit\n")
        assert fifo.read_lines() == ["request web", "quit"]
    finally:
        fifo.close()


def test_fifo_refuses_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_text("")
    with pytest.raises(ValueError):
        CommandFifo(str(path))


def test_cli_arguments() -> None:
    args = build_parser().parse_args([
        "--portal", "ws://10.0.0.1:8080", "--token", "t", "--name", "n",
        "--resource", "a", "--resource", "b", "--relay-only",
        "--dns-domain", "app=app.example", "--commands", "/tmp/x",
    ])
    assert args.resource == ["a", "b"] and args.relay_only and args.tun == "tun-fzclient"
    assert args.dns_domain == [("app", "app.example")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--portal", "ws://x", "--token", "t", "--name", "n",
                                   "--dns-domain", "no-equals"])
    assert isinstance(build_parser(), argparse.ArgumentParser)


def test_login_url_and_redaction() -> None:
    url = login_url("ws://10.0.0.1:8080/", token="s3cret+/", external_id="e", name="my laptop",
                    public_key="ab+/cd==")
    parts = urllib.parse.urlsplit(url)
    assert parts.path == "/client/websocket"
    query = dict(urllib.parse.parse_qsl(parts.query))
    assert query == {"token": "s3cret+/", "external_id": "e", "name": "my laptop",
                     "public_key": "ab+/cd=="}
    assert "s3cret" not in redact(url) and "public_key=ab" in redact(url)


def test_frames_round_trip_and_garbage_is_none() -> None:
    text = encode_frame("client", "create_flow", {"resource_id": "r"}, 7)
    assert json.loads(text) == {"topic": "client", "event": "create_flow",
                                "payload": {"resource_id": "r"}, "ref": "7"}
    assert decode_frame(text) == ("client", "create_flow", {"resource_id": "r"}, "7")
    for bad in ("not json", "[1]", '{"topic": 1, "event": "x"}', '{"event": "x"}'):
        assert decode_frame(bad) is None


def test_fifo_created_with_private_mode(tmp_path: Path) -> None:
    path = str(tmp_path / "new")
    CommandFifo(path).close()
    assert os.stat(path).st_mode & 0o777 == 0o600
