"""The rest of the Pusher surface: webhooks in Pusher's format (checked by the PyPI and npm
SDKs' own validators), user sign-in with events to one user, and subscription counts, in one
process and over a real redis-server with two."""

import http.server
import json
import os
import queue
import signal
import subprocess
import threading
import time

import pusher as pusher_sdk
import pytest
import test_pusher
import websocket
from conftest import ROOT, RedisServer, new_prefix, wait_until
from test_operations import scrape
from test_pusher import (
    APP_ID,
    KEY,
    PUSHER,
    SECRET,
    assert_refused_for_good,
    raw_pusher,
    sdk,
    wsboard_json,
)

import wsboard

clients, npm_packages = test_pusher.clients, test_pusher.npm_packages  # fixtures
app_server = test_pusher.app_server
CHECKER = os.path.join(ROOT, "tests", "pusher", "webhook_check.js")
SERVER_SDK = os.path.join(ROOT, "tests", "pusher", "server_sdk.js")
PYPI = pusher_sdk.Pusher(APP_ID, KEY, SECRET)


# What the webhooks post, checked without a server.


def test_a_webhook_post_is_what_both_sdks_validators_accept():
    events = [{"name": "channel_occupied", "channel": "news"}]
    body, headers = wsboard.pusher_webhook_request(KEY, SECRET, events, time.time())
    assert headers["Content-Type"] == "application/json" and headers["X-Pusher-Key"] == KEY
    told = PYPI.validate_webhook(KEY, headers["X-Pusher-Signature"], body.decode())
    assert told is not None and told["events"] == events
    assert abs(told["time_ms"] / 1000 - time.time()) < 5
    assert PYPI.validate_webhook(KEY, "0" * 64, body.decode()) is None
    checker = NpmChecker()
    try:
        assert checker.check(headers, body)["events"] == events
        assert checker.check({**headers, "X-Pusher-Signature": "0" * 64}, body)["valid"] is False
    finally:
        checker.close()


@pytest.mark.parametrize(
    "kind, fields, expected",
    [
        ("join", {"channel": "presence-a", "id": "7", "meta": None},
         {"name": "member_added", "channel": "presence-a", "user_id": "7"}),
        ("leave", {"channel": "presence-a", "id": "7"},
         {"name": "member_removed", "channel": "presence-a", "user_id": "7"}),
        ("occupied", {"channel": "news"}, {"name": "channel_occupied", "channel": "news"}),
        ("vacated", {"channel": "news"}, {"name": "channel_vacated", "channel": "news"}),
        ("cache_miss", {"channel": "cache-a"}, {"name": "cache_miss", "channel": "cache-a"}),
        ("subscription_count", {"channel": "news", "count": 3},
         {"name": "subscription_count", "channel": "news", "subscription_count": 3}),
        ("client_event",
         {"channel": "private-a", "event": "client-x", "data": "{}", "socket_id": "1.2"},
         {"name": "client_event", "channel": "private-a", "event": "client-x", "data": "{}",
          "socket_id": "1.2"}),
        ("client_event",
         {"channel": "presence-a", "event": "client-x", "data": "{}", "socket_id": "1.2",
          "user_id": "7"},
         {"name": "client_event", "channel": "presence-a", "event": "client-x", "data": "{}",
          "socket_id": "1.2", "user_id": "7"}),
        ("occupied", {"channel": "#server-to-user-7"}, None),  # a user's: no channel of the app
        ("message", {"id": "7", "data": "hi"}, None),
        ("connect", {"id": "7"}, None),
    ],
)  # fmt: skip
def test_events_are_named_as_pushers_webhooks_name_them(kind, fields, expected):
    assert wsboard.pusher_webhook_event(kind, fields) == expected


def test_a_channel_is_told_occupied_counted_and_vacated_as_its_counts_change():
    notices = wsboard.count_notices
    assert notices("news", False, True, 0, 1, True) == [
        ("occupied", {"channel": "news"}),
        ("subscription_count", {"channel": "news", "count": 1}),
    ]
    assert notices("news", True, True, 1, 3, True) == [
        ("subscription_count", {"channel": "news", "count": 3})
    ]
    assert notices("news", True, True, 2, 2, True) == []
    assert notices("news", True, False, 1, 0, True) == [("vacated", {"channel": "news"})]
    assert notices("news", False, True, 0, 1, False) == [("occupied", {"channel": "news"})]
    # a presence channel counts users, not subscriptions; held in the grace with no socket
    assert notices("presence-a", False, True, 0, 1, True) == [
        ("occupied", {"channel": "presence-a"})
    ]
    assert notices("presence-a", True, True, 1, 0, True) == []


def test_the_webhook_options_are_checked():
    with pytest.raises(wsboard.ConfigError, match="need the Pusher protocol"):
        wsboard.load_config(["--pusher-webhook", "http://127.0.0.1/hook"], {})
    with pytest.raises(wsboard.ConfigError, match="http:// or https://"):
        wsboard.load_config([*PUSHER, "--pusher-webhook", "ftp://x/"], {})
    with pytest.raises(wsboard.ConfigError, match="not one of"):
        wsboard.load_config([*PUSHER, "--pusher-webhook-events", "member_added,nope"], {})
    cfg = wsboard.load_config(
        [*PUSHER, "--pusher-webhook", "http://a/1", "--pusher-webhook", "https://b/2"], {}
    )
    assert cfg.pusher_webhook == ("http://a/1", "https://b/2")
    assert cfg.pusher_webhook_events == frozenset(wsboard.PUSHER_WEBHOOK_EVENTS)
    cfg = wsboard.load_config(
        PUSHER,
        {"WSBOARD_PUSHER_WEBHOOK": "http://a/1 http://b/2", "WSBOARD_PUSHER_WEBHOOK_EVENTS":
         "member_added, member_removed"},
    )  # fmt: skip
    assert cfg.pusher_webhook == ("http://a/1", "http://b/2")
    assert cfg.pusher_webhook_events == {"member_added", "member_removed"}


# Sign-in, checked without a server: the auth is what the PyPI SDK's authenticate_user makes.


def signin_data(socket_id: str, user: dict) -> dict:
    return PYPI.authenticate_user(socket_id, user)


def test_a_signin_signed_by_the_sdk_names_its_user():
    data = signin_data("1.2", {"id": "ann", "user_info": {"name": "Ann"}})
    assert wsboard.pusher_signed_user(KEY, SECRET, "1.2", data) == "ann"
    numeric = signin_data("1.2", {"id": "ann"}) | {"user_data": '{"id":42}'}
    numeric["auth"] = wsboard.pusher_user_auth(KEY, SECRET, "1.2", '{"id":42}')
    assert wsboard.pusher_signed_user(KEY, SECRET, "1.2", numeric) == "42"


@pytest.mark.parametrize(
    "data, reason",
    [
        ("just a string", "needs"),
        ({"auth": "x"}, "user_data must be a JSON string"),
        ({"user_data": '{"id":"ann"}'}, "Auth required"),
        ({"user_data": '{"id":"ann"}', "auth": f"{KEY}:{'0' * 64}"}, "Invalid signature"),
        ({"user_data": "x" * 20000, "auth": "x"}, "larger than"),
        ("signed:not json", "JSON"),
        ("signed:[1]", "JSON object"),
        ('signed:{"name":"ann"}', "id must be"),
        ('signed:{"id":"a b"}', "id must be"),
        ('signed:{"id":""}', "id must be"),
    ],
)
def test_a_signin_that_names_nobody_is_refused_with_its_reason(data, reason):
    if isinstance(data, str) and data.startswith("signed:"):
        user_data = data[len("signed:") :]
        data = {
            "user_data": user_data,
            "auth": wsboard.pusher_user_auth(KEY, SECRET, "1.2", user_data),
        }
    with pytest.raises(wsboard.BadRequest, match=reason):
        wsboard.pusher_signed_user(KEY, SECRET, "1.2", data)


def test_a_signin_for_another_socket_is_refused():
    data = signin_data("1.3", {"id": "ann"})
    with pytest.raises(wsboard.BadRequest, match="Invalid signature"):
        wsboard.pusher_signed_user(KEY, SECRET, "1.2", data)


def test_user_channels_may_be_published_to_but_are_no_channel_names():
    assert wsboard.is_user_channel("#server-to-user-ann") and wsboard.is_publish_channel(
        "#server-to-user-ann"
    )
    assert not wsboard.is_valid_channel("#server-to-user-ann")
    assert not wsboard.is_user_channel("#server-to-user-") and not wsboard.is_user_channel(
        "#server-to-user-a b"
    )
    assert not wsboard.is_publish_channel("#other")


# A real webhook endpoint: an HTTP server on loopback that records every POST.


class Receiver:
    """Records each POST (headers, raw body); answers 500 to the first `failing` and
    waits `delay` seconds before answering each (an endpoint that hangs)."""

    def __init__(self, failing: int = 0, delay: float = 0.0) -> None:
        self.posts: queue.Queue = queue.Queue()
        self.failing, self.delay, self.tries = failing, delay, 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.tries += 1
                if receiver.delay:
                    time.sleep(receiver.delay)
                if receiver.tries <= receiver.failing:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.posts.put(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/pusher/webhook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.events: list = []
        self.bodies: list = []

    def collect(self, timeout: float = 0.0) -> list:
        """Every event posted so far (and within timeout), each POST validated by the PyPI
        SDK on the way."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                headers, body = self.posts.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return self.events
            told = PYPI.validate_webhook(
                headers["x-pusher-key"], headers["x-pusher-signature"], body.decode()
            )
            assert told is not None, body  # signed, and its time_ms is now
            self.bodies.append((headers, body))
            self.events += told["events"]

    def wait_for(self, timeout: float = 10, **match) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if all(event.get(k) == v for k, v in match.items()):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no {match} within {timeout}s; got {self.events}")
            self.collect(0.1)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class NpmChecker:
    """The npm pusher SDK's webhook(...).isValid() in Node."""

    def __init__(self) -> None:
        config = json.dumps({"appId": APP_ID, "key": KEY, "secret": SECRET})
        self.proc = subprocess.Popen(
            ["node", CHECKER, config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=os.path.dirname(CHECKER),
            text=True,
        )

    def check(self, headers: dict, body: bytes) -> dict:
        lowered = {k.lower(): v for k, v in headers.items()}
        self.proc.stdin.write(json.dumps({"headers": lowered, "body": body.decode()}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(5)
        self.proc.stdout.close()


@pytest.fixture
def receiver():
    made = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for one in made:
        one.close()


def names_of(events: list, channel: str) -> list:
    return [e["name"] for e in events if e.get("channel") == channel]


def test_webhooks_tell_channels_members_whispers_and_cache_misses_in_order(
    server_factory, clients, receiver
):
    hook = receiver()
    server = server_factory(
        *PUSHER, "--pusher-webhook", hook.url, "--pusher-client-events", "yes",
        "--presence-grace", "0",
    )  # fmt: skip
    ann = clients(server, echo=True, user={"user_id": "ann", "user_info": {"name": "Ann"}})
    ann_tab = clients(server, user={"user_id": "ann"})
    bob = clients(server, echo=True, user={"user_id": "bob"})
    for client in (ann, ann_tab):
        client.connected()
    bob_id = bob.connected()
    ann.do("listenForWhisper", kind="join", channel="room", event="typing")
    ann.expect(type="echo", channel="room", what="here")
    hook.wait_for(name="member_added", user_id="ann")
    ann_tab.subscribe("presence-room")  # ann's second tab: no second member_added
    bob.do("listen", kind="join", channel="room", event="Ignored")
    bob.expect(type="echo", channel="room", what="here")
    hook.wait_for(name="member_added", user_id="bob")
    bob.do("whisper", kind="join", channel="room", event="typing", data={"now": True})
    ann.expect(type="echo", channel="room", what="whisper")
    whisper = hook.wait_for(name="client_event")
    assert whisper == {
        "name": "client_event", "channel": "presence-room", "event": "client-typing",
        "data": '{"now":true}', "socket_id": bob_id, "user_id": "bob",
    }  # fmt: skip
    ann_tab.do("subscribe", channel="cache-weather")
    ann_tab.expect(type="event", channel="cache-weather", event="pusher:cache_miss")
    hook.wait_for(name="cache_miss", channel="cache-weather")
    bob.do("leave", channel="room")
    hook.wait_for(name="member_removed", user_id="bob")
    ann.do("leave", channel="room")
    ann_tab.close()  # ann's last socket in the room goes: she leaves, the room is empty
    hook.wait_for(name="channel_vacated", channel="presence-room")
    hook.wait_for(name="channel_vacated", channel="cache-weather")
    events = hook.events
    assert names_of(events, "presence-room") == [
        "channel_occupied", "member_added", "member_added", "client_event", "member_removed",
        "member_removed", "channel_vacated",
    ]  # fmt: skip
    assert [e["user_id"] for e in events if e["name"] == "member_added"] == ["ann", "bob"]
    assert [e["user_id"] for e in events if e["name"] == "member_removed"] == ["bob", "ann"]
    assert names_of(events, "cache-weather") == [
        "channel_occupied",
        "cache_miss",
        "channel_vacated",
    ]
    assert len(hook.bodies) < len(events)  # what came within a quarter second shared a POST
    checker = NpmChecker()  # and the npm SDK's validator accepts every POST as it came
    try:
        for headers, body in hook.bodies:
            assert checker.check(headers, body)["valid"] is True
    finally:
        checker.close()
    stats = wsboard_json(server.control(), {"op": "stats"})
    assert stats["pusher_webhooks"][0]["delivered"] == len(events)
    assert stats["pusher_webhooks"][0]["dropped"] == 0


def test_only_the_events_asked_for_are_posted_to_every_webhook(server_factory, clients, receiver):
    first, second = receiver(), receiver()
    server = server_factory(
        *PUSHER, "--pusher-webhook", first.url, "--pusher-webhook", second.url,
        "--pusher-webhook-events", "member_added,member_removed", "--presence-grace", "0",
    )  # fmt: skip
    ann = clients(server, user={"user_id": "ann"})
    ann.connected()
    ann.subscribe("news")
    ann.subscribe("presence-room")
    ann.do("unsubscribe", channel="presence-room")
    for hook in (first, second):
        hook.wait_for(name="member_removed", user_id="ann")
        hook.collect(1.0)  # anything else would have come by now
        assert [e["name"] for e in hook.events] == ["member_added", "member_removed"]


def test_a_failing_endpoint_gets_the_events_again_with_backoff(server_factory, clients, receiver):
    hook = receiver(failing=2)
    server = server_factory(*PUSHER, "--pusher-webhook", hook.url)
    client = clients(server)
    client.connected()
    client.subscribe("news")
    started = time.monotonic()
    assert hook.wait_for(name="channel_occupied", timeout=15)["channel"] == "news"
    assert hook.tries == 3 and time.monotonic() - started >= 1.4  # waited 0.5 s, then 1 s
    stats = wsboard_json(server.control(), {"op": "stats"})["pusher_webhooks"][0]
    assert stats["posts"] == 3 and stats["delivered"] == 1 and stats["failed"] == 0


def test_a_hanging_endpoint_and_a_flood_cost_a_counted_drop_and_slow_nothing(
    server_factory, receiver
):
    """Thousands of presence changes a second towards an endpoint that takes 3 s a POST:
    the queue stays at its bound, the drops are counted everywhere, and a message sent
    meanwhile arrives at once."""
    hook = receiver(delay=3)
    server = server_factory(
        *PUSHER, "--pusher-webhook", hook.url, "--webhook-queue", "100", "--presence-grace", "0"
    )
    watcher = server.websocket("reader")
    control = server.control()
    flood = b"".join(b"JOIN presence-big reader\nLEAVE presence-big reader\n" for _ in range(1500))
    started = time.monotonic()
    control.send(flood)
    for _ in range(3000):
        assert control.line().startswith(b"OK")
    flooded = time.monotonic() - started
    before = time.monotonic()
    assert control.ask("SEND MESSAGE reader still fast") == "OK"
    assert watcher.recv() == "still fast"
    assert time.monotonic() - before < 2  # a send held behind a POST would take 3 s at least
    assert flooded < 10  # 3,000 control lines, each a webhook event, none waiting for it
    stats = wsboard_json(control, {"op": "stats"})
    dropped = stats["pusher_webhooks"][0]["dropped"]
    assert dropped > 2000 and stats["pusher_webhooks"][0]["waiting"] <= 100
    wait_until(lambda: "not keeping up" in server.log(), what="the drop logged")
    assert server.log().count("not keeping up") == 1  # once per burst, not per event
    state = json.loads(admin_state(server))
    assert state["stats"]["webhook_dropped"] >= dropped
    samples = scrape(server.url + "/metrics")
    told = samples[("wsboard_pusher_webhook_events_total", (("result", "dropped"),))]
    assert told >= dropped
    assert samples[("wsboard_queue_overflows_total", (("queue", "pusher_webhook"),))] == told
    control.close()
    watcher.close()


def admin_state(server) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/admin/state.json", timeout=10) as answer:
        return answer.read().decode()


# User sign-in: pusher.signin() with the SDK's authenticateUser, events to one user.


def npm_send_to_user(server, user_id: str, event: str, data: object) -> int:
    config = {"appId": APP_ID, "key": KEY, "secret": SECRET, "port": server.port}
    config["sendToUser"] = [user_id, event, data]
    result = subprocess.run(
        ["node", SERVER_SDK, json.dumps(config)],
        cwd=os.path.dirname(SERVER_SDK),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["status"]


def signed_in(client) -> dict:
    client.do("signin")
    success = client.expect(type="raw", event="pusher:signin_success")
    return json.loads(success["data"]["user_data"])


def test_pusher_js_signs_in_and_gets_what_both_sdks_send_to_its_user(app_server, clients):
    ann = clients(app_server, signinAs={"id": "ann", "user_info": {"name": "Ann"}})
    ann_tab = clients(app_server, signinAs={"id": "ann"})
    bob = clients(app_server, signinAs={"id": "bob"})
    ann_id, tab_id, _ = ann.connected(), ann_tab.connected(), bob.connected()
    assert signed_in(ann) == {"id": "ann", "user_info": {"name": "Ann"}}
    signed_in(ann_tab)
    signed_in(bob)
    # pusher-js subscribes to its user's channel itself; the server answers it
    ann.expect(type="raw", event="pusher_internal:subscription_succeeded")
    sdk(app_server).send_to_user("ann", "note", {"text": "from python"})
    for tab in (ann, ann_tab):
        assert tab.expect(type="user", event="note")["data"] == {"text": "from python"}
    assert npm_send_to_user(app_server, "ann", "note", {"text": "from node"}) == 200
    assert ann.expect(type="user", event="note")["data"] == {"text": "from node"}
    bob.never(type="user", event="note")
    assert sdk(app_server).channels_info() == {"channels": {}}  # users' channels are not listed
    control = app_server.control()
    rows = {c["conn"]: c for c in wsboard_json(control, {"op": "list"})["clients"]}
    assert rows[ann_id]["user"] == "ann" and rows[tab_id]["user"] == "ann"
    assert json.loads(admin_state(app_server))["clients"]["rows"][0]["user"] in ("ann", "bob")
    sdk(app_server).terminate_user_connections("ann")  # every socket signed in as ann
    assert_refused_for_good(ann, 4009)
    assert_refused_for_good(ann_tab, 4009)
    rows = wsboard_json(control, {"op": "list"})["clients"]
    assert [c.get("user") for c in rows] == ["bob"]
    control.close()


def test_a_mis_signed_signin_gets_an_error_and_binds_nobody(app_server, clients):
    mallory = clients(app_server, signinAs={"id": "ann"}, badAuth=True)
    mallory.connected()
    mallory.do("signin")
    error = mallory.expect(type="raw", event="pusher:error")["data"]
    assert error["code"] == 4009 and "Invalid signature" in error["message"]
    sdk(app_server).send_to_user("ann", "note", "secret")
    mallory.never(type="user", event="note")
    mallory.never(seconds=0.1, type="raw", event="note")
    control = app_server.control()
    assert "user" not in wsboard_json(control, {"op": "list"})["clients"][0]
    control.close()


def raw_signin(ws, user_data: str, socket_id: str | None = None) -> dict:
    auth = wsboard.pusher_user_auth(KEY, SECRET, socket_id or ws.socket_id, user_data)
    ws.send(json.dumps({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}))
    return json.loads(ws.recv())


def test_no_socket_joins_a_users_channel_but_those_signed_in_as_that_user(app_server):
    ws = raw_pusher(app_server)
    subscribe = {"event": "pusher:subscribe", "data": {"channel": "#server-to-user-ann"}}
    ws.send(json.dumps(subscribe))
    refused = json.loads(ws.recv())
    assert refused["event"] == "pusher:subscription_error" and refused["data"]["status"] == 403
    for user_data, reason in (
        ("not json", "JSON"),
        ('{"name":"ann"}', "id must be"),
        ('{"id":"ann","pad":"' + "x" * 11000 + '"}', "larger than"),
    ):
        error = raw_signin(ws, user_data)
        assert error["event"] == "pusher:error" and reason in error["data"]["message"]
    assert raw_signin(ws, '{"id":"ann"}', socket_id="9.9")["event"] == "pusher:error"
    success = raw_signin(ws, '{"id":"ann"}')
    assert success == {
        "event": "pusher:signin_success",
        "data": json.dumps({"user_data": '{"id":"ann"}'}),
    }
    ws.send(json.dumps(subscribe))
    assert json.loads(ws.recv())["event"] == "pusher_internal:subscription_succeeded"
    error = raw_signin(ws, '{"id":"bob"}')
    assert error["event"] == "pusher:error" and "already" in error["data"]["message"]
    control = app_server.control()
    assert control.ask("PUBLISH #server-to-user-ann from the control socket") == "OK 1"
    told = json.loads(ws.recv())
    assert told == {
        "event": "message",
        "channel": "#server-to-user-ann",
        "data": "from the control socket",
    }
    assert control.ask("JOIN #server-to-user-ann someone").startswith("ERROR")
    control.close()
    ws.close()


# Subscription counts.


def test_sockets_are_told_their_channels_subscription_count_as_it_changes(
    server_factory, clients, receiver
):
    hook = receiver()
    server = server_factory(
        *PUSHER, "--pusher-subscription-count", "yes", "--pusher-webhook", hook.url,
        "--presence-grace", "0",
    )  # fmt: skip
    one, two = clients(server), clients(server, user={"user_id": "two"})
    one.connected()
    two.connected()
    one.subscribe("news")
    assert counted(one, "news") == 1
    two.subscribe("news")
    assert counted(one, "news") == 2 and counted(two, "news") == 2
    native = websocket.create_connection(server.ws_url("native") + "&channel=news", timeout=10)
    assert counted(one, "news") == 3  # every socket in the channel counts, Pusher's or not
    native.close()
    assert counted(one, "news") == 2
    two.do("unsubscribe", channel="news")
    assert counted(one, "news") == 1
    info = sdk(server).channel_info("news", ["subscription_count"])
    assert info == {"occupied": True, "subscription_count": 1}
    two.subscribe("presence-room")  # presence channels count users instead
    two.never(seconds=1.5, type="event", channel="presence-room", event="pusher:subscription_count")
    told = [e["subscription_count"] for e in hook.collect(1) if e["name"] == "subscription_count"]
    assert told[0] == 1 and told[-1] == 1 and 2 in told
    assert all(e["channel"] == "news" for e in hook.events if e["name"] == "subscription_count")


def counted(client, channel: str) -> int:
    event = client.expect(type="event", channel=channel, event="pusher:subscription_count")
    return event["data"]["subscription_count"]


def counted_to(client, channel: str, count: int) -> None:
    """Counts the client is told until count (throttled: a passing one may be skipped)."""
    told = []
    while count not in told:
        told.append(counted(client, channel))


# Two processes on one real redis-server: each thing told once, wherever it happened.


def two_processes(server_factory, redis_server, tmp_path, *extra: str, prefix="") -> tuple:
    prefix = prefix or new_prefix()
    common = (*PUSHER, "--redis", redis_server.url, "--redis-prefix", prefix, *extra)
    one = server_factory(*common, "--control", str(tmp_path / "one.sock")).wait_linked()
    two = server_factory(*common, "--control", str(tmp_path / "two.sock")).wait_linked()
    return one, two


def test_over_two_processes_each_channel_and_member_is_told_once(
    server_factory, redis_server, clients, receiver, tmp_path
):
    hook = receiver()
    one, two = two_processes(
        server_factory, redis_server, tmp_path, "--pusher-webhook", hook.url,
        "--presence-grace", "0", "--pusher-subscription-count", "yes",
    )  # fmt: skip
    ann = clients(one, user={"user_id": "ann"})
    ann_tab = clients(two, user={"user_id": "ann"})  # ann's second tab, on the other process
    bob = clients(two, user={"user_id": "bob"})
    for client in (ann, ann_tab, bob):
        client.connected()
    ann.subscribe("news")
    hook.wait_for(name="channel_occupied", channel="news")
    bob.subscribe("news")
    counted_to(bob, "news", 2)  # over both processes
    counted_to(ann, "news", 2)
    ann.subscribe("presence-room")
    ann_tab.subscribe("presence-room")
    bob.subscribe("presence-room")
    hook.wait_for(name="member_added", user_id="bob")
    ann.do("unsubscribe", channel="news")
    counted_to(bob, "news", 1)
    # Two processes post apart: what one told is waited for before the other tells more.
    hook.wait_for(name="subscription_count", channel="news", subscription_count=2)
    wait_until(lambda: counts_told(hook, "news")[-1:] == [1], what="the count of 1 told")
    ann.do("unsubscribe", channel="presence-room")  # her tab on two holds her in
    bob.close()
    hook.wait_for(name="member_removed", user_id="bob")
    ann_tab.close()
    hook.wait_for(name="member_removed", user_id="ann")
    hook.wait_for(name="channel_vacated", channel="presence-room")
    hook.wait_for(name="channel_vacated", channel="news")
    hook.collect(1.5)  # a second telling by the other process would have come by now
    events = hook.events  # each process posts what it told, in order; the two interleave
    room = sorted(names_of(events, "presence-room"))
    assert room == sorted(
        ["channel_occupied", "member_added", "member_added", "member_removed", "member_removed",
         "channel_vacated"]
    )  # fmt: skip
    assert names_of(events, "presence-room")[-1] == "channel_vacated"
    news = [(e["name"], e.get("subscription_count")) for e in events if e["channel"] == "news"]
    assert news[0] == ("channel_occupied", None) and news[-1] == ("channel_vacated", None)
    assert counts_told(hook, "news") == [1, 2, 1]


def counts_told(hook, channel: str) -> list:
    hook.collect(0.1)
    return [
        e["subscription_count"]
        for e in hook.events
        if e["name"] == "subscription_count" and e["channel"] == channel
    ]


def test_a_user_signed_in_on_one_process_gets_what_is_sent_through_the_other(
    server_factory, redis_server, clients, tmp_path
):
    one, two = two_processes(server_factory, redis_server, tmp_path)
    ann = clients(two, signinAs={"id": "ann"})
    ann.connected()
    signed_in(ann)
    ann.expect(type="raw", event="pusher_internal:subscription_succeeded")
    sdk(one).send_to_user("ann", "note", {"via": "one"})
    assert ann.expect(type="user", event="note")["data"] == {"via": "one"}
    control = one.control()
    rows = wsboard_json(control, {"op": "list"})["clients"]
    assert [c.get("user") for c in rows] == ["ann"]  # listed from the other process too
    control.close()
    sdk(one).terminate_user_connections("ann")
    assert_refused_for_good(ann, 4009)


def test_a_process_that_dies_has_its_channels_vacated_by_another(
    server_factory, redis_server, clients, receiver, tmp_path
):
    hook = receiver()
    one, two = two_processes(
        server_factory, redis_server, tmp_path, "--pusher-webhook", hook.url,
        "--presence-grace", "0", "--node-timeout", "1",
    )  # fmt: skip
    ann = clients(one, user={"user_id": "ann"})
    ann.connected()
    ann.subscribe("presence-room")
    ann.subscribe("news")
    hook.wait_for(name="member_added", user_id="ann")
    hook.wait_for(name="channel_occupied", channel="news")
    one.stop(sig=signal.SIGKILL)
    hook.wait_for(name="member_removed", user_id="ann", timeout=15)
    hook.wait_for(name="channel_vacated", channel="news")
    hook.wait_for(name="channel_vacated", channel="presence-room")
    assert names_of(hook.events, "presence-room") == [
        "channel_occupied", "member_added", "member_removed", "channel_vacated"
    ]  # fmt: skip
    assert two.ready()


def test_a_redis_restarted_empty_gets_the_counts_back_without_them_told_again(
    server_factory, clients, receiver, tmp_path
):
    own = RedisServer(tmp_path / "own-redis").start()
    try:
        hook, prefix = receiver(), new_prefix()
        one, two = two_processes(
            server_factory, own, tmp_path, "--pusher-webhook", hook.url,
            "--pusher-subscription-count", "yes", prefix=prefix,
        )  # fmt: skip
        ann, bob = clients(one), clients(two)
        ann.connected()
        bob.connected()
        ann.subscribe("news")
        bob.subscribe("news")
        counted_to(ann, "news", 2)
        hook.wait_for(name="channel_occupied", channel="news")
        own.stop()
        own.start()  # empty: it kept nothing
        client = own.client()
        wait_until(
            lambda: len(client.hkeys(f"{prefix}:cc:news")) == 2, timeout=15, what="counts back"
        )
        bob.do("unsubscribe", channel="news")
        counted_to(ann, "news", 1)
        hook.collect(1.5)
        assert names_of(hook.events, "news").count("channel_occupied") == 1
    finally:
        own.stop()
