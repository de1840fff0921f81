"""Channels and connection ids on the real server: control lines, URLs, signed channels, PHP."""

import json
import socket
import subprocess

import pytest
import websocket
from conftest import ask_json, drain_answers, upgrade_request, wait_until

import wsboard

SECRET = "a-long-enough-secret-for-tests"


def in_channels(server, client_id, *channels, **kwargs):
    query = "".join(f"&channel={c}" for c in channels)
    return websocket.create_connection(server.ws_url(client_id) + query, timeout=10, **kwargs)


def test_join_publish_and_leave_on_the_control_socket(server):
    tabs = [server.websocket("u1"), server.websocket("u1")]
    other = server.websocket("u2")
    server.wait_listed(3)
    control = server.control()
    assert control.ask("JOIN room u1") == "OK 2"
    assert control.ask("JOIN room nobody") == "ERROR Client Not Found"
    assert control.ask("PUBLISH room hello  room") == "OK 2"
    assert [tab.recv() for tab in tabs] == ["hello  room"] * 2
    assert control.ask("LEAVE room u1") == "OK 2"
    assert control.ask("PUBLISH room again") == "OK 0"  # nobody left: still an answer
    assert control.ask("SEND MESSAGE u2 sentinel") == "OK"
    assert other.recv() == "sentinel"  # it was never in the room


def test_sockets_named_channels_in_their_url_get_a_publish_sent_the_moment_they_connect(server):
    control = server.control()
    for n in range(30):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(upgrade_request(f"?id=page{n}&channel=ticket-7"))
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
        assert control.ask(f"PUBLISH ticket-7 n{n}") == "OK 1"
        assert sock.recv(64).endswith(f"n{n}".encode())
        sock.close()
        wait_until(lambda: control.ask("COUNT ticket-7") == "OK 0 0", what="the page to go")


def test_online_count_and_the_channel_listings(server):
    a = in_channels(server, "alice", "room", "hall")
    a2 = in_channels(server, "alice", "room")
    b = in_channels(server, "bob", "room")
    server.wait_listed(3)
    control = server.control()
    assert control.ask("ONLINE bob carol alice") == "OK bob alice"
    assert control.ask("ONLINE carol") == "OK"
    assert control.ask("COUNT") == "OK 3 2"
    assert control.ask("COUNT room") == "OK 3 2"
    assert control.ask("COUNT hall") == "OK 1 1"
    control.send(b"LIST CHANNEL hall\n")
    assert control.line() == b"=== START ==="
    assert control.line().decode() == f"alice 127.0.0.1:{a.sock.getsockname()[1]}"
    assert control.line() == b"=== END ==="
    control.send(b"LIST CHANNELS\n")
    assert control.line() == b"=== START ==="
    rows = {control.line(), control.line()}
    assert control.line() == b"=== END ==="
    assert rows == {b"room 3", b"hall 1"}
    b.close()
    wait_until(lambda: control.ask("COUNT room") == "OK 2 1", what="bob's socket to go")
    assert len([a, a2]) == 2


def test_a_json_publish_can_leave_out_the_sender_by_its_connection_id(server):
    sender = in_channels(server, "writer", "doc-1", subprotocols=["wsboard.v1"])
    hello = json.loads(sender.recv())["hello"]
    reader = in_channels(server, "reader", "doc-1")
    server.wait_listed(2)
    control = server.control()
    request = {"op": "publish", "channel": "doc-1", "data": "edited", "except": hello["conn"]}
    assert ask_json(control, request) == {"ok": True, "sockets": 1}
    assert reader.recv() == "edited"
    assert ask_json(control, {"op": "send", "conn": hello["conn"], "data": "only you"}) == {
        "ok": True,
        "sockets": 1,
    }
    assert json.loads(sender.recv()) == {"seq": None, "data": "only you"}  # not "edited" first


def test_json_channel_ops(server):
    a = in_channels(server, "a", "room")
    server.wait_listed(1)
    control = server.control()
    conn = ask_json(control, {"op": "list"})["clients"][0]["conn"]
    assert ask_json(control, {"op": "join", "channel": "hall", "conn": conn}) == {
        "ok": True,
        "sockets": 1,
    }
    assert ask_json(control, {"op": "channels"}) == {"ok": True, "channels": {"room": 1, "hall": 1}}
    members = ask_json(control, {"op": "channel", "channel": "hall"})["members"]
    assert [(m["id"], m["conn"]) for m in members] == [("a", conn)]
    assert ask_json(control, {"op": "online", "ids": ["a", "z"]}) == {"ok": True, "online": ["a"]}
    assert ask_json(control, {"op": "count", "channel": "room"}) == {
        "ok": True,
        "sockets": 1,
        "ids": 1,
    }
    assert ask_json(control, {"op": "publish", "channel": ["room", "hall"], "data": "once"}) == {
        "ok": True,
        "sockets": 1,
    }
    assert a.recv() == "once"
    assert ask_json(control, {"op": "leave", "channel": "hall", "id": "a"})["sockets"] == 1
    assert ask_json(control, {"op": "kick", "conn": conn}) == {"ok": True, "sockets": 1}


@pytest.mark.parametrize(
    "request_, error",
    [
        ({"op": "publish", "channel": "bad name", "data": "x"}, "invalid channel name"),
        ({"op": "publish", "channel": ["a"] * 101, "data": "x"}, "1-100"),
        ({"op": "publish", "channel": "a", "data": "x", "except": "nope"}, "connection id"),
        ({"op": "join", "channel": "a"}, '"id" must be a client id'),
        ({"op": "online", "ids": ["a"] * 1001}, "1-1000"),
        ({"op": "send", "conn": "1", "data": "x"}, "connection id"),
    ],
)
def test_bad_channel_requests_get_a_reason(server, request_, error):
    answer = ask_json(server.control(), request_)
    assert answer["ok"] is False and error in answer["error"]


def test_bad_channels_in_a_url_are_refused_before_the_upgrade(server_factory):
    server = server_factory("--max-channels-per-socket", "3")
    for query, status, reason in [
        ("&channel=bad%20name", 400, b"Invalid channel name"),
        ("&channel=a&channel=b&channel=c&channel=d", 400, b"Too many channels (limit 3)"),
        ("".join(f"&channel=c{n}" for n in range(600)), 400, b"Too many channels (limit 3)"),
        ("".join(f"&channel=c{n}" for n in range(10000)), 414, b""),  # past the request line
    ]:
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(server.ws_url("x") + query, timeout=10)
        assert info.value.status_code == status and reason in (info.value.resp_body or b"")
    assert server.control().list() == []


def test_a_socket_at_its_channel_limit_is_told_so(server_factory):
    server = server_factory("--max-channels-per-socket", "2")
    ws = in_channels(server, "full", "a", "b")
    server.wait_listed(1)
    assert server.control().ask("JOIN c full") == "ERROR Too many channels (limit 2)"
    assert ws.connected


# Signed private channels ######################################################


@pytest.fixture
def signed(server_factory):
    return server_factory("--secret", SECRET)


def test_a_private_channel_needs_a_token_that_signs_it(signed):
    plain = wsboard.signed_query(SECRET.encode(), "u7", 60)
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        url = f"ws://127.0.0.1:{signed.port}/websocket?{plain}&channel=private-u7"
        websocket.create_connection(url, timeout=5)
    assert info.value.status_code == 403 and b"private and presence" in info.value.resp_body
    query = wsboard.signed_query(SECRET.encode(), "u7", 60, channels=["news", "private-u7"])
    ws = websocket.create_connection(f"ws://127.0.0.1:{signed.port}/websocket?{query}", timeout=5)
    signed.wait_listed(1)
    assert signed.control().ask("PUBLISH private-u7 for you") == "OK 1"
    assert ws.recv() == "for you"


def test_a_public_channel_needs_no_more_than_todays_token(signed):
    query = wsboard.signed_query(SECRET.encode(), "u8", 60) + "&channel=news"
    ws = websocket.create_connection(f"ws://127.0.0.1:{signed.port}/websocket?{query}", timeout=5)
    signed.wait_listed(1)
    assert signed.control().ask("PUBLISH news hi") == "OK 1"
    assert ws.recv() == "hi"


@pytest.mark.php
def test_the_php_one_liner_signs_private_channels(signed):
    php = (
        '$id = "u9"; $exp = time() + 60; $private = ["private-u9"]; '
        f'$secret = "{SECRET}"; '
        "echo hash_hmac('sha256', \"$id.$exp\" . implode('', array_map(fn($c) => \"|$c\", "
        "$private)), $secret), ' ', $exp;"
    )
    token, exp = subprocess.run(
        ["php", "-r", php], capture_output=True, text=True, check=True
    ).stdout.split()
    url = f"ws://127.0.0.1:{signed.port}/websocket?id=u9&channel=private-u9&exp={exp}&token={token}"
    websocket.create_connection(url, timeout=5)
    signed.wait_listed(1)


# PHP ##########################################################################

PHP_CHANNELS = r"""<?php
// A backend script that speaks the channel verbs with PHP's own stream functions.
$s = stream_socket_client("unix://" . $argv[1], $errno, $error, 5);
stream_set_timeout($s, 5);
function ask($s, $line) { fwrite($s, $line . "\n"); return rtrim(fgets($s), "\n"); }
$out = [];
$out[] = ask($s, "JOIN room alice");
$out[] = ask($s, "PUBLISH room " . json_encode(["message" => "hi room"]));
$out[] = ask($s, "ONLINE alice bob");
$out[] = ask($s, "COUNT room");
echo json_encode($out);
"""


@pytest.mark.php
def test_a_php_script_joins_publishes_and_asks_who_is_online(server, tmp_path):
    alice = server.websocket("alice")
    server.wait_listed(1)
    script = tmp_path / "channels.php"
    script.write_text(PHP_CHANNELS)
    result = subprocess.run(
        ["php", str(script), server.control_path], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["OK 1", "OK 1", "OK alice", "OK 1 1"]
    assert json.loads(alice.recv()) == {"message": "hi room"}


# /publish (the admin page's form) #############################################


def test_the_publish_route_sends_to_a_channel_and_answers_like_send_message(server):
    from conftest import http_request

    ws = in_channels(server, "reader", "news")
    server.wait_listed(1)
    body = json.dumps({"channel": "news", "message": "extra"}).encode()
    status, _, answer = http_request(server, "/publish", body)
    assert status == 200 and json.loads(answer) == {"error": False, "message": "1"}
    assert json.loads(ws.recv()) == {"message": "extra"}
    status, _, answer = http_request(server, "/publish", b'{"channel": "bad name", "message": "x"}')
    assert status == 400 and json.loads(answer)["error"] is True
    headers = {"Host": f"evil.example:{server.port}"}
    assert http_request(server, "/publish", body, headers=headers)[0] == 403


def test_a_publish_to_a_big_channel_with_a_member_that_never_reads_holds_nobody(server_factory):
    server = server_factory("--max-connections-per-ip", "1000")
    members = [in_channels(server, f"m{n}", "big") for n in range(300)]
    stuck = socket.create_connection(("127.0.0.1", server.port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(upgrade_request("?id=stuck&channel=big"))
    stuck.recv(1024)
    server.wait_listed(301)
    busy, other = server.control(), server.control()
    lines = 3000  # 900,000 frames: seconds of work on any machine, against one slice of 5 ms
    busy.send(f"PUBLISH big {'p' * 10}\n".encode() * lines)
    wait_until(lambda: drain_answers(busy) or None, what="the publishes to be under way")
    other.send(b"PING\n")
    assert other.line() == b"PONG"
    assert drain_answers(busy) < lines  # answered while the publishes were still going out
    answers = {busy.line() for _ in range(lines)}
    assert answers <= {b"OK 301", b"OK 300"}  # 300 once the stuck one is cut, if it is
    assert members[0].recv() == "p" * 10
