"""wsboard: a small WebSocket push server that sits beside a request/response web app.

Browsers open ``ws://HOST:PORT/websocket?id=<client id>``; the app pushes to them over a
local UNIX socket with a line protocol (``LIST WEBSOCKETS``, ``SEND MESSAGE <id> <text>``).
The module reads top to bottom: configuration, the WebSocket adapter, the connection
registry and delivery, the control line protocol, the web routes, start-up.
"""

# Bottle keeps request state in thread-locals made at import time: patch before importing it.
from gevent import monkey

monkey.patch_all()

import argparse
import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple
from urllib.parse import parse_qs

import bottle
import gevent
import gevent.event
import gevent.lock
from gevent.pywsgi import WSGIHandler, WSGIServer
from gevent.server import StreamServer
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.handler import WebSocketHandler as _GeventWebSocketHandler
from geventwebsocket.websocket import Header, Stream
from geventwebsocket.websocket import WebSocket as _GeventWebSocket

__version__ = "0.1.0"

log = logging.getLogger("wsboard")
access_log = logging.getLogger("wsboard.access")

HERE = os.path.dirname(os.path.abspath(__file__))


###############################################################################
# Configuration ###############################################################
###############################################################################
# Every setting is one row: a --flag, a WSBOARD_* environment variable and a default.
# Precedence: flag, then environment, then default. Values are checked where they enter.


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the setting."""


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0-65535")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _socket_path(text: str) -> str:
    if not text or "\0" in text:
        raise ValueError("must be a file path")
    if len(os.fsencode(text)) > 107:
        raise ValueError("is longer than the 107 bytes a UNIX socket path may have")
    return text


def _log_level(text: str) -> str:
    if text.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError("must be one of debug, info, warning, error")
    return text.lower()


class Option(NamedTuple):
    name: str
    default: object
    parse: Callable[[str], object]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "WSBOARD_" + self.name.upper()


OPTIONS = (
    Option(
        "host",
        "127.0.0.1",
        str,
        "address the HTTP/WebSocket server binds; 0.0.0.0 exposes it to the network",
    ),
    Option("port", 8080, _port, "TCP port of the HTTP/WebSocket server"),
    Option(
        "control",
        "/tmp/wsboard.sock",
        _socket_path,
        "path of the UNIX control socket the backend app talks to",
    ),
    Option(
        "max_line",
        1024 * 1024,
        _positive_int,
        "longest control line in bytes; a longer one is refused and its connection closed",
    ),
    Option(
        "max_message",
        64 * 1024,
        _positive_int,
        "largest message in bytes a browser may send; a larger one closes it with 1009",
    ),
    Option(
        "write_timeout",
        10.0,
        _positive_float,
        "seconds a write to a socket may block before that socket is dropped",
    ),
    Option(
        "handshake_timeout",
        10.0,
        _positive_float,
        "seconds a client gets to send its HTTP request, and to idle between requests",
    ),
    Option(
        "shutdown_timeout",
        5.0,
        _positive_float,
        "seconds open WebSockets get to finish their close handshake on shutdown",
    ),
    Option("log_level", "info", _log_level, "debug, info, warning or error"),
)


class Config:
    """The settings in force: one attribute per row of OPTIONS."""

    def __init__(self, **values: object) -> None:
        for option in OPTIONS:
            setattr(self, option.name, values.get(option.name, option.default))

    def __repr__(self) -> str:
        fields = ", ".join(f"{o.name}={getattr(self, o.name)!r}" for o in OPTIONS)
        return f"Config({fields})"


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsboard",
        description="WebSocket push server: browsers connect to /websocket?id=ID, "
        "the backend app pushes to them over a UNIX control socket.",
        epilog="Each option can also be set by the environment variable named in brackets; "
        "a flag wins over the environment.",
    )
    parser.add_argument("--version", action="version", version=f"wsboard {__version__}")
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.name.upper(),
            help=f"{option.help} [{option.env}, default: {option.default}]",
        )
    return parser


def load_config(argv: Sequence[str] = (), environ: Mapping[str, str] = os.environ) -> Config:
    """Build the Config from flags and environment; raise ConfigError naming a bad value."""
    flags = vars(argument_parser().parse_args(list(argv)))
    values = {}
    for option in OPTIONS:
        if flags.get(option.name) is not None:
            source, raw = option.flag, flags[option.name]
        elif option.env in environ:
            source, raw = option.env, environ[option.env]
        else:
            continue
        try:
            values[option.name] = option.parse(raw.strip())
        except ValueError as exc:
            reason = str(exc) if not str(exc).startswith("invalid literal") else "is not a number"
            raise ConfigError(f"{source}={raw!r}: {reason}") from None
    return Config(**values)


config = Config()


###############################################################################
# Client ids ##################################################################
###############################################################################
# An id ends up in control lines and on the admin page, so it may hold nothing that
# could break either: 1-128 characters from a small safe set.

CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def is_valid_client_id(value: object) -> bool:
    return isinstance(value, str) and CLIENT_ID.fullmatch(value) is not None


def new_board_id() -> str:
    """A random id for a board page, in the seed's form: 10 of A-Z 0-9."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(10))


###############################################################################
# WebSocket adapter ###########################################################
###############################################################################
# gevent-websocket 0.10.1 is unmaintained; its known defects are mended here and only
# here (see README, "Design"): writes are serialised and time-limited, inbound size is
# capped before the payload is read, close frames carry their code, and a bad request is
# refused with a real HTTP status before the 101 is sent.

WEBSOCKET_PATH = "/websocket"
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OPCODE_TEXT = 0x1
OPCODE_CLOSE = 0x8

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_MESSAGE_TOO_BIG = 1009


class MessageTooBig(WebSocketError):
    """A browser sent more than max_message bytes in one message."""


class WriteTimedOut(WebSocketError):
    """A socket did not take our bytes within write_timeout."""


def text_frame(text: str) -> bytes:
    """One unmasked, final text frame, as a server sends it."""
    payload = text.encode("utf-8")
    return bytes(Header.encode_header(True, OPCODE_TEXT, b"", len(payload), 0)) + payload


def close_payload(code: int | None, reason: object = b"") -> bytes:
    """The body of a close frame: the code, then the reason cut to fit 125 bytes."""
    if code is None:
        return b""
    if isinstance(reason, str):
        reason = reason.encode("utf-8")
    reason = bytes(reason or b"")[:123]
    while reason:  # never cut a UTF-8 character in two
        try:
            reason.decode("utf-8")
            break
        except UnicodeDecodeError:
            reason = reason[:-1]
    return struct.pack("!H", code) + reason


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR a client's payload with its 4-byte mask, at C speed via big integers."""
    length = len(payload)
    if not length:
        return b""
    key = (bytes(mask) * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")


def websocket_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()).decode()


def query_ids(environ: Mapping[str, str]) -> list:
    return parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).get("id", [])


def handshake_refusal(environ: Mapping[str, str], http_version: str) -> tuple | None:
    """Why an upgrade request to /websocket must be refused, as (status, reason), or None."""
    if environ.get("REQUEST_METHOD") != "GET" or http_version != "HTTP/1.1":
        return "400 Bad Request", "WebSocket upgrades need GET over HTTP/1.1"
    if "upgrade" not in environ.get("HTTP_CONNECTION", "").lower():
        return "400 Bad Request", "Connection: Upgrade header missing"
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return "426 Upgrade Required", "Only WebSocket version 13 is supported"
    try:
        key = base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 16:
        return "400 Bad Request", "Sec-WebSocket-Key must be 16 bytes in base64"
    ids = query_ids(environ)
    if len(ids) != 1 or not is_valid_client_id(ids[0]):
        return "400 Bad Request", (
            "Invalid client id: give exactly one id of 1-128 characters from A-Z a-z 0-9 _ - . :"
        )
    return None


class BoardSocket(_GeventWebSocket):
    """gevent-websocket's WebSocket with its write, read-limit and close defects mended."""

    __slots__ = ("write_lock", "message_size", "peer_closed")

    def __init__(self, environ: dict, stream: Stream, handler: "WebSocketHandler") -> None:
        super().__init__(environ, stream, handler)
        self.write_lock = gevent.lock.Semaphore()
        self.message_size = 0
        self.peer_closed = False
        self.raw_write = self._write

    def _write(self, data: bytes) -> None:
        # One writer at a time (gevent forbids two), and never longer than write_timeout.
        sock = self.handler.socket
        try:
            with gevent.Timeout(config.write_timeout, WriteTimedOut("write timed out")):
                with self.write_lock:
                    sock.sendall(data)
        except WriteTimedOut:
            self.abort()
            raise

    def send_frame_bytes(self, frame: bytes) -> None:
        """Write a frame that was encoded once for many sockets."""
        if self.closed:
            raise WebSocketError("Connection is already closed")
        try:
            self._write(frame)
        except OSError as exc:
            raise WebSocketError(f"Socket is dead: {exc}") from None

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake; the reader then sees EOF."""
        self.closed = True
        try:
            self.handler.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def read_frame(self) -> tuple:
        header = Header.decode_header(self.stream)
        if header.flags:
            raise ProtocolError("reserved bits set without a negotiated extension")
        if not header.mask:
            raise ProtocolError("client frames must be masked")
        if header.opcode in (0x0, 0x1, 0x2):
            self.message_size = header.length + (self.message_size if header.opcode == 0 else 0)
            if self.message_size > config.max_message:
                raise MessageTooBig(f"message of more than {config.max_message} bytes")
        if not header.length:
            return header, b""
        try:
            payload = self.raw_read(header.length)
        except OSError:
            payload = b""
        if len(payload) != header.length:
            raise WebSocketError("Unexpected EOF reading frame payload")
        return header, unmask(payload, header.mask)

    def handle_close(self, header: Header, payload: bytes) -> None:
        self.peer_closed = True
        super().handle_close(header, payload)

    def receive(self) -> object | None:
        """The next message, or None once the socket is closed for any reason."""
        if self.closed:
            return None
        try:
            return self.read_message()
        except MessageTooBig:
            self.close(CLOSE_MESSAGE_TOO_BIG, "message too big")
        except UnicodeError:
            self.close(1007, "invalid UTF-8")
        except ProtocolError:
            self.close(1002, "protocol error")
        except (OSError, WebSocketError):
            self.closed = True
        return None

    def close(self, code: int | None = CLOSE_NORMAL, message: object = b"") -> None:
        """Send a close frame with its code and reason (stock 0.10.1 drops the code)."""
        if self.closed:
            return
        try:
            if self.raw_write is not None:
                self.send_frame(close_payload(code, message), self.OPCODE_CLOSE)
        except (OSError, WebSocketError):
            pass
        finally:
            self.closed = True


class WebSocketHandler(_GeventWebSocketHandler):
    """Upgrades /websocket after checking the request, then runs one socket's session.

    Everything else goes to the Bottle app. Refusals get a real status before any 101.
    """

    def handle(self) -> None:
        self.socket.settimeout(config.handshake_timeout)  # a silent client must not hold a greenlet
        super().handle()

    def run_application(self) -> None:
        environ = self.environ
        if (
            environ.get("PATH_INFO") != WEBSOCKET_PATH
            or environ.get("HTTP_UPGRADE", "").lower() != "websocket"
        ):
            return WSGIHandler.run_application(self)
        refusal = handshake_refusal(environ, self.request_version)
        if refusal:
            return self.refuse(*refusal)
        self.websocket = BoardSocket(environ, Stream(self), self)
        environ["wsgi.websocket"] = self.websocket
        environ["wsgi.websocket_version"] = "13"
        self.start_response(
            "101 Switching Protocols",
            [
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                (
                    "Sec-WebSocket-Accept",
                    websocket_accept(environ["HTTP_SEC_WEBSOCKET_KEY"].strip()),
                ),
            ],
        )
        self.write(b"")
        self.socket.settimeout(None)  # an open WebSocket may idle; writes have their own timeout
        self.run_websocket()

    def log_request(self) -> None:
        status = self.status.decode() if isinstance(self.status, bytes) else str(self.status)
        if not status.startswith("101"):  # sockets log their own connect/disconnect
            access_log.info(self.format_request())

    def refuse(self, status: str, reason: str) -> None:
        log.warning("refused websocket from %s: %s", format_peer(self.client_address), reason)
        body = (reason + "\n").encode("utf-8")
        self.start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        self.result = [body]
        self.process_result()

    def run_websocket(self) -> None:
        serve_websocket(Connection(query_ids(self.environ)[0], self.client_address, self.websocket))
        self.environ["wsgi.websocket"] = None
        self.websocket = None


###############################################################################
# Connection registry and delivery ############################################
###############################################################################


def format_peer(address: object) -> str:
    """host:port for a TCP peer ([host]:port for IPv6), '-' where there is none."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "-"


class Connection:
    """One open WebSocket: who it is, where it comes from, and the socket itself."""

    __slots__ = ("client_id", "peer", "ws", "connected_at")

    def __init__(self, client_id: str, peer: object, ws: BoardSocket) -> None:
        self.client_id = client_id
        self.peer = format_peer(peer)
        self.ws = ws
        self.connected_at = time.time()


class Registry:
    """The open sockets by client id: the one interface listing and delivery go through."""

    def __init__(self) -> None:
        self._by_id: dict[str, dict[Connection, None]] = {}

    def add(self, conn: Connection) -> None:
        self._by_id.setdefault(conn.client_id, {})[conn] = None

    def remove(self, conn: Connection) -> None:
        sockets = self._by_id.get(conn.client_id)
        if sockets is not None:
            sockets.pop(conn, None)
            if not sockets:
                del self._by_id[conn.client_id]

    def sockets_of(self, client_id: str) -> list:
        return list(self._by_id.get(client_id, ()))

    def __iter__(self) -> Iterator[Connection]:
        return iter([conn for sockets in self._by_id.values() for conn in sockets])

    def __len__(self) -> int:
        return sum(len(sockets) for sockets in self._by_id.values())


registry = Registry()


def deliver(client_id: str, text: str) -> int:
    """Send text as one frame to every open socket of client_id; return how many took it."""
    frame = text_frame(text)
    delivered = 0
    for conn in registry.sockets_of(client_id):
        try:
            conn.ws.send_frame_bytes(frame)
            delivered += 1
        except WebSocketError as exc:
            log.warning("dropped %s %s: %s", conn.client_id, conn.peer, exc)
    return delivered


def serve_websocket(conn: Connection) -> None:
    """A socket's life: registered while open, its incoming messages read and discarded."""
    registry.add(conn)
    log.info("connect %s %s (%d open)", conn.client_id, conn.peer, len(registry))
    ws = conn.ws
    try:
        while ws.receive() is not None:
            pass
    finally:
        registry.remove(conn)
        ws.close()
        log.info(
            "disconnect %s %s after %.1fs",
            conn.client_id,
            conn.peer,
            time.time() - conn.connected_at,
        )


def close_all(code: int, reason: str) -> int:
    """Send every open socket a close frame; return how many were open."""
    conns = list(registry)
    for conn in conns:
        conn.ws.close(code, reason)
    return len(conns)


###############################################################################
# Control line protocol #######################################################
###############################################################################
# Lines end in \n (a \r before it is dropped). Every line gets exactly one answer, in
# order: the seed's PHP client waits for one and would hang on silence.


class Command(NamedTuple):
    verb: str
    args: tuple = ()


def parse_control_line(line: bytes) -> Command:
    """A control line (without its \\n) as a Command; refusals are Command('error', (text,))."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if line.rstrip(b" ") == b"LIST WEBSOCKETS":
        return Command("list")
    if line.startswith(b"SEND MESSAGE "):
        client_id, space, text = line[len(b"SEND MESSAGE ") :].partition(b" ")
        if not client_id:
            return Command("error", ("Missing client id",))
        try:
            client_id = client_id.decode("ascii")
        except UnicodeDecodeError:
            return Command("error", ("Invalid client id",))
        if not is_valid_client_id(client_id):
            return Command("error", ("Invalid client id",))
        if not space or not text:
            return Command("error", ("Missing message text",))
        try:
            return Command("send", (client_id, text.decode("utf-8")))
        except UnicodeDecodeError:
            return Command("error", ("Message is not valid UTF-8",))
    return Command("error", ("Unknown command",))


def list_lines() -> list:
    return ["=== START ==="] + [f"{c.client_id} {c.peer}" for c in registry] + ["=== END ==="]


def send_lines(client_id: str, text: str) -> list:
    return ["OK"] if deliver(client_id, text) else ["ERROR Client Not Found"]


COMMANDS: dict = {
    "list": list_lines,
    "send": send_lines,
    "error": lambda message: ["ERROR " + message],
}


def run_command(command: Command) -> list:
    """The answer lines for one command."""
    return COMMANDS[command.verb](*command.args)


def split_lines(buffer: bytearray) -> tuple:
    """Complete lines in buffer, and what is left after the last \\n."""
    *lines, rest = bytes(buffer).split(b"\n")
    return lines, bytearray(rest)


def serve_control(sock: socket.socket, address: object) -> None:
    """One control connection: read lines, answer each in order, until EOF or abuse."""
    buffer = bytearray()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                if buffer:  # a last line without \n still gets its answer
                    answer_lines(sock, [bytes(buffer)])
                return
            buffer += data
            if b"\n" in data:
                lines, buffer = split_lines(buffer)
                if not answer_lines(sock, lines):
                    return
            if len(buffer) > config.max_line:
                refuse_long_line(sock)
                return
    except (OSError, WriteTimedOut) as exc:
        log.info("control connection ended: %s", exc)
    finally:
        sock.close()


CONTROL_FLUSH_BYTES = 64 * 1024


def answer_lines(sock: socket.socket, lines: Iterable[bytes]) -> bool:
    """Answer lines in order; False when one was too long and the connection must end.

    Answers are written whenever 64 KiB are pending, so a burst of LISTs cannot pile up.
    """
    pending: list = []
    size = 0
    for line in lines:
        if len(line) > config.max_line:
            flush_control(sock, pending)
            refuse_long_line(sock)
            return False
        command = parse_control_line(line)
        if command.verb == "error":
            log.warning("control error: %s: %r", command.args[0], line[:80])
        for answer in run_command(command):
            pending.append(answer)
            size += len(answer) + 1
        if size >= CONTROL_FLUSH_BYTES:
            flush_control(sock, pending)
            pending, size = [], 0
    flush_control(sock, pending)
    return True


def flush_control(sock: socket.socket, answers: list) -> None:
    if answers:
        write_control(sock, ("\n".join(answers) + "\n").encode("utf-8"))


def refuse_long_line(sock: socket.socket) -> None:
    log.warning("control error: line longer than %d bytes; closing", config.max_line)
    write_control(sock, f"ERROR Line too long (limit {config.max_line} bytes)\n".encode())


def write_control(sock: socket.socket, data: bytes) -> None:
    with gevent.Timeout(config.write_timeout, WriteTimedOut("control client is not reading")):
        sock.sendall(data)


###############################################################################
# Web routes and pages ########################################################
###############################################################################


def find_views() -> str:
    """views/ beside this file (a checkout) or under <prefix>/share/wsboard (pip install)."""
    for candidate in (
        os.path.join(HERE, "views"),
        os.path.join(sys.prefix, "share", "wsboard", "views"),
    ):
        if os.path.isdir(candidate):
            return candidate
    raise RuntimeError("wsboard: cannot find its views/ directory")


VIEWS = find_views()
STATIC = os.path.join(VIEWS, "static")
MAX_FORM_BYTES = 1024 * 1024

app = bottle.Bottle()


def render(name: str, **values: object) -> str:
    return bottle.template(name, template_lookup=[VIEWS], **values)


@app.get("/")
def board_page() -> str:
    return render("board", board_id=new_board_id())


@app.get("/admin")
def admin_page() -> str:
    return render("admin", clients=list(registry))


def json_answer(status: int, error: bool, message: str) -> str:
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return json.dumps({"error": error, "message": message})


def parse_send_request(body: bytes) -> tuple:
    """(client_id, message) from the admin form's JSON body, or raise ValueError(reason)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("Body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ValueError("Body must be a JSON object")
    client_id, message = data.get("clientId"), data.get("message")
    if not is_valid_client_id(client_id):
        raise ValueError("clientId must be a valid client id")
    if not isinstance(message, str):
        raise ValueError("message must be a string")
    return client_id, message


@app.post("/sendMessage")
def send_message() -> str:
    if bottle.request.get_header("Transfer-Encoding"):  # Bottle would spool it whole first
        return json_answer(411, True, "Send the body with a Content-Length")
    if bottle.request.content_length > MAX_FORM_BYTES:
        return json_answer(413, True, f"Body larger than {MAX_FORM_BYTES} bytes")
    try:
        client_id, message = parse_send_request(bottle.request.body.read(MAX_FORM_BYTES))
    except ValueError as exc:
        log.warning("sendMessage refused: %s", exc)
        return json_answer(400, True, str(exc))
    payload = json.dumps({"message": message}, separators=(",", ":"))
    if deliver(client_id, payload):
        return json_answer(200, False, "")
    return json_answer(200, True, "Client Not Found")


@app.get(WEBSOCKET_PATH)
def websocket_without_upgrade() -> str:
    bottle.response.status = 426
    bottle.response.set_header("Upgrade", "websocket")
    bottle.response.content_type = "text/plain; charset=utf-8"
    return "This URL takes WebSocket connections: ws://HOST:PORT/websocket?id=ID\n"


@app.get("/static/<filename:path>")
def static(filename: str) -> object:
    return bottle.static_file(filename, root=STATIC)


@app.error(404)
@app.error(405)
@app.error(500)
def plain_error(error: bottle.HTTPError) -> str:
    bottle.response.content_type = "text/plain; charset=utf-8"
    return f"{error.status_line}\n"


###############################################################################
# Start-up ####################################################################
###############################################################################


class ControlSocketInUse(RuntimeError):
    """Another server answers on the control socket path."""


def bind_control_socket(path: str) -> socket.socket:
    """A listening UNIX socket at path, mode 0660; a stale file is replaced, a live one kept."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise ControlSocketInUse(f"{path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1)
            probe.connect(path)
            raise ControlSocketInUse(f"another server is listening on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # never world-accessible, not even for an instant
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    listener.listen(128)
    return listener


def remove_control_socket(path: str, inode: int) -> None:
    """Remove our socket file, but not one a newer server has put at the same path."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


class ControlServer:
    """The UNIX control socket: a StreamServer with one greenlet per control connection."""

    def __init__(self, path: str) -> None:
        self.path = path
        listener = bind_control_socket(path)
        self.inode = os.lstat(path).st_ino
        self.server = StreamServer(listener, serve_control, backlog=None)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(timeout=1)
        remove_control_socket(self.path, self.inode)


def configure(new: Config) -> None:
    """Put new settings in force for this process."""
    global config
    config = new
    logging.basicConfig(
        level=new.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("wsboard").setLevel(new.log_level.upper())


def drain(timeout: float) -> None:
    """Close every WebSocket with 1001 and give them timeout seconds to answer."""
    count = close_all(CLOSE_GOING_AWAY, "server shutting down")
    deadline = time.monotonic() + timeout
    while len(registry) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    log.info("closed %d websockets; %d did not answer in time", count, len(registry))
    for conn in list(registry):
        conn.ws.abort()


def serve(cfg: Config) -> int:
    """Run the HTTP/WebSocket server and the control socket until SIGTERM or SIGINT."""
    http = WSGIServer(
        (cfg.host, cfg.port),
        app,
        handler_class=WebSocketHandler,
        log=access_log,
        error_log=logging.getLogger("wsboard.error"),
    )
    try:
        http.init_socket()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, exc.strerror or exc)
        return 1
    try:
        control = ControlServer(cfg.control)
    except (ControlSocketInUse, OSError) as exc:
        log.error("cannot open control socket %s: %s", cfg.control, exc)
        http.close()
        return 1
    stopping = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    http.start()
    control.start()
    log.info(
        "wsboard %s on http://%s:%d, control socket %s",
        __version__,
        cfg.host,
        http.server_port,
        cfg.control,
    )
    stopping.wait()
    log.info("shutting down")
    http.close()
    control.server.close()
    drain(cfg.shutdown_timeout)
    http.stop(timeout=1)
    control.stop()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        sys.stderr.write(f"wsboard: {exc}\n")
        return 2
    configure(cfg)
    return serve(cfg)


# gunicorn: gunicorn.conf.py's worker calls these inside the worker process.

worker_control: ControlServer | None = None


def start_in_worker() -> None:
    """Configure from the environment and open the control socket in a gunicorn worker."""
    global worker_control
    configure(load_config([]))
    worker_control = ControlServer(config.control)
    worker_control.start()
    log.info(
        "wsboard %s in gunicorn worker %d, control socket %s",
        __version__,
        os.getpid(),
        config.control,
    )


def stop_in_worker() -> None:
    """Close WebSockets with 1001 and remove the control socket as a worker stops (once)."""
    global worker_control
    control, worker_control = worker_control, None
    if control is not None:
        control.server.close()
        drain(config.shutdown_timeout)
        control.stop()


if __name__ == "__main__":
    sys.exit(main())
