"""The real server over real sockets: the WebSocket port, the UNIX control socket, the pages."""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import websocket
from conftest import (
    ROOT,
    Control,
    close_frame,
    http_request,
    raw_http,
    upgrade_request,
    wait_until,
)

# Listing and sending ##########################################################


def test_list_websockets_is_empty_on_a_fresh_server(server):
    control = server.control()
    assert control.list() == []


def test_a_websocket_is_listed_with_its_host_and_port(server):
    ws = server.websocket("board1")
    host, port = ws.sock.getsockname()[:2]
    assert server.wait_listed(1) == [f"board1 {host}:{port}"]


def test_list_websockets_answers_in_the_seeds_exact_bytes(server):
    ws = server.websocket("abc")
    server.wait_listed(1)
    control = server.control()
    control.send(b"LIST WEBSOCKETS\n")
    expected = f"=== START ===\nabc 127.0.0.1:{ws.sock.getsockname()[1]}\n=== END ===\n".encode()
    received = b""
    while len(received) < len(expected):
        received += control.sock.recv(4096)
    assert received == expected


def test_send_message_keeps_spaces_and_utf8_in_the_text(server):
    ws = server.websocket("tab")
    server.wait_listed(1)
    text = '{"message":"  two  spaces, h\u00e9llo \u2603 \U0001f600 "}'
    assert server.control().ask(f"SEND MESSAGE tab {text}") == "OK"
    assert ws.recv() == text


def test_send_message_reaches_every_tab_of_an_id(server):
    tabs = [server.websocket("same") for _ in range(3)]
    other = server.websocket("other")
    server.wait_listed(4)
    assert server.control().ask("SEND MESSAGE same hello tabs") == "OK"
    assert [tab.recv() for tab in tabs] == ["hello tabs"] * 3
    assert server.control().ask("SEND MESSAGE other sentinel") == "OK"
    assert other.recv() == "sentinel"  # nothing for it came first


def test_send_message_to_an_unknown_id_answers_client_not_found(server):
    assert server.control().ask("SEND MESSAGE nobody hi") == "ERROR Client Not Found"


def test_a_closed_websocket_is_no_longer_listed_or_reachable(server):
    ws = server.websocket("gone")
    keep = server.websocket("kept")
    server.wait_listed(2)
    ws.close()
    rows = server.wait_listed(1)
    assert rows[0].startswith("kept ")
    assert server.control().ask("SEND MESSAGE gone hi") == "ERROR Client Not Found"
    keep.close()


def test_a_dropped_tcp_connection_is_unregistered(server):
    ws = server.websocket("dropped")
    server.wait_listed(1)
    ws.sock.shutdown(socket.SHUT_RDWR)
    ws.sock.close()
    server.wait_listed(0)


# Refusals at the handshake ####################################################


@pytest.mark.parametrize(
    "query", ["", "?id=", "?id=a%20b", "?id=" + "x" * 129, "?id=a&id=b", "?id=%3Cb%3E", "?other=1"]
)
def test_missing_empty_or_invalid_ids_are_refused_before_the_upgrade(server, query):
    answer = raw_http(server.port, upgrade_request(query))
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"101 Switching" not in answer and b"Invalid client id" in answer
    assert server.control().list() == []
    assert "refused websocket" in server.log()


@pytest.mark.parametrize(
    "kwargs, status",
    [
        ({"key": "bm90IDE2IGJ5dGVz"}, b"400"),
        ({"key": "%%%notbase64"}, b"400"),
        ({"version": "8"}, b"426"),
        ({"method": "POST"}, b"400"),
    ],
)
def test_bad_handshakes_get_an_http_error_not_a_crash(server, kwargs, status):
    answer = raw_http(server.port, upgrade_request("?id=ok", **kwargs))
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert "Traceback" not in server.log()
    assert server.websocket("still-fine")


def test_a_plain_get_of_the_websocket_url_gets_426(server):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url + "/websocket?id=abc", timeout=5)
    assert info.value.code == 426


def test_garbage_on_the_http_port_does_not_hurt_the_server(server):
    for junk in (b"\x00\xff" * 5000, b"GET / HTTP/9.9\r\n\r\n", b"\r\n\r\n", os.urandom(4096)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    ws = server.websocket("after-junk")
    server.wait_listed(1)
    assert server.control().ask("SEND MESSAGE after-junk ok") == "OK"
    assert ws.recv() == "ok"


# The control protocol #########################################################


def test_pipelined_commands_are_answered_in_order(server):
    ws = server.websocket("pipe")
    server.wait_listed(1)
    control = server.control()
    lines = []
    for i in range(500):
        lines.append(f"SEND MESSAGE pipe message {i}")
        lines.append("SEND MESSAGE nobody x")
    lines.append("LIST WEBSOCKETS")
    control.send(("\n".join(lines) + "\n").encode())
    for _ in range(500):
        assert control.line() == b"OK"
        assert control.line() == b"ERROR Client Not Found"
    assert control.line() == b"=== START ==="
    assert control.line().startswith(b"pipe 127.0.0.1:")
    assert control.line() == b"=== END ==="
    assert [ws.recv() for _ in range(500)] == [f"message {i}" for i in range(500)]


def test_crlf_lines_and_a_last_line_without_newline_are_answered(server):
    control = server.control()
    control.send(b"LIST WEBSOCKETS\r\nSEND MESSAGE nobody hi")
    control.sock.shutdown(socket.SHUT_WR)
    assert control.line() == b"=== START ==="
    assert control.line() == b"=== END ==="
    assert control.line() == b"ERROR Client Not Found"
    assert control.at_eof()


def test_lines_that_arrive_in_pieces_are_answered_whole_and_in_order(server):
    ws = server.websocket("pieces")
    control = server.control()
    # Whole lines, then a line cut in three reads, then whole lines with a cut one behind.
    for piece in (b"SEND MESSAGE pieces a\n", b"SEND MES", b"SAGE pieces b", b"\nPING\nSEND ME"):
        control.send(piece)
        time.sleep(0.05)  # each piece its own read
    control.send(b"SSAGE pieces c\nSEND MESSAGE pieces d\n")
    assert [control.line() for _ in range(5)] == [b"OK", b"OK", b"PONG", b"OK", b"OK"]
    assert [ws.recv() for _ in range(4)] == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "line, answer",
    [
        (b"HELLO", b"ERROR Unknown command"),
        (b"", b"ERROR Unknown command"),
        (b"SEND MESSAGE abc", b"ERROR Missing message text"),
        (b"SEND MESSAGE abc \xff\xfe", b"ERROR Message is not valid UTF-8"),
        (b"SEND MESSAGE a|b hi", b"ERROR Invalid client id"),
    ],
)
def test_bad_lines_get_exactly_one_error_line_and_the_connection_goes_on(server, line, answer):
    control = server.control()
    control.send(line + b"\nLIST WEBSOCKETS\n")
    assert control.line() == answer
    assert control.line() == b"=== START ==="
    assert control.line() == b"=== END ==="
    assert "control error" in server.log()


def test_a_line_over_the_limit_gets_one_error_and_its_connection_closes(server_factory):
    server = server_factory("--max-line", "1024")
    ws = server.websocket("ok")
    other = server.control()
    abuser = server.control()
    abuser.send(b"LIST WEBSOCKETS\nSEND MESSAGE ok " + b"x" * 5000)
    assert abuser.line() == b"=== START ==="
    assert abuser.line().startswith(b"ok ")
    assert abuser.line() == b"=== END ==="
    assert abuser.line() == b"ERROR Line too long (limit 1024 bytes)"
    assert abuser.at_eof()
    assert other.ask("SEND MESSAGE ok still working") == "OK"
    assert ws.recv() == "still working"


def test_a_long_line_that_arrives_whole_is_refused_too(server_factory):
    server = server_factory("--max-line", "1024")
    control = server.control()
    control.send(b"SEND MESSAGE ok " + b"y" * 2000 + b"\nLIST WEBSOCKETS\n")
    assert control.line() == b"ERROR Line too long (limit 1024 bytes)"
    assert control.at_eof()


def test_a_message_of_one_mebibyte_is_delivered_whole(server):
    ws = server.websocket("big")
    server.wait_listed(1)
    text = "z" * (1024 * 1024 - 100)
    assert server.control().ask(f"SEND MESSAGE big {text}") == "OK"
    assert ws.recv() == text


def test_many_control_connections_at_once(server):
    ws = server.websocket("many")
    server.wait_listed(1)
    controls = [server.control() for _ in range(50)]
    for i, control in enumerate(controls):
        control.send(f"SEND MESSAGE many {i}\n".encode())
    assert [control.line() for control in controls] == [b"OK"] * 50
    assert sorted(int(ws.recv()) for _ in range(50)) == list(range(50))


# What browsers send ###########################################################


def test_messages_from_browsers_are_read_and_the_socket_stays_open(server):
    ws = server.websocket("talker")
    server.wait_listed(1)
    for i in range(20):
        ws.send(f"hello {i}")
    ws.send_binary(b"\x00\x01")
    ws.ping(b"are you there")
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_PONG and frame.data == b"are you there"
    assert server.control().ask("SEND MESSAGE talker back") == "OK"
    assert ws.recv() == "back"


def test_a_message_over_max_message_is_closed_with_1009(server_factory):
    server = server_factory("--max-message", "1000")
    ws = server.websocket("chatty")
    server.wait_listed(1)
    ws.send("x" * 1000)
    ws.send("x" * 1001)
    assert close_frame(ws) == (1009, "message too big")
    server.wait_listed(0)


def test_fragments_count_toward_max_message(server_factory):
    server = server_factory("--max-message", "1000")
    ws = server.websocket("fragments")
    server.wait_listed(1)
    ws.send_frame(websocket.ABNF.create_frame("x" * 600, websocket.ABNF.OPCODE_TEXT, fin=0))
    ws.send_frame(websocket.ABNF.create_frame("x" * 600, websocket.ABNF.OPCODE_CONT, fin=1))
    assert close_frame(ws) == (1009, "message too big")


def test_an_unmasked_client_frame_is_a_protocol_error(server):
    ws = server.websocket("unmasked")
    server.wait_listed(1)
    ws.sock.sendall(b"\x81\x02hi")
    assert close_frame(ws) == (1002, "protocol error")
    server.wait_listed(0)


def test_invalid_utf8_in_a_text_message_closes_with_1007(server):
    ws = server.websocket("badtext")
    server.wait_listed(1)
    ws.send(b"\xff\xfe\xfd", opcode=websocket.ABNF.OPCODE_TEXT)
    assert close_frame(ws)[0] == 1007


def test_a_client_close_is_answered_with_its_code(server):
    ws = server.websocket("closer")
    server.wait_listed(1)
    ws.send_close(4001, b"bye")
    assert close_frame(ws)[0] == 4001
    server.wait_listed(0)


# Slow clients #################################################################


@pytest.mark.slow  # waits out a timeout or a drain
def test_a_control_client_that_never_reads_its_answers_is_dropped(server_factory):
    server = server_factory("--write-timeout", "1")
    lazy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(server.control_path)
    lazy.settimeout(10)
    request = b"LIST WEBSOCKETS\n" * 20000
    try:
        lazy.sendall(request * 20)
    except OSError:
        pass  # the server gave up on us and closed: that is the point
    wait_until(lambda: "control client is not reading" in server.log(), what="the drop log line")
    assert server.control().list() == []
    lazy.close()


# Pages ########################################################################


def test_the_board_page_shows_a_random_board_id(server):
    status, headers, body = http_request(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'src="/static/board.js"' in body
    board_id = re.compile(r'id="boardId" data-query="id=([A-Z0-9]{10})">([A-Z0-9]{10})<')
    first, second = board_id.search(body), board_id.search(http_request(server, "/")[2])
    assert first and second, body
    assert first.group(1) == first.group(2)
    assert first.group(1) != second.group(1)


def test_static_files_are_served_and_paths_cannot_escape(server):
    status, headers, body = http_request(server, "/static/board.js")
    assert status == 200 and "textContent" in body
    assert http_request(server, "/static/../../wsboard.py")[0] in (403, 404)
    assert http_request(server, "/nowhere")[0] == 404


def test_the_admin_page_lists_connected_clients(server):
    ws = server.websocket("admin-sees-me")
    server.wait_listed(1)
    status, _, body = http_request(server, "/admin")
    port = ws.sock.getsockname()[1]
    assert status == 200
    assert f"<td>admin-sees-me</td><td>127.0.0.1:{port}</td>" in body
    assert '<option value="admin-sees-me">admin-sees-me</option>' in body


def test_send_message_endpoint_delivers_the_message_as_json(server):
    ws = server.websocket("form")
    server.wait_listed(1)
    body = json.dumps({"clientId": "form", "message": "hi <b>you</b> \u00e9"}).encode()
    status, headers, answer = http_request(server, "/sendMessage", body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(answer) == {"error": False, "message": ""}
    assert json.loads(ws.recv()) == {"message": "hi <b>you</b> \u00e9"}


def test_send_message_endpoint_answers_client_not_found(server):
    status, _, answer = http_request(
        server, "/sendMessage", b'{"clientId": "nobody", "message": "x"}'
    )
    assert status == 200 and json.loads(answer) == {"error": True, "message": "Client Not Found"}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[1]",
        b'{"clientId": "a"}',
        b'{"clientId": "a b", "message": "x"}',
        b'{"clientId": "a", "message": ["x"]}',
        b"\xff\xfe",
    ],
)
def test_malformed_send_message_bodies_get_400_with_the_same_json_shape(server, body):
    status, headers, answer = http_request(server, "/sendMessage", body)
    data = json.loads(answer)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert data["error"] is True and isinstance(data["message"], str) and data["message"]


def test_an_oversized_send_message_body_gets_413(server):
    status, _, answer = http_request(server, "/sendMessage", b"x" * (1024 * 1024 + 1))
    assert status == 413 and json.loads(answer)["error"] is True


# Start-up, the socket file and shutdown #######################################


def test_the_control_socket_is_created_with_mode_0660(server):
    mode = os.stat(server.control_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660


def test_a_stale_socket_file_is_replaced(server_factory, tmp_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "control.sock"))
    stale.close()  # the file stays, nobody listens
    server = server_factory()
    assert server.control().list() == []


def test_a_live_server_is_never_replaced(server_factory):
    first = server_factory()
    ws = first.websocket("first")
    second = server_factory(start=False)
    second.control_path = first.control_path
    second.args[3] = first.control_path
    second.start(wait=False)
    assert second.proc.wait(timeout=15) == 1
    assert "another server is listening on" in second.log()
    assert first.control().ask("SEND MESSAGE first still mine") == "OK"
    assert ws.recv() == "still mine"


def test_a_file_that_is_not_a_socket_is_never_deleted(server_factory, tmp_path):
    (tmp_path / "control.sock").write_text("precious")
    server = server_factory(start=False)
    server.start(wait=False)
    assert server.proc.wait(timeout=15) == 1
    assert "is not a socket" in server.log()
    assert (tmp_path / "control.sock").read_text() == "precious"


def test_a_port_in_use_is_a_clear_error_and_leaves_no_socket_file(server_factory):
    first = server_factory()
    second = server_factory(start=False)
    second.port = first.port
    second.args[1] = str(first.port)
    second.control_path = second.control_path + ".2"
    second.args[3] = second.control_path
    second.start(wait=False)
    assert second.proc.wait(timeout=15) == 1
    assert "cannot listen on" in second.log()
    assert not os.path.exists(second.control_path)


@pytest.mark.slow  # waits out a timeout or a drain
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_closes_websockets_with_1001_removes_the_socket_and_exits_0(server, sig):
    tabs = [server.websocket("leaving") for _ in range(3)]
    server.wait_listed(3)
    assert server.stop(sig) == 0
    assert [close_frame(tab) for tab in tabs] == [(1001, "server shutting down; reconnect")] * 3
    assert not os.path.exists(server.control_path)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1)


@pytest.mark.slow  # waits out a timeout or a drain
def test_shutdown_does_not_wait_forever_for_a_client_that_never_answers(server_factory):
    server = server_factory("--shutdown-timeout", "1")
    mute = server.websocket("mute")  # never reads, so never answers the close
    server.wait_listed(1)
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10
    mute.sock.close()


def test_help_lists_every_option_with_its_environment_variable():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "wsboard.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    for flag in (
        "--handshake-timeout",
        "--host",
        "--port",
        "--control",
        "--max-line",
        "--max-message",
        "--write-timeout",
        "--shutdown-timeout",
        "--log-level",
    ):
        assert flag in result.stdout
        assert "WSBOARD_" + flag[2:].upper().replace("-", "_") in result.stdout


def test_a_bad_setting_is_refused_before_anything_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "wsboard.py"), "--control", str(tmp_path / "c.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "WSBOARD_PORT": "eighty"},
    )
    assert result.returncode == 2
    assert "WSBOARD_PORT='eighty': is not a number" in result.stderr
    assert not (tmp_path / "c.sock").exists()


def test_the_log_has_one_line_per_connect_and_disconnect(server):
    ws = server.websocket("logged")
    server.wait_listed(1)
    ws.close()
    server.wait_listed(0)
    wait_until(lambda: "disconnect logged 127.0.0.1:" in server.log(), what="disconnect log line")
    assert server.log().count("wsboard: connect logged 127.0.0.1:") == 1
    assert server.log().count("wsboard: disconnect logged 127.0.0.1:") == 1
    assert '"GET /websocket?id=logged HTTP/1.1" 101' not in server.log()


def test_control_clients_are_isolated_from_each_other(server):
    """A control client that disconnects mid-command leaves the others unaffected."""
    quitter = server.control()
    quitter.send(b"SEND MESSAGE some")
    quitter.close()
    assert Control(server.control_path).list() == []


@pytest.mark.slow  # waits out a timeout or a drain
def test_a_client_that_never_finishes_its_request_is_cut_off(server_factory):
    server = server_factory("--handshake-timeout", "1")
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    silent.sendall(b"GET /websocket?id=slow HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    started = time.monotonic()
    answer = b""
    while chunk := silent.recv(1024):
        answer += chunk
    assert time.monotonic() - started < 5
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4")
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert idle.recv(1024) == b""  # connected, said nothing


@pytest.mark.slow  # waits out a timeout or a drain
def test_an_open_websocket_may_idle_longer_than_the_handshake_timeout(server_factory):
    server = server_factory("--handshake-timeout", "1")
    ws = server.websocket("patient")
    time.sleep(2)
    assert server.control().ask("SEND MESSAGE patient still here") == "OK"
    assert ws.recv() == "still here"


def test_a_burst_of_lists_is_answered_without_piling_up(server):
    sockets = [server.websocket(f"many-{i}") for i in range(20)]
    server.wait_listed(20)
    control = server.control()
    control.send(b"LIST WEBSOCKETS\n" * 3000)
    for _ in range(3000):
        assert control.line() == b"=== START ==="
        rows = [control.line() for _ in range(20)]
        assert control.line() == b"=== END ==="
    ports = sorted(int(r.split(b":")[-1]) for r in rows)
    assert sorted(r.split()[0] for r in rows) == sorted(f"many-{i}".encode() for i in range(20))
    assert ports == sorted(ws.sock.getsockname()[1] for ws in sockets)


def test_a_chunked_send_message_body_is_refused_with_411(server):
    body = b'{"clientId": "a", "message": "x"}'
    request = (
        b"POST /sendMessage HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    answer = raw_http(server.port, request)
    assert answer.startswith(b"HTTP/1.1 411 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] is True


def test_the_admin_event_stream_says_when_sockets_come_and_go(server):
    import socket as socketlib

    stream = socketlib.create_connection(("127.0.0.1", server.port), timeout=10)
    stream.sendall(b"GET /admin/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = b""
    while b"retry: 2000" not in head:
        head += stream.recv(4096)
    assert b"200 OK" in head and b"text/event-stream" in head
    ws = server.websocket("comer")
    seen = b""
    while b"event: change" not in seen:
        seen += stream.recv(4096)
    state = json.loads(http_request(server, "/admin/state.json?q=COM")[2])
    assert [row["id"] for row in state["clients"]["rows"]] == ["comer"]
    ws.close()
    seen = b""
    while b"event: change" not in seen:
        seen += stream.recv(4096)
    stream.close()


def test_the_admin_json_routes_need_the_password_and_check_their_input(server_factory):
    server = server_factory("--admin-password", "correct horse battery")
    for path in ("/admin/state.json", "/admin/events", "/metrics"):
        assert http_request(server, path)[0] == 401
    auth = "admin:correct horse battery"
    for path, body, reason in (
        ("/admin/kick", {}, "clientId must be"),
        ("/admin/kick", {"conn": "x"}, "conn must be"),
        ("/admin/send", {"clientId": "a"}, "message must be a string"),
        ("/admin/broadcast", {"message": 5}, "message must be a string"),
    ):
        status, _, text = http_request(server, path, json.dumps(body).encode(), auth=auth)
        assert status == 400 and reason in json.loads(text)["message"], (path, text)
    status, _, text = http_request(server, "/admin/kick", b'{"clientId":"nobody"}', auth=auth)
    assert status == 200 and json.loads(text) == {"error": True, "message": "Client Not Found"}
    status, _, text = http_request(
        server, "/admin/kick", b'{"clientId":"x"}', auth=auth, headers={"Origin": "http://evil"}
    )
    assert status == 403  # cross-site, as for /sendMessage
