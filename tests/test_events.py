"""The event-stream transport (/events), on the real server: the same sockets as /websocket's
as text/event-stream responses, refused by the same checks, resumed from Last-Event-ID."""

import json
import signal
import socket

import pytest
import websocket
from conftest import ask_json, wait_until

import wsboard_client


class Stream:
    """A client of /events over a raw socket: the head, then one event at a time."""

    def __init__(
        self,
        port: int,
        query: str,
        headers: dict | None = None,
        timeout: float = 10,
        source: str = "",
    ):
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(
            f"GET /events?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n".encode()
        )
        self.buffer = b""
        head = self._until(b"\r\n\r\n").decode("latin-1")
        rest = self.buffer
        self.status = int(head.split(" ", 2)[1])
        self.headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
        }
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            self.chunked, self.buffer = True, b""
            self._take(rest)
        self.body = b""
        if self.status != 200:  # a refusal: its reason, whole
            while len(self.buffer) < int(self.headers.get("content-length", 0)):
                self.buffer += self.sock.recv(65536)
            self.body = self.buffer

    def _until(self, mark: bytes) -> bytes:
        while mark not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"stream ended; unread: {self.buffer!r}")
            self._take(chunk)
        head, self.buffer = self.buffer.split(mark, 1)
        return head

    chunked = False  # a proxy passes the stream on in chunks (HTTP/1.1, no length)
    raw = b""

    def _take(self, data: bytes) -> None:
        if not self.chunked:
            self.buffer += data
            return
        self.raw += data
        while b"\r\n" in self.raw:
            size_line, rest = self.raw.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                return
            self.buffer += rest[:size]
            self.raw = rest[size + 2 :]

    def event(self, comments: bool = False) -> dict:
        """The next event: {"event", "data", "id", "retry"} as the fields came (data lines
        joined by newlines); comment-only blocks are skipped unless comments."""
        while True:
            block = self._until(b"\n\n").decode()
            fields: dict = {}
            for line in block.split("\n"):
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    fields["data"] = fields["data"] + "\n" + value if "data" in fields else value
                elif name:
                    fields[name] = value
                elif comments:
                    fields.setdefault("comments", []).append(value)
            if fields:
                return fields

    def at_end(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def hello(stream: Stream) -> dict:
    first = stream.event()
    assert first["event"] == "hello", first
    return json.loads(first["data"])


def test_a_stream_is_a_socket_of_its_id_that_sends_lists_publishes_and_kicks_reach(server):
    stream = Stream(server.port, "id=sam&channel=news")
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert hello(stream)["conn"]
    control = server.control()
    (row,) = server.wait_listed(1)
    assert row.startswith("sam 127.0.0.1:")
    assert control.ask("SEND MESSAGE sam hello  there") == "OK"
    assert stream.event() == {"data": "hello  there"}
    assert ask_json(control, {"op": "send", "to": "sam", "data": "one\ntwo\r\nthree\rfour"})["ok"]
    assert stream.event() == {"data": "one\ntwo\nthree\nfour"}  # as EventSource puts it back
    assert control.ask("PUBLISH news extra") == "OK 1"
    assert stream.event() == {"data": "extra"}
    assert control.ask("BROADCAST everyone") == "OK 1"
    assert stream.event() == {"data": "everyone"}
    assert control.ask("KICK sam") == "OK 1"
    end = stream.event()
    assert end["event"] == "close" and json.loads(end["data"]) == {"code": 4000, "reason": "kicked"}
    assert stream.at_end()
    server.wait_listed(0)


def test_a_stream_is_refused_by_the_same_checks_as_a_websocket(server_factory):
    secret = "a-long-enough-secret-for-tests"
    server = server_factory("--secret", secret, "--max-sockets-per-id", "1")
    for query in ("id=bad%20id", "id=u", "id=u&exp=1&token=00", "id=u&channel=bad%20name"):
        stream = Stream(server.port, query)
        sock = websocket.WebSocket()
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            sock.connect(f"ws://127.0.0.1:{server.port}/websocket?{query}")
        assert stream.status == refused.value.status_code
        assert stream.body.decode().strip().endswith(refused.value.resp_body.decode().strip())
    query = wsboard_client.signed_query(secret.encode(), "u", 60)
    first = Stream(server.port, query)
    assert first.status == 200
    second = Stream(server.port, query)  # past --max-sockets-per-id, as a WebSocket would be
    assert second.status == 503 and b"Too many sockets for this id" in second.body


def test_a_stream_resumes_its_inbox_and_channels_from_last_event_id(server_factory):
    server = server_factory("--inbox", "50", "--history", "50")
    stream = Stream(server.port, "id=ann&channel=news")
    hello(stream)
    stream.event()  # the id-only event: where it is now (0, 0)
    control = server.control()
    control.ask("SEND MESSAGE ann first")
    control.ask("PUBLISH news headline")
    assert stream.event()["data"] == "first"
    last = stream.event()
    assert last["data"] == "headline"
    stream.close()
    server.wait_listed(0)
    assert ask_json(control, {"op": "send", "to": "ann", "data": "missed"})["queued"] == 1
    control.ask("PUBLISH news while-away")
    back = Stream(server.port, "id=ann&channel=news", {"Last-Event-ID": last["id"]})
    resumed = hello(back)
    assert resumed["seq"] == 2 and resumed["channels"]["news"]["offset"] == 2
    assert back.event()["data"] == "missed"
    assert back.event()["data"] == "while-away"
    now = back.event()
    assert set(now) == {"id"}  # no data: it moves lastEventId only
    epoch = resumed["epoch"]
    assert now["id"] == f"{epoch}:2|news:{resumed['channels']['news']['epoch']}:2"


def test_a_stream_is_told_of_a_gap_and_a_bad_last_event_id_is_a_400(server_factory):
    server = server_factory("--inbox", "50", "--history", "2")
    control = server.control()
    epoch = control.ask("POSITION news").split()[1]
    for n in range(5):
        control.ask(f"PUBLISH news p{n}")
    stream = Stream(server.port, "id=late&channel=news", {"Last-Event-ID": f"|news:{epoch}:1"})
    hello(stream)
    assert stream.event() == {"event": "gap", "data": '{"channel":"news","after":1}'}
    assert [stream.event()["data"] for _ in range(2)] == ["p3", "p4"]
    for bad in ("zz", "ab:1|news", "ab:1|news:zz:1", "ab:x"):
        refused = Stream(server.port, "id=late", {"Last-Event-ID": bad})
        assert refused.status == 400 and b"Invalid Last-Event-ID" in refused.body


def test_a_stream_gets_comment_pings_and_is_not_dropped_for_answering_none(server_factory):
    server = server_factory("--ping-interval", "0.3", "--ping-timeout", "0.5")
    stream = Stream(server.port, "id=quiet")
    hello(stream)
    pings = 0
    while pings < 4:  # past the ping timeout several times over
        assert stream.event(comments=True) == {"comments": ["ping"]}
        pings += 1
    assert server.control().ask("SEND MESSAGE quiet still here") == "OK"
    assert stream.event() == {"data": "still here"}


def test_a_shutdown_ends_streams_with_a_spread_retry(server_factory):
    server = server_factory("--drain-window", "2")
    stream = Stream(server.port, "id=leaving")
    hello(stream)
    server.wait_listed(1)
    server.proc.send_signal(signal.SIGTERM)
    end = stream.event()
    assert end["event"] == "close" and json.loads(end["data"])["code"] == 1001
    assert 1000 <= int(end["retry"]) <= 3000
    assert server.proc.wait(timeout=15) == 0


def test_a_stream_is_told_presence(server):
    stream = Stream(server.port, "id=u1&channel=presence-room")
    hello(stream)
    members = stream.event()
    assert members["event"] == "presence"
    assert json.loads(members["data"]) == {
        "channel": "presence-room",
        "members": [{"id": "u1", "meta": None}],
    }
    other = websocket.create_connection(server.ws_url("u2") + "&channel=presence-room")
    joined = json.loads(stream.event()["data"])
    assert joined == {"channel": "presence-room", "join": {"id": "u2", "meta": None}}
    other.close()


def test_watchers_see_a_stream_come_and_go(server):
    control = server.control()
    assert ask_json(control, {"op": "watch"})["watching"]
    stream = Stream(server.port, "id=seen")
    hello(stream)
    connect = json.loads(control.line())
    assert connect["event"] == "connect" and connect["id"] == "seen"
    stream.close()
    disconnect = json.loads(control.line())
    assert disconnect["event"] == "disconnect" and disconnect["id"] == "seen"
    wait_until(lambda: server.control().list() == [], what="the stream to go")


@pytest.mark.slow  # waits out the write timeout
def test_a_stream_that_cannot_be_written_for_the_write_timeout_ends(server_factory):
    server = server_factory("--write-timeout", "1", "--queue-bytes", "100000000")
    control = server.control()
    assert ask_json(control, {"op": "watch"})["watching"]
    stream = Stream(server.port, "id=stuck")
    stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert json.loads(control.line())["event"] == "connect"
    sender = server.control()
    for _ in range(200):  # 20 MB, far more than any kernel buffers: the rest times out
        assert sender.ask("SEND MESSAGE stuck " + "x" * 100_000) == "OK"
    disconnect = json.loads(control.line())
    assert disconnect["event"] == "disconnect" and disconnect["reason"] == "write timed out"
    stream.close()
