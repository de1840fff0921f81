"""Shared fixtures: a real wsboard process on loopback and clients for its two sockets."""

# The unit tests import wsboard, which patches with gevent; do it before anything else loads.
from gevent import monkey

monkey.patch_all()

import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402
import websocket  # noqa: E402

import wsboard  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecordingSocket:
    """What a hub may touch of a BoardSocket, recording every frame it is given."""

    def __init__(self) -> None:
        self.frames: list = []
        self.closed = False
        self.close_code = None
        self.end_reason = None
        self.queued_bytes = 0

    def send_frame_bytes(self, frame: bytes) -> None:
        if self.closed:
            raise wsboard.WebSocketError("Connection is already closed")
        self.frames.append(frame)

    def write_frames(self, frames: list) -> None:
        for frame in frames:
            self.send_frame_bytes(frame)

    def end(self, reason, code, told="", detail="") -> None:
        self.end_reason, self.close_code, self.closed = reason, code, True

    def ended(self, reason, detail="") -> None:
        self.end_reason = reason

    def abort(self) -> None:
        self.closed = True

    def texts(self) -> list:
        """The payloads of the text frames received, decoded."""
        out = []
        for frame in self.frames:
            assert frame[0] == 0x81, frame[:2]
            length = frame[1] & 0x7F
            start = 2 if length < 126 else 4 if length == 126 else 10
            out.append(frame[start:].decode("utf-8"))
        return out


def handshake(client_id, ip="10.0.0.1", subprotocol="", epoch="", last=0, channels=()):
    return wsboard.Handshake(
        client_id,
        ip,
        f"{ip}:1",
        None,
        "127.0.0.1",
        "k",
        subprotocol,
        "",
        "",
        epoch,
        last,
        tuple(channels),
    )


def ask_json(control, request) -> dict:
    """One JSON command on a control connection, and its answer."""
    return json.loads(control.ask(json.dumps(request)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value is not None and value is not False:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Control:
    """A client of the UNIX control socket that reads answers line by line."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"control socket closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def ask(self, line: str) -> str:
        self.send(line.encode("utf-8") + b"\n")
        return self.line().decode("utf-8")

    def list(self) -> list:
        self.send(b"LIST WEBSOCKETS\n")
        assert self.line() == b"=== START ==="
        rows = []
        while (row := self.line()) != b"=== END ===":
            rows.append(row.decode())
        return rows

    def at_eof(self) -> bool:
        """True when the server has closed its side and nothing more is unread."""
        return not self.buffer and self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


SHORT_TIMEOUTS = ("--close-timeout", "1", "--shutdown-timeout", "2")


class Server:
    """wsboard started for real as `python wsboard.py` on a free loopback port."""

    def __init__(self, tmp_path, *args: str, env=None) -> None:
        self.port = free_port()
        args = list(args)
        if "--control" in args:  # the test chose the path
            at = args.index("--control")
            self.control_path = args[at + 1]
            del args[at : at + 2]
        else:
            self.control_path = str(tmp_path / "control.sock")
        self.log_path = tmp_path / f"wsboard-{self.port}.log"
        # Short close and shutdown timeouts, so no test waits out the 5 s defaults; a test's
        # own flags come later and win.
        self.args = [
            "--port",
            str(self.port),
            "--control",
            self.control_path,
            *SHORT_TIMEOUTS,
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc = None
        self.host = "127.0.0.1"  # where tests reach it (another in a network namespace)
        self.wrapper: list = []  # what runs it: ["ip", "netns", "exec", NAME] for a host apart

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ws_url(self, client_id: str) -> str:
        return f"ws://{self.host}:{self.port}/websocket?id={client_id}"

    def start(self, wait: bool = True) -> "Server":
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, os.path.join(ROOT, "wsboard.py"), *self.args],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )
        if wait:
            wait_until(self.ready, what=f"wsboard to start; log:\n{self.log()}")
        return self

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"wsboard exited with {self.proc.returncode}:\n{self.log()}")
        try:
            Control(self.control_path, timeout=1).close()
            socket.create_connection((self.host, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def control(self) -> Control:
        return Control(self.control_path)

    def wait_linked(self) -> "Server":
        """Wait until its Redis link is up (a process serves before it is: it says
        Backplane Unavailable to what needs the others until then)."""

        def up() -> bool:
            control = self.control()
            try:
                return ask_json(control, {"op": "stats"})["backplane"]["state"] == "up"
            finally:
                control.close()

        wait_until(up, what=f"the redis link; log:\n{self.log()}")
        return self

    def websocket(self, client_id: str, **kwargs) -> websocket.WebSocket:
        return websocket.create_connection(self.ws_url(client_id), timeout=10, **kwargs)

    def wait_listed(self, count: int) -> list:
        def rows():
            control = self.control()
            try:
                listed = control.list()
            finally:
                control.close()
            return listed if len(listed) == count else None

        return wait_until(rows, what=f"{count} listed sockets")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.log_file.close()
        return code


@pytest.fixture
def server_factory(tmp_path):
    servers = []

    def make(*args: str, start: bool = True, env=None) -> Server:
        server = Server(tmp_path, *args, env=env)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def server(server_factory):
    return server_factory()


def close_frame(ws) -> tuple:
    """Read until the server's close frame; return (code, reason)."""
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else None
            return code, frame.data[2:].decode()


def drain_answers(control) -> int:
    """Read what has arrived without waiting; return how many answer lines are in hand."""
    control.sock.settimeout(0)
    try:
        while chunk := control.sock.recv(1 << 16):
            control.buffer += chunk
    except BlockingIOError:
        pass
    finally:
        control.sock.settimeout(10)
    return control.buffer.count(b"\n")


def http_request(server, path, body=None, headers=None, auth=None, content_type="application/json"):
    """GET path (POST when there is a body); (status, headers, text), errors included."""
    headers = dict(headers or {})
    if body is not None:
        headers.setdefault("Content-Type", content_type)
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(server.url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


GUNICORN = [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py")]


class Gunicorn:
    """wsboard started for real under gunicorn with gunicorn.conf.py on a free port."""

    def __init__(self, tmp_path, *args, env=None):
        self.port = free_port()
        self.control_path = (env or {}).get("WSBOARD_CONTROL") or str(tmp_path / "control.sock")
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        env = {
            **os.environ,
            "WSBOARD_PORT": str(self.port),
            "WSBOARD_CONTROL": self.control_path,
            "WSBOARD_CLOSE_TIMEOUT": "1",
            "WSBOARD_SHUTDOWN_TIMEOUT": "2",
            **(env or {}),
        }
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*GUNICORN, *args, "wsboard:app"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self):
        return self.log_path.read_text(errors="replace")

    def ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        # The master binds the control socket before any worker runs: ready is a worker's PONG.
        try:
            control = Control(self.control_path, timeout=1)
            try:
                return control.ask("PING") == "PONG"
            finally:
                control.close()
        except OSError:
            return False


@pytest.fixture
def gunicorn(tmp_path):
    started = []

    def start(*args, env=None):
        server = Gunicorn(tmp_path, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def raw_http(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes to the HTTP port and return everything the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b"Content-Length" not in answer:
                break
            head, _, body = answer.partition(b"\r\n\r\n")
            for header in head.split(b"\r\n"):
                if header.lower().startswith(b"content-length:"):
                    if len(body) >= int(header.split(b":")[1]):
                        return answer
        return answer


def upgrade_request(
    query: str, key: str = "dGhlIHNhbXBsZSBub25jZQ==", version: str = "13", method: str = "GET"
) -> bytes:
    return (
        f"{method} /websocket{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: {version}\r\n\r\n"
    ).encode()


_terminal_notes: list = []


@pytest.fixture
def terminal_notes() -> list:
    """Text a test wants shown at the end of the run (e.g. the Autobahn summary table)."""
    return _terminal_notes


def pytest_terminal_summary(terminalreporter):
    for note in _terminal_notes:
        terminalreporter.write_sep("-", note.splitlines()[0])
        terminalreporter.write_line("\n".join(note.splitlines()[1:]))


class RedisServer:
    """A real redis-server on loopback with its own port and directory, no persistence
    (so a restart comes back empty, as an unconfigured Redis does)."""

    def __init__(self, directory, *args: str) -> None:
        self.port = free_port()
        self.directory = str(directory)
        self.args = args  # more of redis-server's options: --replicaof HOST PORT, ...
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        os.makedirs(self.directory, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                "--loglevel",
                "warning",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_until(self.ping, timeout=10, what="redis-server to answer")
        return self

    def start_with(self, password: str) -> "RedisServer":
        """start() for a Redis that asks the default user for password."""
        self.password = password
        return self.start()

    def client(self):
        import redis

        password = getattr(self, "password", None)
        return redis.Redis(port=self.port, socket_timeout=5, protocol=2, password=password)

    def ping(self) -> bool:
        try:
            return self.client().ping()
        except OSError:
            return False
        except Exception:  # redis.ConnectionError and friends
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def keys(self, prefix: str) -> list:
        return sorted(k.decode() for k in self.client().keys(prefix + ":*"))

    def pubsub_channels(self, prefix: str) -> list:
        return sorted(c.decode() for c in self.client().pubsub_channels(prefix + ":*"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


prefixes = iter(range(1, 1_000_000))


def new_prefix() -> str:
    """A Redis prefix of its own for each test: tests never see each other's keys."""
    return f"t{os.getpid()}-{next(prefixes)}"


def start_hub(hub):
    """Start a hub; a Backplane must also have its transport up."""
    hub.start()
    if isinstance(hub, wsboard.Backplane):
        wait_until(lambda: hub.transport.up, timeout=10, what="the backplane's link")
    return hub


SEED_PHP = os.path.join(ROOT, "tests", "seed_php")
# The seed's class predates PHP 8.2 (dynamic properties) and polls a non-blocking socket
# (a warning per empty read): quiet both, as a deployment would; the code stays as it is.
PHP = [
    "php",
    "-d",
    "error_reporting=E_ALL & ~E_DEPRECATED & ~E_WARNING",
    "-d",
    "display_errors=stderr",
]


def seed_php_app(tmp_path, control_path: str, port: int):
    """A copy of the seed's PHP files, with the seed's config.php pointing at our server."""
    import shutil

    app = tmp_path / "php"
    shutil.copytree(SEED_PHP, app)
    (app / "config.php").write_text(
        "<?php\n\t$config=array();\n\t//Path to the UNIX socket\n"
        f'\t$config["service_socket"]="{control_path}";\n'
        "\t$config['ws_host']=\"127.0.0.1\";\n"
        f"\t$config['ws_port']=\"{port}\";\n?>\n"
    )
    return app


def run_seed_php(app, code: str):
    """Run PHP code after the seed's setup.php and return what it printed as JSON."""
    script = app / "case.php"
    script.write_text('<?php\nrequire_once dirname(__FILE__)."/setup.php";\n' + code + "\n")
    result = subprocess.run([*PHP, str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# Markers, so a fast loop can leave out what needs a browser, Redis, PHP, Node or time:
#   python3 -m pytest -m "not (slow or browser or redis or php or node)"
# They are given here by the fixtures and files a test uses, so they cannot go stale; a test
# in a mixed file that calls a tool itself carries its own mark.
MARKS_BY_FIXTURE = {
    "redis_server": "redis",
    "cluster": "redis",
    "own_redis": "redis",
    "browser": "browser",
    "gunicorn": "slow",
    "npm_packages": "node",
    "seed_app": "php",
}
MARKS_BY_FILE = {
    "test_autobahn.py": ("slow",),
    "test_browser.py": ("browser",),
    "test_deploy.py": ("slow", "browser", "php"),
    "test_gunicorn.py": ("slow",),
    "test_php.py": ("php",),
    "test_php_client.py": ("php",),
    "test_pusher.py": ("node",),
    "test_pusher_surface.py": ("node",),
    "test_failover.py": ("slow", "redis"),
    "test_netns.py": ("slow", "redis"),
    "test_scaleout.py": ("slow", "redis"),
}


def pytest_collection_modifyitems(items):
    for item in items:
        names = set(MARKS_BY_FILE.get(item.path.name, ()))
        names.update(MARKS_BY_FIXTURE[f] for f in item.fixturenames if f in MARKS_BY_FIXTURE)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("hub_name") == "redis":
            names.add("redis")
        for name in sorted(names):
            item.add_marker(name)


@pytest.fixture
def trickling_control(tmp_path):
    """A control socket that answers every line with one byte every 0.4 s (an answer that
    takes 24 s to come whole): each read is quick, the call must not be."""
    path = str(tmp_path / "trickle.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    stop = threading.Event()

    def trickle(conn):
        with conn:
            try:
                conn.recv(4096)
                for byte in b"OK " + b"1" * 57 + b"\n":
                    if stop.wait(0.4):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                pass

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield path
    stop.set()
    listener.close()
