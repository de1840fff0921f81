"""The security model: signed ids, Origin checks, the admin guard, control-socket access, limits."""

import base64
import grp
import hashlib
import hmac
import ipaddress
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
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

import wsboard

SECRET = "0123456789abcdef-test-secret"

# Pure checks ##################################################################


def test_tokens_are_hex_hmac_sha256_of_id_dot_exp():
    expected = hmac.new(SECRET.encode(), b"user42.1900000000", hashlib.sha256).hexdigest()
    assert wsboard.mint_token(SECRET.encode(), "user42", 1900000000) == expected


@pytest.mark.parametrize(
    "exp, token, reason",
    [
        ("", "abc", "a signed id needs exp and token"),
        ("1900000000", "", "a signed id needs exp and token"),
        ("soon", "abc", "exp must be a Unix time"),
        ("-5", "abc", "exp must be a Unix time"),
        ("1" * 13, "abc", "exp must be a Unix time"),
        ("1000", "abc", "token expired"),
        ("1900000000", "0" * 64, "token does not match"),
        ("1900000000", "\u00e9", "token does not match"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(exp, token, reason):
    assert wsboard.token_refusal(SECRET.encode(), "user42", exp, token, now=1800000000) == reason


def test_a_good_token_passes_and_only_for_its_own_id():
    token = wsboard.mint_token(SECRET.encode(), "user42", 1900000000)
    assert wsboard.token_refusal(SECRET.encode(), "user42", "1900000000", token, 1800000000) is None
    assert wsboard.token_refusal(SECRET.encode(), "user43", "1900000000", token, 1800000000)
    assert wsboard.token_refusal(b"another-secret-value", "user42", "1900000000", token, 1.8e9)


def test_signed_query_carries_id_exp_and_token():
    query = wsboard.signed_query(SECRET.encode(), "a.b", 60, now=1000)
    exp = 1060
    assert query == f"id=a.b&exp={exp}&token={wsboard.mint_token(SECRET.encode(), 'a.b', exp)}"


@pytest.mark.parametrize(
    "origin, host, patterns, hosts, allowed",
    [
        (None, "example.com", (), (), True),
        ("http://example.com", "example.com", (), ("example.com",), True),
        ("https://example.com", "example.com", (), ("*.com",), True),
        ("https://example.com:443", "example.com", (), ("example.com",), True),
        ("http://127.0.0.1:8080", "127.0.0.1:8080", (), (), True),
        ("http://localhost:8080", "localhost:8080", (), (), True),
        ("http://[::1]:8080", "[::1]:8080", (), (), True),
        ("http://127.0.0.1:8081", "127.0.0.1:8080", (), (), False),
        ("http://evil.example", "example.com", (), ("example.com",), False),
        ("http://example.com.evil.example", "example.com", (), ("example.com",), False),
        ("null", "example.com", (), ("example.com",), False),
        ("http://example.com/path", "example.com", (), ("example.com",), False),
        # DNS rebinding: the attacker's name, resolved to us, is same-origin with itself
        ("http://evil.example:8080", "evil.example:8080", (), (), False),
        ("http://evil.example:8080", "evil.example:8080", (), ("example.com",), False),
        ("https://app.example.com", "ws.example.com", ("https://*.example.com",), (), True),
        ("https://example.com", "ws.example.com", ("https://*.example.com",), (), False),
        ("http://app.example.com", "ws.example.com", ("https://*.example.com",), (), False),
        ("https://APP.Example.com", "x", ("https://app.example.com",), (), True),
        ("https://anything", "x", ("*",), (), True),
    ],
)
def test_origin_allowed(origin, host, patterns, hosts, allowed):
    assert wsboard.origin_allowed(origin, host, patterns, hosts) is allowed


@pytest.mark.parametrize(
    "host, hosts, trusted",
    [
        ("127.0.0.1:8080", (), True),
        ("[::1]:8080", (), True),
        ("localhost", (), True),
        ("evil.example:8080", (), False),
        ("push.example.com", ("push.example.com",), True),
        ("a.example.com:443", ("*.example.com",), True),
        ("", (), False),
        ("[bad", (), False),
    ],
)
def test_only_addresses_localhost_and_listed_names_are_trusted_hosts(host, hosts, trusted):
    assert wsboard.host_trusted(host, hosts) is trusted


def test_passwords_are_kept_as_pbkdf2_hashes():
    stored = wsboard.hash_password("correct horse", iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$") and "correct horse" not in stored
    assert wsboard.password_matches("correct horse", stored)
    assert not wsboard.password_matches("correct horse!", stored)
    assert wsboard.hash_password("x", iterations=1000) != wsboard.hash_password(
        "x", iterations=1000
    )


@pytest.mark.parametrize(
    "header, expected",
    [
        (
            "Basic " + base64.b64encode(b"admin:s3cret:with:colons").decode(),
            ("admin", "s3cret:with:colons"),
        ),
        ("basic " + base64.b64encode(b"admin:").decode(), ("admin", "")),
        ("Basic " + base64.b64encode(b"no-colon").decode(), None),
        ("Basic !!!", None),
        ("Bearer abc", None),
        ("", None),
    ],
)
def test_basic_credentials(header, expected):
    assert wsboard.basic_credentials(header) == expected


def test_forwarded_for_is_believed_only_from_trusted_proxies():
    proxies = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    environ = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 203.0.113.9, 10.1.2.3"}
    assert wsboard.client_ip(environ, proxies) == "203.0.113.9"
    assert wsboard.client_ip(environ, ()) == "127.0.0.1"
    untrusted = {"REMOTE_ADDR": "198.51.100.7", "HTTP_X_FORWARDED_FOR": "127.0.0.1"}
    assert wsboard.client_ip(untrusted, proxies) == "198.51.100.7"


@pytest.mark.parametrize(
    "environ, local",
    [
        ({"REMOTE_ADDR": "127.0.0.1"}, True),
        ({"REMOTE_ADDR": "::1"}, True),
        ({"REMOTE_ADDR": "192.0.2.1"}, False),
        ({"REMOTE_ADDR": ""}, False),
        ({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "192.0.2.1"}, False),
        ({"REMOTE_ADDR": "127.0.0.1", "HTTP_FORWARDED": "for=192.0.2.1"}, False),
    ],
)
def test_only_unrelayed_loopback_requests_count_as_local(environ, local):
    assert wsboard.is_local_request(environ) is local


def test_peer_allow_lists():
    assert wsboard.peer_allowed(1000, 1000, frozenset(), frozenset())
    assert wsboard.peer_allowed(33, 1, frozenset({33}), frozenset())
    assert wsboard.peer_allowed(1, 33, frozenset({0}), frozenset({33}))
    assert not wsboard.peer_allowed(1, 1, frozenset({0}), frozenset({33}))


def test_tokens_are_hidden_in_logged_request_lines():
    line = "GET /websocket?id=a&exp=1&token=deadbeef HTTP/1.1"
    assert wsboard.redact(line) == "GET /websocket?id=a&exp=1&token=*** HTTP/1.1"


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--secret", "short"], {}, "at least 16 characters"),
        (["--secret", SECRET, "--secret-file", "/etc/hostname"], {}, "not both"),
        (["--secret-file", "/nonexistent/secret"], {}, "No such file"),
        (["--admin-password", "pbkdf2_sha256$x$y$z"], {}, "is malformed"),
        # "pbkdf2_sha256$200000$ab$cd" in double quotes: the shell ate every $word
        (["--admin-password", "pbkdf2_sha25600000"], {}, "single quotes"),
        (["--admin-password", "a"], {}, "at least 8 characters"),
        (["--control-mode", "0400"], {}, "owner read and write"),
        (["--control-mode", "0666"], {}, "no access"),
        (["--control-mode", "0604"], {}, "no access"),
        (["--control-mode", "rw"], {}, "is not a number"),
        (["--control-group", "no-such-group-here"], {}, "is not a group"),
        ([], {"WSBOARD_TRUSTED_PROXIES": "not-an-ip"}, "WSBOARD_TRUSTED_PROXIES"),
        ([], {"WSBOARD_CONTROL_UIDS": "root"}, "is not a number"),
    ],
)
def test_bad_security_settings_are_refused(argv, env, message):
    with pytest.raises(wsboard.ConfigError) as info:
        wsboard.load_config(argv, environ=env)
    assert message in str(info.value)


def test_secrets_are_read_from_a_file_and_never_shown(tmp_path):
    (tmp_path / "secret").write_text(SECRET + "\n")
    config = wsboard.load_config(
        ["--secret-file", str(tmp_path / "secret"), "--admin-password", "hunter2hunter2"],
        environ={},
    )
    assert config.secret_key == SECRET.encode()
    assert config.admin_hash.startswith("pbkdf2_sha256$")
    assert SECRET not in repr(config) and "hunter2" not in repr(config)


# Signed ids on the real server ################################################


@pytest.fixture
def signed(server_factory):
    return server_factory(env={"WSBOARD_SECRET": SECRET})


def signed_url(server, client_id, exp=None, token=None, secret=SECRET):
    exp = int(time.time()) + 60 if exp is None else exp
    token = wsboard.mint_token(secret.encode(), client_id, exp) if token is None else token
    return f"?id={client_id}&exp={exp}&token={token}"


@pytest.mark.parametrize(
    "query_for, reason",
    [
        (lambda s: "?id=alice", b"a signed id needs exp and token"),
        (lambda s: signed_url(s, "alice", exp=int(time.time()) - 1), b"token expired"),
        (lambda s: signed_url(s, "alice", token="f" * 64), b"token does not match"),
        (
            lambda s: signed_url(s, "alice", secret="a-different-secret-123"),
            b"token does not match",
        ),
        (
            lambda s: signed_url(s, "mallory").replace("id=mallory", "id=alice"),
            b"token does not match",
        ),
    ],
)
def test_missing_expired_wrong_or_forged_tokens_are_refused_with_403(signed, query_for, reason):
    query = query_for(signed)
    answer = raw_http(signed.port, upgrade_request(query))
    assert answer.startswith(b"HTTP/1.1 403 ") and reason in answer
    assert signed.control().list() == []
    token = query.partition("token=")[2]
    if token:
        assert token not in signed.log()
    assert "refused websocket" in signed.log()


def test_a_valid_token_connects_and_receives(signed):
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{signed.port}/websocket{signed_url(signed, 'alice')}"
    )
    signed.wait_listed(1)
    assert signed.control().ask("SEND MESSAGE alice for alice only") == "OK"
    assert ws.recv() == "for alice only"


def test_a_token_minted_by_the_php_one_liner_is_accepted(signed):
    exp = int(time.time()) + 300
    php = f"echo hash_hmac('sha256', \"php-user.{exp}\", '{SECRET}');"
    token = subprocess.run(
        ["php", "-r", php], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{signed.port}/websocket?id=php-user&exp={exp}&token={token}"
    )
    signed.wait_listed(1)
    assert signed.control().ask("SEND MESSAGE php-user signed by PHP") == "OK"
    assert ws.recv() == "signed by PHP"


def test_the_token_command_prints_a_query_the_server_accepts(signed):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "wsboard.py"), "token", "cli-user", "--ttl", "120"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "WSBOARD_SECRET": SECRET},
    )
    assert result.returncode == 0, result.stderr
    query = result.stdout.strip()
    assert query.startswith("id=cli-user&exp=")
    exp = int(query.split("exp=")[1].split("&")[0])
    assert 100 <= exp - time.time() <= 121
    websocket.create_connection(f"ws://127.0.0.1:{signed.port}/websocket?{query}").close()


def test_the_token_command_without_a_secret_says_so():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "wsboard.py"), "token", "someone"],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("WSBOARD_")},
    )
    assert result.returncode == 2 and "no secret" in result.stderr


def test_the_signed_board_page_carries_a_server_minted_token(signed):
    with urllib.request.urlopen(signed.url + "/", timeout=5) as response:
        body = response.read().decode()
        assert response.headers["Cache-Control"] == "no-store"
    query = body.split('data-query="')[1].split('"')[0].replace("&amp;", "&")
    board_id = query.split("id=")[1].split("&")[0]
    ws = websocket.create_connection(f"ws://127.0.0.1:{signed.port}/websocket?{query}")
    signed.wait_listed(1)
    assert signed.control().ask(f"SEND MESSAGE {board_id} hi board") == "OK"
    assert ws.recv() == "hi board"


def test_unsigned_deployments_still_take_plain_ids(server):
    websocket.create_connection(server.ws_url("plain-id")).close()


# Origin #######################################################################


def test_a_foreign_origin_is_refused_before_the_upgrade(server):
    request = upgrade_request("?id=victim").replace(
        b"\r\n\r\n", b"\r\nOrigin: http://evil.example\r\n\r\n"
    )
    answer = raw_http(server.port, request)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"Origin not allowed" in answer
    assert server.control().list() == []


def test_the_pages_own_origin_and_no_origin_are_allowed(server):
    websocket.create_connection(server.ws_url("same"), origin=server.url).close()
    websocket.create_connection(server.ws_url("none"), suppress_origin=True).close()


def test_allowed_origins_patterns_are_honoured(server_factory):
    server = server_factory("--allowed-origins", "https://*.example.com,http://localhost:3000")
    websocket.create_connection(server.ws_url("a"), origin="https://app.example.com").close()
    websocket.create_connection(server.ws_url("b"), origin="http://localhost:3000").close()
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(server.ws_url("c"), origin=server.url)
    assert info.value.status_code == 403


# The admin routes #############################################################


SEND = json.dumps({"clientId": "target", "message": "hi"}).encode()


def test_without_a_password_admin_routes_refuse_requests_relayed_by_a_proxy(server):
    status, _, body = http_request(server, "/admin", headers={"X-Forwarded-For": "203.0.113.5"})
    assert status == 403 and "--admin-password" in body
    status, _, body = http_request(
        server, "/sendMessage", SEND, headers={"X-Forwarded-For": "203.0.113.5"}
    )
    assert status == 403 and json.loads(body)["error"] is True


@pytest.fixture(params=["plain", "hashed"])
def protected(request, server_factory):
    password = "correct horse battery"
    value = (
        password if request.param == "plain" else wsboard.hash_password(password, iterations=50_000)
    )
    return server_factory(env={"WSBOARD_ADMIN_PASSWORD": value})


def test_admin_routes_ask_for_the_password(protected):
    status, headers, _ = http_request(protected, "/admin")
    assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="wsboard admin"')
    status, _, body = http_request(protected, "/sendMessage", SEND)
    assert status == 401 and json.loads(body) == {
        "error": True,
        "message": "Admin password required",
    }


@pytest.mark.parametrize("auth", ["admin:wrong", "root:correct horse battery", "admin:"])
def test_a_wrong_admin_credential_is_refused(protected, auth):
    assert http_request(protected, "/admin", auth=auth)[0] == 401
    assert "correct horse" not in protected.log()


def test_the_right_admin_credential_opens_both_routes(protected):
    ws = protected.websocket("target")
    protected.wait_listed(1)
    assert http_request(protected, "/admin", auth="admin:correct horse battery")[0] == 200
    status, _, body = http_request(
        protected, "/sendMessage", SEND, auth="admin:correct horse battery"
    )
    assert status == 200 and json.loads(body) == {"error": False, "message": ""}
    assert json.loads(ws.recv()) == {"message": "hi"}


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"Origin": "http://evil.example"}, 403),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ],
)
def test_cross_site_requests_to_send_message_are_refused(server, headers, status):
    ws = server.websocket("target")
    server.wait_listed(1)
    code, _, body = http_request(server, "/sendMessage", SEND, headers=headers)
    assert code == status and json.loads(body)["error"] is True
    assert server.control().ask("SEND MESSAGE target sentinel") == "OK"
    assert ws.recv() == "sentinel"  # the refused request delivered nothing before it


def test_a_same_origin_request_to_send_message_is_accepted(server):
    ws = server.websocket("target")
    server.wait_listed(1)
    headers = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}
    assert http_request(server, "/sendMessage", SEND, headers=headers)[0] == 200
    assert json.loads(ws.recv()) == {"message": "hi"}


def test_refusals_are_counted_on_the_admin_page(server):
    raw_http(server.port, upgrade_request("?id=bad%20id"))
    raw_http(
        server.port,
        upgrade_request("?id=x").replace(b"\r\n\r\n", b"\r\nOrigin: http://evil\r\n\r\n"),
    )
    body = http_request(server, "/admin")[2]
    assert "<td>bad_id</td><td>1</td>" in body and "<td>origin</td><td>1</td>" in body


@pytest.mark.parametrize("path", ["/", "/admin", "/static/board.js", "/nowhere"])
def test_every_answer_carries_the_security_headers(server, path):
    _, headers, _ = http_request(server, path)
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert f"ws://127.0.0.1:{server.port}" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Frame-Options"] == "DENY"


def test_the_hash_password_command_makes_a_hash_the_server_accepts(server_factory):
    made = subprocess.run(
        [sys.executable, os.path.join(ROOT, "wsboard.py"), "hash-password"],
        input="a long enough password\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    stored = made.stdout.strip()
    assert stored.startswith("pbkdf2_sha256$") and "long enough" not in stored
    server = server_factory("--admin-password", stored)
    assert http_request(server, "/admin", auth="admin:a long enough password")[0] == 200


# The control socket ###########################################################


def test_a_uid_not_on_the_allow_list_gets_permission_denied(server_factory):
    server = server_factory("--control-uids", "12345", "--control-gids", "54321")
    control = server.control()
    assert control.line() == b"ERROR Permission denied"
    assert control.at_eof()
    assert "Permission denied (pid" in server.log()


def test_a_uid_on_the_allow_list_is_let_in(server_factory):
    server = server_factory("--control-uids", f"12345,{os.getuid()}")
    assert server.control().list() == []


def run_as_nobody(path: str) -> subprocess.CompletedProcess:
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('EACCES'); sys.exit(0)\n"
        "s.sendall(b'LIST WEBSOCKETS\\n'); print(s.recv(100).decode().splitlines()[0])\n"
    )
    nobody = pwd.getpwnam("nobody")

    def drop():
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    return subprocess.run(
        ["/usr/bin/python3", "-c", code, path],  # Debian's: nobody cannot run pyenv's under /root
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=drop,
        cwd="/",
    )


@pytest.fixture
def open_dir():
    """A directory anyone may traverse, so only the socket's own mode and group decide."""
    path = tempfile.mkdtemp(prefix="wsboard-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_the_file_mode_keeps_other_users_out_and_the_group_lets_them_in(server_factory, open_dir):
    nobody = pwd.getpwnam("nobody")
    closed = server_factory("--control", f"{open_dir}/closed.sock")
    assert stat.S_IMODE(os.stat(closed.control_path).st_mode) == 0o660
    assert run_as_nobody(f"{open_dir}/closed.sock").stdout.strip() == "EACCES"
    group = grp.getgrgid(nobody.pw_gid).gr_name
    opened = server_factory("--control", f"{open_dir}/opened.sock", "--control-group", group)
    assert os.stat(f"{open_dir}/opened.sock").st_gid == nobody.pw_gid
    assert run_as_nobody(f"{open_dir}/opened.sock").stdout.strip() == "=== START ==="
    assert opened.control().list() == []


def test_the_control_mode_can_be_tightened(server_factory):
    server = server_factory("--control-mode", "0600")
    assert stat.S_IMODE(os.stat(server.control_path).st_mode) == 0o600


def test_control_connections_beyond_the_limit_are_refused(server_factory):
    server = server_factory("--max-control-connections", "2")
    first, second = server.control(), server.control()
    assert first.list() == [] and second.list() == []
    third = server.control()
    assert third.line() == b"ERROR Too many control connections"
    assert third.at_eof()
    first.close()
    wait_until(
        lambda: (
            Control(server.control_path).ask("SEND MESSAGE x y") == "ERROR Client Not Found" or None
        ),
        what="a free control slot",
    )


def test_an_idle_control_connection_is_closed(server_factory):
    server = server_factory("--control-idle-timeout", "1")
    control = server.control()
    started = time.monotonic()
    assert control.at_eof()
    assert 0.5 < time.monotonic() - started < 5
    wait_until(lambda: "control connection idle for 1s: closing" in server.log(), what="its log")


def test_a_control_connection_that_talks_and_a_quiet_watcher_stay_open(server_factory):
    server = server_factory("--control-idle-timeout", "2")
    talker, watcher = server.control(), server.control()
    assert json.loads(watcher.ask('{"op":"watch"}'))["watching"]
    for _ in range(18):  # 4.5 s of a line every quarter second: never idle for 2 s
        assert talker.ask("PING") == "PONG"
        time.sleep(0.25)
    server.websocket("seen").close()
    assert json.loads(watcher.line())["event"] == "connect"  # quiet for 4.5 s, still told
    assert talker.ask("PING") == "PONG"


# Connection limits ############################################################


def test_connections_beyond_the_limit_get_503(server_factory):
    server = server_factory("--max-connections", "2")
    kept = [server.websocket("a"), server.websocket("b")]
    server.wait_listed(2)
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        server.websocket("c")
    assert info.value.status_code == 503
    kept[0].close()
    server.wait_listed(1)
    server.websocket("c").close()


def test_connections_per_address_are_limited(server_factory):
    server = server_factory("--max-connections-per-ip", "2")
    kept = [server.websocket("a"), server.websocket("b")]
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        server.websocket("c")
    assert info.value.status_code == 503 and b"from this address" in info.value.resp_body
    assert server.control().ask("BROADCAST still here") == "OK 2"
    assert [ws.recv() for ws in kept] == ["still here"] * 2  # the refusal touched neither


def test_sockets_per_id_are_limited(server_factory):
    server = server_factory("--max-sockets-per-id", "2")
    kept = [server.websocket("tabs"), server.websocket("tabs")]
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        server.websocket("tabs")
    assert info.value.status_code == 503 and b"for this id" in info.value.resp_body
    server.websocket("other-id").close()
    assert server.control().ask("SEND MESSAGE tabs both") == "OK"
    assert [ws.recv() for ws in kept] == ["both"] * 2


def test_an_idle_websocket_is_closed_when_an_idle_timeout_is_set(server_factory):
    server = server_factory("--idle-timeout", "1")
    ws = server.websocket("sleepy")
    talker = server.websocket("talker")
    for _ in range(4):
        talker.send("keeping busy")
        time.sleep(0.4)
    assert close_frame(ws) == (1000, "idle timeout")
    server.wait_listed(1)
    assert server.control().ask("SEND MESSAGE talker still open") == "OK"
