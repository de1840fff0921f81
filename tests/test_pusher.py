"""The Pusher protocol, spoken to the real clients: pusher-js and Laravel Echo (in Node,
tests/pusher/driver.js) and the Pusher server SDKs (pusher from PyPI and from npm)."""

import base64
import hashlib
import json
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pusher as pusher_sdk
import pytest
import websocket
from conftest import ROOT, close_frame, new_prefix

import wsboard

APP_ID, KEY, SECRET = "4711", "wsboard-key", "wsboard-test-secret"
PUSHER = ("--pusher-app-id", APP_ID, "--pusher-key", KEY, "--pusher-secret", SECRET)
DRIVER = os.path.join(ROOT, "tests", "pusher", "driver.js")
NODE_MODULES = os.path.join(ROOT, "tests", "pusher", "node_modules")


@pytest.fixture(scope="module", autouse=True)
def npm_packages():
    subprocess.run([os.path.join(ROOT, "tests", "pusher", "install")], check=True)


# What Pusher's documentation gives as worked examples (auth signatures, HTTP API).
DOC_KEY, DOC_SECRET = "278d425bdf160c739803", "7ad3773142a6692b25b8"


def test_channel_auth_matches_pushers_documented_vectors():
    private = wsboard.pusher_channel_auth(DOC_KEY, DOC_SECRET, "1234.1234", "private-foobar")
    assert private == (
        "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
    )
    data = '{"user_id":10,"user_info":{"name":"Mr. Channels"}}'
    presence = wsboard.pusher_channel_auth(
        DOC_KEY, DOC_SECRET, "1234.1234", "presence-foobar", data
    )
    assert presence == (
        "278d425bdf160c739803:31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80"
    )
    refusal = wsboard.pusher_auth_refusal
    assert refusal(DOC_KEY, DOC_SECRET, "1234.1234", "private-foobar", private, None) is None
    assert refusal(DOC_KEY, DOC_SECRET, "1234.1234", "presence-foobar", presence, data) is None
    assert "Invalid signature" in refusal(
        DOC_KEY, DOC_SECRET, "1234.1235", "private-foobar", private, None
    )
    assert "Invalid signature" in refusal(
        DOC_KEY, DOC_SECRET, "1234.1234", "presence-foobar", presence, data.replace("10", "11")
    )
    assert "Auth required" in refusal(DOC_KEY, DOC_SECRET, "1.1", "private-a", None, None)


DOC_BODY = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
DOC_QUERY = (
    "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0"
    "&body_md5=ec365a775a4cd0599faeb73354201b6f"
)
DOC_SIGNATURE = "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"


def api_refusal(query, body=DOC_BODY, now=1353088179, method="POST", path="/apps/3/events"):
    return wsboard.pusher_api_refusal(DOC_KEY, DOC_SECRET, method, path, query, body, now)


def test_api_signature_matches_pushers_documented_request():
    assert hashlib.md5(DOC_BODY).hexdigest() == "ec365a775a4cd0599faeb73354201b6f"
    assert api_refusal(DOC_QUERY + "&auth_signature=" + DOC_SIGNATURE) is None


@pytest.mark.parametrize(
    "query, body, now, status, reason",
    [
        (DOC_QUERY, DOC_BODY, 1353088179, 401, "Invalid signature"),  # unsigned
        (DOC_QUERY + "&auth_signature=" + "0" * 64, DOC_BODY, 1353088179, 401, "Invalid signature"),
        (
            DOC_QUERY + "&auth_signature=" + DOC_SIGNATURE,
            DOC_BODY + b" ",
            1353088179,
            401,
            "body_md5",
        ),
        (
            DOC_QUERY + "&auth_signature=" + DOC_SIGNATURE,
            DOC_BODY,
            1353088179 + 601,
            401,
            "expired",
        ),
        (
            DOC_QUERY + "&auth_signature=" + DOC_SIGNATURE,
            DOC_BODY,
            1353088179 - 601,
            401,
            "expired",
        ),
        (
            DOC_QUERY.replace(DOC_KEY, "x" * 20) + "&auth_signature=" + DOC_SIGNATURE,
            DOC_BODY,
            1353088179,
            401,
            "auth_key",
        ),
        (
            DOC_QUERY.replace("1.0", "2.0") + "&auth_signature=" + DOC_SIGNATURE,
            DOC_BODY,
            1353088179,
            401,
            "auth_version",
        ),
        (
            DOC_QUERY + "&auth_key=x&auth_signature=" + DOC_SIGNATURE,
            DOC_BODY,
            1353088179,
            400,
            "twice",
        ),
        (
            DOC_QUERY.replace("1353088179", "soon") + "&auth_signature=" + DOC_SIGNATURE,
            DOC_BODY,
            1353088179,
            401,
            "Unix time",
        ),
    ],
)
def test_api_requests_not_signed_right_are_refused(query, body, now, status, reason):
    refusal = api_refusal(query, body, now)
    assert refusal is not None and refusal.status == status and reason in refusal.reason


def test_a_get_may_carry_the_md5_of_its_empty_body_as_the_python_sdk_sends_it():
    params = {"auth_key": DOC_KEY, "auth_timestamp": "1353088179", "auth_version": "1.0"}
    for extra in ({}, {"body_md5": hashlib.md5(b"").hexdigest()}):
        signed = "&".join(f"{k}={v}" for k, v in sorted({**params, **extra}.items()))
        signature = wsboard.pusher_sign(DOC_SECRET, f"GET\n/apps/3/channels\n{signed}")
        query = signed + "&auth_signature=" + signature
        assert api_refusal(query, b"", method="GET", path="/apps/3/channels") is None
    wrong = {**params, "body_md5": "0" * 32}
    signed = "&".join(f"{k}={v}" for k, v in sorted(wrong.items()))
    signature = wsboard.pusher_sign(DOC_SECRET, f"GET\n/apps/3/channels\n{signed}")
    refusal = api_refusal(signed + "&auth_signature=" + signature, b"", method="GET")
    assert refusal is not None and "body_md5" in refusal.reason


def test_every_close_code_falls_in_the_range_pusher_js_acts_on_rightly():
    reconnect_now = range(4200, 4300)
    back_off = range(4100, 4200)
    assert wsboard.pusher_close_code(wsboard.CloseCode.GOING_AWAY) in reconnect_now  # drain
    assert wsboard.pusher_close_code(wsboard.CloseCode.SERVICE_RESTART) in reconnect_now
    assert wsboard.pusher_close_code(wsboard.CloseCode.NORMAL) in reconnect_now  # idle
    for code in (1002, 1007, 1008, 1009, 1011, 1013):  # trouble: never a tight loop
        assert wsboard.pusher_close_code(code) in back_off
    assert wsboard.pusher_close_code(wsboard.CloseCode.KICKED) == 4000  # kicks mean it
    assert wsboard.pusher_close_code(4009) == 4009


def test_the_pusher_options_come_all_three_or_not_at_all():
    with pytest.raises(wsboard.ConfigError, match="needs all of"):
        wsboard.load_config(["--pusher-app-id", "1", "--pusher-key", "k"], {})
    with pytest.raises(wsboard.ConfigError, match="8 characters"):
        wsboard.load_config(
            ["--pusher-app-id", "1", "--pusher-key", "k", "--pusher-secret", "s"], {}
        )
    with pytest.raises((wsboard.ConfigError, SystemExit)):
        wsboard.load_config(
            ["--pusher-app-id", "no spaces", "--pusher-key", "k", "--pusher-secret", SECRET], {}
        )
    cfg = wsboard.load_config(
        [],
        {"WSBOARD_PUSHER_APP_ID": "1", "WSBOARD_PUSHER_KEY": "k", "WSBOARD_PUSHER_SECRET": SECRET},
    )
    assert (cfg.pusher_app_id, cfg.pusher_key, cfg.pusher_secret) == ("1", "k", SECRET)
    assert SECRET not in repr(cfg)


# Real clients against a real server.


class Client:
    """A pusher-js (or Laravel Echo) client in Node: commands in, what it saw out."""

    def __init__(self, port: int, echo: bool = False, user: dict | None = None, **config) -> None:
        config = {
            "appId": APP_ID,
            "key": KEY,
            "secret": SECRET,
            "port": port,
            "echo": echo,
            "user": user,
            **config,
        }
        self.proc = subprocess.Popen(
            ["node", DRIVER, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=os.path.dirname(DRIVER),
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def do(self, op: str, **fields) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def expect(self, timeout: float = 10, **match):
        """The first thing seen (earlier or within timeout) whose fields match."""

        def matches(item):
            return all(item.get(k) == v for k, v in match.items())

        for item in self.seen:
            if matches(item):
                self.seen.remove(item)
                return item
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {match} within {timeout}s; seen: {self.seen[-20:]}; "
                    f"stderr: {self.stderr()}"
                )
            try:
                item = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if matches(item):
                return item
            self.seen.append(item)

    def never(self, seconds: float = 0.5, **match) -> None:
        with pytest.raises(AssertionError):
            self.expect(timeout=seconds, **match)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read()[-2000:]

    def connected(self) -> str:
        return self.expect(type="connected")["socket_id"]

    def subscribe(self, channel: str) -> dict:
        self.do("subscribe", channel=channel)
        return self.expect(type="event", channel=channel, event="pusher:subscription_succeeded")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stdin.close()
        self.proc.stderr.close()


@pytest.fixture
def clients():
    made = []

    def make(server, **kwargs) -> Client:
        client = Client(server.port, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def app_server(server_factory):
    return server_factory(*PUSHER, "--pusher-client-events", "yes", "--presence-grace", "0")


def sdk(server) -> pusher_sdk.Pusher:
    return pusher_sdk.Pusher(APP_ID, KEY, SECRET, ssl=False, host="127.0.0.1", port=server.port)


def test_pusher_js_connects_with_a_socket_id_that_is_wsboards_connection_id(app_server, clients):
    client = clients(app_server)
    socket_id = client.connected()
    assert wsboard.CONN_ID.fullmatch(socket_id)
    control = app_server.control()
    listed = wsboard_json(control, {"op": "list"})
    assert [c["conn"] for c in listed["clients"]] == [socket_id]
    assert [c["id"] for c in listed["clients"]] == [socket_id]  # its client id is its socket id
    assert control.list() == [f"{socket_id} {listed['clients'][0]['peer']}"]
    control.close()


def wsboard_json(control, request: dict) -> dict:
    return json.loads(control.ask(json.dumps(request)))


def test_events_from_the_python_sdk_reach_public_private_and_presence_channels(app_server, clients):
    client = clients(app_server, user={"user_id": "7", "user_info": {"name": "Ann"}})
    client.connected()
    client.subscribe("news")
    client.subscribe("private-orders")
    joined = client.subscribe("presence-room")
    assert joined["data"]["count"] == 1 and joined["data"]["me"] == {
        "id": "7",
        "info": {"name": "Ann"},
    }
    api = sdk(app_server)
    assert api.trigger("news", "headline", {"title": "hi"}) == {}
    assert client.expect(type="event", channel="news", event="headline")["data"] == {"title": "hi"}
    api.trigger(["private-orders", "presence-room"], "update", "plain text")
    assert (
        client.expect(type="event", channel="private-orders", event="update")["data"]
        == "plain text"
    )
    assert (
        client.expect(type="event", channel="presence-room", event="update")["data"] == "plain text"
    )
    api.trigger_batch(
        [
            {"channel": "news", "name": "one", "data": "1"},
            {"channel": "private-orders", "name": "two", "data": json.dumps({"n": 2})},
        ]
    )
    assert client.expect(type="event", channel="news", event="one")["data"] == 1
    assert client.expect(type="event", channel="private-orders", event="two")["data"] == {"n": 2}


def test_pusher_js_gets_a_cache_channels_last_event_or_a_cache_miss(app_server, clients):
    """Cache channels keep their last event without --history: a subscription gets it right
    after subscription_succeeded, or pusher:cache_miss; private and presence ones too."""
    first = clients(app_server, user={"user_id": "9", "user_info": {}})
    first.connected()
    first.subscribe("cache-weather")
    miss = first.expect(type="event", channel="cache-weather", event="pusher:cache_miss")
    assert "data" not in miss  # Pusher sends {"event", "channel"} alone
    api = sdk(app_server)
    api.trigger("cache-weather", "forecast", {"sky": "grey"})
    api.trigger("cache-weather", "forecast", {"sky": "blue"})
    api.trigger("private-cache-desk", "state", "open")
    for _ in range(2):
        first.expect(type="event", channel="cache-weather", event="forecast")
    late = clients(app_server, user={"user_id": "10", "user_info": {}})
    late.connected()
    late.subscribe("cache-weather")
    cached = late.expect(type="event", channel="cache-weather", event="forecast")
    assert cached["data"] == {"sky": "blue"}  # the last one only
    late.subscribe("private-cache-desk")
    assert late.expect(type="event", channel="private-cache-desk", event="state")["data"] == "open"
    late.do("subscribe", channel="presence-cache-room")
    late.expect(type="event", channel="presence-cache-room", event="pusher:subscription_succeeded")
    late.expect(type="event", channel="presence-cache-room", event="pusher:cache_miss")
    control = app_server.control()
    answer = wsboard_json(control, {"op": "history", "channel": "news"})
    assert answer == {"ok": False, "error": wsboard.HISTORY_OFF}  # no --history: only cache-


def test_encrypted_channels_carry_what_only_the_clients_can_read(app_server, clients):
    master = base64.b64encode(b"m" * 32).decode()
    client = clients(app_server, encryptionMasterKeyBase64=master)
    client.connected()
    client.subscribe("private-encrypted-vault")
    native = websocket.create_connection(
        f"ws://127.0.0.1:{app_server.port}/websocket?id=n&channel=private-encrypted-vault",
        timeout=10,
    )
    api = pusher_sdk.Pusher(
        APP_ID,
        KEY,
        SECRET,
        ssl=False,
        host="127.0.0.1",
        port=app_server.port,
        encryption_master_key_base64=master,
    )
    api.trigger("private-encrypted-vault", "sealed", {"pin": 1234})
    assert client.expect(type="event", channel="private-encrypted-vault", event="sealed")[
        "data"
    ] == {"pin": 1234}  # decrypted by pusher-js with the secret its auth gave it
    opaque = json.loads(native.recv())  # the server passed on what it cannot read
    assert set(opaque) == {"nonce", "ciphertext"} and "1234" not in opaque["ciphertext"]
    native.close()


def test_the_socket_id_of_a_trigger_is_left_out_as_laravels_to_others_needs(app_server, clients):
    sender, other = clients(app_server), clients(app_server)
    sender_id, _ = sender.connected(), other.connected()
    sender.subscribe("chat")
    other.subscribe("chat")
    sdk(app_server).trigger("chat", "said", "hello", socket_id=sender_id)
    assert other.expect(type="event", channel="chat", event="said")["data"] == "hello"
    sender.never(type="event", channel="chat", event="said")


def test_presence_joins_and_leaves_once_per_user_across_two_tabs(app_server, clients):
    watcher = clients(app_server, user={"user_id": "1", "user_info": {"name": "Watcher"}})
    watcher.connected()
    watcher.subscribe("presence-room")
    tab1 = clients(app_server, user={"user_id": "2", "user_info": {"name": "Bo"}})
    tab2 = clients(app_server, user={"user_id": "2", "user_info": {"name": "Bo"}})
    tab1.connected()
    assert tab1.subscribe("presence-room")["data"]["count"] == 2
    added = watcher.expect(type="event", channel="presence-room", event="pusher:member_added")
    assert added["data"] == {"id": "2", "info": {"name": "Bo"}}
    tab2.connected()
    members = tab2.subscribe("presence-room")["data"]
    assert members["count"] == 2 and sorted(members["members"]) == ["1", "2"]
    watcher.never(type="event", channel="presence-room", event="pusher:member_added")
    users = sdk(app_server).users_info("presence-room")
    assert sorted(u["id"] for u in users["users"]) == ["1", "2"]
    info = sdk(app_server).channel_info("presence-room", ["user_count", "subscription_count"])
    assert info == {"occupied": True, "user_count": 2, "subscription_count": 3}
    tab1.do("disconnect")
    watcher.never(type="event", channel="presence-room", event="pusher:member_removed")
    tab2.do("unsubscribe", channel="presence-room")
    removed = watcher.expect(type="event", channel="presence-room", event="pusher:member_removed")
    assert removed["data"] == {"id": "2", "info": {"name": "Bo"}}


def test_client_events_reach_the_other_members_with_the_senders_user_id(app_server, clients):
    ann = clients(app_server, user={"user_id": "ann"})
    bob = clients(app_server, user={"user_id": "bob"})
    for client in (ann, bob):
        client.connected()
        client.subscribe("presence-typing")
        client.subscribe("private-dm")
    ann.do("trigger", channel="presence-typing", event="client-typing", data={"on": True})
    assert ann.expect(type="triggered")["ok"] is True
    got = bob.expect(type="event", channel="presence-typing", event="client-typing")
    assert got["data"] == {"on": True}
    ann.never(type="event", channel="presence-typing", event="client-typing")
    bob.do("trigger", channel="private-dm", event="client-note", data="psst")
    assert ann.expect(type="event", channel="private-dm", event="client-note")["data"] == "psst"
    ann.do("send", raw=json.dumps({"event": "client-x", "channel": "news", "data": {}}))
    error = ann.expect(type="global", event="pusher:error")
    assert "private- and presence-" in error["data"]["message"]
    ann.do("send", raw=json.dumps({"event": "client-x", "channel": "private-other", "data": {}}))
    assert "Subscribe to" in ann.expect(type="global", event="pusher:error")["data"]["message"]


def test_client_events_are_off_unless_enabled(server_factory, clients):
    server = server_factory(*PUSHER)
    ann, bob = clients(server), clients(server)
    for client in (ann, bob):
        client.connected()
        client.subscribe("private-dm")
    ann.do("trigger", channel="private-dm", event="client-note", data="psst")
    assert (
        "--pusher-client-events"
        in ann.expect(type="global", event="pusher:error")["data"]["message"]
    )
    bob.never(type="event", channel="private-dm", event="client-note")


def test_a_bad_auth_gets_a_subscription_error_and_no_membership(app_server, clients):
    client = clients(app_server, badAuth=True)
    client.connected()
    client.do("subscribe", channel="private-secret")
    error = client.expect(type="event", channel="private-secret", event="pusher:subscription_error")
    assert error["data"]["status"] == 401 and "Invalid signature" in error["data"]["error"]
    control = app_server.control()
    assert control.ask("COUNT private-secret") == "OK 0 0"
    control.close()


def test_one_namespace_native_and_pusher_sockets_share_channels(app_server, clients):
    client = clients(app_server)
    socket_id = client.connected()
    client.subscribe("news")
    native = websocket.create_connection(
        f"ws://127.0.0.1:{app_server.port}/websocket?id=native&channel=news", timeout=10
    )
    control = app_server.control()
    assert control.ask("COUNT news") == "OK 2 2"
    # A wsboard PUBLISH reaches pusher-js as "message", or as the event the JSON op names.
    assert control.ask("PUBLISH news breaking") == "OK 2"
    assert client.expect(type="event", channel="news", event="message")["data"] == "breaking"
    assert native.recv() == "breaking"
    assert (
        wsboard_json(
            control,
            {"op": "publish", "channel": "news", "data": '{"a":1}', "event": "App\\Events\\Posted"},
        )["sockets"]
        == 2
    )
    assert client.expect(type="event", channel="news", event="App\\Events\\Posted")["data"] == {
        "a": 1
    }
    assert native.recv() == '{"a":1}'
    # A Pusher trigger reaches the /websocket socket in that channel as its text.
    sdk(app_server).trigger("news", "update", "from the SDK")
    assert native.recv() == "from the SDK"
    # SEND to a Pusher socket's id reaches it as a "message" event outside any channel.
    assert control.ask(f"SEND MESSAGE {socket_id} just you") == "OK"
    personal = client.expect(type="raw", event="message", data="just you")
    assert "channel" not in personal
    assert sorted(row.split()[0] for row in control.list()) == sorted(["native", socket_id])
    native.close()
    control.close()


def test_the_npm_server_sdk_triggers_and_queries(app_server, clients):
    client = clients(app_server)
    client.connected()
    client.subscribe("lobby")
    config = {"appId": APP_ID, "key": KEY, "secret": SECRET, "port": app_server.port}
    result = subprocess.run(
        ["node", os.path.join(os.path.dirname(DRIVER), "server_sdk.js"), json.dumps(config)],
        cwd=os.path.dirname(DRIVER),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out == {
        "trigger": 200,
        "batch": 200,
        "channels": {"channels": {"lobby": {}}},
        "lobby": {"occupied": True, "subscription_count": 1},
        "users": 400,
    }
    assert client.expect(type="event", channel="lobby", event="hello")["data"] == {"from": "node"}
    assert client.expect(type="event", channel="lobby", event="b1")["data"] == "x"


def test_the_python_sdk_lists_channels_and_terminates_a_users_connections(app_server, clients):
    client = clients(app_server, user={"user_id": "42"})
    client.connected()
    client.subscribe("presence-x")
    client.subscribe("private-y")
    api = sdk(app_server)
    assert api.channels_info() == {"channels": {"presence-x": {}, "private-y": {}}}
    assert api.channels_info("presence-", ["user_count"]) == {
        "channels": {"presence-x": {"user_count": 1}}
    }
    assert api.channel_info("empty") == {"occupied": False}
    api.terminate_user_connections("42")
    assert_refused_for_good(client, 4009)
    app_server.wait_listed(0)


def test_unknown_app_key_closes_with_a_code_pusher_js_does_not_retry(app_server, clients):
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{app_server.port}/app/nope?protocol=7&client=js&version=8.4.0", timeout=10
    )
    error = json.loads(ws.recv())
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4001
    assert close_frame(ws)[0] == 4001
    ws.close()
    ws = websocket.create_connection(f"ws://127.0.0.1:{app_server.port}/app/{KEY}", timeout=10)
    assert json.loads(ws.recv())["data"]["code"] == 4008  # no protocol version
    assert close_frame(ws)[0] == 4008
    ws.close()
    client = clients(app_server, key="nope")
    assert_refused_for_good(client, 4001)
    app_server.wait_listed(0)


def told_code(client: Client) -> int:
    """The Pusher code of the next error pusher-js reports (a pusher:error or a close)."""
    error = client.expect(type="error")["error"]
    while "data" not in error:
        error = error["error"]
    return error["data"]["code"]


def assert_refused_for_good(client: Client, code: int) -> None:
    """pusher-js was told code (4000-4099) and stays disconnected: it does not retry."""
    assert told_code(client) == code
    client.expect(type="state", state="disconnected")
    client.never(seconds=3, type="state", state="connecting")


def raw_pusher(server) -> websocket.WebSocket:
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{server.port}/app/{KEY}?protocol=7&client=test", timeout=10
    )
    established = json.loads(ws.recv())
    assert established["event"] == "pusher:connection_established"
    data = json.loads(established["data"])
    assert data["activity_timeout"] == 120 and wsboard.CONN_ID.fullmatch(data["socket_id"])
    ws.socket_id = data["socket_id"]
    return ws


def raw_subscribe_private(ws: websocket.WebSocket, channel: str) -> None:
    auth = wsboard.pusher_channel_auth(KEY, SECRET, ws.socket_id, channel)
    ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}))
    assert json.loads(ws.recv())["event"] == "pusher_internal:subscription_succeeded"


def test_malformed_frames_get_a_pusher_error_and_the_socket_stays(app_server):
    ws = raw_pusher(app_server)
    for frame in (
        "not json",
        "[1, 2]",
        '{"data": {}}',
        '{"event": "pusher:subscribe", "data": 5}',
        '{"event": "pusher:subscribe", "data": {"channel": "bad name!"}}',
        '{"event": "pusher:nonsense"}',
        '{"event": "pusher:subscribe", "data": "{"}',
    ):
        ws.send(frame)
        answer = json.loads(ws.recv())
        assert answer["event"] == "pusher:error" and answer["data"]["message"], frame
    ws.send_binary(b"\x00\x01")
    assert json.loads(ws.recv())["event"] == "pusher:error"
    ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
    assert json.loads(ws.recv()) == {"event": "pusher:pong", "data": "{}"}
    ws.close()


def subscribe_many(ws: websocket.WebSocket, prefix: str, count: int) -> None:
    """Subscribe frames for channels prefix0 .. prefix<count-1>, sent without waiting."""
    for n in range(count):
        ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": f"{prefix}{n}"}}))


def test_a_subscribe_flood_stops_at_the_channel_limit(server_factory):
    server = server_factory(*PUSHER, "--max-channels-per-socket", "3")
    ws = raw_pusher(server)
    subscribe_many(ws, "c", 5)
    answers = [json.loads(ws.recv()) for _ in range(5)]
    assert [a["event"] for a in answers] == ["pusher_internal:subscription_succeeded"] * 3 + [
        "pusher:subscription_error"
    ] * 2
    assert "limit 3" in answers[3]["data"]["error"]
    control = server.control()
    assert json.loads(control.ask('{"op":"channels"}'))["channels"] == {"c0": 1, "c1": 1, "c2": 1}
    control.close()
    ws.close()


def test_oversized_frames_close_with_a_backoff_code(server_factory):
    server = server_factory(*PUSHER, "--max-message", "1000")
    ws = raw_pusher(server)
    ws.send(json.dumps({"event": "pusher:ping", "data": "x" * 2000}))
    assert close_frame(ws)[0] == 4100  # 1009 as Pusher says it: reconnect after a back-off
    ws.close()


def signed_url(server, method: str, path: str, body: bytes = b"", **params) -> str:
    query = {
        "auth_key": KEY,
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
        **params,
    }
    if body:
        query["body_md5"] = hashlib.md5(body).hexdigest()
    signed = "&".join(f"{k}={v}" for k, v in sorted(query.items()))
    signature = wsboard.pusher_sign(SECRET, f"{method}\n{path}\n{signed}")
    return f"http://127.0.0.1:{server.port}{path}?{signed}&auth_signature={signature}"


def api_call(url: str, body: bytes | None = None) -> tuple:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_api_calls_get_the_right_status_and_a_reason(server_factory):
    server = server_factory(*PUSHER, "--pusher-max-event", "100")
    base = f"http://127.0.0.1:{server.port}/apps/{APP_ID}"
    body = json.dumps({"name": "e", "channel": "c", "data": "x"}).encode()
    assert api_call(base + "/events", body)[0] == 401  # unsigned
    url = signed_url(server, "POST", f"/apps/{APP_ID}/events", body)
    assert api_call(url, body + b" ")[0] == 401  # the body is not what was signed
    assert api_call(url.replace(APP_ID, "999", 1), body)[0] == 404  # unknown app id
    stale = signed_url(
        server, "POST", f"/apps/{APP_ID}/events", body, auth_timestamp=str(int(time.time()) - 700)
    )
    status, answer = api_call(stale, body)
    assert status == 401 and "expired" in answer["error"]
    cases = [
        ({"name": "e", "channel": "c", "data": "x" * 101}, 413),
        ({"name": "e", "channels": [f"c{n}" for n in range(101)], "data": "x"}, 400),
        ({"name": "e", "channel": "bad name", "data": "x"}, 400),
        ({"name": "pusher:fake", "channel": "c", "data": "x"}, 400),
        ({"name": "e", "channel": "c", "data": {"not": "a string"}}, 400),
        ({"name": "e", "channel": "c", "data": "x", "socket_id": "nope"}, 400),
        ([1, 2], 400),
    ]
    for request, status in cases:
        body = json.dumps(request).encode()
        got, answer = api_call(signed_url(server, "POST", f"/apps/{APP_ID}/events", body), body)
        assert got == status and answer["error"], request
    body = b"{not json"
    assert api_call(signed_url(server, "POST", f"/apps/{APP_ID}/events", body), body)[0] == 400
    batch = json.dumps({"batch": [{"name": "e", "channel": "c", "data": "x"}] * 11}).encode()
    assert (
        api_call(signed_url(server, "POST", f"/apps/{APP_ID}/batch_events", batch), batch)[0] == 400
    )
    assert api_call(signed_url(server, "GET", f"/apps/{APP_ID}/nothing"))[0] == 404
    assert api_call(signed_url(server, "GET", f"/apps/{APP_ID}/channels/public/users"))[0] == 400
    assert (
        api_call(signed_url(server, "GET", f"/apps/{APP_ID}/channels", info="user_count"))[0] == 400
    )
    assert "refused POST /apps/4711/events: Unknown auth_key" in server.log()


def test_an_api_call_refused_with_a_4xx_delivered_nothing(server_factory):
    server = server_factory(*PUSHER)
    reader = websocket.create_connection(
        f"ws://127.0.0.1:{server.port}/websocket?id=reader&channel=c&channel=d", timeout=10
    )
    server.wait_listed(1)
    good = {"name": "e", "channel": "c", "data": "must not arrive"}
    batch = {"batch": [good] * 9 + [{"name": "e", "channel": "bad name", "data": "x"}]}
    refused = [
        ("batch_events", batch),
        ("events", {**good, "info": "user_count"}),  # user_count of a non-presence channel
        ("events", {**good, "info": "subscription_count,colour"}),  # an unknown attribute
        ("events", {**good, "info": ["subscription_count"]}),  # not a string
        ("batch_events", {"batch": [good, {**good, "info": "user_count"}]}),
    ]
    for resource, request in refused:
        body = json.dumps(request).encode()
        status, answer = api_call(
            signed_url(server, "POST", f"/apps/{APP_ID}/{resource}", body), body
        )
        assert status == 400 and answer["error"], request
    assert server.control().ask("PUBLISH d sentinel") == "OK 1"
    assert reader.recv() == "sentinel"  # the first thing to arrive: nothing came before it
    body = json.dumps({**good, "data": "now", "info": "subscription_count"}).encode()
    status, answer = api_call(signed_url(server, "POST", f"/apps/{APP_ID}/events", body), body)
    assert (status, answer) == (200, {"channels": {"c": {"subscription_count": 1}}})
    assert reader.recv() == "now"


def test_numbers_too_long_for_int_are_refused_not_a_500(server_factory):
    server = server_factory(*PUSHER)
    huge = "9" * 5000
    status, answer = api_call(
        signed_url(server, "GET", f"/apps/{APP_ID}/channels", auth_timestamp=huge)
    )
    assert status == 401 and answer["error"] == "auth_timestamp must be a Unix time"
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{server.port}/app/{KEY}?protocol={huge}", timeout=10
    )
    error = json.loads(ws.recv())
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4007
    assert "Traceback" not in server.log()


def test_a_pusher_socket_taken_out_of_a_presence_channel_is_no_longer_there_as_its_user(
    server_factory,
):
    server = server_factory(*PUSHER, "--presence-grace", "0")
    ws = raw_pusher(server)
    user = json.dumps({"user_id": "ann"})
    auth = wsboard.pusher_channel_auth(KEY, SECRET, ws.socket_id, "presence-room", user)
    ws.send(
        json.dumps(
            {
                "event": "pusher:subscribe",
                "data": {"channel": "presence-room", "auth": auth, "channel_data": user},
            }
        )
    )
    assert json.loads(ws.recv())["event"] == "pusher_internal:subscription_succeeded"
    control = server.control()
    assert ask_presence(control, "presence-room") == ["ann"]
    assert control.ask(f"LEAVE presence-room {ws.socket_id}") == "OK 1"
    assert control.ask(f"JOIN presence-room {ws.socket_id}") == "OK 1"
    assert ask_presence(control, "presence-room") == [ws.socket_id]
    path = f"/apps/{APP_ID}/users/ann/terminate_connections"
    assert api_call(signed_url(server, "POST", path, b"{}"), b"{}") == (200, {})
    assert control.ask(f"SEND MESSAGE {ws.socket_id} still here") == "OK"
    while (frame := json.loads(ws.recv()))["event"] != "message":  # no close came before it
        assert frame["event"].startswith("pusher_internal:"), frame
    assert frame["data"] == "still here"
    control.close()


def ask_presence(control, channel: str) -> list:
    control.send(json.dumps({"op": "presence", "channel": channel}).encode() + b"\n")
    return [member["id"] for member in json.loads(control.line())["members"]]


def test_without_the_options_there_is_no_pusher_endpoint(server):
    ws = websocket.WebSocket()
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        ws.connect(f"ws://127.0.0.1:{server.port}/app/{KEY}?protocol=7", timeout=10)
    assert caught.value.status_code == 404
    assert api_call(f"http://127.0.0.1:{server.port}/apps/{APP_ID}/channels")[0] == 404


def test_origin_checks_hold_for_pusher_sockets(server_factory):
    server = server_factory(*PUSHER, "--allowed-origins", "https://app.example")
    url = f"ws://127.0.0.1:{server.port}/app/{KEY}?protocol=7"
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        websocket.create_connection(url, timeout=10, origin="https://evil.example")
    assert caught.value.status_code == 403
    ws = websocket.create_connection(url, timeout=10, origin="https://app.example")
    assert json.loads(ws.recv())["event"] == "pusher:connection_established"
    ws.close()


def test_pusher_js_reconnects_and_resubscribes_after_a_restart(server_factory, clients):
    server = server_factory(*PUSHER)
    client = clients(server)
    first = client.connected()
    client.subscribe("news")
    assert server.stop() == 0  # a drain: 4200 tells pusher-js to come back at once
    assert told_code(client) == 4200
    server.start()
    second = client.expect(type="connected", timeout=30)["socket_id"]  # pusher-js's own pace
    assert second != first
    client.expect(type="event", channel="news", event="pusher:subscription_succeeded", timeout=15)
    sdk(server).trigger("news", "back", "again")
    assert client.expect(type="event", channel="news", event="back")["data"] == "again"


def test_laravel_echo_listens_joins_whispers_and_leaves(app_server, clients):
    ann = clients(app_server, echo=True, user={"user_id": 1, "user_info": {"name": "Ann"}})
    bob = clients(app_server, echo=True, user={"user_id": 2, "user_info": {"name": "Bob"}})
    ann.connected()
    ann.do("listen", kind="channel", channel="orders", event="OrderShipped")
    ann.expect(type="echo", channel="orders", what="subscribed")
    ann.do("listen", kind="private", channel="App.Models.User.1", event=".status")
    ann.expect(type="echo", channel="App.Models.User.1", what="subscribed")
    ann.do("listen", kind="join", channel="chat", event=".said")
    assert ann.expect(type="echo", channel="chat", what="here")["data"] == [{"name": "Ann"}]
    ann.do("listenForWhisper", kind="join", channel="chat", event="typing")
    bob.connected()
    bob.do("listen", kind="join", channel="chat", event=".said")
    here = bob.expect(type="echo", channel="chat", what="here")["data"]
    assert sorted(u["name"] for u in here) == ["Ann", "Bob"]
    assert ann.expect(type="echo", channel="chat", what="joining")["data"] == {"name": "Bob"}
    api = sdk(app_server)
    api.trigger("orders", "App\\Events\\OrderShipped", {"id": 5})  # Laravel's namespaced name
    assert ann.expect(type="echo", what="listen", event="OrderShipped")["data"] == {"id": 5}
    api.trigger("private-App.Models.User.1", "status", {"ok": True})
    assert ann.expect(type="echo", what="listen", event=".status")["data"] == {"ok": True}
    bob.do("whisper", kind="join", channel="chat", event="typing", data={"who": "Bob"})
    assert ann.expect(type="echo", what="whisper", event="typing")["data"] == {"who": "Bob"}
    bob.do("socket_id")
    bob_socket = bob.expect(type="socket_id")["socket_id"]
    api.trigger("presence-chat", "said", {"text": "hi"}, socket_id=bob_socket)  # toOthers
    assert ann.expect(type="echo", what="listen", event=".said")["data"] == {"text": "hi"}
    bob.never(type="echo", what="listen", event=".said")
    bob.do("leave", channel="chat")
    assert ann.expect(type="echo", channel="chat", what="leaving")["data"] == {"name": "Bob"}


def test_pusher_sockets_span_processes_on_the_redis_hub(
    server_factory, redis_server, clients, tmp_path
):
    common = (
        *PUSHER,
        "--redis",
        redis_server.url,
        "--redis-prefix",
        new_prefix(),
        "--presence-grace",
        "0",
        "--pusher-client-events",
        "yes",
    )
    one = server_factory(*common, "--control", str(tmp_path / "one.sock")).wait_linked()
    two = server_factory(*common, "--control", str(tmp_path / "two.sock")).wait_linked()
    ann = clients(one, user={"user_id": "ann"})
    bob = clients(two, user={"user_id": "bob"})
    ann_id, bob_id = ann.connected(), bob.connected()
    ann.subscribe("presence-room")
    members = bob.subscribe("presence-room")["data"]
    assert sorted(members["members"]) == ["ann", "bob"]
    assert (
        ann.expect(type="event", channel="presence-room", event="pusher:member_added")["data"]["id"]
        == "bob"
    )
    sdk(two).trigger("presence-room", "hello", "everyone", socket_id=bob_id)
    assert ann.expect(type="event", channel="presence-room", event="hello")["data"] == "everyone"
    bob.never(type="event", channel="presence-room", event="hello")
    bob.do("trigger", channel="presence-room", event="client-wave", data={})
    wave = ann.expect(type="event", channel="presence-room", event="client-wave")
    assert wave["data"] == {}
    raw = ann.expect(type="raw", channel="presence-room", event="client-wave")
    assert raw["user_id"] == "bob"  # Pusher names the sender of a presence client event
    info = sdk(one).channel_info("presence-room", ["user_count", "subscription_count"])
    assert info == {"occupied": True, "user_count": 2, "subscription_count": 2}
    sdk(two).trigger("cache-status", "state", "green")  # nobody subscribed anywhere yet
    ann.subscribe("cache-status")  # on the other process: the cache is in Redis
    assert ann.expect(type="event", channel="cache-status", event="state")["data"] == "green"
    sdk(one).terminate_user_connections("bob")
    assert_refused_for_good(bob, 4009)
    assert (
        ann.expect(type="event", channel="presence-room", event="pusher:member_removed")["data"][
            "id"
        ]
        == "bob"
    )
    assert ann_id.split(".")[0] != bob_id.split(".")[0]


def test_subscription_counts_of_every_channel_take_one_round_trip_over_redis(
    server_factory, redis_server, tmp_path
):
    common = (*PUSHER, "--redis", redis_server.url, "--redis-prefix", new_prefix())
    one = server_factory(*common, "--control", str(tmp_path / "one.sock")).wait_linked()
    two = server_factory(
        *common, "--control", str(tmp_path / "two.sock"), "--max-channels-per-socket", "500"
    ).wait_linked()
    reader = two.websocket("reader")
    control = two.control()
    control.send(b"".join(f"JOIN c{n} reader\n".encode() for n in range(500)))
    assert [control.line() for _ in range(500)] == [b"OK 1"] * 500
    client = redis_server.client()

    def publishes() -> int:
        return client.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)

    before = publishes()
    status, answer = api_call(
        signed_url(one, "GET", f"/apps/{APP_ID}/channels", info="subscription_count")
    )
    assert status == 200 and len(answer["channels"]) == 500
    assert answer["channels"]["c7"] == {"subscription_count": 1}
    assert publishes() - before < 100  # a question to all and its answers; one a channel: 1,000
    reader.close()


def test_the_php_sdks_request_shape_under_phpunit_with_php_curl(app_server):
    native = websocket.create_connection(
        f"ws://127.0.0.1:{app_server.port}/websocket?id=php-reader&channel=php-news", timeout=10
    )
    result = subprocess.run(
        [
            "phpunit",
            "--do-not-cache-result",
            "--configuration",
            os.path.join(ROOT, "tests", "pusher", "php", "phpunit.xml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "WSBOARD_URL": app_server.url,
            "PUSHER_APP_ID": APP_ID,
            "PUSHER_KEY": KEY,
            "PUSHER_SECRET": SECRET,
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK (4 tests" in result.stdout  # every test ran and passed: none skipped
    assert native.recv() == '{"from":"php"}'
    assert native.recv() == "two"
    native.close()


def test_watchers_and_the_admin_page_see_pusher_sockets_and_members(app_server, clients):
    from conftest import ask_json, http_request

    watcher = app_server.control()
    assert ask_json(watcher, {"op": "watch"})["watching"]
    client = clients(app_server, user={"user_id": "ann", "user_info": {"name": "Ann"}})
    socket_id = client.connected()
    client.subscribe("presence-room")
    connect = json.loads(watcher.line())
    assert connect["event"] == "connect" and connect["conn"] == socket_id
    join = json.loads(watcher.line())
    assert join == {
        **join,
        "event": "join",
        "channel": "presence-room",
        "id": "ann",
        "meta": {"name": "Ann"},
    }
    status, _, page = http_request(app_server, "/admin")
    assert status == 200 and socket_id in page and "presence-room" in page and ">ann<" in page
    control = app_server.control()
    members = ask_json(control, {"op": "presence", "channel": "presence-room"})["members"]
    assert members == [{"id": "ann", "meta": {"name": "Ann"}}]
    control.close()
    client.do("disconnect")
    leave = json.loads(watcher.line())
    assert (leave["event"], leave["id"]) == ("leave", "ann")
    assert json.loads(watcher.line())["event"] == "disconnect"
    watcher.close()


def test_past_the_rate_no_client_event_is_relayed_and_no_ping_answered_after_the_close(
    server_factory,
):
    server = server_factory(
        *PUSHER, "--max-client-rate", "50", "--pusher-client-events", "yes", "--close-timeout", "2"
    )
    peer, flooder = raw_pusher(server), raw_pusher(server)
    raw_subscribe_private(peer, "private-room")
    raw_subscribe_private(flooder, "private-room")
    whisper = json.dumps({"event": "client-typing", "channel": "private-room", "data": {}})
    ping = json.dumps({"event": "pusher:ping", "data": {}})
    flooder.sock.sendall(
        b"".join(
            websocket.ABNF.create_frame(text, websocket.ABNF.OPCODE_TEXT).format()
            for text in [whisper] * 3000 + [ping] * 100
        )
    )
    after_close, closed = [], False
    try:
        while True:
            opcode, frame = flooder.recv_data_frame(control_frame=True)
            if closed:
                after_close.append(frame.data)
            closed = closed or opcode == websocket.ABNF.OPCODE_CLOSE
    except (websocket.WebSocketConnectionClosedException, OSError):
        pass
    assert closed and after_close == []  # no pusher:pong after our close frame
    control = server.control()
    assert control.ask("PUBLISH private-room sentinel").startswith("OK ")
    relayed = 0
    while (event := json.loads(peer.recv()))["event"] != "message":
        relayed += event["event"] == "client-typing"
    assert 0 < relayed < 50  # the window's 50 messages held the subscribe too
    control.close()


def test_a_frame_flood_closes_the_socket_with_a_backoff_code(server_factory):
    server = server_factory(*PUSHER, "--max-client-rate", "50")
    ws = raw_pusher(server)
    subscribe_many(ws, "f", 80)
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            assert int.from_bytes(frame.data[:2], "big") == 4100
            break
    ws.close()
