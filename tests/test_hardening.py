"""What an adversarial trial broke, each reproduced against the real server."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import websocket
from conftest import (
    ROOT,
    Control,
    ask_json,
    close_frame,
    drain_answers,
    http_request,
    raw_http,
    upgrade_request,
    wait_until,
)

# One control client cannot hold the server ###################################


def test_a_batch_of_broadcasts_does_not_hold_other_control_clients(server_factory):
    server = server_factory("--max-connections-per-ip", "1000")
    sockets = [server.websocket(f"many{n}") for n in range(400)]
    server.wait_listed(400)
    busy, other = server.control(), server.control()
    lines = 2000  # 800,000 frames: seconds of work on any machine, against one slice of 5 ms
    busy.send(b"BROADCAST x\n" * lines)
    wait_until(lambda: drain_answers(busy) or None, what="the batch to be under way")
    other.send(b"PING\n")
    assert other.line() == b"PONG"
    assert drain_answers(busy) < lines  # PONG came while the batch was still being answered
    assert [busy.line() for _ in range(lines)] == [b"OK 400"] * lines
    assert sockets[-1].recv() == "x"


def test_a_socket_that_dies_mid_batch_is_reported_once(server_factory):
    server = server_factory("--max-connections-per-ip", "1000")
    live = [server.websocket(f"live{n}") for n in range(300)]
    dead = server.websocket("dead1")
    server.wait_listed(301)
    control = server.control()
    lines = 2000  # seconds of work on any machine: the reset lands inside the batch
    control.send(b"BROADCAST y\n" * lines)
    wait_until(lambda: drain_answers(control) or None, what="the batch to be under way")
    dead.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    dead.sock.close()
    answers = [control.line() for _ in range(lines)]
    assert answers[0] == b"OK 301" and answers[-1] == b"OK 300"
    wait_until(lambda: "disconnect dead1 " in server.log() or None, what="the disconnect")
    log = server.log()
    assert log.count("disconnect dead1 ") == 1
    assert log.count("dropped dead1 ") <= 1  # when a write, not the reader, found it dead
    assert live[0].recv() == "y"


# Slow requests ################################################################


def test_a_request_head_that_dribbles_in_is_cut_at_the_deadline(server_factory):
    server = server_factory("--handshake-timeout", "1")
    sock = socket.create_connection(("127.0.0.1", server.port))
    started = time.monotonic()
    ended = None
    for byte in upgrade_request("?id=slow")[:40]:  # each read is quick, the head is not
        try:
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
            sock.settimeout(0)
            answer = sock.recv(4096)
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        ended = time.monotonic() - started
        break
    assert ended is not None, "the server waited for the whole dribbled head"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")
    assert ended < 3
    assert server.control().list() == []


def test_pending_request_heads_are_capped_per_address(server_factory):
    server = server_factory("--max-handshakes-per-ip", "5", "--handshake-timeout", "30")
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]

    def sixth() -> (
        bytes | None
    ):  # refused once the server has taken the five; until then it gets in
        answer = raw_http(server.port, upgrade_request("?id=sixth"))
        return answer if answer.startswith(b"HTTP/1.1 503 ") else None

    assert b"in progress from this address" in wait_until(sixth, what="a sixth head refused")
    # another address is not held up by this one
    other = socket.socket()
    other.bind(("127.0.0.2", 0))
    other.connect(("127.0.0.1", server.port))
    other.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    other.settimeout(5)
    assert other.recv(12) == b"HTTP/1.1 200"
    for sock in silent:
        sock.close()
    wait_until(
        lambda: (
            raw_http(server.port, upgrade_request("?id=later")).startswith(b"HTTP/1.1 101") or None
        ),
        what="a handshake once the slow heads are gone",
    )


def test_too_many_headers_is_one_log_line_not_a_traceback(server):
    headers = "".join(f"X-H{n}: v\r\n" for n in range(120))
    answer = raw_http(server.port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
    assert answer.split(b" ")[1] in (b"400", b"431")
    wait_until(lambda: "refused request from" in server.log() or None, what="the refusal line")
    assert "Traceback" not in server.log()


# Every line gets its answer ###################################################


@pytest.mark.parametrize(
    "line",
    [
        '{"op":"send","to":"a","data":' + "[" * 2000 + "]" * 2000 + "}",
        '{"op":"send","to":"victim","data":"\\ud800"}',
        '{"op":"kick","id":"victim","code":4000.0}',
        '{"op":"send","to":"victim","data":NaN}',
        '{"op":"send","to":"victim","data":1e999}',
    ],
)
def test_inputs_that_once_dropped_the_connection_get_an_answer_and_the_next_line_too(server, line):
    victim = server.websocket("victim")
    server.wait_listed(1)
    control = server.control()
    control.send(line.encode() + b"\nPING\n")
    answer = json.loads(control.line())
    assert answer["ok"] is False and answer["error"]
    assert control.line() == b"PONG"
    assert ask_json(control, {"op": "kick", "id": "victim", "code": 4001, "reason": "bye"}) == {
        "ok": True,
        "sockets": 1,
    }
    assert close_frame(victim) == (4001, "bye")


def test_a_deeply_nested_send_message_body_is_a_400(server):
    status, _, body = http_request(server, "/sendMessage", b"[" * 50_000 + b"]" * 50_000)
    assert status == 400 and json.loads(body)["error"] is True


def test_a_short_send_message_body_is_a_408_not_a_500(server_factory):
    server = server_factory("--handshake-timeout", "1")
    answer = raw_http(
        server.port,
        b"POST /sendMessage HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"clientId":',
    )
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert "Traceback" not in server.log()


# DNS rebinding ################################################################


def rebound(server, path, body=None):
    host = f"evil.example:{server.port}"
    headers = {"Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}
    return http_request(server, path, body, headers=headers)


SEND = b'{"clientId": "target", "message": "pwned"}'


def test_a_rebound_host_cannot_use_the_password_less_admin_routes(server):
    target = server.websocket("target")
    server.wait_listed(1)
    status, _, body = rebound(server, "/sendMessage", SEND)
    assert status == 403 and "Host not allowed" in json.loads(body)["message"]
    assert rebound(server, "/admin")[0] == 403
    assert server.control().ask("SEND MESSAGE target sentinel") == "OK"
    assert target.recv() == "sentinel"  # the rebound send delivered nothing before it


def test_a_rebound_host_cannot_open_a_same_origin_websocket(server):
    host = f"evil.example:{server.port}"
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(
            server.ws_url("victim"), timeout=5, host=host, origin=f"http://{host}"
        )
    assert info.value.status_code == 403


def test_a_listed_host_is_believed(server_factory):
    server = server_factory("--allowed-hosts", "evil.example")
    host = f"evil.example:{server.port}"
    ws = websocket.create_connection(
        server.ws_url("fine"), timeout=5, host=host, origin=f"http://{host}"
    )
    assert rebound(server, "/admin")[0] == 200
    ws.close()


# The control socket's place ###################################################


def test_a_control_socket_in_a_world_writable_directory_is_refused(server_factory, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    server = server_factory("--control", str(shared / "c.sock"), start=False)
    server.start(wait=False)
    assert server.proc.wait(timeout=15) == 1
    assert "writable by everyone without the sticky bit" in server.log()


def test_a_control_socket_in_a_sticky_shared_directory_is_warned_about(server_factory, tmp_path):
    shared = tmp_path / "sticky"
    shared.mkdir()
    shared.chmod(0o1777)
    server = server_factory("--control", str(shared / "c.sock"))
    assert "another user could take the path first" in server.log()


def test_the_default_control_socket_is_in_a_private_directory(tmp_path):
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    env.pop("WSBOARD_CONTROL", None)
    out = subprocess.run(
        [sys.executable, "wsboard.py", "check-config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip().rsplit(" ", 1)[1]
    directory = os.path.dirname(path)
    info = os.stat(directory)
    assert path.endswith("/wsboard.sock")
    assert directory == ("/run/wsboard" if os.access("/run", os.W_OK) else str(tmp_path))
    assert not info.st_mode & 0o022 and info.st_uid == os.getuid()


# Descriptors ##################################################################


def test_under_a_small_descriptor_limit_clients_past_it_get_503(server_factory):
    def small_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    server = server_factory(start=False)
    server.log_file = open(server.log_path, "ab")
    server.proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "wsboard.py"), *server.args],
        stdout=server.log_file,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        preexec_fn=small_limit,
    )
    wait_until(server.ready, what="wsboard under ulimit -n 256")
    assert "limits lowered" in server.log()
    opened, refused = [], 0
    for n in range(230):
        try:
            opened.append(websocket.create_connection(server.ws_url(f"fd{n}"), timeout=5))
        except websocket.WebSocketBadStatusException as exc:
            assert exc.status_code == 503
            refused += 1
    assert refused > 0 and len(opened) + refused == 230
    assert server.control().ask("PING") == "PONG"
    assert http_request(server, "/")[0] == 200
    assert "Traceback" not in server.log() and "EMFILE" not in server.log()


# Limits and handshakes in flight ##############################################


def test_concurrent_handshakes_past_a_limit_get_503_never_101_then_1013(server_factory):
    server = server_factory("--max-connections-per-ip", "40")
    results = []

    def connect(n):
        try:
            ws = websocket.create_connection(server.ws_url(f"burst{n}"), timeout=10)
            results.append(("open", ws))
        except websocket.WebSocketBadStatusException as exc:
            results.append((exc.status_code, None))

    threads = [threading.Thread(target=connect, args=(n,)) for n in range(120)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    opened = [ws for kind, ws in results if kind == "open"]
    assert len(opened) == 40 and sorted({kind for kind, _ in results if kind != "open"}) == [503]
    server.wait_listed(40)
    assert server.control().ask("BROADCAST still open") == "OK 40"
    assert all(ws.recv() == "still open" for ws in opened)


def test_a_send_the_moment_the_client_has_its_101_reaches_it(server_factory):
    server = server_factory("--max-handshakes-per-ip", "200")
    control = server.control()
    for round_ in range(3):
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(60)]
        for n, sock in enumerate(socks):  # many handshakes in flight at once
            sock.sendall(upgrade_request(f"?id=race{round_}x{n}"))
        for n, sock in enumerate(socks):
            sock.settimeout(5)
            head = sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert control.ask(f"SEND MESSAGE race{round_}x{n} now") == "OK", (round_, n)
        for sock in socks:
            sock.close()


def test_a_socket_cut_for_a_full_queue_leaves_list_and_send_together(server_factory):
    server = server_factory("--queue-messages", "2", "--queue-bytes", "100000")
    stuck = socket.create_connection(("127.0.0.1", server.port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(upgrade_request("?id=stuck"))
    stuck.recv(1024)
    server.wait_listed(1)
    control = server.control()
    big = "z" * 60_000
    for _ in range(1000):
        answer = control.ask(f"SEND MESSAGE stuck {big}")
        if answer != "OK":
            break
    assert answer == "ERROR Client Not Found"  # cut: its queue overflowed
    assert control.list() == []  # at once, not after the close timeout


# Behind a proxy ###############################################################


def test_behind_a_trusted_proxy_listings_show_the_browsers_address(server_factory):
    server = server_factory("--trusted-proxies", "127.0.0.1")
    ws = server.websocket("proxied", header=["X-Forwarded-For: 203.0.113.9"])
    (row,) = server.wait_listed(1)
    assert row == f"proxied 203.0.113.9:{ws.sock.getsockname()[1]}"
    assert ask_json(server.control(), {"op": "list"})["clients"][0]["peer"].startswith(
        "203.0.113.9:"
    )
    wait_until(lambda: "connect proxied 203.0.113.9:" in server.log() or None, what="the log")


# Inbox bounds #################################################################


def test_the_inbox_keeps_within_its_total_byte_budget(server_factory):
    server = server_factory("--inbox", "10", "--inbox-total-bytes", "100000")
    control = server.control()
    for n in range(40):
        assert ask_json(control, {"op": "send", "to": f"off{n}", "data": "q" * 10_000})["ok"]
    stats = ask_json(control, {"op": "stats"})
    assert 0 < stats["inbox_bytes"] <= 100_000 and stats["inbox_ids"] <= 10


def test_a_plain_socket_gets_what_was_queued_while_its_id_was_offline(server_factory):
    server = server_factory("--inbox", "10")
    answer = ask_json(server.control(), {"op": "send", "to": "later", "data": "kept for you"})
    assert answer["queued"] == 1
    first = server.websocket("later")
    assert first.recv() == "kept for you"
    second = server.websocket("later")
    server.wait_listed(2)
    assert server.control().ask("SEND MESSAGE later sentinel") == "OK"
    assert second.recv() == "sentinel"  # the queued message went to the first socket only
    assert first.recv() == "sentinel"


# gunicorn #####################################################################


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_gunicorn_quick_stops_still_close_every_socket_with_1001(gunicorn, sig):
    server = gunicorn()
    wait_until(server.ready, timeout=30, what="gunicorn to start")
    sockets = [
        websocket.create_connection(f"ws://127.0.0.1:{server.port}/websocket?id=q{n}", timeout=10)
        for n in range(6)
    ]
    wait_until(lambda: len(Control(server.control_path).list()) == 6 or None, what="6 sockets")
    server.proc.send_signal(sig)
    assert [close_frame(ws)[0] for ws in sockets] == [1001] * 6
    server.proc.wait(timeout=30)
    assert not os.path.exists(server.control_path)


def test_gunicorn_binds_an_ipv6_host(gunicorn):
    server = gunicorn(env={"WSBOARD_HOST": "::1"})
    wait_until(server.ready, timeout=30, what="gunicorn on ::1")
    ws = websocket.create_connection(f"ws://[::1]:{server.port}/websocket?id=six", timeout=10)
    assert Control(server.control_path).ask("SEND MESSAGE six hi") == "OK"
    assert ws.recv() == "hi"


def test_gunicorn_with_a_bad_setting_says_so_in_one_line(gunicorn):
    server = gunicorn(env={"WSBOARD_PING_TIMEOUT": "soon"})
    assert server.proc.wait(timeout=30) != 0
    assert "wsboard: WSBOARD_PING_TIMEOUT='soon': is not a number" in server.log()
    assert "Traceback" not in server.log() and "Worker failed to boot" not in server.log()


# Installing ###################################################################


@pytest.mark.slow
def test_an_installed_copy_finds_its_views_and_gunicorn_conf(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            ROOT,
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = [sys.executable, "-c", "import sys, wsboard; sys.exit(wsboard.main(sys.argv[1:]))"]
    help_text = subprocess.run(
        [*run, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "check-config" in help_text.stdout
    conf = subprocess.run(
        [*run, "gunicorn-conf"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert conf.returncode == 0 and conf.stdout.strip().startswith(str(target))
    views = subprocess.run(
        [sys.executable, "-c", "import wsboard; print(wsboard.VIEWS)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert views.stdout.strip() == str(target / "wsboard_views")


def test_sigterm_during_a_long_batch_is_acted_on_at_once(server_factory):
    server = server_factory("--max-connections-per-ip", "1000", "--drain-window", "0")
    sockets = [server.websocket(f"term{n}") for n in range(400)]
    server.wait_listed(400)
    busy = server.control()
    busy.send(b"BROADCAST z\n" * 2000)  # seconds of work for one connection
    time.sleep(0.1)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert close_frame(sockets[0]) == (1001, "server shutting down; reconnect")
    assert time.monotonic() - started < 2.5
    answers = [busy.line() for _ in range(2000)]  # each line answered, none falsely OK
    done = answers.count(b"OK 400")
    assert 0 < done < 2000 and answers[done:] == [b"ERROR Shutting down"] * (2000 - done)
    assert server.stop() == 0


# Round 2: after our close frame, nothing a browser sends is acted on ##########


def masked_text_frames(text: str, count: int) -> bytes:
    frame = websocket.ABNF.create_frame(text, websocket.ABNF.OPCODE_TEXT).format()
    return frame * count


def frames_after_close(ws) -> list:
    """Read up to the server's close frame, then until the connection ends: the opcodes of
    every frame that came after the close (RFC 6455 5.5.1: there must be none)."""
    close_frame(ws)
    after = []
    try:
        while True:
            opcode, _ = ws.recv_data_frame(control_frame=True)
            after.append(opcode)
    except (websocket.WebSocketConnectionClosedException, OSError):
        return after


def test_a_browser_past_its_rate_gets_nothing_more_done_in_the_close_window(server_factory):
    server = server_factory("--max-client-rate", "50", "--close-timeout", "2")
    watcher = server.control()
    assert ask_json(watcher, {"op": "watch"}) == {"ok": True, "watching": True}
    flooder = server.websocket("flooder")
    ping = websocket.ABNF.create_frame("p", websocket.ABNF.OPCODE_PING).format()
    flooder.sock.sendall(masked_text_frames("x", 3000) + ping * 100)
    assert frames_after_close(flooder) == []  # no pong after our close, however many pings
    messages = 0
    while True:  # the disconnect is told after every message the socket's session took
        event = json.loads(watcher.line())
        if event["event"] == "message":
            messages += 1
        elif event["event"] == "disconnect":
            break
    assert messages == 50


# Round 2: numbers from outside are bounded before they are converted ###########


def test_numbers_too_long_for_int_get_a_400_with_a_reason(server):
    huge = "9" * 5000
    answer = raw_http(server.port, upgrade_request(f"?id=v&epoch=9f1c&last={huge}"))
    assert answer.startswith(b"HTTP/1.1 400") and b"Invalid resume point" in answer
    answer = raw_http(server.port, upgrade_request("?id=v&epoch=nothex&last=1"))
    assert answer.startswith(b"HTTP/1.1 400") and b"Invalid resume point" in answer
    for query in (f"offset={huge}", f"limit={huge}", "offset=-1"):
        status, _, text = http_request(server, f"/admin/state.json?{query}")
        assert status == 400 and "whole numbers" in json.loads(text)["error"], query
    assert http_request(server, "/admin/state.json?offset=0&limit=5")[0] == 200
    assert "Traceback" not in server.log()
    assert server.control().ask("PING") == "PONG"


# A plain upgrade is read at once; anything else as pywsgi reads it ##############


def opened_then_pong(sock: socket.socket) -> bytes:
    """What the server answers: its 101, then the pong to the ping sent with the head."""
    sock.settimeout(5)
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 3:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


def test_a_frame_that_comes_with_the_head_is_read_after_the_101(server_factory):
    server = server_factory()
    ping = websocket.ABNF.create_frame("hi", websocket.ABNF.OPCODE_PING).format()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(upgrade_request("?id=eager") + ping)  # one segment: head and frame
        head, _, frames = opened_then_pong(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert frames[:4] == b"\x8a\x02hi"  # the pong: the frame was not lost with the head
        assert [row.split()[0] for row in server.control().list()] == ["eager"]


def test_an_upgrade_whose_head_comes_in_pieces_still_opens(server_factory):
    server = server_factory()
    request = upgrade_request("?id=pieces")
    ping = websocket.ABNF.create_frame("hi", websocket.ABNF.OPCODE_PING).format()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request[:30])
        time.sleep(0.2)  # the server has peeked half a head: pywsgi reads it
        sock.sendall(request[30:] + ping)
        head, _, frames = opened_then_pong(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert frames[:4] == b"\x8a\x02hi"


def test_a_pong_alone_in_pieces_or_with_a_frame_behind_it_is_read_whole(server_factory):
    """A lone pong is taken in the event loop; one in pieces, or with a frame behind it in
    the same segment, goes on to the reading greenlet, and nothing is lost on the way."""
    server = server_factory()
    pong = websocket.ABNF.create_frame("", websocket.ABNF.OPCODE_PONG).format()
    ping = websocket.ABNF.create_frame("hi", websocket.ABNF.OPCODE_PING).format()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(5)
        sock.sendall(upgrade_request("?id=ponger"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        server.wait_listed(1)
        sock.sendall(pong)  # alone
        sock.sendall(pong[:3])  # in pieces
        time.sleep(0.2)
        sock.sendall(pong[3:])
        sock.sendall(pong + ping)  # with a frame behind it, in one segment
        frames = b""
        while len(frames) < 4:
            frames += sock.recv(64)
        assert frames == b"\x8a\x02hi"  # the ping behind the pongs was read and answered
        assert [row.split()[0] for row in server.control().list()] == ["ponger"]


def test_a_refused_plain_upgrade_gets_its_status_and_the_connection_serves_on(server_factory):
    server = server_factory()
    page = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(upgrade_request("?id=bad%20id") + page)  # refused, then a page asked
        answer = b""
        while answer.count(b"HTTP/1.1 ") < 2:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Invalid client id" in answer
    assert b"HTTP/1.1 200 " in answer.partition(b"Invalid client id")[2]
