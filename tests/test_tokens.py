"""Token lifetime and secret rotation on the real server: a socket closes when its token's
exp passes (4001), unless a wsboard.v1 socket refreshes it; tokens of the previous secret
are accepted while --secret-previous-file is set."""

import json
import time

import pytest
import websocket
from conftest import close_frame
from test_events import Stream
from test_hook import App

import wsboard_client

SECRET = "the-current-secret-of-this-test"
PREVIOUS = "the-previous-secret-of-this-test"


def signed(client_id: str, exp: int, secret: str = SECRET) -> str:
    return f"id={client_id}&exp={exp}&token={wsboard_client.mint_token(secret, client_id, exp)}"


def v1(server, query: str):
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{server.port}/websocket?{query}", timeout=10, subprotocols=["wsboard.v1"]
    )
    return ws, json.loads(ws.recv())["hello"]


@pytest.fixture
def secret_server(server_factory, tmp_path):
    (tmp_path / "secret").write_text(SECRET)
    return server_factory("--secret-file", str(tmp_path / "secret"))


def test_a_socket_closes_with_4001_when_its_token_expires(secret_server):
    exp = int(time.time()) + 2
    ws, hello = v1(secret_server, signed("brief", exp))
    assert hello["exp"] == exp
    assert close_frame(ws) == (4001, "token expired")
    # At exp itself: the server promises a second; the rest is slack for a loaded machine.
    assert time.time() < exp + 2.5
    plain = websocket.create_connection(
        f"ws://127.0.0.1:{secret_server.port}/websocket?{signed('plain', exp + 1)}", timeout=10
    )
    assert close_frame(plain) == (4001, "token expired")


def test_a_refreshed_socket_stays_past_its_first_exp(secret_server):
    exp = int(time.time()) + 4
    ws, _ = v1(secret_server, signed("kept", exp))
    later = exp + 30
    token = wsboard_client.mint_token(SECRET, "kept", later)
    ws.send(json.dumps({"refresh": {"exp": later, "token": token}}))
    assert json.loads(ws.recv()) == {"refreshed": {"exp": later}}
    time.sleep(exp + 1.5 - time.time())
    assert secret_server.control().ask("SEND MESSAGE kept still here") == "OK"
    assert json.loads(ws.recv())["data"] == "still here"


@pytest.mark.parametrize(
    "refresh, reason",
    [
        ({"exp": 1, "token": "00"}, "refresh refused: token expired"),
        ({"exp": 4102444800, "token": "00" * 32}, "refresh refused: token does not match"),
        ({"exp": "soon", "token": "00"}, "refresh refused: a signed id needs exp and token"),
        ("nonsense", 'refresh refused: a refresh is {"refresh":{"exp":…,"token":…}}'),
    ],
)
def test_a_refresh_that_does_not_hold_closes_with_its_reason(secret_server, refresh, reason):
    ws, _ = v1(secret_server, signed("refreshing", int(time.time()) + 60))
    ws.send(json.dumps({"refresh": refresh}))
    assert close_frame(ws) == (4001, reason)


def test_a_stream_ends_with_event_expired(secret_server):
    exp = int(time.time()) + 2
    stream = Stream(secret_server.port, signed("streamed", exp))
    assert json.loads(stream.event()["data"])["exp"] == exp
    end = stream.event()
    assert end["event"] == "expired"
    assert json.loads(end["data"]) == {"code": 4001, "reason": "token expired"}


def test_the_connect_hooks_exp_closes_the_socket_too(server_factory):
    app = App()
    try:
        exp = int(time.time()) + 3
        app.answer = {"id": "hooked", "exp": exp}
        server = server_factory("--connect-url", app.url)
        ws, hello = v1(server, "")
        assert hello["exp"] == exp
        assert close_frame(ws) == (4001, "token expired")
    finally:
        app.stop()


def test_tokens_of_the_previous_secret_are_accepted_while_it_is_set(server_factory, tmp_path):
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "previous").write_text(PREVIOUS)
    server = server_factory(
        "--secret-file",
        str(tmp_path / "secret"),
        "--secret-previous-file",
        str(tmp_path / "previous"),
    )
    exp = int(time.time()) + 600
    for secret in (SECRET, PREVIOUS):
        ws, _ = v1(server, signed("rotating", exp, secret))
        ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        v1(server, signed("rotating", exp, "some-other-secret-entirely"))
    assert refused.value.status_code == 403
    after = server_factory(
        "--secret-file", str(tmp_path / "secret"), "--control", str(tmp_path / "after.sock")
    )
    with pytest.raises(websocket.WebSocketBadStatusException) as gone:
        v1(after, signed("rotating", exp, PREVIOUS))  # the rotation is over: refused
    assert gone.value.status_code == 403
