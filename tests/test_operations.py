"""Running it like production: /metrics (read with prometheus_client's own parser),
/healthz and /readyz, on the main port and on --metrics-port."""

import json
import signal
import socket
import urllib.request

import websocket
from conftest import free_port, http_request, raw_http, upgrade_request, wait_until
from prometheus_client.parser import text_string_to_metric_families

import wsboard


def scrape(url: str) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample a scrape returns."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_health_answers_before_start_up_while_serving_and_while_draining():
    board = wsboard.Board(wsboard.Config())
    assert wsboard.health_answer(board, "/healthz") == (200, "ok\n")
    assert wsboard.health_answer(board, "/readyz") == (503, "not ready: starting\n")
    board.started = True
    assert wsboard.health_answer(board, "/readyz") == (200, "ready\n")
    board.draining = True
    assert wsboard.health_answer(board, "/readyz") == (503, "not ready: draining\n")


def test_buckets_count_as_prometheus_histograms_do():
    buckets = wsboard.Buckets((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0):
        buckets.observe(value)
    assert buckets.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]  # le is inclusive
    assert abs(buckets.total - 2.65) < 1e-9
    buckets.observe(0.5, 256)  # a group of SEND lines, each answered after the group's time
    assert buckets.cumulative() == [("0.1", 2), ("1.0", 259), ("+Inf", 260)]
    assert abs(buckets.total - 130.65) < 1e-9


def test_metrics_count_what_happened(server_factory):
    server = server_factory(
        "--pusher-app-id", "1", "--pusher-key", "k", "--pusher-secret", "s" * 16
    )
    plain = server.websocket("m1")
    v1 = websocket.create_connection(server.ws_url("m2"), timeout=10, subprotocols=["wsboard.v1"])
    v1.recv()  # its hello
    pusher = websocket.create_connection(f"ws://127.0.0.1:{server.port}/app/k?protocol=7")
    pusher.recv()
    assert raw_http(server.port, upgrade_request("?id=bad%20id")).startswith(b"HTTP/1.1 400")
    control = server.control()
    assert control.ask("SEND MESSAGE m1 hello") == "OK"
    assert control.ask("SEND MESSAGE nobody hello") == "ERROR Client Not Found"
    assert control.ask("PING") == "PONG"
    assert json.loads(control.ask('{"op":"count"}'))["sockets"] == 3
    assert plain.recv() == "hello"
    plain.close()
    wait_until(lambda: len(control.list()) == 2 or None, what="m1 to go")
    samples = scrape(server.url + "/metrics")  # loopback: no password needed without one set
    assert samples[("wsboard_sockets", (("protocol", "plain"),))] == 0
    assert samples[("wsboard_sockets", (("protocol", "wsboard.v1"),))] == 1
    assert samples[("wsboard_sockets", (("protocol", "pusher"),))] == 1
    assert samples[("wsboard_sends_total", (("answer", "ok"),))] == 1
    assert samples[("wsboard_sends_total", (("answer", "not_found"),))] == 1
    assert samples[("wsboard_closes_total", (("reason", "client_closed"),))] == 1
    assert samples[("wsboard_refusals_total", (("kind", "bad_id"),))] == 1
    assert samples[("wsboard_control_commands_total", (("verb", "send"),))] == 2
    assert samples[("wsboard_control_commands_total", (("verb", "json_count"),))] == 1
    assert samples[("wsboard_control_connections", ())] == 1
    assert samples[("wsboard_messages_delivered_total", ())] >= 1
    assert samples[("wsboard_delivered_bytes_total", ())] >= len(b"\x81\x05hello")
    assert samples[("wsboard_control_command_seconds_count", (("verb", "send"),))] == 2
    assert samples[("wsboard_delivery_seconds_count", ())] == 0  # a lone line's frame: at once
    assert samples[("wsboard_ready", ())] == 1
    assert ("wsboard_backplane_up", ()) not in samples  # no --redis
    control.send(b"SEND MESSAGE m2 one\nSEND MESSAGE m2 two\n")  # one read: its frames wait
    assert [control.line(), control.line()] == [b"OK", b"OK"]
    assert scrape(server.url + "/metrics")[("wsboard_delivery_seconds_count", ())] == 1
    control.close()
    v1.close()
    pusher.close()


def test_metrics_on_their_own_port_need_no_password_the_main_port_does(server_factory):
    port = free_port()
    server = server_factory(
        "--admin-password", "correct horse battery", "--metrics-port", str(port)
    )
    assert http_request(server, "/metrics")[0] == 401
    assert http_request(server, "/metrics", auth="admin:correct horse battery")[0] == 200
    assert scrape(f"http://127.0.0.1:{port}/metrics")[("wsboard_ready", ())] == 1
    assert http_request(server, "/healthz")[:1] == (200,)  # probes need no password
    assert http_request(server, "/readyz")[2] == "ready\n"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
        assert response.read() == b"ready\n"


def test_readyz_says_draining_during_the_shutdown_drain(server_factory):
    port = free_port()
    server = server_factory("--metrics-port", str(port), "--shutdown-timeout", "3")
    silent = socket.create_connection(("127.0.0.1", server.port))  # a client that never
    silent.sendall(upgrade_request("?id=silent"))  # answers the close frame
    server.wait_listed(1)
    server.proc.send_signal(signal.SIGTERM)

    def readyz():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    assert wait_until(lambda: readyz()[0] == 503 and readyz(), timeout=3) == (
        503,
        b"not ready: draining\n",
    )
    assert server.proc.wait(timeout=15) == 0
    silent.close()


def test_readyz_says_when_the_backplane_is_down(server_factory, tmp_path):
    from conftest import RedisServer, new_prefix

    redis = RedisServer(tmp_path / "redis").start()
    try:
        server = server_factory("--redis", redis.url, "--redis-prefix", new_prefix())
        wait_until(lambda: http_request(server, "/readyz")[0] == 200, what="the redis link")
        assert scrape(server.url + "/metrics")[("wsboard_backplane_up", ())] == 1
        redis.stop()
        status, _, text = wait_until(
            lambda: (answer := http_request(server, "/readyz"))[0] == 503 and answer,
            what="readyz to notice",
        )
        assert text == "not ready: backplane down\n"
        assert scrape(server.url + "/metrics")[("wsboard_backplane_up", ())] == 0
        assert http_request(server, "/healthz")[0] == 200  # it still serves: alive, not ready
    finally:
        redis.stop()
