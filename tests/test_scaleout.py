"""Scale-out on Redis with real processes: `python wsboard.py` and gunicorn workers sharing
one id space through a real redis-server, including the failures (kill -9, SIGSTOP, Redis
stopped, frozen, restarted empty, its pub/sub clients killed)."""

import json
import os
import resource
import signal
import socket
import threading
import time

import pytest
import websocket
from conftest import (
    Control,
    RedisServer,
    ask_json,
    new_prefix,
    run_seed_php,
    seed_php_app,
    upgrade_request,
    wait_until,
)


def ask(server, line: str) -> str:
    """One line to a fresh control connection (a gunicorn master hands it to any worker)."""
    control = Control(server.control_path)
    try:
        return control.ask(line)
    finally:
        control.close()


def backplane(server) -> dict:
    control = Control(server.control_path)
    try:
        return ask_json(control, {"op": "stats"})["backplane"]
    finally:
        control.close()


@pytest.fixture
def cluster(server_factory, redis_server, tmp_path):
    """make(n, *flags): n wsboard processes on one Redis, each with its control socket."""
    prefix = new_prefix()

    def make(n=2, *flags, redis=redis_server, url=None):
        servers = [
            server_factory(
                "--control",
                str(tmp_path / f"control-{prefix}-{i}.sock"),
                "--redis",
                url or redis.url,
                "--redis-prefix",
                prefix,
                "--node-timeout",
                "3",
                "--presence-grace",
                "0",
                *flags,
            )
            for i in range(n)
        ]
        for server in servers:
            wait_until(lambda s=server: backplane(s)["state"] == "up", what="the redis link")
            server.node = backplane(server)["node"]
            server.prefix = prefix
        return servers

    return make


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, to stop, freeze and restart."""
    server = RedisServer(tmp_path / "own-redis").start()
    yield server
    server.stop()


def received_exactly(ws, expected: list, sentinel: str, send_sentinel) -> None:
    """ws gets expected (in any order), then sentinel: nothing twice, nothing in between."""
    got = [ws.recv() for _ in expected]
    assert sorted(got) == sorted(expected)
    send_sentinel()
    assert ws.recv() == sentinel


# Routing #####################################################################


def test_a_send_on_any_process_reaches_every_tab_of_the_id_exactly_once(cluster):
    p0, p1, p2 = cluster(3)
    tabs = [p0.websocket("a"), p1.websocket("a"), p1.websocket("a")]
    other = p2.websocket("b")
    for n, server in enumerate((p0, p1, p2)):
        assert ask(server, f"SEND MESSAGE a to a {n}") == "OK"
        assert ask(server, f"SEND MESSAGE b to b {n}") == "OK"
    for tab in tabs:
        received_exactly(
            tab, [f"to a {n}" for n in range(3)], "end", lambda: ask(p2, "SEND MESSAGE a end")
        )
    received_exactly(
        other, [f"to b {n}" for n in range(3)], "end", lambda: ask(p0, "SEND MESSAGE b end")
    )


def test_sends_to_an_id_held_only_here_publish_nothing_to_redis(cluster, redis_server):
    p0, p1 = cluster(2)
    mine = p0.websocket("mine")
    client = redis_server.client()

    def publishes() -> int:
        return client.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)

    before = publishes()
    control = Control(p0.control_path)
    control.send(b"SEND MESSAGE mine x\n" * 500)
    assert [control.line() for _ in range(500)] == [b"OK"] * 500
    assert publishes() - before < 20  # heartbeat probes only: none of the 500 went to Redis
    assert [mine.recv() for _ in range(500)] == ["x"] * 500


def test_pipelined_sends_through_another_process_are_answered_and_delivered_in_order(cluster):
    """Groups of SEND lines are under way several at once (GROUPS_IN_FLIGHT): every answer
    still comes in its line's place, a command between them waits for them, and each id
    gets its messages in order."""
    p0, p1 = cluster(2)
    far, near = p0.websocket("far"), p1.websocket("near")
    lines, expected, to_far, to_near = [], [], [], []
    for n in range(3000):
        if n % 10 == 3:
            lines.append(f"SEND MESSAGE ghost {n}")
            expected.append("ERROR Client Not Found")
        elif n % 10 == 7:
            lines.append(f"SEND MESSAGE near {n}")
            expected.append("OK")
            to_near.append(str(n))
        elif n == 1500:
            lines.append("PING")  # not a SEND: it waits for the groups before it
            expected.append("PONG")
        else:
            lines.append(f"SEND MESSAGE far  {n} ")  # spaces are part of the text
            expected.append("OK")
            to_far.append(f" {n} ")
    control = Control(p1.control_path)
    control.send(("\n".join(lines) + "\n").encode())
    assert [control.line().decode() for _ in lines] == expected
    assert [far.recv() for _ in to_far] == to_far
    assert [near.recv() for _ in to_near] == to_near
    assert ask(p1, "SEND MESSAGE far end") == "OK" and far.recv() == "end"


def test_publishes_ride_in_bundles_only_while_every_process_reads_them(cluster, redis_server):
    """A run of publishes to one route is one PUBLISH of a JSON list (BUS_VERSION 2). A
    process that has not said it reads them (an older wsboard during a rolling upgrade:
    its record in Redis has no "bus") turns them off until it is gone."""
    p0, p1 = cluster(2)
    far = p0.websocket("far")
    client = redis_server.client()
    wait_until(lambda: backplane(p1)["bundles"], what="bundles on")
    heard = client.pubsub()
    heard.subscribe(f"{p0.prefix}:i:far")
    assert heard.get_message(timeout=5)["type"] == "subscribe"

    def payloads(count: int) -> list:
        control = Control(p1.control_path)
        control.send(b"SEND MESSAGE far x\n" * count)
        assert [control.line() for _ in range(count)] == [b"OK"] * count
        assert [far.recv() for _ in range(count)] == ["x"] * count
        got, total = [], 0
        while total < count:
            message = heard.get_message(timeout=5)
            assert message is not None, f"heard {total} of {count}"
            data = json.loads(message["data"])
            got.append(data)
            total += len(data) if isinstance(data, list) else 1
        assert total == count
        return got

    bundled = payloads(1000)
    assert any(isinstance(p, list) and len(p) > 1 for p in bundled)
    assert len(bundled) < 1000

    old = f"{p0.prefix}:node:old"  # what an older process's beat leaves in Redis
    client.hset(old, mapping={"pid": 1, "host": "old", "pubsub": 0})
    stop = threading.Event()

    def old_beat() -> None:
        while not stop.is_set():
            client.zadd(f"{p0.prefix}:nodes", {"old": client.time()[0]})
            stop.wait(0.3)

    beater = threading.Thread(target=old_beat, daemon=True)
    beater.start()
    try:
        wait_until(lambda: not backplane(p1)["bundles"], what="bundles off")
        assert all(isinstance(p, dict) for p in payloads(600))
    finally:
        stop.set()
        beater.join()
        client.zrem(f"{p0.prefix}:nodes", "old")
        client.delete(old)
    wait_until(lambda: backplane(p1)["bundles"], what="bundles on again")


def test_a_tab_that_opens_on_another_process_gets_the_next_send_at_once(cluster):
    p0, p1 = cluster(2)
    first = p0.websocket("u")
    control = Control(p0.control_path)
    for n in range(15):
        second = p1.websocket("u")  # its 101 comes after p0 knows p1 holds "u" too
        assert control.ask(f"SEND MESSAGE u m{n}") == "OK"
        assert first.recv() == f"m{n}"
        got = second.recv()
        if got == f"only{n - 1}":  # sent just before it opened, on its way to p1 meanwhile
            got = second.recv()
        assert got == f"m{n}"
        second.close()
        assert control.ask(f"SEND MESSAGE u only{n}") == "OK"
        assert first.recv() == f"only{n}"
    received_exactly(first, [], "end", lambda: ask(p1, "SEND MESSAGE u end"))


def test_an_unknown_id_is_not_found_at_once_and_a_closed_socket_is_never_ok(cluster):
    p0, p1 = cluster(2)
    started = time.monotonic()
    assert ask(p0, "SEND MESSAGE nobody x") == "ERROR Client Not Found"
    assert time.monotonic() - started < 0.5
    for n in range(20):
        ws = p1.websocket(f"brief{n}")
        assert ask(p0, f"SEND MESSAGE brief{n} hello") == "OK"
        assert ws.recv() == "hello"
        ws.close()  # returns once the server's close frame came back
        assert ask(p0, f"SEND MESSAGE brief{n} late") == "ERROR Client Not Found"


def test_listings_counts_and_channels_show_every_process(cluster):
    p0, p1 = cluster(2)
    sockets = [p0.websocket("a"), p1.websocket("b"), p1.websocket("a")]
    control = Control(p0.control_path)
    assert sorted(row.split()[0] for row in control.list()) == ["a", "a", "b"]
    rows = ask_json(Control(p1.control_path), {"op": "list"})["clients"]
    assert sorted((r["id"], r["conn"].split(".")[0]) for r in rows) == sorted(
        [("a", p0.node), ("b", p1.node), ("a", p1.node)]
    )
    assert control.ask("COUNT") == "OK 3 2"
    assert control.ask("ONLINE b nobody a") == "OK b a"
    assert control.ask("JOIN room a") == "OK 2"
    assert control.ask("COUNT room") == "OK 2 1"
    assert control.ask("PUBLISH room to the room") == "OK 2"
    assert [sockets[0].recv(), sockets[2].recv()] == ["to the room"] * 2
    assert control.ask("BROADCAST everyone") == "OK 3"
    assert [ws.recv() for ws in sockets] == ["everyone"] * 3
    assert ask_json(control, {"op": "channels"})["channels"] == {"room": 2}
    assert control.ask("KICK a") == "OK 2"
    wait_until(lambda: control.ask("COUNT") == "OK 1 1", what="the kicked sockets to go")


def test_connection_ids_reach_one_socket_on_whichever_process_holds_it(cluster):
    p0, p1 = cluster(2)
    one = websocket.create_connection(p1.ws_url("u"), subprotocols=["wsboard.v1"])
    other = p0.websocket("u")
    conn = json.loads(one.recv())["hello"]["conn"]
    assert conn.startswith(p1.node + ".")
    control = Control(p0.control_path)
    assert ask_json(control, {"op": "send", "conn": conn, "data": "just you"})["ok"]
    assert json.loads(one.recv())["data"] == "just you"
    assert ask_json(control, {"op": "send", "conn": p0.node + ".999999", "data": "x"}) == {
        "ok": False,
        "error": "Client Not Found",
    }
    received_exactly(other, [], "end", lambda: ask(p1, "SEND MESSAGE u end"))


def test_a_keyed_retry_on_another_process_is_not_delivered_again(cluster):
    p0, p1 = cluster(2)
    ws = p0.websocket("k")
    first = ask_json(
        Control(p1.control_path), {"op": "send", "to": "k", "data": "once", "key": "K1"}
    )
    again = ask_json(
        Control(p0.control_path), {"op": "send", "to": "k", "data": "once", "key": "K1"}
    )
    assert first["ok"] and first["sockets"] == 1 and "duplicate" not in first
    assert again["ok"] and again.get("duplicate") is True
    received_exactly(ws, ["once"], "end", lambda: ask(p1, "SEND MESSAGE k end"))


def test_the_inbox_numbers_without_gaps_under_sends_from_every_process_and_resumes_anywhere(
    cluster,
):
    servers = cluster(3, "--inbox", "500")
    ws = websocket.create_connection(servers[0].ws_url("v"), subprotocols=["wsboard.v1"])
    epoch = json.loads(ws.recv())["hello"]["epoch"]

    def sender(server, n):
        control = Control(server.control_path)
        for i in range(50):
            assert ask_json(control, {"op": "send", "to": "v", "data": f"{n}-{i}"})["ok"]

    threads = [threading.Thread(target=sender, args=(s, n)) for n, s in enumerate(servers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    frames = [json.loads(ws.recv()) for _ in range(150)]
    assert [f["seq"] for f in frames] == list(range(1, 151))  # in order, no gap, no repeat
    assert sorted(f["data"] for f in frames) == sorted(
        f"{n}-{i}" for n in range(3) for i in range(50)
    )
    ws.close()
    url = servers[1].ws_url("v") + f"&epoch={epoch}&last=100"
    resumed = websocket.create_connection(url, subprotocols=["wsboard.v1"])
    hello = json.loads(resumed.recv())["hello"]
    assert (hello["epoch"], hello["seq"]) == (epoch, 150)
    assert [json.loads(resumed.recv())["seq"] for _ in range(50)] == list(range(101, 151))


def test_presence_members_are_counted_once_over_every_process(cluster):
    p0, p1, p2 = cluster(3)
    watcher = websocket.create_connection(
        p2.ws_url("w") + "&channel=presence-room", subprotocols=["wsboard.v1"]
    )
    assert "hello" in json.loads(watcher.recv())
    assert json.loads(watcher.recv())["presence"]["members"] == [{"id": "w", "meta": None}]
    here = websocket.create_connection(p0.ws_url("u") + "&channel=presence-room")
    there = websocket.create_connection(p1.ws_url("u") + "&channel=presence-room")
    assert json.loads(watcher.recv())["presence"]["join"] == {"id": "u", "meta": None}
    members = ask_json(Control(p0.control_path), {"op": "presence", "channel": "presence-room"})
    assert sorted(m["id"] for m in members["members"]) == ["u", "w"]
    here.close()
    time.sleep(0.3)
    there.close()
    assert json.loads(watcher.recv())["presence"] == {
        "channel": "presence-room",
        "leave": {"id": "u"},
    }
    received_exactly(
        watcher,
        [],
        json.dumps({"seq": None, "data": "end"}, separators=(",", ":")),
        lambda: ask(p0, "SEND MESSAGE w end"),
    )


def test_watchers_and_the_webhook_get_each_event_once(cluster, tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posted = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_port}/hook"
    p0, p1 = cluster(2, "--webhook", url)
    watcher = Control(p0.control_path)
    assert ask_json(watcher, {"op": "watch"})["ok"]
    ws = p1.websocket("evented")
    event = json.loads(watcher.line())
    assert (event["event"], event["id"]) == ("connect", "evented")
    wait_until(lambda: [e for e in posted if e.get("id") == "evented"], what="the webhook")
    time.sleep(0.5)
    assert [e["event"] for e in posted if e.get("id") == "evented"] == ["connect"]
    ws.close()
    event = json.loads(watcher.line())
    assert (event["event"], event["id"]) == ("disconnect", "evented")
    hook.shutdown()


# Process death ###############################################################


def node_keys(redis_server, server) -> list:
    return [k for k in redis_server.keys(server.prefix) if server.node in k]


def test_a_killed_process_leaves_routing_at_once_and_presence_and_redis_within_the_timeout(
    cluster, redis_server
):
    p0, p1 = cluster(2)
    watcher = websocket.create_connection(
        p0.ws_url("w") + "&channel=presence-room", subprotocols=["wsboard.v1"]
    )
    watcher.recv(), watcher.recv()  # hello, members
    victim = websocket.create_connection(p1.ws_url("victim") + "&channel=presence-room")
    assert json.loads(watcher.recv())["presence"]["join"]["id"] == "victim"
    assert node_keys(redis_server, p1)
    p1.proc.kill()
    p1.proc.wait()
    started = time.monotonic()
    control = Control(p0.control_path)
    wait_until(lambda: control.ask("SEND MESSAGE victim x") == "ERROR Client Not Found", timeout=2)
    assert control.ask("COUNT") == "OK 1 1"
    assert [row.split()[0] for row in control.list()] == ["w"]
    watcher.settimeout(15)
    assert json.loads(watcher.recv())["presence"] == {
        "channel": "presence-room",
        "leave": {"id": "victim"},
    }
    assert time.monotonic() - started < 15
    wait_until(lambda: not node_keys(redis_server, p1), timeout=5, what="the dead node's keys")
    assert not [c for c in redis_server.pubsub_channels(p1.prefix) if p1.node in c or "victim" in c]
    victim.close()


def test_a_hung_process_gets_timeout_never_ok_then_is_cut_off_and_comes_back(cluster):
    p0, p1 = cluster(2)
    sleeper = p1.websocket("sleeper")
    awake = p0.websocket("awake")
    os.kill(p1.proc.pid, signal.SIGSTOP)
    try:
        control = Control(p0.control_path)
        assert control.ask("SEND MESSAGE sleeper x") == "ERROR Timeout"
        control.send(b"LIST WEBSOCKETS\n")
        assert control.line() == b"ERROR Timeout"  # never a silently partial list
        assert control.ask("SEND MESSAGE awake still here") == "OK"
        assert awake.recv() == "still here"
        # After --node-timeout (3 s here) the others cut it off: answers are whole again.
        wait_until(lambda: control.ask("COUNT") == "OK 1 1", timeout=10, what="the cut-off")
        assert control.ask("SEND MESSAGE sleeper x") == "ERROR Client Not Found"
    finally:
        os.kill(p1.proc.pid, signal.SIGCONT)
    wait_until(
        lambda: control.ask("SEND MESSAGE sleeper back") == "OK", timeout=10, what="its return"
    )
    assert sleeper.recv() == "back"


def test_a_control_line_answered_after_the_idle_timeout_is_answered_not_cut(cluster):
    p0, p1 = cluster(2, "--control-idle-timeout", "1", "--redis-timeout", "2.5")
    p1.websocket("sleeper")
    os.kill(p1.proc.pid, signal.SIGSTOP)
    try:
        control = Control(p0.control_path)
        started = time.monotonic()
        assert control.ask("SEND MESSAGE sleeper x") == "ERROR Timeout"  # busy for 2.5 s
        assert time.monotonic() - started > 1.5
        assert control.ask("PING") == "PONG"
    finally:
        os.kill(p1.proc.pid, signal.SIGCONT)


def test_a_beat_a_moment_ago_across_a_second_boundary_is_not_stale(redis_server):
    """Beats are timed to the microsecond: in whole seconds, a process that beat at x.9 was
    taken for dead at x+1.05 under --node-timeout 1 (a reap of a live process)."""
    import wsboard

    client, nodes = redis_server.client(), f"{new_prefix()}:nodes"

    def beat(node: str) -> list:
        return [n.decode() for n in client.eval(wsboard.BEAT, 1, nodes, node, 1)]

    def redis_fraction() -> float:
        return client.time()[1] / 1e6

    wait_until(lambda: redis_fraction() >= 0.85, timeout=3, what="late in a second")
    assert beat("early") == []
    wait_until(lambda: redis_fraction() < 0.5, timeout=3, what="the next second")
    assert beat("late") == []  # "early" beat about 0.2 s ago: alive under a 1 s timeout
    client.zadd(nodes, {"gone": client.time()[0] - 2})
    assert beat("late") == ["gone"]
    client.delete(nodes)


# Redis trouble ###############################################################


def test_redis_stopped_then_restarted_empty(cluster, own_redis):
    p0, p1 = cluster(2, "--inbox", "10", redis=own_redis)
    here = p0.websocket("here")
    there = websocket.create_connection(
        p1.ws_url("there") + "&channel=presence-room", subprotocols=["wsboard.v1"]
    )
    epoch = json.loads(there.recv())["hello"]["epoch"]
    assert "members" in json.loads(there.recv())["presence"]
    assert ask(p0, "SEND MESSAGE there before") == "OK"
    assert json.loads(there.recv())["seq"] == 1
    own_redis.stop()
    control = Control(p0.control_path)
    assert control.ask("SEND MESSAGE here local still works") == "OK"
    assert here.recv() == "local still works"
    assert control.ask("SEND MESSAGE there x") == "ERROR Backplane Unavailable"
    control.send(b"LIST WEBSOCKETS\n")
    assert control.line() == b"ERROR Backplane Unavailable"
    wait_until(lambda: backplane(p0)["state"] == "down", timeout=5, what="state down")
    own_redis.start()  # empty: it kept nothing
    wait_until(lambda: control.ask("SEND MESSAGE there after") == "OK", timeout=10, what="resume")
    assert json.loads(there.recv())["data"] == "after"
    client = own_redis.client()
    wait_until(
        lambda: client.hkeys(f"{p1.prefix}:pc:presence-room") == [b"there"],
        timeout=5,
        what="presence rebuilt",
    )
    there.close()
    resumed = websocket.create_connection(
        p0.ws_url("there") + f"&epoch={epoch}&last=1", subprotocols=["wsboard.v1"]
    )
    hello = json.loads(resumed.recv())["hello"]
    assert hello["epoch"] != epoch  # numbered anew: the client is told of the gap
    assert json.loads(resumed.recv()) == {"gap": {"after": 0}}


def test_a_frozen_redis_gives_unavailable_not_a_hang_and_recovers(cluster, own_redis):
    p0, p1 = cluster(2, redis=own_redis)
    here, there = p0.websocket("here"), p1.websocket("there")
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        control = Control(p0.control_path)
        started = time.monotonic()
        # Sent to Redis and not answered: its fate is unknown (Redis may carry it out later).
        assert control.ask("SEND MESSAGE there early") == "ERROR Timeout"
        assert time.monotonic() - started < 2
        wait_until(lambda: backplane(p0)["state"] == "down", timeout=5, what="the probe")
        assert control.ask("SEND MESSAGE there x") == "ERROR Backplane Unavailable"
        assert control.ask("SEND MESSAGE here local") == "OK"
        assert here.recv() == "local"
        assert control.ask("PING") == "PONG"
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    wait_until(lambda: control.ask("SEND MESSAGE there back") == "OK", timeout=10, what="resume")
    assert there.recv() in ("early", "back")  # "early" was in Redis's buffer all along
    received_exactly(here, [], "end", lambda: ask(p1, "SEND MESSAGE here end"))


def test_killed_pubsub_links_reconnect_by_themselves(cluster, redis_server):
    p0, p1 = cluster(2)
    there = p1.websocket("there")
    killed = redis_server.client().execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed >= 2
    control = Control(p0.control_path)
    wait_until(lambda: control.ask("SEND MESSAGE there back") == "OK", timeout=10, what="resume")
    assert there.recv() == "back"


def test_churn_of_10000_sockets_leaves_redis_as_it_was(cluster, redis_server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 11_000:
        pytest.skip(f"needs 11000 descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 11_000), hard))
    (p0,) = cluster(
        1,
        "--max-connections", "10500",
        "--max-connections-per-ip", "10500",
        "--ping-interval", "0",
        "--log-level", "warning",
    )  # fmt: skip
    client = redis_server.client()
    control = Control(p0.control_path, timeout=30)
    channels_before = redis_server.pubsub_channels(p0.prefix)
    keys_before = redis_server.keys(p0.prefix)

    def churn():
        sockets = []
        for n in range(10_000):
            sock = socket.create_connection(("127.0.0.1", p0.port))
            sock.sendall(upgrade_request(f"?id=churn{n}&channel=room{n % 100}"))
            sockets.append(sock)
        for sock in sockets:
            assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        assert control.ask("COUNT") == "OK 10000 10000"
        assert len(redis_server.pubsub_channels(p0.prefix)) == len(channels_before) + 10_100
        for sock in sockets:
            sock.close()
        wait_until(lambda: control.ask("COUNT") == "OK 0 0", timeout=60, what="every socket to go")
        wait_until(
            lambda: redis_server.pubsub_channels(p0.prefix) == channels_before,
            timeout=10,
            what="the routes to go",
        )
        assert redis_server.keys(p0.prefix) == keys_before
        return client.info("memory")["used_memory"]

    # Redis keeps the tables it grew (and its clients' buffers) for the next burst: the first
    # churn sets that level, and a second one must end where the first did.
    after_first = churn()
    after_second = churn()
    assert after_second - after_first < 64 * 1024


# gunicorn ####################################################################


def test_a_full_gunicorn_worker_steps_aside_so_its_siblings_take_the_connections(
    gunicorn, redis_server, tmp_path
):
    """Two workers of one socket each share the listening socket, and one holds a socket.
    The kernel hands a connection to whichever worker accepts first, full or not: a full
    worker that kept accepting refused the retry after its 503 about every other time. It
    stops accepting for STEP_ASIDE after a refusal, so a retry made at once reaches its
    sibling: in 20 tries, never two 503s in a row."""
    env = {
        "WSBOARD_REDIS": redis_server.url,
        "WSBOARD_REDIS_PREFIX": new_prefix(),
        "WSBOARD_MAX_CONNECTIONS": "1",
    }
    server = gunicorn("--workers", "2", env=env)
    wait_until(server.ready, timeout=30, what="gunicorn")
    wait_until(lambda: backplane(server)["processes"] == 2, timeout=20, what="2 workers")
    url = f"ws://127.0.0.1:{server.port}/websocket?id="
    control = Control(server.control_path)
    held = websocket.create_connection(url + "held", timeout=10)
    wait_until(lambda: len(control.list()) == 1 or None, what="the held socket")
    refused, twice = 0, 0
    for n in range(20):
        answers = []
        while len(answers) < 5:
            try:
                ws = websocket.create_connection(url + f"try{n}", timeout=10)
            except websocket.WebSocketBadStatusException as exc:
                assert exc.status_code == 503
                answers.append(503)
                continue
            answers.append(101)
            break
        assert answers[-1] == 101, answers
        refused += answers.count(503)
        twice += answers[:2] == [503, 503]
        ws.close()
        wait_until(lambda: len(control.list()) == 1 or None, what="the try to be gone")
    assert twice == 0, f"{twice} of 20 tries were refused twice in a row ({refused} refusals)"
    held.close()


def test_two_gunicorn_instances_of_three_workers_share_every_id(gunicorn, redis_server, tmp_path):
    prefix = new_prefix()
    env = {"WSBOARD_REDIS": redis_server.url, "WSBOARD_REDIS_PREFIX": prefix}
    first = gunicorn("--workers", "3", env={**env, "WSBOARD_CONTROL": str(tmp_path / "a.sock")})
    second = gunicorn("--workers", "3", env={**env, "WSBOARD_CONTROL": str(tmp_path / "b.sock")})
    for instance in (first, second):
        wait_until(instance.ready, timeout=30, what="gunicorn")
    wait_until(
        lambda: redis_server.client().zcard(f"{prefix}:nodes") == 6, timeout=20, what="6 workers"
    )
    clients = {}
    for n in range(12):
        instance = (first, second)[n % 2]
        clients[f"g{n}"] = websocket.create_connection(
            f"ws://127.0.0.1:{instance.port}/websocket?id=g{n}", timeout=10
        )
    for n, (client_id, ws) in enumerate(clients.items()):
        instance = (second, first)[n % 2]  # the other instance, any of its workers
        assert ask(instance, f"SEND MESSAGE {client_id} hello {client_id}") == "OK"
        assert ws.recv() == f"hello {client_id}"
    for instance in (first, second):
        control = Control(instance.control_path)
        assert sorted(row.split()[0] for row in control.list()) == sorted(clients)
    app = seed_php_app(tmp_path, first.control_path, first.port)
    listed = run_seed_php(app, "print json_encode($serviceSocket->listConnections());")
    assert len(listed) == 12
    sent = run_seed_php(app, 'print json_encode($serviceSocket->sendMessage("g1", "from php"));')
    assert sent is True
    assert clients["g1"].recv() == "from php"


class Proxy:
    """A TCP proxy in front of Redis that can go silent towards its clients while every
    connection stays open: a half-open link, as a dead NAT entry or a stuck peer makes."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.silent = threading.Event()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self.pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, client, True), daemon=True).start()

    def pump(self, source, sink, to_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if not (to_client and self.silent.is_set()):
                    sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_a_half_open_link_is_found_by_the_probe_and_comes_back(cluster, redis_server):
    proxy = Proxy(redis_server.port)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    p0, p1 = cluster(2, url=url)
    there = p1.websocket("there")
    proxy.silent.set()  # every connection open, nothing coming back
    try:
        wait_until(lambda: backplane(p0)["state"] == "down", timeout=10, what="the probe")
        assert ask(p0, "SEND MESSAGE there x") == "ERROR Backplane Unavailable"
    finally:
        proxy.silent.clear()
    wait_until(lambda: ask(p0, "SEND MESSAGE there back") == "OK", timeout=15, what="resume")
    assert there.recv() in ("x", "back")
    proxy.close()


def test_gunicorn_keeps_its_workers_while_redis_is_frozen(gunicorn, own_redis, tmp_path):
    env = {"WSBOARD_REDIS": own_redis.url, "WSBOARD_REDIS_PREFIX": new_prefix()}
    server = gunicorn("--workers", "2", "--timeout", "3", env=env)
    wait_until(server.ready, timeout=30, what="gunicorn")
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/websocket?id=f", timeout=10)
        for _ in range(4):  # well past gunicorn's 3 s worker timeout
            assert ask(server, "SEND MESSAGE nobody x") in (
                "ERROR Timeout",
                "ERROR Backplane Unavailable",
            )
            time.sleep(1.5)
        assert ask(server, "PING") == "PONG"
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    wait_until(lambda: ask(server, "SEND MESSAGE f back") == "OK", timeout=15, what="resume")
    assert ws.recv() == "back"
    assert "WORKER TIMEOUT" not in server.log() and "Booting worker" in server.log()
    assert server.log().count("Booting worker") == 2


# Channel history across processes ############################################


def v1_socket(server, client_id, *channels, since=()):
    query = "".join(f"&channel={c}" for c in channels) + "".join(f"&since={s}" for s in since)
    ws = websocket.create_connection(
        server.ws_url(client_id) + query, timeout=10, subprotocols=["wsboard.v1"]
    )
    return ws, json.loads(ws.recv())["hello"]


def test_two_processes_publishing_to_one_channel_never_share_an_offset_and_are_seen_in_order(
    cluster,
):
    servers = cluster(2, "--history", "500")
    watchers = [v1_socket(server, f"w{n}", "news")[0] for n, server in enumerate(servers)]

    def publisher(server, n):
        control = Control(server.control_path)
        for i in range(60):
            answer = ask_json(control, {"op": "publish", "channel": "news", "data": f"{n}-{i}"})
            assert answer["ok"] and answer["sockets"] == 2, answer

    threads = [threading.Thread(target=publisher, args=(s, n)) for n, s in enumerate(servers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ws in watchers:  # each socket: offsets 1..120 in order, every publication once
        frames = [json.loads(ws.recv()) for _ in range(120)]
        assert [f["offsets"]["news"] for f in frames] == list(range(1, 121))
        assert sorted(f["data"] for f in frames) == sorted(
            f"{n}-{i}" for n in range(2) for i in range(60)
        )
    position = ask_json(Control(servers[1].control_path), {"op": "position", "channel": "news"})
    assert position["offset"] == 120


def test_a_socket_whose_process_is_killed_resumes_on_another_and_loses_nothing(cluster):
    p0, p1 = cluster(2, "--history", "100")
    ws, hello = v1_socket(p0, "reader", "news")
    epoch = hello["channels"]["news"]["epoch"]
    assert ask(p1, "PUBLISH news one") == "OK 1"
    seen = json.loads(ws.recv())
    assert seen == {"seq": None, "data": "one", "offsets": {"news": 1}}
    p0.proc.kill()  # kill -9: its socket drops with it
    p0.proc.wait()
    for text in ("two", "three"):  # while the reader is away
        assert ask(p1, f"PUBLISH news {text}") == "OK 0"
    back, hello = v1_socket(p1, "reader", "news", since=[f"news:{epoch}:1"])
    assert hello["channels"]["news"] == {"epoch": epoch, "offset": 3}
    got = [json.loads(back.recv()) for _ in range(2)]
    assert [(f["data"], f["offsets"]) for f in got] == [
        ("two", {"news": 2}),
        ("three", {"news": 3}),
    ]
    assert ask(p1, "PUBLISH news four") == "OK 1"
    assert json.loads(back.recv())["offsets"] == {"news": 4}


def test_a_publication_to_several_channels_is_replayed_once_across_processes(cluster):
    p0, p1 = cluster(2, "--history", "10")
    epochs = {c: ask(p0, f"POSITION {c}").split()[1] for c in ("a", "b")}
    request = {"op": "publish", "channel": ["a", "b"], "data": "both"}
    assert ask_json(Control(p1.control_path), request)["ok"]
    since = [f"{c}:{epochs[c]}:0" for c in ("a", "b")]
    ws, hello = v1_socket(p0, "late", "a", "b", since=since)
    assert {c: hello["channels"][c]["offset"] for c in ("a", "b")} == {"a": 1, "b": 1}
    assert json.loads(ws.recv()) == {"seq": None, "data": "both", "offsets": {"a": 1, "b": 1}}
    assert ask(p1, "PUBLISH a sentinel") == "OK 1"
    assert json.loads(ws.recv())["data"] == "sentinel"  # "both" came once


def test_the_history_op_and_a_gap_read_the_same_history_from_every_process(cluster):
    p0, p1 = cluster(2, "--history", "3")
    epoch = ask(p1, "POSITION news").split()[1]
    for n in range(1, 6):
        assert ask(p0, f"PUBLISH news m{n}") == "OK 0"
    page = ask_json(Control(p1.control_path), {"op": "history", "channel": "news"})
    assert [(p["offset"], p["data"]) for p in page["publications"]] == [
        (3, "m3"),
        (4, "m4"),
        (5, "m5"),
    ]
    since = {"op": "history", "channel": "news", "since": {"epoch": epoch, "offset": 1}}
    assert ask_json(Control(p0.control_path), since)["gap"] is True
    ws, _ = v1_socket(p1, "late", "news", since=[f"news:{epoch}:1"])
    assert json.loads(ws.recv()) == {"gap": {"channel": "news", "after": 1}}
    assert [json.loads(ws.recv())["data"] for _ in range(3)] == ["m3", "m4", "m5"]


def test_history_in_redis_is_bounded_per_channel_and_expires(cluster, redis_server):
    import redis as redis_py

    p0, _ = cluster(2, "--history", "5", "--history-ttl", "60")
    for n in range(20):
        ask(p0, f"PUBLISH news n{n}")
    client = redis_py.Redis.from_url(redis_server.url)
    assert client.llen(f"{p0.prefix}:hs:news") == 5
    assert 0 < client.ttl(f"{p0.prefix}:hs:news") <= 60
    assert 0 < client.ttl(f"{p0.prefix}:hm:news") <= 86400


def test_a_sticky_join_made_on_one_process_holds_for_sockets_opened_on_another(
    cluster, redis_server
):
    import redis as redis_py

    p0, p1 = cluster(2, "--history", "10", "--session-ttl", "3")
    join = {"op": "join", "channel": "news", "id": "sam", "sticky": True}
    assert ask_json(Control(p0.control_path), join) == {"ok": True, "sockets": 0}
    ws, hello = v1_socket(p1, "sam")  # names no channel: the sticky join puts it in
    assert "news" in hello["channels"]
    assert ask(p0, "PUBLISH news hi") == "OK 1"
    assert json.loads(ws.recv())["data"] == "hi"
    key = f"{p0.prefix}:st:sam"
    client = redis_py.Redis.from_url(redis_server.url)
    time.sleep(4)  # past --session-ttl: the open socket on p1 keeps it alive (every 0.6 s)
    assert client.exists(key)
    ws.close()
    wait_until(lambda: not client.exists(key), timeout=10, what="the sticky join to expire")
    again, hello = v1_socket(p0, "sam")
    assert "news" not in hello["channels"]


def test_a_leave_on_any_process_ends_a_sticky_join_everywhere(cluster):
    p0, p1 = cluster(2, "--history", "10")
    join = {"op": "join", "channel": "news", "id": "kim", "sticky": True}
    assert ask_json(Control(p1.control_path), join)["ok"]
    ws, _ = v1_socket(p0, "kim")
    assert ask(p1, "LEAVE news kim") == "OK 1"
    assert ask(p1, "PUBLISH news after") == "OK 0"
    ws.close()
    again, hello = v1_socket(p1, "kim")
    assert "news" not in hello["channels"]
    assert ask(p0, "LEAVE news kim") == "OK 0"  # nothing left, but kim has a socket


def test_sockets_that_resume_during_a_flood_of_publications_get_each_offset_once_in_order(
    cluster,
):
    p0, p1 = cluster(2, "--history", "1000")
    epoch = ask(p1, "POSITION news").split()[1]
    total = 400

    def flood():
        control = Control(p0.control_path)
        control.send(b"".join(f"PUBLISH news n{i}\n".encode() for i in range(total)))
        for _ in range(total):
            assert control.line().startswith(b"OK")

    publisher = threading.Thread(target=flood)
    publisher.start()
    sockets = []
    for n in range(12):  # opening while publications are numbered and heard
        ws, hello = v1_socket(p1, f"r{n}", "news", since=[f"news:{epoch}:0"])
        sockets.append(ws)
    publisher.join()
    for ws in sockets:
        offsets = []
        while not offsets or offsets[-1] < total:
            frame = json.loads(ws.recv())
            assert "gap" not in frame, frame
            offsets.append(frame["offsets"]["news"])
        assert offsets == list(range(1, total + 1))  # each once, in order, nothing lost


def test_sockets_that_resume_the_inbox_during_a_flood_of_sends_get_each_seq_once_in_order(
    cluster,
):
    p0, p1 = cluster(2, "--inbox", "1000")
    first, hello = v1_socket(p0, "v")
    epoch, total = hello["epoch"], 300

    def flood():
        control = Control(p0.control_path)
        control.send(b"".join(f"SEND MESSAGE v n{i}\n".encode() for i in range(total)))
        for _ in range(total):
            assert control.line() == b"OK"

    sender = threading.Thread(target=flood)
    sender.start()
    sockets = [first]
    for _ in range(10):  # opening while messages are numbered and heard
        url = p1.ws_url("v") + f"&epoch={epoch}&last=0"
        ws = websocket.create_connection(url, timeout=10, subprotocols=["wsboard.v1"])
        json.loads(ws.recv())  # its hello
        sockets.append(ws)
    sender.join()
    for n, ws in enumerate(sockets):
        seqs = []
        while not seqs or seqs[-1] < total:
            frame = json.loads(ws.recv())
            assert "gap" not in frame, frame
            seqs.append(frame["seq"])
        assert seqs == list(range(1, total + 1)), n  # each once, in order, nothing lost


def test_an_event_stream_on_one_process_is_reached_from_another(cluster):
    from test_events import Stream

    p0, p1 = cluster(2, "--history", "10")
    stream = Stream(p1.port, "id=streamer&channel=news")
    assert stream.event()["event"] == "hello"
    stream.event()  # where it is now
    assert ask(p0, "SEND MESSAGE streamer across") == "OK"
    assert stream.event() == {"data": "across"}
    assert ask(p0, "PUBLISH news headline") == "OK 1"
    published = stream.event()
    assert published["data"] == "headline" and published["id"].endswith(":1")
    assert any(row.startswith("streamer ") for row in Control(p0.control_path).list())
    assert ask(p0, "KICK streamer") == "OK 1"
    assert stream.event()["event"] == "close"
