"""Delivery that holds up: bounded queues, heartbeats, drain, the richer protocol, inbox and
resume, idempotency, watch events and the webhook, all against the real server."""

import base64
import hashlib
import hmac
import http.server
import json
import signal
import socket
import struct
import threading
import time

import pytest
import websocket
from conftest import ask_json, close_frame, free_port, upgrade_request, wait_until

import wsboard


def v1(server, client_id, query=""):
    """A client of the wsboard.v1 subprotocol."""
    ws = websocket.create_connection(
        server.ws_url(client_id) + query, timeout=10, subprotocols=["wsboard.v1"]
    )
    assert ws.getsubprotocol() == "wsboard.v1"
    return ws


def frames(ws, count):
    return [json.loads(ws.recv()) for _ in range(count)]


def stuck_client(server, client_id):
    """A WebSocket that completes its handshake and then never reads."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(upgrade_request(f"?id={client_id}"))
    assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
    return sock


# One client never hurts the others ############################################


def test_send_answers_at_once_while_a_socket_does_not_read(server_factory):
    server = server_factory("--queue-bytes", "20000000")
    stuck = stuck_client(server, "stuck")
    fast = server.websocket("fast")
    server.wait_listed(2)
    control = server.control()
    chunk = "s" * 100_000
    slowest = 0.0
    for i in range(60):  # 6 MB: far more than the kernel buffers, less than the queue
        started = time.monotonic()
        assert control.ask(f"SEND MESSAGE stuck {chunk}") == "OK"
        assert control.ask(f"SEND MESSAGE fast {i}") == "OK"
        assert fast.recv() == str(i)
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 0.5, f"a SEND waited {slowest:.3f}s behind a socket that does not read"
    queued = ask_json(control, {"op": "list"})["clients"]
    assert next(c for c in queued if c["id"] == "stuck")["queued_bytes"] > 1_000_000
    stuck.close()


def test_a_socket_whose_queue_overflows_is_dropped_and_others_carry_on(server_factory):
    server = server_factory("--queue-bytes", "300000")
    stuck = stuck_client(server, "stuck")
    fast = server.websocket("fast")
    server.wait_listed(2)
    control = server.control()
    answers = [control.ask(f"SEND MESSAGE stuck {'x' * 100_000}") for _ in range(100)]
    assert "OK" in answers and answers[-1] == "ERROR Client Not Found"
    server.wait_listed(1)
    assert "send queue full" in server.log()
    assert control.ask("SEND MESSAGE fast still fine") == "OK"
    assert fast.recv() == "still fine"
    stuck.close()


def test_a_slow_reader_that_overflows_is_told_why_with_1013(server_factory):
    server = server_factory("--queue-messages", "4")
    slow = websocket.create_connection(
        server.ws_url("slow"), timeout=10, sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
    )
    server.wait_listed(1)
    control = server.control()
    answers = [control.ask(f"SEND MESSAGE slow {'y' * 50_000}") for _ in range(200)]  # 10 MB
    assert answers[0] == "OK" and answers[-1] == "ERROR Client Not Found"
    assert close_frame(slow) == (1013, "too slow: send queue full")


def test_a_frozen_peer_is_reaped_by_the_heartbeat(server_factory):
    server = server_factory("--ping-interval", "0.5", "--ping-timeout", "0.5")
    frozen = stuck_client(server, "frozen")
    alive = server.websocket("alive")
    server.wait_listed(2)
    alive.settimeout(0.1)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # websocket-client answers pings as it reads
        try:
            alive.recv()
        except websocket.WebSocketTimeoutException:
            pass
    rows = server.wait_listed(1)
    assert rows[0].startswith("alive ")
    assert "disconnect frozen" in server.log() and "ping timeout" in server.log()
    frozen.close()


@pytest.mark.parametrize(
    "opening",
    [
        upgrade_request("?id=acks"),
        b"GET /events?id=acks HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
    ],
    ids=["websocket", "event-stream"],
)
def test_a_second_message_does_not_wait_for_the_client_to_ack_the_first(server, opening):
    """A client that delays its ACKs (TCP_QUICKACK off, as many do) must not hold the next
    message back: with Nagle on, it waited for the delayed ACK, 40 ms at least here."""
    control = server.control()
    waits = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(opening)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        time.sleep(0.2)  # whatever follows the head (an event stream's first lines) comes
        sock.setblocking(False)
        try:
            sock.recv(65536)
        except BlockingIOError:
            pass
        sock.setblocking(True)
        for text in ("one", "two"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)  # acks delayed
            time.sleep(0.002)
            started = time.monotonic()
            assert control.ask(f"SEND MESSAGE acks {text}") == "OK"
            assert text.encode() in sock.recv(65536)
        waits.append(time.monotonic() - started)
        sock.close()
    assert min(waits) < 0.02, waits  # held for the ACK, each took about 40 ms


def test_pings_are_sent_to_every_socket(server_factory):
    server = server_factory("--ping-interval", "0.3")
    sockets = [server.websocket(f"pinged{n}") for n in range(5)]
    for ws in sockets:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_PING and frame.data == b""


def test_shutdown_spreads_its_closes_over_the_drain_window(server_factory):
    server = server_factory("--drain-window", "1")
    tabs = [server.websocket(f"tab{i}") for i in range(20)]
    server.wait_listed(20)
    control = server.control()
    control.send(b"SEND MESSAGE tab0 in flight\n" * 50)
    server.proc.send_signal(signal.SIGTERM)
    answers = [control.line() for _ in range(50)]  # every command in flight is answered
    assert set(answers) <= {b"OK", b"ERROR Client Not Found", b"ERROR Shutting down"}, answers
    assert answers == sorted(answers, key=lambda a: a == b"ERROR Shutting down")  # then none
    arrivals = []
    for tab in tabs:
        assert close_frame(tab) == (1001, "server shutting down; reconnect")
        arrivals.append(time.monotonic())
    assert arrivals[-1] - arrivals[0] >= 0.5
    assert server.proc.wait(timeout=15) == 0


# The plain verbs ##############################################################


def test_ping_and_help(server):
    control = server.control()
    assert control.ask("PING") == "PONG"
    assert control.ask("HELP").startswith("OK commands: LIST WEBSOCKETS")


def test_broadcast_reaches_every_socket_and_counts_them(server):
    sockets = [server.websocket("a"), server.websocket("a"), server.websocket("b")]
    server.wait_listed(3)
    control = server.control()
    assert control.ask("BROADCAST to  everyone") == "OK 3"
    assert [ws.recv() for ws in sockets] == ["to  everyone"] * 3
    assert control.ask("BROADCAST") == "ERROR Missing message text"


def test_kick_closes_every_socket_of_an_id(server):
    tabs = [server.websocket("unwanted"), server.websocket("unwanted")]
    other = server.websocket("other")
    server.wait_listed(3)
    control = server.control()
    assert control.ask("KICK unwanted") == "OK 2"
    assert [close_frame(tab) for tab in tabs] == [(4000, "kicked")] * 2
    assert server.wait_listed(1)[0].startswith("other ")
    assert control.ask("KICK unwanted") == "ERROR Client Not Found"
    assert control.ask("KICK") == "ERROR Missing client id"
    assert other.connected


# The JSON form ################################################################


def test_json_send_to_several_ids(server):
    a, b = server.websocket("a"), server.websocket("b")
    server.wait_listed(2)
    answer = ask_json(
        server.control(), {"op": "send", "to": ["a", "b", "nobody"], "data": {"x": 1}}
    )
    assert answer == {"ok": True, "sockets": 2, "queued": 0, "missing": ["nobody"]}
    assert a.recv() == b.recv() == '{"x":1}'


def test_json_send_to_nobody_is_client_not_found(server):
    answer = ask_json(server.control(), {"op": "send", "to": "nobody", "data": "x"})
    assert answer == {"ok": False, "error": "Client Not Found"}


def test_json_list_describes_each_socket(server):
    ws = websocket.create_connection(server.ws_url("listed"), origin=server.url)
    server.wait_listed(1)
    (client,) = ask_json(server.control(), {"op": "list"})["clients"]
    assert client["id"] == "listed" and client["origin"] == server.url
    assert client["peer"] == f"127.0.0.1:{ws.sock.getsockname()[1]}"
    assert abs(client["since"] - time.time()) < 30 and client["queued_bytes"] == 0


def test_json_stats_counts_sockets_refusals_and_collections(server):
    ws = server.websocket("counted")
    server.wait_listed(1)
    control = server.control()
    control.send(b"SEND MESSAGE a<b x\n")
    control.line()
    stats = ask_json(control, {"op": "stats"})
    assert stats["ok"] and stats["sockets"] == 1 and stats["control_connections"] == 1
    assert set(stats["gc"]) == {"full", "last_ms", "max_ms"} and stats["gc"]["full"] >= 0
    assert stats["version"] == wsboard.__version__
    ws.close()


def test_json_kick_with_a_code_and_ping(server):
    ws = server.websocket("moving")
    server.wait_listed(1)
    control = server.control()
    kicked = ask_json(control, {"op": "kick", "id": "moving", "code": 1012, "reason": "moving you"})
    assert kicked == {"ok": True, "sockets": 1}
    assert close_frame(ws) == (1012, "moving you")
    assert ask_json(control, {"op": "ping", "ref": 7}) == {"ok": True, "pong": True, "ref": 7}


@pytest.mark.parametrize(
    "line, error",
    [
        ("{", "Malformed JSON"),
        ("{}", "Unknown op: 'None'"),
        ('{"op": "fly"}', "Unknown op: 'fly'"),
        ('{"op": "send", "data": "x"}', '"to" must be a client id or a list of 1-1000 of them'),
        ('{"op": "send", "to": "a b", "data": "x"}', "invalid client id: 'a b'"),
        ('{"op": "send", "to": "a"}', '"data" is missing'),
        (
            '{"op": "send", "to": "a", "data": "x", "key": 5}',
            '"key" must be a string of 1-200 characters',
        ),
        (
            '{"op": "kick", "id": "a", "code": 1006}',
            '"code" must be 1000, 1001, 1008, 1011, 1012, 1013 or 4000-4999',
        ),
    ],
)
def test_bad_json_commands_get_ok_false_with_a_reason(server, line, error):
    control = server.control()
    assert json.loads(control.ask(line)) == {"ok": False, "error": error}
    assert control.ask("PING") == "PONG"


def test_a_retried_send_with_the_same_key_is_delivered_once(server):
    ws = server.websocket("once")
    server.wait_listed(1)
    control = server.control()
    request = {"op": "send", "to": "once", "data": "pay 10", "key": "order-17"}
    first = ask_json(control, request)
    again = ask_json(server.control(), request)
    assert first == {"ok": True, "sockets": 1, "queued": 0}
    assert again == {**first, "duplicate": True}
    assert ask_json(control, {**request, "key": "order-18"})["ok"] is True
    assert [ws.recv(), ws.recv()] == ["pay 10", "pay 10"]
    assert control.ask("SEND MESSAGE once sentinel") == "OK"
    assert ws.recv() == "sentinel"  # the retry delivered nothing before it


# Inbox and resume #############################################################


def test_plain_sockets_still_get_raw_text_when_the_inbox_is_on(server_factory):
    server = server_factory("--inbox", "10")
    ws = server.websocket("plain")
    server.wait_listed(1)
    assert server.control().ask("SEND MESSAGE plain just text") == "OK"
    assert ws.recv() == "just text"


def test_messages_to_an_offline_id_wait_in_its_inbox(server_factory):
    server = server_factory("--inbox", "10")
    control = server.control()
    for i in range(3):
        answer = ask_json(control, {"op": "send", "to": "later", "data": f"m{i}"})
        assert answer == {"ok": True, "sockets": 0, "queued": 1, "seq": {"later": i + 1}}
    ws = v1(server, "later")
    hello, *missed = frames(ws, 4)
    assert hello["hello"]["inbox"] is True and hello["hello"]["seq"] == 3
    assert missed == [{"seq": 1, "data": "m0"}, {"seq": 2, "data": "m1"}, {"seq": 3, "data": "m2"}]
    assert server.control().ask("SEND MESSAGE later live") == "OK"
    assert json.loads(ws.recv()) == {"seq": 4, "data": "live"}


def test_a_reconnecting_client_gets_what_it_missed_in_order_and_once(server_factory):
    server = server_factory("--inbox", "50")
    ws = v1(server, "tab")
    epoch = frames(ws, 1)[0]["hello"]["epoch"]
    control = server.control()
    for i in range(3):
        assert control.ask(f"SEND MESSAGE tab before {i}") == "OK"
    seen = frames(ws, 3)
    assert [f["seq"] for f in seen] == [1, 2, 3]
    ws.close()
    server.wait_listed(0)
    for i in range(4):
        assert (
            ask_json(control, {"op": "send", "to": "tab", "data": f"while away {i}"})["queued"] == 1
        )
    back = v1(server, "tab", f"&epoch={epoch}&last=3")
    hello, *missed = frames(back, 5)
    assert hello["hello"] == {
        "inbox": True,
        "epoch": epoch,
        "seq": 7,
        "conn": hello["hello"]["conn"],
    }
    assert wsboard.CONN_ID.fullmatch(hello["hello"]["conn"])
    assert missed == [{"seq": 4 + i, "data": f"while away {i}"} for i in range(4)]
    assert ask_json(control, {"op": "send", "to": "tab", "data": "sentinel"})["sockets"] == 1
    assert frames(back, 1) == [{"seq": 8, "data": "sentinel"}]  # nothing replayed twice


def test_a_client_is_told_of_a_gap_when_what_it_missed_was_evicted(server_factory):
    server = server_factory("--inbox", "3")
    ws = v1(server, "gappy")
    epoch = frames(ws, 1)[0]["hello"]["epoch"]
    ws.close()
    server.wait_listed(0)
    control = server.control()
    for i in range(6):
        ask_json(control, {"op": "send", "to": "gappy", "data": f"m{i}"})
    back = v1(server, "gappy", f"&epoch={epoch}&last=0")
    hello, gap, *kept = frames(back, 5)
    assert hello["hello"]["seq"] == 6
    assert gap == {"gap": {"after": 0}}
    assert [f["seq"] for f in kept] == [4, 5, 6]


def test_a_client_from_another_epoch_is_told_of_a_gap(server_factory):
    server = server_factory("--inbox", "10")
    back = v1(server, "restarted", "&epoch=deadbeef&last=41")
    hello, gap = frames(back, 2)
    assert hello["hello"]["epoch"] != "deadbeef" and gap == {"gap": {"after": 0}}


def test_the_seed_send_keeps_client_not_found_unless_the_deployment_opts_in(
    server_factory, tmp_path
):
    strict = server_factory("--inbox", "10")
    assert strict.control().ask("SEND MESSAGE offline hi") == "ERROR Client Not Found"
    assert frames(v1(strict, "offline"), 1)[0]["hello"]["seq"] == 0  # nothing was kept
    lenient = server_factory("--inbox", "10", "--offline-ok", "--control", str(tmp_path / "l.sock"))
    assert lenient.control().ask("SEND MESSAGE offline hi") == "OK"
    assert frames(v1(lenient, "offline"), 2)[1] == {"seq": 1, "data": "hi"}


def test_a_replay_larger_than_the_send_queue_closes_cleanly(server_factory):
    server = server_factory("--inbox", "100", "--inbox-bytes", "20000000", "--queue-messages", "3")
    control = server.control()
    for _ in range(100):
        ask_json(control, {"op": "send", "to": "flooded", "data": "w" * 60_000})
    ws = websocket.create_connection(
        server.ws_url("flooded"),
        timeout=10,
        subprotocols=["wsboard.v1"],
        sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)],
    )
    assert close_frame(ws) == (1013, "too slow: send queue full")
    server.wait_listed(0)
    assert "replay to flooded" in server.log() and "Traceback" not in server.log()


def test_v1_without_an_inbox_still_wraps_frames(server):
    ws = v1(server, "noinbox")
    (hello,) = frames(ws, 1)
    assert hello == {
        "hello": {"inbox": False, "epoch": None, "seq": None, "conn": hello["hello"]["conn"]}
    }
    assert server.control().ask("SEND MESSAGE noinbox hi") == "OK"
    assert json.loads(ws.recv()) == {"seq": None, "data": "hi"}


def test_the_inbox_is_bounded_by_ids(server_factory):
    server = server_factory("--inbox", "5", "--inbox-ids", "2")
    control = server.control()
    for client_id in ("first", "second", "third"):
        ask_json(control, {"op": "send", "to": client_id, "data": "hello"})
    assert frames(v1(server, "first"), 1)[0]["hello"]["seq"] == 0  # evicted, least recent
    assert frames(v1(server, "third"), 2)[1] == {"seq": 1, "data": "hello"}


# Events #######################################################################


def test_a_watcher_hears_connects_messages_and_disconnects(server):
    watcher = server.control()
    assert ask_json(watcher, {"op": "watch"}) == {"ok": True, "watching": True}
    ws = websocket.create_connection(server.ws_url("talky"), origin=server.url)
    ws.send("hello from the browser")
    ws.send_binary(b"\x00\x01")
    ws.close()
    events = [json.loads(watcher.line()) for _ in range(4)]
    assert [e["event"] for e in events] == ["connect", "message", "message", "disconnect"]
    assert events[0]["id"] == "talky" and events[0]["origin"] == server.url
    assert events[1]["data"] == "hello from the browser"
    assert base64.b64decode(events[2]["binary"]) == b"\x00\x01"
    assert events[3]["reason"] == "closed by client (1000)"
    assert ask_json(watcher, {"op": "unwatch"}) == {"ok": True, "watching": False}


def test_a_watcher_that_falls_behind_on_connects_is_dropped(server_factory):
    server = server_factory("--watch-queue", "2", "--allowed-origins", "*")
    lazy = socket.socket(socket.AF_UNIX)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(server.control_path)
    lazy.sendall(b'{"op":"watch"}\n')
    origin = "http://" + "o" * 7000  # fat connect events fill the watcher's socket quickly
    for n in range(80):
        server.websocket(f"comer{n}", origin=origin).close()
        if "dropped a watcher" in server.log():
            break
    wait_until(
        lambda: "dropped a watcher" in server.log() or None, what="the watcher to be dropped"
    )
    assert server.control().ask("PING") == "PONG"
    lazy.close()


def test_a_message_flood_cannot_push_connect_events_out(server_factory):
    server = server_factory("--watch-queue", "50", "--max-client-rate", "0")
    control = server.control()
    assert ask_json(control, {"op": "watch"}) == {"ok": True, "watching": True}
    flooder = server.websocket("flooder")
    for _n in range(3000):
        flooder.send_binary(b"xy")
    late = [server.websocket(f"late{n}") for n in range(20)]
    seen = set()
    while len(seen) < 20:
        event = json.loads(control.line())
        if event.get("event") == "connect" and event["id"].startswith("late"):
            seen.add(event["id"])
    assert len(seen) == 20 and len(late) == 20
    assert "dropped a watcher" not in server.log()


def test_a_browser_over_the_message_rate_is_closed_with_1008(server_factory):
    server = server_factory("--max-client-rate", "50")
    chatty = server.websocket("chatty")
    calm = server.websocket("calm")
    for _n in range(200):
        try:
            chatty.send("x")
        except (OSError, websocket.WebSocketException):
            break
    assert close_frame(chatty) == (1008, "too many messages")
    wait_until(lambda: "too many messages" in server.log() or None, what="the disconnect line")
    assert server.control().ask("SEND MESSAGE calm still here") == "OK"
    assert calm.recv() == "still here"


class Hook(http.server.BaseHTTPRequestHandler):
    """A webhook endpoint that fails its first request with 500, then takes them all."""

    received: list = []
    failures_left = 1

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if Hook.failures_left:
            Hook.failures_left -= 1
            self.send_response(500)
        else:
            Hook.received.append((dict(self.headers), body))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_events_reach_the_webhook_signed_and_after_a_retry(server_factory):
    Hook.received, Hook.failures_left = [], 1
    endpoint = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Hook)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    secret = "webhook-secret-0123456789"
    server = server_factory(
        "--webhook",
        f"http://127.0.0.1:{endpoint.server_address[1]}/hook",
        env={"WSBOARD_SECRET": secret},
    )
    token_query = wsboard.signed_query(secret.encode(), "hooked", 60)
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/websocket?{token_query}")
    ws.close()
    wait_until(lambda: len(Hook.received) >= 2 or None, timeout=20, what="two webhook events")
    endpoint.shutdown()
    (headers, connect), (_, disconnect) = Hook.received[:2]
    assert (
        json.loads(connect)["event"] == "connect"
        and json.loads(disconnect)["event"] == "disconnect"
    )
    expected = hmac.new(secret.encode(), connect, hashlib.sha256).hexdigest()
    assert headers["X-Wsboard-Signature"] == "sha256=" + expected
    assert "webhook attempt 1 failed" in server.log()


def test_frames_held_during_a_batch_keep_their_order_across_commands(server):
    a, b = server.websocket("a"), server.websocket("b")
    server.wait_listed(2)
    control = server.control()
    batch = [
        "SEND MESSAGE a 1",
        "BROADCAST 2",
        '{"op": "send", "to": ["a", "b"], "data": "3"}',
        "SEND MESSAGE b 4",
        "SEND MESSAGE a 5",
    ]
    control.send(("\n".join(batch) + "\n").encode())
    answers = [control.line() for _ in batch]
    assert answers[:2] == [b"OK", b"OK 2"] and answers[3:] == [b"OK", b"OK"]
    assert [a.recv() for _ in range(4)] == ["1", "2", "3", "5"]
    assert [b.recv() for _ in range(3)] == ["2", "3", "4"]


def test_a_ping_after_our_close_does_not_cut_the_close_handshake_short(server_factory):
    server = server_factory("--close-timeout", "30")  # only the reply can end it in time

    def frame(opcode: int, payload: bytes) -> bytes:  # masked with zeros, as the RFC allows
        return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload

    raw = stuck_client(server, "pinger")  # a raw client: it answers nothing by itself
    server.wait_listed(1)
    assert server.control().ask("KICK pinger") == "OK 1"
    raw.settimeout(10)
    assert raw.recv(64) == b"\x88\x08\x0f\xa0kicked"  # our close: 4000 "kicked"
    raw.sendall(frame(0x9, b"still there?"))  # a ping sent before it read our close
    raw.sendall(frame(0x8, struct.pack("!H", 4000) + b"bye"))
    started = time.monotonic()
    wait_until(lambda: "disconnect pinger" in server.log() or None, what="the close reply")
    assert time.monotonic() - started < 10
    assert "disconnect pinger" in server.log() and "kicked (4000 kicked)" in server.log()
    assert raw.recv(64) == b""  # no pong: after our close frame we send nothing more


def disconnect_reason(server, client_id):
    line = wait_until(
        lambda: next(
            (x for x in server.log().splitlines() if f"disconnect {client_id} " in x), None
        ),
        what=f"the disconnect of {client_id}",
    )
    return line.split(": ", 1)[1].split(": ", 1)[1]


@pytest.mark.parametrize("how", ["plain", "json"])
def test_a_kick_is_reported_as_a_kick_though_the_client_answers_its_close(server, how):
    ws = server.websocket("kicked1")
    server.wait_listed(1)
    if how == "plain":
        assert server.control().ask("KICK kicked1") == "OK 1"
        expected = "kicked (4000 kicked)"
    else:
        answer = ask_json(
            server.control(), {"op": "kick", "id": "kicked1", "code": 4001, "reason": "bye"}
        )
        assert answer == {"ok": True, "sockets": 1}
        expected = "kicked (4001 bye)"
    assert close_frame(ws)[0] in (4000, 4001)  # websocket-client answers the close at once
    assert disconnect_reason(server, "kicked1") == expected


def test_a_shutdown_is_reported_as_a_shutdown(server_factory):
    server = server_factory("--drain-window", "0")
    ws = server.websocket("leaving")
    server.wait_listed(1)
    server.proc.send_signal(signal.SIGTERM)
    assert close_frame(ws) == (1001, "server shutting down; reconnect")
    assert server.stop() == 0
    assert disconnect_reason(server, "leaving") == "server shutdown"


def test_a_client_close_is_reported_as_the_clients(server):
    ws = server.websocket("quitter")
    server.wait_listed(1)
    ws.close(status=4321)
    assert disconnect_reason(server, "quitter") == "closed by client (4321)"
