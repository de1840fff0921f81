"""wsboard under gunicorn's gevent worker, configured by gunicorn.conf.py and WSBOARD_* vars."""

import os
import signal
import subprocess
import time

from conftest import ROOT, Control, close_frame, free_port, wait_until


def test_gunicorn_serves_websockets_and_the_control_socket(gunicorn):
    import websocket

    server = gunicorn()
    wait_until(server.ready, what="gunicorn to start")
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/websocket?id=gu1", timeout=10)
    control = Control(server.control_path)
    wait_until(lambda: len(control.list()) == 1 or None, what="the socket to be listed")
    assert control.ask("SEND MESSAGE gu1 through gunicorn") == "OK"
    assert ws.recv() == "through gunicorn"
    ws.close()


def test_gunicorn_refuses_a_bad_id_before_the_upgrade(gunicorn):
    from conftest import raw_http, upgrade_request

    server = gunicorn()
    wait_until(server.ready, what="gunicorn to start")
    assert raw_http(server.port, upgrade_request("?id=a%20b")).startswith(b"HTTP/1.1 400 ")


def test_gunicorn_sigterm_closes_websockets_with_1001_and_removes_the_socket(gunicorn):
    import websocket

    server = gunicorn()
    wait_until(server.ready, what="gunicorn to start")
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/websocket?id=bye", timeout=10)
    wait_until(lambda: len(Control(server.control_path).list()) == 1 or None, what="listing")
    server.proc.send_signal(signal.SIGTERM)
    assert close_frame(ws) == (1001, "server shutting down; reconnect")
    assert server.proc.wait(timeout=20) == 0
    assert not os.path.exists(server.control_path)
    assert server.log().count("closed 1 websockets") == 1
    # gunicorn's own lines still format in a worker wsboard set up (%(process)d among them)
    assert "Worker exiting" in server.log() and "Logging error" not in server.log()


def test_a_draining_worker_accepts_nothing_so_reconnects_reach_its_replacement(gunicorn):
    """SIGTERM to a worker (a rolling restart): it stops accepting before it drains, so a
    client that reconnects meanwhile waits in the shared backlog for the next worker and is
    served there, rather than taken by the dying worker and dropped without a close frame
    when gunicorn's graceful timeout ends it."""
    import websocket

    server = gunicorn(env={"WSBOARD_DRAIN_WINDOW": "2"})
    wait_until(server.ready, what="gunicorn to start")
    url = f"ws://127.0.0.1:{server.port}/websocket?id="
    old = websocket.create_connection(url + "old", timeout=10)
    control = Control(server.control_path)
    wait_until(lambda: len(control.list()) == 1 or None, what="the socket to be listed")
    control.close()
    with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
        (worker,) = (int(pid) for pid in f.read().split())
    started = time.monotonic()
    os.kill(worker, signal.SIGTERM)
    time.sleep(0.3)  # the drain has begun: its window is 2 s
    comer = websocket.create_connection(url + "comer", timeout=15)
    assert close_frame(old) == (1001, "server shutting down; reconnect")
    wait_until(lambda: not os.path.exists(f"/proc/{worker}/status") or None, timeout=15,
               what="the old worker to exit")  # fmt: skip
    assert time.monotonic() - started < 8  # its drain, not gunicorn's 10 s graceful timeout
    wait_until(server.ready, what="the new worker")
    assert Control(server.control_path).ask("SEND MESSAGE comer still here") == "OK"
    assert comer.recv() == "still here"
    assert "Worker graceful timeout" not in server.log()


def test_gunicorn_refuses_more_than_one_worker(gunicorn):
    server = gunicorn("--workers", "2")
    assert server.proc.wait(timeout=30) != 0
    assert "refusing to start 2 workers" in server.log()
    assert not os.path.exists(server.control_path)


def test_the_documented_gunicorn_command_line_works(tmp_path):
    port = free_port()
    env = {**os.environ, "WSBOARD_PORT": str(port), "WSBOARD_CONTROL": str(tmp_path / "c.sock")}
    proc = subprocess.Popen(
        ["gunicorn", "-c", "gunicorn.conf.py", "wsboard:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: os.path.exists(tmp_path / "c.sock") or None, what="the control socket")
        assert Control(str(tmp_path / "c.sock")).list() == []
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_gunicorn_speaks_the_pusher_protocol_from_the_environment(gunicorn):
    import json

    import pusher
    import websocket

    env = {
        "WSBOARD_PUSHER_APP_ID": "9",
        "WSBOARD_PUSHER_KEY": "gk",
        "WSBOARD_PUSHER_SECRET": "s" * 16,
    }
    server = gunicorn(env=env)
    wait_until(server.ready, what="gunicorn to start")
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/app/gk?protocol=7", timeout=10)
    assert json.loads(ws.recv())["event"] == "pusher:connection_established"
    ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "g"}}))
    assert json.loads(ws.recv())["event"] == "pusher_internal:subscription_succeeded"
    api = pusher.Pusher("9", "gk", "s" * 16, ssl=False, host="127.0.0.1", port=server.port)
    api.trigger("g", "hello", "from gunicorn")
    assert json.loads(ws.recv()) == {"event": "hello", "channel": "g", "data": "from gunicorn"}
    ws.close()
