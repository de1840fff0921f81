"""The connect hook (--connect-url): the app decides who connects from the browser's own
cookies. Here the app is a real HTTP server in this process, answering as each test says."""

import http.server
import json
import threading
import time

import pytest
import websocket
from conftest import ask_json, free_port
from test_events import Stream


class App:
    """An HTTP server whose answer to each POST is set by the test; it keeps what it got."""

    def __init__(self) -> None:
        self.status, self.answer, self.delay = 200, {}, 0.0
        self.requests: list = []
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                app.requests.append({"body": json.loads(body), "headers": dict(self.headers)})
                time.sleep(app.delay)
                data = app.answer if isinstance(app.answer, bytes) else json.dumps(app.answer)
                data = data.encode() if isinstance(data, str) else data
                self.send_response(app.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def app():
    made = App()
    yield made
    made.stop()


@pytest.fixture
def hooked(server_factory, app):
    return server_factory(
        "--connect-url", app.url, "--connect-headers", "X-Trace", "--connect-timeout", "1"
    )


def connect(server, query="", **kwargs):
    return websocket.create_connection(
        f"ws://127.0.0.1:{server.port}/websocket{query}", timeout=10, **kwargs
    )


def refused(server, query="", **kwargs):
    with pytest.raises(websocket.WebSocketBadStatusException) as failure:
        connect(server, query, **kwargs)
    return failure.value.status_code, failure.value.resp_body.decode().strip()


def test_the_app_names_the_id_from_the_cookie_and_the_url_needs_none(hooked, app):
    app.answer = {"id": "user-42", "channels": ["private-user-42"], "meta": {"name": "Ann"}}
    ws = connect(hooked, "?channel=news", cookie="PHPSESSID=abc123", header=["X-Trace: t-1"])
    (request,) = app.requests
    assert request["body"] == {
        "id": None,
        "channels": ["news"],
        "peer": request["body"]["peer"],
        "origin": f"http://127.0.0.1:{hooked.port}",  # websocket-client sends one
        "path": "/websocket",
    }
    assert request["headers"]["Cookie"] == "PHPSESSID=abc123"
    assert request["headers"]["X-Trace"] == "t-1"
    control = hooked.control()
    assert control.ask("SEND MESSAGE user-42 for ann") == "OK"
    assert ws.recv() == "for ann"
    assert control.ask("PUBLISH private-user-42 private") == "OK 1"  # the app granted it
    assert ws.recv() == "private"
    assert control.ask("PUBLISH news public") == "OK 1"  # the URL's public channel too
    assert ws.recv() == "public"
    (row,) = ask_json(control, {"op": "list"})["clients"]
    assert row["id"] == "user-42" and row["meta"] == {"name": "Ann"}


def test_the_event_stream_asks_the_app_too(hooked, app):
    app.answer = {"id": "streamed"}
    stream = Stream(hooked.port, "channel=news", {"Cookie": "s=1"})
    assert stream.status == 200
    assert app.requests[0]["body"]["path"] == "/events"
    assert hooked.control().ask("SEND MESSAGE streamed hi") == "OK"
    assert stream.event()["event"] == "hello"
    assert stream.event() == {"data": "hi"}


def test_the_app_refusing_is_a_403_with_its_reason(hooked, app):
    app.status, app.answer = 401, {"reason": "not logged in"}
    assert refused(hooked) == (403, "Refused by the app: not logged in")
    app.status, app.answer = 403, b"banned\x00 user"
    assert refused(hooked) == (403, "Refused by the app: banned user")
    assert hooked.control().list() == []


def test_a_private_channel_the_app_did_not_grant_is_refused(hooked, app):
    app.answer = {"id": "user-1", "channels": ["private-user-1"]}
    assert refused(hooked, "?channel=private-user-2") == (
        403,
        "Channel 'private-user-2' not granted by the app",
    )


@pytest.mark.parametrize(
    "status, answer, reason",
    [
        (500, {"id": "x"}, "Connect hook failed (status 500)"),
        (200, b"not json", "Connect hook failed: its answer's not a JSON object"),
        (200, {"id": "bad id"}, 'Connect hook failed: its answer\'s "id" is not a client id'),
        (200, {"id": "x", "channels": "news"}, 'its answer\'s "channels" is not a list'),
        (200, {"id": "x", "channels": ["bad name"]}, "invalid channel name"),
        (200, {"id": "x", "meta": "no"}, '"meta" is not a JSON object'),
        (200, {"id": "x", "meta": {"k": "v" * 2000}}, '"meta" is not a JSON object'),
        (200, {"id": "x", "exp": "soon"}, '"exp" is not a Unix time'),
        (200, {"id": "x", "exp": True}, '"exp" is not a Unix time'),
    ],
)
def test_a_hook_that_answers_wrong_is_a_503_never_a_socket(hooked, app, status, answer, reason):
    app.status, app.answer = status, answer
    code, body = refused(hooked)
    assert code == 503 and reason in body, body
    assert hooked.control().list() == []


def test_a_slow_or_absent_hook_is_a_503_within_its_timeout_and_counted(
    server_factory, app, tmp_path
):
    app.delay, app.answer = 3, {"id": "late"}
    server = server_factory("--connect-url", app.url, "--connect-timeout", "0.5")
    started = time.monotonic()
    code, body = refused(server)
    assert code == 503 and body.startswith("Connect hook failed: no answer in 0.5 s")
    assert time.monotonic() - started < 2.5
    absent = f"http://127.0.0.1:{free_port()}/hook"
    nothing = server_factory("--connect-url", absent, "--control", str(tmp_path / "other.sock"))
    code, body = refused(nothing)
    assert code == 503 and body.startswith("Connect hook failed:")
    refusals = ask_json(nothing.control(), {"op": "stats"})["refused"]
    assert refusals["hook_error"] == 1
