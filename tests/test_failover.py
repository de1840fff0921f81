"""A backplane that survives failover: a real primary, a replica and three real sentinels
(redis-server --sentinel), a primary demoted under wsboard (REPLICAOF), a Redis Cluster
node refused."""

import json
import os
import subprocess
import sys
import time

import pytest
import websocket
from conftest import (
    ROOT,
    Control,
    RedisServer,
    ask_json,
    close_frame,
    free_port,
    new_prefix,
    wait_until,
)

import wsboard

SERVICE = "wsboard-primary"


def test_a_sentinel_url_names_its_sentinels_service_and_credentials():
    target = wsboard.parse_sentinel_url(
        "redis+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380/main?db=3"
    )
    assert target == wsboard.SentinelTarget(
        (("10.0.0.1", 26379), ("::1", 26380)), "main", 3, "app", "p@ss"
    )
    plain = wsboard.parse_sentinel_url("redis+sentinel://127.0.0.1:26379/main")
    assert (plain.db, plain.username, plain.password) == (0, None, None)


@pytest.mark.parametrize(
    "url, reason",
    [
        ("redis+sentinel://127.0.0.1/main", "HOST:PORT"),
        ("redis+sentinel://127.0.0.1:99999/main", "HOST:PORT"),
        ("redis+sentinel://127.0.0.1:26379/", "service"),
        ("redis+sentinel://127.0.0.1:26379/main?db=x", "db=N"),
        ("redis+sentinel://127.0.0.1:26379/main?timeout=1", "db=N"),
    ],
)
def test_a_bad_sentinel_url_stops_start_up_saying_why(url, reason):
    with pytest.raises(wsboard.ConfigError, match=reason):
        wsboard.load_config(["--redis", url], {})


class Sentinels:
    """Three redis-server --sentinel processes watching one primary: quorum 2, a primary
    taken for down after 1 s without an answer."""

    def __init__(self, directory, primary: RedisServer) -> None:
        self.procs, self.ports = [], []
        for n in range(3):
            port = free_port()
            conf = os.path.join(str(directory), f"sentinel-{n}.conf")
            os.makedirs(str(directory), exist_ok=True)
            with open(conf, "w") as f:
                f.write(
                    f"port {port}\nbind 127.0.0.1\nsentinel resolve-hostnames no\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                    f"sentinel failover-timeout {SERVICE} 5000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                )
            self.procs.append(
                subprocess.Popen(
                    ["redis-server", conf, "--sentinel", "--loglevel", "warning"],
                    stdout=subprocess.DEVNULL,
                )
            )
            self.ports.append(port)
        wait_until(lambda: self.primary() == primary.port, timeout=15, what="the sentinels")

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def primary(self) -> int | None:
        import redis

        try:
            client = redis.Redis(port=self.ports[0], socket_timeout=2)
            return int(client.sentinel_get_master_addr_by_name(SERVICE)[1])
        except Exception:
            return None

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def replicated(tmp_path):
    """A primary, its replica and three sentinels."""
    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", "0").start()
    replica.client().replicaof("127.0.0.1", primary.port)
    wait_until(
        lambda: replica.client().info("replication").get("master_link_status") == "up",
        what="the replica in sync",
    )
    sentinels = Sentinels(tmp_path / "sentinels", primary)
    yield primary, replica, sentinels
    sentinels.stop()
    replica.stop()
    primary.stop()


def stats(server) -> dict:
    control = Control(server.control_path)
    try:
        return ask_json(control, {"op": "stats"})
    finally:
        control.close()


def test_check_config_and_the_start_up_line_name_the_primary_the_sentinels_give(
    replicated, server_factory
):
    primary, _, sentinels = replicated
    checked = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "wsboard.py"),
            "check-config",
            "--redis",
            sentinels.url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    assert f"redis 127.0.0.1:{primary.port} (primary of '{SERVICE}'" in checked.stdout
    server = server_factory("--redis", sentinels.url, "--redis-prefix", new_prefix())
    server.wait_linked()
    assert f"redis 127.0.0.1:{primary.port} (primary of '{SERVICE}'" in server.log()
    assert f"redis link up to 127.0.0.1:{primary.port}" in server.log()


def test_a_failover_never_gets_a_false_ok_and_heals_without_a_restart(
    replicated, server_factory, tmp_path
):
    """kill -9 of the primary: every SEND answered OK meanwhile reached its socket; after
    the failover SEND, PUBLISH, presence and listings work across processes again."""
    primary, replica, sentinels = replicated
    prefix = new_prefix()
    common = ("--redis", sentinels.url, "--redis-prefix", prefix, "--presence-grace", "0")
    one = server_factory(*common, "--control", str(tmp_path / "one.sock")).wait_linked()
    two = server_factory(*common, "--control", str(tmp_path / "two.sock")).wait_linked()
    there = websocket.create_connection(two.ws_url("there") + "&channel=news", timeout=10)
    member = websocket.create_connection(
        two.ws_url("member") + "&channel=presence-room", subprotocols=["wsboard.v1"], timeout=10
    )
    control = Control(one.control_path)
    assert control.ask("SEND MESSAGE there before") == "OK"
    assert there.recv() == "before"
    primary.stop()  # kill -9
    answered_ok, started, n = [], time.monotonic(), 0
    while time.monotonic() - started < 30:
        n += 1
        answer = control.ask(f"SEND MESSAGE there during {n}")
        assert answer in ("OK", "ERROR Backplane Unavailable", "ERROR Timeout"), answer
        if answer == "OK":
            answered_ok.append(f"during {n}")
            if len(answered_ok) >= 3 and sentinels.primary() == replica.port:
                break
        time.sleep(0.05)
    assert sentinels.primary() == replica.port, "the sentinels did not fail over"
    assert len(answered_ok) >= 3, "sends did not come back after the failover"
    received = [there.recv() for _ in answered_ok]
    assert received == answered_ok  # every OK reached the socket, in order
    assert control.ask("PUBLISH news after the failover") == "OK 1"
    assert there.recv() == "after the failover"
    wait_until(lambda: len(control.list()) == 2, what="both sockets listed again")
    presence = ask_json(control, {"op": "presence", "channel": "presence-room"})
    assert [m["id"] for m in presence["members"]] == ["member"]
    assert f"redis link up to 127.0.0.1:{replica.port}" in one.log()
    control.close()
    there.close()
    member.close()


def test_a_primary_demoted_with_replicaof_is_a_link_down_and_heals(server_factory, tmp_path):
    """REPLICAOF sent to the node wsboard is connected to (what a proxy that keeps old
    sessions open does after a failover): no OK while it is a replica; back when it is a
    primary again."""
    node = RedisServer(tmp_path / "node").start()
    other = RedisServer(tmp_path / "other").start()
    try:
        prefix = new_prefix()
        common = ("--redis", node.url, "--redis-prefix", prefix, "--node-timeout", "2")
        one = server_factory(*common, "--control", str(tmp_path / "one.sock")).wait_linked()
        two = server_factory(*common, "--control", str(tmp_path / "two.sock")).wait_linked()
        there = websocket.create_connection(two.ws_url("there"), timeout=10)
        control = Control(one.control_path)
        assert control.ask("SEND MESSAGE there before") == "OK"
        assert there.recv() == "before"
        node.client().replicaof("127.0.0.1", other.port)
        answers = []  # what a SEND got until the demotion was noticed: each OK was true
        wait_until(
            lambda: answers.append(control.ask("SEND MESSAGE there x")) or answers[-1] != "OK",
            timeout=10,
            what="the demotion noticed",
        )
        assert [there.recv() for _ in range(answers.count("OK"))] == ["x"] * answers.count("OK")
        # "ERROR Timeout" says the outcome is unknown: such a send may still arrive.
        unknown = ["x"] if answers[-1] == "ERROR Timeout" else []
        for _ in range(10):
            answer = control.ask("SEND MESSAGE there during")
            assert answer.startswith("ERROR")
            unknown += ["during"] if answer == "ERROR Timeout" else []
        wait_until(lambda: stats(one)["backplane"]["state"] == "down", what="the link down")
        assert "not the primary" in one.log()
        node.client().replicaof("no", "one")  # a primary again
        wait_until(
            lambda: control.ask("SEND MESSAGE there after") == "OK", timeout=15, what="the heal"
        )
        while (text := there.recv()) != "after":
            assert text in unknown, text  # only a send whose answer was Timeout comes late
            unknown.remove(text)
        control.close()
        there.close()
    finally:
        node.stop()
        other.stop()


def test_a_redis_cluster_node_is_refused_at_start(server_factory, tmp_path):
    # The cluster bus is port + 10000 unless told: above 55535 it cannot bind and the node
    # never starts (a test that failed one run in three), so it gets a free port of its own.
    bus = str(free_port())
    node = RedisServer(tmp_path / "cluster", "--cluster-enabled", "yes", "--cluster-port", bus)
    node.start()
    try:
        server = server_factory("--redis", node.url, start=False)
        server.start(wait=False)
        assert server.proc.wait(30) == 2
        assert "Redis Cluster" in server.log() and "docs/scaleout.md" in server.log()
        checked = subprocess.run(
            [sys.executable, os.path.join(ROOT, "wsboard.py"), "check-config", "--redis", node.url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 2 and "Redis Cluster" in checked.stderr
    finally:
        node.stop()


def send_json(control, request: dict) -> dict:
    return json.loads(control.ask(json.dumps(request)))


def test_with_redis_wait_what_was_queued_before_a_failover_is_delivered_after_it(
    replicated, server_factory, tmp_path
):
    primary, replica, sentinels = replicated
    prefix = new_prefix()
    common = (
        "--redis", sentinels.url, "--redis-prefix", prefix, "--inbox", "100", "--offline-ok",
        "--redis-wait", "1",
    )  # fmt: skip
    one = server_factory(*common, "--control", str(tmp_path / "one.sock")).wait_linked()
    control = Control(one.control_path)
    for n in range(20):
        answer = send_json(control, {"op": "send", "to": "away", "data": f"kept {n}"})
        assert answer == {"ok": True, "sockets": 0, "queued": 1, "seq": {"away": n + 1}}, answer
    keyed = send_json(control, {"op": "send", "to": "away", "data": "once", "key": "k-1"})
    assert keyed["ok"] is True
    primary.stop()  # kill -9: the replica has every write answered above
    wait_until(lambda: sentinels.primary() == replica.port, timeout=30, what="the failover")
    wait_until(lambda: stats_state(one) == "up", timeout=30, what="the link on the new primary")
    again = send_json(control, {"op": "send", "to": "away", "data": "once", "key": "k-1"})
    assert again.get("duplicate") is True  # the idempotency key outlived the failover
    away = websocket.create_connection(one.ws_url("away"), subprotocols=["wsboard.v1"])
    assert "hello" in json.loads(away.recv())
    got = [json.loads(away.recv())["data"] for _ in range(21)]
    assert got == [f"kept {n}" for n in range(20)] + ["once"]
    away.close()
    control.close()


def stats_state(server) -> str:
    return stats(server)["backplane"]["state"]


def test_with_redis_wait_a_write_no_replica_took_answers_timeout(tmp_path, server_factory):
    alone = RedisServer(tmp_path / "alone").start()  # no replica at all
    try:
        common = ("--redis", alone.url, "--redis-prefix", new_prefix(), "--inbox", "10")
        one = server_factory(*common, "--offline-ok", "--redis-wait", "1").wait_linked()
        control = Control(one.control_path)
        assert control.ask("SEND MESSAGE away kept alone") == "ERROR Timeout"
        here = websocket.create_connection(one.ws_url("here"))
        # delivered to a socket now: OK says so, whatever the store keeps for its resumes
        assert control.ask("SEND MESSAGE here delivered") == "OK"
        assert here.recv() == "delivered"
        control.close()
        here.close()
    finally:
        alone.stop()


def test_a_reader_ahead_of_what_redis_kept_gets_a_gap_and_a_new_epoch(redis_server, server_factory):
    """Redis replicates asynchronously: after a failover the new primary may lack the last
    numbers a client already has. Its resume gets a gap and a new epoch, never a number it
    would take for one it has (simulated here by taking the numbers back in Redis)."""
    prefix = new_prefix()
    server = server_factory(
        "--redis", redis_server.url, "--redis-prefix", prefix, "--inbox", "10", "--history", "10"
    ).wait_linked()
    control = Control(server.control_path)
    ws = websocket.create_connection(
        server.ws_url("ann") + "&channel=news", subprotocols=["wsboard.v1"], timeout=10
    )
    hello = json.loads(ws.recv())["hello"]
    for n in range(5):
        assert control.ask(f"SEND MESSAGE ann direct {n}") == "OK"
        assert control.ask(f"PUBLISH news chan {n}") == "OK 1"
    seen = [json.loads(ws.recv()) for _ in range(10)]
    last_seq = max(m["seq"] for m in seen if m.get("seq"))
    news = [m for m in seen if "offsets" in m][-1]["offsets"]["news"]
    ws.close()
    client = redis_server.client()
    client.hset(f"{prefix}:im:ann", "seq", 2)  # what a replica promoted too early may hold
    client.hset(f"{prefix}:hm:news", "offset", 2)
    epoch, channel_epoch = hello["epoch"], hello["channels"]["news"]["epoch"]
    resumed = websocket.create_connection(
        server.ws_url("ann")
        + f"&epoch={epoch}&last={last_seq}&channel=news&since=news:{channel_epoch}:{news}",
        subprotocols=["wsboard.v1"],
        timeout=10,
    )
    opening = [json.loads(resumed.recv()) for _ in range(3)]
    again = opening[0]["hello"]
    assert again["epoch"] != epoch and again["channels"]["news"]["epoch"] != channel_epoch
    assert {"gap": {"after": 0}} in opening
    assert control.ask("SEND MESSAGE ann after") == "OK"
    assert json.loads(resumed.recv())["seq"] == 1  # numbered anew, in the new epoch
    resumed.close()
    control.close()


# Authentication and TLS to Redis, against a real redis-server configured for them.


def two_linked(server_factory, url: str, tmp_path) -> tuple:
    prefix = new_prefix()
    common = ("--redis", url, "--redis-prefix", prefix)
    one = server_factory(*common, "--control", str(tmp_path / "one.sock")).wait_linked()
    two = server_factory(*common, "--control", str(tmp_path / "two.sock")).wait_linked()
    return one, two


def sends_across(one, two) -> None:
    there = websocket.create_connection(two.ws_url("there"), timeout=10)
    control = Control(one.control_path)
    try:
        assert control.ask("SEND MESSAGE there across") == "OK"
        assert there.recv() == "across"
    finally:
        control.close()
        there.close()


def test_a_password_and_an_acl_user_are_used_and_never_shown(server_factory, tmp_path):
    node = RedisServer(
        tmp_path / "auth", "--requirepass", "default-pw",
        "--user", "app", "on", ">app-pw", "~*", "&*", "+@all",
    ).start_with(password="default-pw")  # fmt: skip
    try:
        one, two = two_linked(
            server_factory, f"redis://:default-pw@127.0.0.1:{node.port}/0", tmp_path
        )
        sends_across(one, two)
        acl = f"redis://app:app-pw@127.0.0.1:{node.port}/0"
        (tmp_path / "acl").mkdir()
        three, four = two_linked(server_factory, acl, tmp_path / "acl")
        sends_across(three, four)
        for server in (one, two, three, four):
            assert "default-pw" not in server.log() and "app-pw" not in server.log()
        wrong = server_factory(
            "--redis", f"redis://app:wrong@127.0.0.1:{node.port}/0", "--redis-prefix", new_prefix()
        )
        wait_until(lambda: "AuthenticationError" in stats(wrong)["backplane"]["error"], what="why")
        assert stats(wrong)["backplane"]["state"] == "down"
        control = Control(wrong.control_path)
        assert control.ask("SEND MESSAGE anyone x") == "ERROR Backplane Unavailable"
        control.close()
    finally:
        node.stop()


def make_certificates(directory) -> dict:
    """A CA and a certificate for 127.0.0.1 it signed, made with openssl for this test."""
    os.makedirs(directory, exist_ok=True)
    names = ("ca.key", "ca.crt", "r.key", "r.csr", "r.crt", "ext")
    path = {name: os.path.join(str(directory), name) for name in names}
    with open(path["ext"], "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", path["ca.key"], "-out",
         path["ca.crt"], "-days", "2", "-subj", "/CN=wsboard test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", path["r.key"], "-out", path["r.csr"],
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", path["r.csr"], "-CA", path["ca.crt"], "-CAkey", path["ca.key"],
         "-CAcreateserial", "-out", path["r.crt"], "-days", "2", "-extfile", path["ext"]],
    ):  # fmt: skip
        subprocess.run(["openssl", *command], check=True, capture_output=True)
    return path


def test_rediss_with_a_certificate_made_in_the_test(server_factory, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    tls_port = free_port()
    node = RedisServer(
        tmp_path / "tls", "--tls-port", str(tls_port), "--tls-cert-file", certs["r.crt"],
        "--tls-key-file", certs["r.key"], "--tls-ca-cert-file", certs["ca.crt"],
        "--tls-auth-clients", "no",
    ).start()  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={certs['ca.crt']}"
        one, two = two_linked(server_factory, url, tmp_path)
        sends_across(one, two)
        assert f"redis link up to 127.0.0.1:{tls_port}" in one.log()
        other = make_certificates(tmp_path / "other")  # a CA that did not sign the server's
        untrusted = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={other['ca.crt']}"
        refused = server_factory("--redis", untrusted, "--redis-prefix", new_prefix())
        wait_until(lambda: "certificate" in stats(refused)["backplane"]["error"], what="why")
        assert stats(refused)["backplane"]["state"] == "down"
    finally:
        node.stop()


def test_past_redis_lost_timeout_a_cut_off_process_sends_its_sockets_elsewhere(
    server_factory, tmp_path
):
    """--redis-lost-timeout 1: its sockets close with 1012 (reconnect at once, to a process
    still linked) and new ones get 503 until the link is back; a process without it keeps
    its sockets and serves what needs no Redis."""
    node = RedisServer(tmp_path / "lost").start()
    try:
        common = ("--redis", node.url, "--redis-prefix", new_prefix(), "--drain-window", "0")
        leaving = server_factory(
            *common, "--redis-lost-timeout", "1", "--control", str(tmp_path / "one.sock")
        ).wait_linked()
        staying = server_factory(*common, "--control", str(tmp_path / "two.sock")).wait_linked()
        ws = websocket.create_connection(leaving.ws_url("a"), timeout=10)
        kept = websocket.create_connection(staying.ws_url("b"), timeout=10)
        node.stop()
        started = time.monotonic()
        assert close_frame(ws)[0] == 1012
        assert 0.9 <= time.monotonic() - started < 6
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(leaving.ws_url("c"), timeout=5)
        assert refused.value.status_code == 503
        control = Control(staying.control_path)
        assert control.ask("SEND MESSAGE b still served here") == "OK"
        assert kept.recv() == "still served here"
        node.start()
        leaving.wait_linked()
        wait_until(lambda: _connects(leaving), what="sockets taken again")
        back = websocket.create_connection(leaving.ws_url("a"), timeout=10)
        back.close()
        assert "closing 1 sockets with 1012" in leaving.log()
        control.close()
        kept.close()
    finally:
        node.stop()


def _connects(server) -> bool:
    try:
        websocket.create_connection(server.ws_url("probe"), timeout=5).close()
        return True
    except websocket.WebSocketBadStatusException:
        return False
