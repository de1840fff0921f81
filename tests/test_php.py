"""The seed's own PHP client, unchanged, against the real server with the real `php`."""

import json
import shutil
import subprocess
import urllib.request

import pytest
from conftest import free_port, wait_until

SEED_PHP = __file__.rsplit("/", 1)[0] + "/seed_php"
# The seed's class predates PHP 8.2 (dynamic properties) and polls a non-blocking socket
# (a warning per empty read): quiet both, as a deployment would; the code stays as it is.
PHP = [
    "php",
    "-d",
    "error_reporting=E_ALL & ~E_DEPRECATED & ~E_WARNING",
    "-d",
    "display_errors=stderr",
]


@pytest.fixture
def seed_app(tmp_path, server):
    """A copy of the seed's PHP files, with the seed's config.php pointing at our server."""
    app = tmp_path / "php"
    shutil.copytree(SEED_PHP, app)
    (app / "config.php").write_text(
        "<?php\n\t$config=array();\n\t//Path to the UNIX socket\n"
        f'\t$config["service_socket"]="{server.control_path}";\n'
        "\t$config['ws_host']=\"127.0.0.1\";\n"
        f"\t$config['ws_port']=\"{server.port}\";\n?>\n"
    )
    return app


def run_php(app, code: str):
    """Run PHP code after the seed's setup.php and return what it printed as JSON."""
    script = app / "case.php"
    script.write_text('<?php\nrequire_once dirname(__FILE__)."/setup.php";\n' + code + "\n")
    result = subprocess.run([*PHP, str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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
