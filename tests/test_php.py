"""The seed's own PHP client, unchanged, against the real server with the real `php`."""

import json
import subprocess
import urllib.request

import pytest
from conftest import PHP, free_port, seed_php_app, wait_until
from conftest import run_seed_php as run_php


@pytest.fixture
def seed_app(tmp_path, server):
    """A copy of the seed's PHP files, with the seed's config.php pointing at our server."""
    return seed_php_app(tmp_path, server.control_path, server.port)


def test_the_seed_class_lists_every_connected_socket(seed_app, server):
    sockets = [server.websocket("php1"), server.websocket("php2"), server.websocket("php2")]
    server.wait_listed(3)
    listed = run_php(seed_app, "print json_encode($serviceSocket->listConnections());")
    expected = [
        {"clientId": cid, "host": f"127.0.0.1:{ws.sock.getsockname()[1]}"}
        for cid, ws in zip(["php1", "php2", "php2"], sockets, strict=True)
    ]
    assert listed == expected


def test_the_seed_class_lists_nothing_when_nobody_is_connected(seed_app):
    assert run_php(seed_app, "print json_encode($serviceSocket->listConnections());") == []


def test_the_seed_class_sends_text_with_spaces_and_non_ascii(seed_app, server):
    ws = server.websocket("php-tab")
    server.wait_listed(1)
    text = "h\u00e9llo  w\u00f6rld \u2603 with  spaces"
    result = run_php(
        seed_app,
        "print json_encode($serviceSocket->sendMessage('php-tab', "
        f"json_encode(array('message' => '{text}'))));",
    )
    assert result is True
    assert json.loads(ws.recv()) == {"message": text}


def test_the_seed_class_gets_client_not_found_for_an_unknown_id(seed_app):
    result = run_php(seed_app, "print json_encode($serviceSocket->sendMessage('nobody', 'x y'));")
    assert result == "Client Not Found"


def test_the_seed_class_can_pipeline_on_one_connection(seed_app, server):
    ws = server.websocket("php-many")
    server.wait_listed(1)
    results = run_php(
        seed_app,
        "$r = array(); for ($i = 0; $i < 50; $i++) "
        "{ $r[] = $serviceSocket->sendMessage('php-many', \"n $i\"); }"
        " $r[] = count($serviceSocket->listConnections()); print json_encode($r);",
    )
    assert results == [True] * 50 + [1]
    assert [ws.recv() for _ in range(50)] == [f"n {i}" for i in range(50)]


@pytest.fixture
def php_server(seed_app):
    port = free_port()
    proc = subprocess.Popen(
        [*PHP, "-S", f"127.0.0.1:{port}", "-t", str(seed_app)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up():
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/setup.php", timeout=1)
            return True
        except OSError:
            return False if proc.poll() is None else pytest.fail("php -S exited")

    wait_until(up, what="php -S")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_seeds_send_message_php_delivers_through_wsboard(php_server, server):
    ws = server.websocket("via-php")
    server.wait_listed(1)
    text = "from the seed's form: <b>bold?</b> caf\u00e9"
    assert post(php_server + "/sendMessage.php", {"clientId": "via-php", "message": text}) == {
        "error": False,
        "message": "",
    }
    assert json.loads(ws.recv()) == {"message": text}


def test_the_seeds_send_message_php_reports_client_not_found(php_server):
    assert post(php_server + "/sendMessage.php", {"clientId": "absent", "message": "x"}) == {
        "error": True,
        "message": "Client Not Found",
    }
