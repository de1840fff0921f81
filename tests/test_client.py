"""wsboard_client (stdlib only, patches nothing) and the `wsboard send|list|...` commands,
against a real server on its real control socket."""

import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import websocket
from conftest import ROOT, wait_until

import wsboard
import wsboard_client
from wsboard_client import Client


def run_cli(server, *args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "wsboard.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "WSBOARD_CONTROL": server.control_path, **(env or {})},
    )


def test_importing_the_client_patches_nothing():
    code = (
        "import sys, socket, threading, wsboard_client\n"
        "assert 'gevent' not in sys.modules and 'bottle' not in sys.modules\n"
        "assert socket.socket.__module__ == 'socket'\n"
        "assert threading.Thread.__module__ == 'threading'\n"
        "print('clean')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "clean", result.stderr


def test_the_client_covers_the_protocol(server):
    tab = websocket.create_connection(server.ws_url("alice"), subprotocols=["wsboard.v1"])
    conn = json.loads(tab.recv())["hello"]["conn"]
    other = server.websocket("bob")
    with Client(server.control_path, timeout=5) as board:
        assert board.ping()
        assert board.send("alice", "hello there") is True
        assert json.loads(tab.recv())["data"] == "hello there"
        assert board.send("nobody", "x") is False
        assert board.send_lines([("bob", "one"), ("nobody", "two"), ("bob", "three")]) == [
            True,
            False,
            True,
        ]
        assert [other.recv(), other.recv()] == ["one", "three"]
        first = board.send_many(["bob", "nobody"], "two\nlines", key="k-1")
        again = board.send_many(["bob", "nobody"], "two\nlines", key="k-1")
        assert (first["sockets"], first["missing"], again.get("duplicate")) == (1, ["nobody"], True)
        assert other.recv() == "two\nlines"
        assert board.join("room", "bob") == 1 and board.join("room", conn=conn) == 1
        assert board.count("room") == (2, 2) and board.count() == (2, 2)
        assert board.publish("room", "to the room", except_conn=conn) == 1
        assert other.recv() == "to the room"
        assert board.channels() == {"room": 2}
        assert sorted(m["id"] for m in board.channel("room")) == ["alice", "bob"]
        assert board.leave("room", "bob") == 1 and board.join("room", "nobody") == 0
        assert board.online(["bob", "nobody", "alice"]) == ["bob", "alice"]
        assert sorted(c["id"] for c in board.clients()) == ["alice", "bob"]
        assert board.broadcast("everyone") == 2
        assert json.loads(tab.recv())["data"] == "everyone" and other.recv() == "everyone"
        board.send_to_connection(conn, "just you")
        assert json.loads(tab.recv())["data"] == "just you"
        with pytest.raises(wsboard_client.ClientNotFound):
            board.send_to_connection("1.999999", "x")
        assert board.set_meta("bob", {"name": "Bob"}) is True
        assert board.stats()["sockets"] == 2
        assert board.kick("bob") == 1 and board.kick("nobody") == 0
        with pytest.raises(wsboard_client.CommandError, match="must be a client id"):
            board.kick("bad/id")  # refused by the server
        with pytest.raises(ValueError):
            board.send("bad id", "x")  # a space would make it another id: refused here
        with pytest.raises(ValueError):
            board.send("alice", "two\nlines")  # SEND MESSAGE is one line: send_many takes it


def test_watch_yields_events_as_they_happen(server):
    events = []
    ready = threading.Event()

    def watcher():
        board = Client(server.control_path)
        stream = board.watch()
        ready.set()
        for event in stream:
            events.append(event)
            if event["event"] == "disconnect":
                stream.close()

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    assert ready.wait(5)  # watch() returns once the server has taken the watch: no sleep
    ws = server.websocket("watched")
    ws.close()
    thread.join(10)
    assert [(e["event"], e["id"]) for e in events] == [
        ("connect", "watched"),
        ("disconnect", "watched"),
    ]


def test_failures_are_distinct_exceptions(server, tmp_path, server_factory):
    with pytest.raises(wsboard_client.Unreachable):
        Client(str(tmp_path / "none.sock")).ping()
    silent = socket.socket(socket.AF_UNIX)  # accepts, never answers
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)
    started = time.monotonic()
    with pytest.raises(wsboard_client.Timeout):
        Client(str(tmp_path / "silent.sock"), timeout=0.5).ping()
    assert time.monotonic() - started < 2
    guarded = server_factory(
        "--control", str(tmp_path / "guarded.sock"), "--control-uids", str(os.getuid() + 1)
    )
    with pytest.raises(wsboard_client.PermissionDenied):
        Client(guarded.control_path).stats()


def test_a_call_takes_at_most_its_timeout_however_slowly_the_answer_trickles(
    trickling_control, server
):
    started = time.monotonic()
    with pytest.raises(wsboard_client.Timeout):
        Client(trickling_control, timeout=1).ping()
    assert time.monotonic() - started < 10  # the answer alone takes 24 s to come whole
    started = time.monotonic()
    cli = run_cli(
        server, "broadcast", "--timeout", "1", "x", env={"WSBOARD_CONTROL": trickling_control}
    )
    assert cli.returncode == 4 and "Timeout" in cli.stderr
    assert time.monotonic() - started < 10


def test_the_command_lines_timeout_must_be_a_bounded_number_of_seconds(server):
    for value in ("0", "-1", "nan", "inf", "1e300", "soon"):
        refused = run_cli(server, "send", "--timeout", value, "nobody", "x")
        assert refused.returncode == 2 and "--timeout" in refused.stderr, value
    assert run_cli(server, "send", "--timeout", "0.5", "nobody", "x").returncode == 1
    for value in (0, -1, float("nan"), float("inf"), 1e300):
        with pytest.raises(ValueError):
            Client(server.control_path, timeout=value)


def test_a_client_reconnects_once_after_the_server_restarted(server_factory, tmp_path):
    path = str(tmp_path / "restart.sock")
    first = server_factory("--control", path)
    board = Client(path)
    assert board.ping()
    first.stop()
    second = server_factory("--control", path)
    ws = second.websocket("back")
    wait_until(lambda: board.send("back", "after the restart"), timeout=5)
    assert ws.recv() == "after the restart"


def test_the_server_signs_with_the_clients_token_helpers():
    assert wsboard.mint_token is wsboard_client.mint_token  # one home, no second copy to drift
    assert wsboard.signed_query is wsboard_client.signed_query
    secret = b"s" * 32
    channels = ["news", "private-a", "presence-b"]
    signed = hmac.new(secret, b"u.1060|private-a|presence-b", hashlib.sha256).hexdigest()
    assert wsboard_client.signed_query(secret, "u", 60, channels, now=1000) == (
        f"id=u&channel=news&channel=private-a&channel=presence-b&exp=1060&token={signed}"
    )


def test_the_command_line_sends_lists_counts_and_says_by_exit_code(server):
    ws = server.websocket("cli")
    sent = run_cli(server, "send", "cli", "hello from the shell")
    assert sent.returncode == 0 and ws.recv() == "hello from the shell"
    assert run_cli(server, "send", "nobody", "x").returncode == 1
    assert run_cli(server, "send", "cli").returncode == 2  # usage
    assert run_cli(server, "send", "bad id", "x").returncode == 2  # refused
    unreachable = run_cli(server, "send", "cli", "x", env={"WSBOARD_CONTROL": "/nonexistent"})
    assert unreachable.returncode == 3 and "no wsboard" in unreachable.stderr
    listed = run_cli(server, "list", "--json")
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == ["cli"]
    assert run_cli(server, "list").stdout.split()[0] == "cli"
    assert run_cli(server, "count").stdout.strip() == "1 1"
    online = run_cli(server, "online", "nobody", "cli")
    assert (online.returncode, online.stdout.split()) == (0, ["cli"])
    assert run_cli(server, "online", "nobody").returncode == 1
    assert run_cli(server, "broadcast", "all").stdout.strip() == "1" and ws.recv() == "all"
    assert json.loads(run_cli(server, "stats").stdout)["sockets"] == 1
    assert run_cli(server, "publish", "empty-room", "x").returncode == 1
    assert run_cli(server, "kick", "cli").stdout.strip() == "1"
    assert "Exit codes: 0 done, 1 not found" in " ".join(
        run_cli(server, "kick", "--help").stdout.split()
    )
