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
import collections
import fnmatch
import functools
import gc
import getpass
import grp
import hashlib
import hmac
import ipaddress
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
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit

import bottle
import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.queue
import gevent.socket
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


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _seconds_or_off(text: str) -> float:
    """Seconds, where 0 turns the timeout off."""
    return 0.0 if float(text) == 0 else _seconds(text)


def _count_or_off(text: str) -> int:
    """A count, where 0 turns the feature off."""
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 (off) or more")
    return value


def _yes_no(text: str) -> bool:
    if text.lower() in ("1", "yes", "true", "on"):
        return True
    if text.lower() in ("", "0", "no", "false", "off"):
        return False
    raise ValueError("must be yes or no")


def _url(text: str) -> str:
    if text and (urlsplit(text).scheme not in ("http", "https") or not urlsplit(text).netloc):
        raise ValueError("must be an http:// or https:// URL")
    return text


def _socket_path(text: str) -> str:
    if not text or "\0" in text:
        raise ValueError("must be a file path")
    if len(os.fsencode(text)) > 107:
        raise ValueError("is longer than the 107 bytes a UNIX socket path may have")
    return text


def _file_mode(text: str) -> int:
    value = int(text, 8)
    if not 0 <= value <= 0o777:
        raise ValueError("must be an octal file mode such as 0660")
    if value & 0o600 != 0o600:
        raise ValueError("must let the owner read and write (0600 at least)")
    return value


def _group(text: str) -> int | None:
    """A group name or number, as the gid to give the control socket; empty: leave it."""
    if not text:
        return None
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError("is not a group on this machine") from None


def _ids(text: str) -> frozenset:
    """A comma-separated list of uids or gids."""
    return frozenset(int(part) for part in text.split(",") if part.strip())


def _words(text: str) -> tuple:
    """A comma-separated list, blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _networks(text: str) -> tuple:
    """A comma-separated list of addresses or networks (127.0.0.1, 10.0.0.0/8, ::1)."""
    return tuple(ipaddress.ip_network(part, strict=False) for part in _words(text))


def _log_level(text: str) -> str:
    if text.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError("must be one of debug, info, warning, error")
    return text.lower()


class Option(NamedTuple):
    name: str
    default: str  # as a user would type it; parsed like any other value
    parse: Callable[[str], object]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "WSBOARD_" + self.name.upper()


# fmt: off
OPTIONS = (
    # Where it listens
    Option("host", "127.0.0.1", str,
           "address the HTTP/WebSocket server binds; 0.0.0.0 exposes it to the network"),
    Option("port", "8080", _port, "TCP port of the HTTP/WebSocket server"),
    Option("backlog", "1024", _positive_int,
           "connections the kernel may hold waiting for accept(); past it, new ones wait a "
           "second for a SYN retry (Linux caps it at net.core.somaxconn)"),
    Option("control", "/tmp/wsboard.sock", _socket_path,
           "path of the UNIX control socket the backend app talks to"),
    # Who may connect
    Option("secret", "", str,
           "turns on signed client ids: sockets must bring exp and token=HMAC-SHA256(secret, "
           "'ID.EXP'); at least 16 characters"),
    Option("secret_file", "", str, "read the secret from this file instead"),
    Option("token_ttl", "3600", _positive_int,
           "seconds a token minted by wsboard (board page, `wsboard token`) stays valid"),
    Option("allowed_origins", "", _words,
           "comma-separated browser origins allowed to open WebSockets, wildcards allowed "
           "(https://*.example.com); empty: the page's own host only"),
    Option("admin_password", "", str,
           "password for /admin and /sendMessage (HTTP Basic, user admin), plain or as made "
           "by `wsboard hash-password`; empty: they answer to loopback only"),
    Option("trusted_proxies", "", _networks,
           "comma-separated proxy addresses whose X-Forwarded-For is believed"),
    Option("control_mode", "0660", _file_mode, "file mode of the control socket"),
    Option("control_group", "", _group, "group of the control socket (name or number)"),
    Option("control_uids", "", _ids,
           "comma-separated uids allowed on the control socket (checked with SO_PEERCRED)"),
    Option("control_gids", "", _ids, "comma-separated gids allowed on the control socket"),
    # Limits
    Option("max_connections", "10000", _positive_int, "open WebSockets at most (more: 503)"),
    Option("max_connections_per_ip", "256", _positive_int,
           "open WebSockets per client address at most (more: 503)"),
    Option("max_sockets_per_id", "32", _positive_int,
           "open WebSockets per client id at most (more: 503)"),
    Option("max_control_connections", "256", _positive_int,
           "open control connections at most"),
    Option("max_line", "1048576", _positive_int,
           "longest control line in bytes; a longer one is refused and its connection closed"),
    Option("max_message", "65536", _positive_int,
           "largest message in bytes a browser may send; a larger one closes it with 1009"),
    Option("handshake_timeout", "10", _seconds,
           "seconds a client gets to send its HTTP request, and to idle between requests"),
    Option("idle_timeout", "0", _seconds_or_off,
           "seconds a WebSocket may send nothing before it is closed; 0: never"),
    Option("control_idle_timeout", "600", _seconds_or_off,
           "seconds a control connection may send nothing before it is closed; 0: never"),
    Option("write_timeout", "10", _seconds,
           "seconds a write to a socket may block before that socket is dropped"),
    Option("close_timeout", "5", _seconds,
           "seconds a socket gets to answer a close frame wsboard sent, before it is dropped"),
    Option("shutdown_timeout", "5", _seconds,
           "seconds open WebSockets get to finish their close handshake on shutdown"),
    # Delivery
    Option("queue_messages", "1000", _positive_int,
           "frames that may wait for a socket that is not reading; past it: close 1013"),
    Option("queue_bytes", "1048576", _positive_int,
           "bytes that may wait for a socket that is not reading; past it: close 1013"),
    Option("ping_interval", "25", _seconds_or_off,
           "seconds between pings to every WebSocket; 0: no pings"),
    Option("ping_timeout", "20", _seconds,
           "seconds a ping may go unanswered before its socket is dropped"),
    Option("drain_window", "2", _seconds_or_off,
           "seconds over which shutdown spreads its 1001 closes, so clients do not all "
           "reconnect at once"),
    Option("inbox", "0", _count_or_off,
           "messages kept per id so a client that reconnects gets what it missed; 0: off"),
    Option("inbox_ttl", "300", _seconds, "seconds an inbox keeps a message"),
    Option("inbox_bytes", "1048576", _positive_int, "bytes an inbox keeps per id at most"),
    Option("inbox_ids", "100000", _positive_int,
           "ids with an inbox at most (the least recently used goes first)"),
    Option("offline_ok", "no", _yes_no,
           "with an inbox, SEND MESSAGE to an id with no open socket keeps the message and "
           "answers OK instead of ERROR Client Not Found"),
    Option("idempotency_window", "300", _seconds,
           "seconds a JSON send's key is remembered, so a retry is not delivered twice"),
    Option("watch_queue", "10000", _positive_int,
           "events that may wait for a watcher that is not reading; past it: dropped"),
    Option("webhook", "", _url, "URL that events are POSTed to, signed with the secret"),
    Option("webhook_queue", "10000", _positive_int,
           "events that may wait for the webhook; past it: dropped and counted"),
    Option("log_level", "info", _log_level, "debug, info, warning or error"),
)
# fmt: on


class Config:
    """The settings in force: one attribute per row of OPTIONS, and what they derive."""

    def __init__(self, **values: object) -> None:
        for option in OPTIONS:
            value = values[option.name] if option.name in values else option.parse(option.default)
            setattr(self, option.name, value)
        self.secret_key = load_secret(self.secret, self.secret_file)
        self.admin_hash = (
            self.admin_password
            if self.admin_password.startswith(HASH_PREFIX) or not self.admin_password
            else hash_password(self.admin_password)
        )
        if self.admin_hash and parse_password_hash(self.admin_hash) is None:
            raise ConfigError(
                "admin password hash is malformed; make one with wsboard hash-password"
            )

    def __repr__(self) -> str:
        def shown(name: str) -> str:
            value = getattr(self, name)
            return "'***'" if name in ("secret", "admin_password") and value else repr(value)

        fields = ", ".join(f"{o.name}={shown(o.name)}" for o in OPTIONS)
        return f"Config({fields})"


def load_secret(secret: str, secret_file: str) -> bytes:
    """The HMAC key for signed ids, from --secret or --secret-file; b'' when off."""
    if secret and secret_file:
        raise ConfigError("give --secret or --secret-file, not both")
    if secret_file:
        try:
            with open(secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"--secret-file={secret_file!r}: {exc.strerror}") from None
    if secret and len(secret) < 16:
        raise ConfigError("the secret must be at least 16 characters")
    return secret.encode("utf-8")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsboard",
        description="WebSocket push server: browsers connect to /websocket?id=ID, "
        "the backend app pushes to them over a UNIX control socket.",
        epilog="Each option can also be set by the environment variable named in brackets; "
        "a flag wins over the environment. Also: `wsboard token ID [--ttl S]` prints a signed "
        "query string for ID; `wsboard hash-password` hashes an admin password.",
    )
    parser.add_argument("--version", action="version", version=f"wsboard {__version__}")
    for option in OPTIONS:
        if option.parse is _yes_no:  # --offline-ok alone means yes
            parser.add_argument(
                option.flag,
                dest=option.name,
                nargs="?",
                const="yes",
                metavar="yes|no",
                help=f"{option.help} [{option.env}, default: {option.default}]",
            )
            continue
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
# Security ####################################################################
###############################################################################
# Small pure checks, each answering "why is this refused?" with a reason or None. The
# handshake, the admin routes and the control socket call them at their edges.

# Signed client ids: token = hex(HMAC-SHA256(secret, "<id>.<exp>")), exp a Unix time.
# In PHP: hash_hmac('sha256', "$id.$exp", $secret)


def mint_token(secret: bytes, client_id: str, exp: int) -> str:
    return hmac.new(secret, f"{client_id}.{exp}".encode(), hashlib.sha256).hexdigest()


def signed_query(secret: bytes, client_id: str, ttl: int, now: float | None = None) -> str:
    """The query string a browser needs to connect as client_id for ttl seconds."""
    exp = int(time.time() if now is None else now) + ttl
    return urlencode({"id": client_id, "exp": exp, "token": mint_token(secret, client_id, exp)})


def token_refusal(secret: bytes, client_id: str, exp: str, token: str, now: float) -> str | None:
    if not exp or not token:
        return "a signed id needs exp and token"
    if not (exp.isascii() and exp.isdigit() and len(exp) <= 12):
        return "exp must be a Unix time"
    if int(exp) < now:
        return "token expired"
    expected = mint_token(secret, client_id, int(exp)).encode()
    if not hmac.compare_digest(expected, token.encode("utf-8", "surrogateescape")):
        return "token does not match"
    return None


# Origins: browsers send one with every WebSocket handshake; other clients may send none.

DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _host_port(netloc: str, scheme: str) -> tuple | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        return (parts.hostname or "", parts.port or DEFAULT_PORTS.get(scheme, 0))
    except ValueError:
        return None


def origin_allowed(origin: str | None, host: str, patterns: Sequence[str]) -> bool:
    """Whether a handshake's Origin may connect: listed patterns, else the request's own host."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    if patterns:
        return any(fnmatch.fnmatchcase(origin, p.lower()) for p in patterns)
    scheme, _, netloc = origin.partition("://")
    if not netloc or "/" in netloc or scheme not in DEFAULT_PORTS:
        return False
    mine = _host_port(host.lower(), scheme)
    return mine is not None and _host_port(netloc, scheme) == mine


# The admin password, kept and compared only as a PBKDF2 hash.

HASH_PREFIX = "pbkdf2_sha256$"
HASH_ITERATIONS = 200_000


def hash_password(
    password: str, salt: bytes | None = None, iterations: int = HASH_ITERATIONS
) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{HASH_PREFIX}{iterations}${salt.hex()}${digest.hex()}"


def parse_password_hash(stored: str) -> tuple | None:
    try:
        _, iterations, salt, digest = stored.split("$")
        return int(iterations), bytes.fromhex(salt), bytes.fromhex(digest)
    except ValueError:
        return None


def password_matches(password: str, stored: str) -> bool:
    iterations, salt, digest = parse_password_hash(stored)
    given = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(given, digest)


def basic_credentials(header: str) -> tuple | None:
    """(user, password) from an Authorization: Basic header, or None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = (
            base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        )
    except (binascii.Error, ValueError):
        return None
    return (user, password) if sep else None


# Addresses: a proxy's X-Forwarded-For is believed only from the configured proxies.


def client_ip(environ: Mapping[str, str], trusted: Sequence) -> str:
    """The browser's address: REMOTE_ADDR, or the last untrusted hop of X-Forwarded-For."""
    ip = environ.get("REMOTE_ADDR", "")
    hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    while trusted and hops and _in_networks(ip, trusted):
        ip = hops.pop()
    return ip


def _in_networks(ip: str, networks: Sequence) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def is_local_request(environ: Mapping[str, str]) -> bool:
    """From this machine, and not relayed by a proxy on it (which would hide the real peer)."""
    if any(environ.get(h) for h in ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")):
        return False
    try:
        return ipaddress.ip_address(environ.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False


# Control socket peers (Linux SO_PEERCRED): the process at the other end, by uid and gid.


def peer_credentials(sock: socket.socket) -> tuple:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def peer_allowed(uid: int, gid: int, uids: frozenset, gids: frozenset) -> bool:
    """With no allow-list anyone the file mode lets in may talk; else uid or gid must be listed."""
    return not (uids or gids) or uid in uids or gid in gids


# Refusals are logged once each and counted by kind; the admin page shows the counts.
refusals: collections.Counter = collections.Counter()


def refused(kind: str, message: str, *args: object) -> None:
    refusals[kind] += 1
    log.warning("refused " + message, *args)


config = Config()


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
CLOSE_POLICY = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_KICKED = 4000  # wsboard.js does not reconnect after it


class MessageTooBig(WebSocketError):
    """A browser sent more than max_message bytes in one message."""


class WriteTimedOut(WebSocketError):
    """A socket did not take our bytes within write_timeout."""


class QueueFull(WebSocketError):
    """A socket's backlog is over queue_messages or queue_bytes: it cannot keep up."""


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


def close_frame(code: int, reason: str) -> bytes:
    """One unmasked close frame, as a server sends it."""
    payload = close_payload(code, reason)
    return bytes(Header.encode_header(True, OPCODE_CLOSE, b"", len(payload), 0)) + payload


PING_FRAME = b"\x89\x00"  # an empty ping, the same bytes for every socket


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


SUBPROTOCOL = "wsboard.v1"  # frames become {"seq": n, "data": text}; see README


def speaks_v1(environ: Mapping[str, str]) -> bool:
    offered = environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "")
    return SUBPROTOCOL in (p.strip() for p in offered.split(","))


def resume_point(epoch: str, last: str) -> tuple:
    """(epoch, last seq) a reconnecting v1 client gave; ("", 0) when absent or malformed."""
    if not (re.fullmatch(r"[0-9a-f]{1,16}", epoch) and last.isascii() and last.isdigit()):
        return "", 0
    return epoch, min(int(last), 2**53)


class Refusal(NamedTuple):
    status: str
    reason: str
    kind: str  # the counter it is counted under


def handshake_refusal(environ: Mapping[str, str], http_version: str) -> Refusal | None:
    """Why an upgrade request to /websocket is malformed, or None."""
    if environ.get("REQUEST_METHOD") != "GET" or http_version != "HTTP/1.1":
        return Refusal("400 Bad Request", "WebSocket upgrades need GET over HTTP/1.1", "handshake")
    if "upgrade" not in environ.get("HTTP_CONNECTION", "").lower():
        return Refusal("400 Bad Request", "Connection: Upgrade header missing", "handshake")
    if environ.get("CONTENT_LENGTH", "0") not in ("", "0") or environ.get("HTTP_TRANSFER_ENCODING"):
        return Refusal("400 Bad Request", "An upgrade request has no body", "handshake")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return Refusal(
            "426 Upgrade Required", "Only WebSocket version 13 is supported", "handshake"
        )
    try:
        key = base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 16:
        return Refusal(
            "400 Bad Request", "Sec-WebSocket-Key must be 16 bytes in base64", "handshake"
        )
    ids = query_ids(environ)
    if len(ids) != 1 or not is_valid_client_id(ids[0]):
        return Refusal(
            "400 Bad Request",
            "Invalid client id: give exactly one id of 1-128 characters from A-Z a-z 0-9 _ - . :",
            "bad_id",
        )
    return None


def access_refusal(
    environ: Mapping[str, str], client_id: str, ip: str, now: float
) -> Refusal | None:
    """Why a well-formed upgrade may not connect (origin, signature, limits), or None."""
    if not origin_allowed(
        environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST", ""), config.allowed_origins
    ):
        return Refusal("403 Forbidden", "Origin not allowed", "origin")
    if config.secret_key:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        reason = token_refusal(
            config.secret_key,
            client_id,
            query.get("exp", [""])[0],
            query.get("token", [""])[0],
            now,
        )
        if reason:
            return Refusal("403 Forbidden", "Signed id refused: " + reason, "token")
    return limit_refusal(client_id, ip)


def limit_refusal(client_id: str, ip: str) -> Refusal | None:
    """Whether one more socket for client_id from ip would pass a connection limit."""
    if len(registry) >= config.max_connections:
        reason = f"Too many connections (limit {config.max_connections})"
    elif registry.count_for_ip(ip) >= config.max_connections_per_ip:
        reason = f"Too many connections from this address (limit {config.max_connections_per_ip})"
    elif registry.count_for_id(client_id) >= config.max_sockets_per_id:
        reason = f"Too many sockets for this id (limit {config.max_sockets_per_id})"
    else:
        return None
    return Refusal("503 Service Unavailable", reason, "limit")


class Cork:
    """Holds writes to sockets while one batch of control lines is answered, then lets each
    socket's frames out in one send(). Nothing yields while it is active, so order holds."""

    def __init__(self) -> None:
        self.active = False
        self.passing = False  # a broadcast: one frame per socket, nothing to coalesce
        self.sockets: list = []

    def release(self) -> None:
        self.active = False
        sockets, self.sockets = self.sockets, []
        for ws in sockets:
            ws.uncork()


cork = Cork()


class SocketReader:
    """Exact reads straight from the socket, for frames after the handshake.

    The handshake's buffered reader keeps an 8 KiB buffer per connection for as long as the
    socket lives; frames from browsers are rare (a pong every ping_interval), so reading them
    with a recv per field is the better trade. Bytes the handshake's reader had already
    buffered are served first.
    """

    __slots__ = ("sock", "pending")

    def __init__(self, sock: socket.socket, pending: bytes) -> None:
        self.sock = sock
        self.pending = pending

    def read(self, size: int) -> bytes:
        head = b""
        if self.pending:
            head, self.pending = self.pending[:size], self.pending[size:]
            if len(head) == size:
                return head
        buffer = bytearray(size - len(head))
        view = memoryview(buffer)
        got = 0
        while got < len(buffer):
            count = self.sock.recv_into(view[got:])
            if not count:
                break
            got += count
        return head + bytes(view[:got])


def buffered_leftover(rfile: object, sock: socket.socket) -> bytes:
    """What rfile has already buffered past the request, taken without waiting for more."""
    sock.settimeout(0.0)
    try:
        leftover = rfile.peek(1 << 16)
    except OSError:
        leftover = b""
    finally:
        sock.settimeout(None)
    if leftover:
        rfile.read(len(leftover))
    return leftover


class BoardSocket(_GeventWebSocket):
    """gevent-websocket's WebSocket with its write, read-limit and close defects mended.

    Writes go straight to the kernel while the socket takes them; only under backpressure
    do frames wait in a bounded backlog, drained by a flusher greenlet that lives only
    while there is a backlog. So a sender never blocks on a slow browser, and an idle
    socket costs no greenlet for writing.
    """

    __slots__ = (
        "sock",
        "message_size",
        "backlog",
        "backlog_bytes",
        "half_close_after_flush",
        "finished",
        "corked",
        "pong_due",
        "end_reason",
    )

    def __init__(self, environ: dict, stream: Stream, handler: "WebSocketHandler") -> None:
        super().__init__(environ, stream, handler)
        self.sock = handler.socket
        self.message_size = 0
        self.backlog: collections.deque | None = None  # None: nothing waits, write directly
        self.backlog_bytes = 0
        self.half_close_after_flush = False
        self.finished = False  # the peer closed or the connection broke: nothing more to read
        self.corked: list | None = None  # frames held while a control batch is answered
        self.pong_due = 0.0  # when an unanswered ping was sent (monotonic), 0 when none
        self.end_reason = "connection lost"
        self.raw_write = self._write

    def _write(self, data: bytes) -> None:
        """Write now if the kernel takes it all; else queue the rest, within the bounds.

        While a batch of control lines is answered, frames are held and then written
        together: a send() per message would cost more than all the rest of a SEND.
        """
        if self.corked is not None:  # frames are held for it: this one goes behind them
            self.corked.append(data)
            return
        if cork.active and not cork.passing:
            self.corked = [data]
            cork.sockets.append(self)
            return
        if self.backlog is None:
            try:
                sent = self.sock.send(data, 0, 0.0)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise WebSocketError(f"Socket is dead: {exc}") from None
            if sent == len(data):
                return
            data = data[sent:]
            self.backlog = collections.deque()
            self.backlog_bytes = 0
            gevent.spawn(self._flush)
        if (
            len(self.backlog) >= config.queue_messages
            or self.backlog_bytes + len(data) > config.queue_bytes
        ):
            self._overflow()
            raise QueueFull("send queue full")
        self.backlog.append(data)
        self.backlog_bytes += len(data)

    def _flush(self) -> None:
        """Drain the backlog with blocking writes, each within write_timeout, then go idle."""
        backlog = self.backlog
        try:
            while backlog:
                data = backlog[0]
                limit = (
                    config.close_timeout if self.half_close_after_flush else config.write_timeout
                )
                with gevent.Timeout(limit, WriteTimedOut("write timed out")):
                    self.sock.sendall(data)
                backlog.popleft()
                self.backlog_bytes -= len(data)
        except (OSError, WebSocketError) as exc:
            if not self.closed:
                self.end_reason = str(exc) or type(exc).__name__
            self.abort()
        finally:
            self.backlog = None
            self.backlog_bytes = 0
            if self.half_close_after_flush:  # FIN after our close frame, never a RST before it
                self.half_close_after_flush = False
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _overflow(self) -> None:
        """Too slow to keep up: drop what it has not begun to receive, queue a 1013 close."""
        head = self.backlog[0] if self.backlog else None  # may be half-written: keep it whole
        self.backlog.clear()
        if head is not None:
            self.backlog.append(head)
        self.backlog.append(close_frame(CLOSE_TRY_AGAIN_LATER, "too slow: send queue full"))
        self.backlog_bytes = sum(len(b) for b in self.backlog)
        self.end_reason = "send queue full"
        self.closed = True
        self.half_close_after_flush = True
        gevent.spawn_later(config.close_timeout, self._close_timed_out)

    def uncork(self) -> None:
        frames, self.corked = self.corked, None
        if frames and not self.finished:
            try:
                self._write(frames[0] if len(frames) == 1 else b"".join(frames))
            except WebSocketError as exc:
                log.warning("dropped a socket while writing held frames: %s", exc)

    @property
    def queued_bytes(self) -> int:
        return self.backlog_bytes

    def send_frame_bytes(self, frame: bytes) -> None:
        """Write (or queue) a frame that was encoded once for many sockets."""
        if self.closed:
            raise WebSocketError("Connection is already closed")
        self._write(frame)

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake; the reader then sees EOF."""
        self.closed = True
        self.finished = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
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
        self.finished = True
        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        self.end_reason = f"closed by client ({code})" if code else "closed by client"
        super().handle_close(header, payload)

    def handle_pong(self, header: Header, payload: bytes) -> None:
        self.pong_due = 0.0

    def handle_ping(self, header: Header, payload: bytes) -> None:
        if not self.closed:  # after our close frame we send nothing more (RFC 6455, 5.5.1)
            super().handle_ping(header, payload)

    class _NoApp:
        """gevent-websocket reports closes to current_app.on_close(); wsboard needs no report."""

        @staticmethod
        def on_close(*args: object) -> None:
            pass

    # Answered here, not through self.handler, which is let go once the session starts.
    current_app = _NoApp()
    logger = log

    def receive(self) -> object | None:
        """The next message, or None once the peer has closed or the connection is gone.

        After we send a close frame we go on reading, so the peer can answer it; a close we
        start is bounded by close_timeout.
        """
        if self.finished:
            return None
        try:
            message = self.read_message()
            self.pong_due = 0.0  # any message shows the peer is alive
            return message
        except MessageTooBig:
            self.end("message too big", CLOSE_MESSAGE_TOO_BIG)
        except TimeoutError:
            self.end("idle timeout", CLOSE_NORMAL)
        except UnicodeError:
            self.end("invalid UTF-8", 1007)
        except ProtocolError:
            self.end("protocol error", 1002)
        except (OSError, WebSocketError):
            self.closed = True
        self.finished = True
        return None

    def end(self, reason: str, code: int, told: str = "") -> None:
        """Close with code, telling the peer told (or reason); the log and watchers get reason."""
        self.close(code, told or reason)
        self.end_reason = reason

    def close(self, code: int | None = CLOSE_NORMAL, message: object = b"") -> None:
        """Send a close frame with its code and reason (stock 0.10.1 drops the code)."""
        if self.closed:
            return
        try:
            self.send_frame(close_payload(code, message), self.OPCODE_CLOSE)
        except (OSError, WebSocketError):
            pass
        finally:
            self.closed = True
            if not self.finished:  # we spoke first: the peer gets close_timeout to answer
                gevent.spawn_later(config.close_timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        if not self.finished:
            self.abort()


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
        refusal = handshake_refusal(environ, self.request_version) or access_refusal(
            environ, query_ids(environ)[0], client_ip(environ, config.trusted_proxies), time.time()
        )
        if refusal:
            return self.refuse(refusal)
        self.websocket = BoardSocket(environ, Stream(self), self)
        environ["wsgi.websocket"] = self.websocket  # start_response frames the 101 by it
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", websocket_accept(environ["HTTP_SEC_WEBSOCKET_KEY"].strip())),
        ]
        if speaks_v1(environ):
            headers.append(("Sec-WebSocket-Protocol", SUBPROTOCOL))
        self.start_response("101 Switching Protocols", headers)
        self.write(b"")
        self.run_websocket()

    def log_request(self) -> None:
        status = self.status.decode() if isinstance(self.status, bytes) else str(self.status)
        if not status.startswith("101"):  # sockets log their own connect/disconnect
            access_log.info(redact(self.format_request()))

    def refuse(self, refusal: Refusal) -> None:
        refused(
            refusal.kind, "websocket from %s: %s", format_peer(self.client_address), refusal.reason
        )
        body = (refusal.reason + "\n").encode("utf-8")
        self.start_response(
            refusal.status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        self.result = [body]
        self.process_result()

    def run_websocket(self) -> None:
        environ = self.environ
        query = parse_qs(environ.get("QUERY_STRING", ""))
        conn = Connection(
            query_ids(environ)[0],
            self.client_address,
            client_ip(environ, config.trusted_proxies),
            self.websocket,
            origin=environ.get("HTTP_ORIGIN", ""),
            v1=speaks_v1(environ),
        )
        epoch, last = resume_point(query.get("epoch", [""])[0], query.get("last", [""])[0])
        del environ, query
        # The handshake's state is dead weight for the socket's whole life: its environ and
        # headers (~2 KB) and its buffered reader (8 KiB); frames are read from the socket.
        ws = self.websocket
        leftover = buffered_leftover(self.rfile, self.socket)
        # The session goes on in a fresh, shallow greenlet: this one's deep stack (pywsgi's
        # request handling) would otherwise be kept, some KB of it, for the socket's whole life.
        # gevent closes the handler's socket object when the handler returns, so the session
        # takes the descriptor into a socket object of its own.
        sock = gevent.socket.socket(fileno=self.socket.detach())
        sock.settimeout(config.idle_timeout or None)  # writes have their own timeout
        reader = SocketReader(sock, leftover)
        ws.sock, ws.stream, ws.raw_read = sock, reader, reader.read
        ws.environ = self.environ = self.headers = self.rfile = self.wsgi_input.rfile = None
        self.socket = self.websocket = ws.handler = None  # ~1.6 KB a socket: nothing needs it now
        gevent.spawn_raw(run_session, conn, sock, epoch, last)


###############################################################################
# Connection registry and delivery ############################################
###############################################################################


def redact(line: str) -> str:
    """A request line fit for the log: token values hidden."""
    return re.sub(r"(token=)[^&\s]*", r"\1***", line)


def format_peer(address: object) -> str:
    """host:port for a TCP peer ([host]:port for IPv6), '-' where there is none."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "-"


class Connection:
    """One open WebSocket: who it is, where it comes from, and the socket itself."""

    __slots__ = ("client_id", "peer", "ip", "origin", "v1", "ws", "connected_at")

    def __init__(
        self,
        client_id: str,
        peer: object,
        ip: str,
        ws: BoardSocket,
        origin: str = "",
        v1: bool = False,
    ) -> None:
        self.client_id = client_id
        self.peer = format_peer(peer)
        self.ip = ip
        self.origin = origin
        self.v1 = v1  # speaks the wsboard.v1 subprotocol: frames carry {"seq", "data"}
        self.ws = ws
        self.connected_at = time.time()


class Registry:
    """The open sockets by client id: the index listing and delivery go through."""

    def __init__(self) -> None:
        self._by_id: dict[str, dict[Connection, None]] = {}
        self._per_ip: collections.Counter = collections.Counter()
        self._count = 0  # kept, not summed: every handshake asks

    def add(self, conn: Connection) -> None:
        self._by_id.setdefault(conn.client_id, {})[conn] = None
        self._per_ip[conn.ip] += 1
        self._count += 1

    def remove(self, conn: Connection) -> None:
        sockets = self._by_id.get(conn.client_id)
        if sockets is None or conn not in sockets:
            return
        del sockets[conn]
        self._count -= 1
        if not sockets:
            del self._by_id[conn.client_id]
        self._per_ip[conn.ip] -= 1
        if not self._per_ip[conn.ip]:
            del self._per_ip[conn.ip]

    def count_for_id(self, client_id: str) -> int:
        return len(self._by_id.get(client_id, ()))

    def count_for_ip(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)

    def sockets_of(self, client_id: str) -> list:
        return list(self._by_id.get(client_id, ()))

    def __iter__(self) -> Iterator[Connection]:
        return iter([conn for sockets in self._by_id.values() for conn in sockets])

    def __len__(self) -> int:
        return self._count


registry = Registry()


class Box:
    """One id's inbox: its recent messages as (seq, text, time), and its epoch."""

    __slots__ = ("epoch", "next_seq", "items", "bytes", "touched")

    def __init__(self, now: float) -> None:
        self.epoch = secrets.token_hex(4)  # a new box numbers from 1 again: the epoch tells
        self.next_seq = 1
        self.items: collections.deque = collections.deque()
        self.bytes = 0
        self.touched = now

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1


class Inbox:
    """Recent messages per id, numbered, so a client that reconnects can catch up.

    Bounded by messages and bytes per id, by age, and by how many ids it keeps (the least
    recently used id's box goes first).
    """

    def __init__(self, size: int, max_bytes: int, ttl: float, max_ids: int) -> None:
        self.size, self.max_bytes, self.ttl, self.max_ids = size, max_bytes, ttl, max_ids
        self._boxes: collections.OrderedDict[str, Box] = collections.OrderedDict()

    def box(self, client_id: str, now: float) -> Box:
        box = self._boxes.get(client_id)
        if box is None:
            box = self._boxes[client_id] = Box(now)
            while len(self._boxes) > self.max_ids:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(client_id)
        box.touched = now
        return box

    def add(self, client_id: str, text: str, now: float) -> int:
        """Keep text for client_id; return its sequence number."""
        box = self.box(client_id, now)
        seq = box.next_seq
        box.next_seq += 1
        box.items.append((seq, text, now))
        box.bytes += len(text)
        while box.items and (len(box.items) > self.size or box.bytes > self.max_bytes):
            box.bytes -= len(box.items.popleft()[1])
        return seq

    def missed(self, client_id: str, epoch: str, last: int, now: float) -> tuple:
        """(box, [(seq, text)] after last, gap): gap when some of what followed is gone."""
        box = self.box(client_id, now)
        first_kept = box.items[0][0] if box.items else box.next_seq
        if epoch and epoch != box.epoch:  # numbered by another box or server: all is new
            return box, [(seq, text) for seq, text, _ in box.items], True
        if not epoch:  # a first connection: everything kept for it is news
            last = 0
        return box, [(seq, text) for seq, text, _ in box.items if seq > last], last + 1 < first_kept

    def expire(self, now: float) -> None:
        for client_id in list(self._boxes):
            box = self._boxes[client_id]
            while box.items and now - box.items[0][2] > self.ttl:
                box.bytes -= len(box.items.popleft()[1])
            if (
                not box.items
                and now - box.touched > self.ttl
                and not registry.count_for_id(client_id)
            ):
                del self._boxes[client_id]


class IdempotencyKeys:
    """The answers to sends that carried a key, so a retry within the window sends nothing twice."""

    def __init__(self, window: float, max_keys: int = 100_000) -> None:
        self.window, self.max_keys = window, max_keys
        self._answers: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    def get(self, key: str, now: float) -> dict | None:
        self.expire(now)
        found = self._answers.get(key)
        return found[1] if found else None

    def put(self, key: str, answer: dict, now: float) -> None:
        self._answers[key] = (now, answer)
        while len(self._answers) > self.max_keys:
            self._answers.popitem(last=False)

    def expire(self, now: float) -> None:
        while self._answers and now - next(iter(self._answers.values()))[0] > self.window:
            self._answers.popitem(last=False)


class SendResult(NamedTuple):
    sockets: int  # sockets that took it now
    queued: int  # ids with no open socket whose inbox keeps it for later
    seq: dict  # id -> sequence number, when the inbox is on
    missing: list  # ids that got nothing


class LocalHub:
    """Where messages go: the open sockets, the inbox and the idempotency keys, in memory.

    The control protocol and the routes talk to this interface only; a Redis backplane will
    implement the same methods to span several processes.
    """

    def __init__(self) -> None:
        self.inbox: Inbox | None = None
        self.keys = IdempotencyKeys(300)

    def configure(self, cfg: Config) -> None:
        self.inbox = (
            Inbox(cfg.inbox, cfg.inbox_bytes, cfg.inbox_ttl, cfg.inbox_ids) if cfg.inbox else None
        )
        self.keys = IdempotencyKeys(cfg.idempotency_window)

    def send(self, ids: Iterable[str], text: str, keep_offline: bool) -> SendResult:
        """Send text to every socket of each id; keep it in the inbox when that is on."""
        plain = text_frame(text)
        now = time.time()
        sockets, queued, seqs, missing = 0, 0, {}, []
        for client_id in dict.fromkeys(ids):
            conns = registry.sockets_of(client_id)
            seq = None
            if self.inbox is not None and (conns or keep_offline):
                seq = seqs[client_id] = self.inbox.add(client_id, text, now)
            delivered = deliver(conns, plain, text, seq)
            sockets += delivered
            if not delivered:
                if seq is None:
                    missing.append(client_id)
                else:
                    queued += 1
        return SendResult(sockets, queued, seqs, missing)

    def broadcast(self, text: str) -> int:
        """Send text to every open socket (not kept in any inbox); return how many took it."""
        cork.passing = True  # sockets with frames held still get this one behind them
        try:
            return deliver(list(registry), text_frame(text), text, None)
        finally:
            cork.passing = False

    def kick(self, client_id: str, code: int, reason: str) -> int:
        conns = registry.sockets_of(client_id)
        for conn in conns:
            conn.ws.end(f"kicked ({code} {reason})", code, reason)
        return len(conns)

    def attach(self, conn: Connection, epoch: str, last: int) -> bool:
        """Register conn; a v1 socket first gets a hello, a gap if any, and what it missed."""
        refusal = limit_refusal(conn.client_id, conn.ip)
        if refusal:  # others registered while our 101 was being written
            refused(refusal.kind, "websocket %s %s: %s", conn.client_id, conn.peer, refusal.reason)
            conn.ws.close(CLOSE_TRY_AGAIN_LATER, "too many connections")
            return False
        registry.add(conn)
        if conn.v1:
            frames = []
            if self.inbox is None:
                frames.append({"hello": {"inbox": False, "epoch": None, "seq": None}})
            else:
                box, missed, gap = self.inbox.missed(conn.client_id, epoch, last, time.time())
                frames.append({"hello": {"inbox": True, "epoch": box.epoch, "seq": box.last_seq}})
                if gap:
                    frames.append({"gap": {"after": last if epoch == box.epoch else 0}})
                frames.extend({"seq": seq, "data": text} for seq, text in missed)
            try:
                for frame in frames:
                    conn.ws.send_frame_bytes(text_frame(json.dumps(frame, separators=(",", ":"))))
            except WebSocketError as exc:  # a replay too big for its queue: it closes, and goes
                log.warning("replay to %s %s cut short: %s", conn.client_id, conn.peer, exc)
        return True

    def detach(self, conn: Connection) -> None:
        registry.remove(conn)

    def expire(self, now: float) -> None:
        if self.inbox is not None:
            self.inbox.expire(now)
        self.keys.expire(now)


hub = LocalHub()


def deliver(conns: Iterable[Connection], plain: bytes, text: str, seq: int | None) -> int:
    """Write one message to conns, each frame encoded once; return how many took it."""
    v1 = None
    delivered = 0
    for conn in conns:
        if conn.v1 and v1 is None:
            v1 = text_frame(json.dumps({"seq": seq, "data": text}, separators=(",", ":")))
        try:
            conn.ws.send_frame_bytes(v1 if conn.v1 else plain)
            delivered += 1
        except WebSocketError as exc:
            log.warning("dropped %s %s: %s", conn.client_id, conn.peer, exc)
    return delivered


def serve_websocket(conn: Connection, epoch: str = "", last: int = 0) -> None:
    """A socket's life: registered while open; what it sends goes to the watchers."""
    ws = conn.ws
    if not hub.attach(conn, epoch, last):
        return
    log.info("connect %s %s (%d open)", conn.client_id, conn.peer, len(registry))
    emit("connect", id=conn.client_id, peer=conn.peer, origin=conn.origin)
    try:
        while (message := ws.receive()) is not None:
            if watchers or webhook is not None:
                if isinstance(message, str):
                    emit("message", id=conn.client_id, data=message)
                else:
                    emit("message", id=conn.client_id, binary=base64.b64encode(message).decode())
    finally:
        hub.detach(conn)
        ws.close()
        log.info(
            "disconnect %s %s after %.1fs: %s",
            conn.client_id,
            conn.peer,
            time.time() - conn.connected_at,
            ws.end_reason,
        )
        emit("disconnect", id=conn.client_id, peer=conn.peer, reason=ws.end_reason)


def run_session(conn: Connection, sock: socket.socket, epoch: str, last: int) -> None:
    """A socket's session in its own greenlet; it closes the socket when the session ends."""
    try:
        serve_websocket(conn, epoch, last)
    except Exception:  # a bug must cost one socket, never the server
        log.exception("session of %s %s failed", conn.client_id, conn.peer)
        hub.detach(conn)
    finally:
        close_gracefully(sock)


def close_gracefully(sock: socket.socket) -> None:
    """FIN first, then read out what the peer still sends: closing a socket with unread bytes
    makes the kernel send a RST, which can destroy the close frame we just wrote."""
    try:
        sock.shutdown(socket.SHUT_WR)
        with gevent.Timeout(config.close_timeout, False):
            while sock.recv(65536):
                pass
    except OSError:
        pass
    finally:
        sock.close()


class GCWatch:
    """Times the collector's full (generation 2) passes: the pauses every socket feels."""

    def __init__(self) -> None:
        self.full = 0
        self.last_ms = self.max_ms = 0.0
        self.started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.full += 1
            self.last_ms = (time.perf_counter() - self.started) * 1000
            self.max_ms = max(self.max_ms, self.last_ms)

    def stats(self) -> dict:
        return {
            "full": self.full,
            "last_ms": round(self.last_ms, 2),
            "max_ms": round(self.max_ms, 2),
        }


gc_watch = GCWatch()


def settle_gc(every: float = 5.0) -> None:
    """After a burst of connections settles, collect once and freeze what is left, so the
    collector's full passes stop walking every idle socket's objects (107 ms at 10k sockets,
    measured) and cannot land inside a broadcast. Collecting first keeps garbage out of the
    frozen set; a population that moved by 1,000 or 10% is frozen anew."""
    frozen_at = previous = 0
    while True:
        gevent.sleep(every)
        count = len(registry)
        if abs(count - frozen_at) >= max(1000, frozen_at // 10) and count == previous:
            started = time.perf_counter()
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            log.info(
                "froze %d objects after the sockets settled at %d (%.0f ms)",
                gc.get_freeze_count(),
                count,
                (time.perf_counter() - started) * 1000,
            )
            frozen_at = count
        previous = count


def heartbeat_round(now: float) -> None:
    """Ping every socket that owes no pong; drop those that let a ping go unanswered too long."""
    for n, conn in enumerate(registry):
        ws = conn.ws
        if ws.pong_due and now - ws.pong_due >= config.ping_timeout:
            ws.end_reason = "ping timeout"
            ws.abort()
        elif not ws.pong_due and not ws.closed:
            ws.pong_due = now
            try:
                ws.send_frame_bytes(PING_FRAME)
            except WebSocketError:
                pass
        if n % 512 == 511:
            gevent.sleep(0)  # let others run during a long round


def heartbeat() -> None:
    """Forever: a heartbeat round every ping_interval, and old inbox entries and keys expired."""
    while True:
        gevent.sleep(config.ping_interval or 60)
        if config.ping_interval:
            heartbeat_round(time.monotonic())
        hub.expire(time.time())


SHUTDOWN_REASON = "server shutting down; reconnect"


def drain(timeout: float, window: float) -> None:
    """Close every WebSocket with 1001, spread over window seconds so that they do not all
    reconnect at once; give them timeout seconds more to answer, then drop the rest."""
    conns = list(registry)
    batches = max(1, min(len(conns), 50))
    for i, conn in enumerate(conns):
        conn.ws.end("server shutdown", CLOSE_GOING_AWAY, SHUTDOWN_REASON)
        if window and (i + 1) % max(1, len(conns) // batches) == 0 and i + 1 < len(conns):
            gevent.sleep(window / batches)
    deadline = time.monotonic() + timeout
    while len(registry) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    log.info("closed %d websockets; %d did not answer in time", len(conns), len(registry))
    for conn in list(registry):
        conn.ws.abort()


###############################################################################
# Events: what happens, told to watchers and the webhook ######################
###############################################################################

watchers: set = set()  # control connections that asked for {"op":"watch"}
webhook: "Webhook | None" = None


def emit(kind: str, **fields: object) -> None:
    """Tell watchers and the webhook that something happened; never waits for either."""
    if not watchers and webhook is None:
        return
    event = {"event": kind, "time": round(time.time(), 3), **fields}
    line = json.dumps(event, separators=(",", ":"))
    for watcher in list(watchers):
        watcher.push(line)
    if webhook is not None:
        webhook.push(line)


class Webhook:
    """Events POSTed to the app one by one, in order, signed with the secret, retried with
    backoff; a bounded queue in front, so a slow or dead endpoint never holds delivery up."""

    TRIES = 5

    def __init__(self, url: str, secret: bytes, size: int) -> None:
        self.url, self.secret = url, secret
        self.queue: gevent.queue.Queue = gevent.queue.Queue(size)
        self.dropped = 0
        self.greenlet = gevent.spawn(self.run)

    def push(self, line: str) -> None:
        try:
            self.queue.put_nowait(line)
        except gevent.queue.Full:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("webhook queue full: %d events dropped so far", self.dropped)

    def run(self) -> None:
        while True:
            self.post(self.queue.get().encode())

    def post(self, body: bytes) -> bool:
        headers = {"Content-Type": "application/json", "User-Agent": f"wsboard/{__version__}"}
        if self.secret:
            signature = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
            headers["X-Wsboard-Signature"] = "sha256=" + signature
        for attempt in range(self.TRIES):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers)
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
                return True
            except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
                log.warning("webhook attempt %d failed: %s", attempt + 1, exc)
                gevent.sleep(min(30.0, 0.5 * 2**attempt))
        log.error("webhook gave up on an event after %d attempts", self.TRIES)
        return False


###############################################################################
# Control line protocol #######################################################
###############################################################################
# Lines end in \n (a \r before it is dropped). Every line gets exactly one answer, in
# order: the seed's PHP client waits for one and would hang on silence.


class Command(NamedTuple):
    verb: str
    args: tuple = ()


def parse_client_id(raw: bytes) -> str | Command:
    """raw as a client id, or the error Command that refuses it."""
    if not raw:
        return Command("error", ("Missing client id",))
    try:
        client_id = raw.decode("ascii")
    except UnicodeDecodeError:
        return Command("error", ("Invalid client id",))
    return client_id if is_valid_client_id(client_id) else Command("error", ("Invalid client id",))


def parse_text(raw: bytes) -> str | Command:
    """raw as a message's text, or the error Command that refuses it."""
    if not raw:
        return Command("error", ("Missing message text",))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return Command("error", ("Message is not valid UTF-8",))


def parse_control_line(line: bytes) -> Command:
    """A control line (without its \\n) as a Command; refusals are Command('error', (text,))."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if line.startswith(b"{"):
        return Command("json", (line,))
    word = line.rstrip(b" ")
    if word in SIMPLE_VERBS:
        return Command(SIMPLE_VERBS[word])
    if line.startswith(b"SEND MESSAGE "):
        raw_id, space, raw_text = line[len(b"SEND MESSAGE ") :].partition(b" ")
        client_id = parse_client_id(raw_id)
        if isinstance(client_id, Command):
            return client_id
        text = parse_text(raw_text if space else b"")
        return text if isinstance(text, Command) else Command("send", (client_id, text))
    if line.startswith(b"BROADCAST"):
        text = parse_text(line[len(b"BROADCAST ") :] if line.startswith(b"BROADCAST ") else b"")
        return text if isinstance(text, Command) else Command("broadcast", (text,))
    if line.startswith(b"KICK"):
        client_id = parse_client_id(line[len(b"KICK ") :].rstrip(b" "))
        return client_id if isinstance(client_id, Command) else Command("kick", (client_id,))
    return Command("error", ("Unknown command",))


SIMPLE_VERBS = {b"LIST WEBSOCKETS": "list", b"PING": "ping", b"HELP": "help"}

HELP = (
    "OK commands: LIST WEBSOCKETS | SEND MESSAGE <id> <text> | BROADCAST <text> | KICK <id> | "
    "PING | HELP | a JSON object per line with op send, broadcast, list, kick, ping, stats, "
    "watch, unwatch"
)


def seed_send(ctx: "ControlConnection", client_id: str, text: str) -> list:
    result = hub.send([client_id], text, keep_offline=config.offline_ok)
    return ["OK"] if result.sockets or result.queued else ["ERROR Client Not Found"]


def kick(client_id: str, code: int = CLOSE_KICKED, reason: str = "kicked") -> int:
    return hub.kick(client_id, code, reason)


COMMANDS: dict = {
    "list": lambda ctx: (
        ["=== START ==="] + [f"{c.client_id} {c.peer}" for c in registry] + ["=== END ==="]
    ),
    "send": seed_send,
    "broadcast": lambda ctx, text: [f"OK {hub.broadcast(text)}"],
    "kick": lambda ctx, client_id: (
        [f"OK {n}"] if (n := kick(client_id)) else ["ERROR Client Not Found"]
    ),
    "ping": lambda ctx: ["PONG"],
    "help": lambda ctx: [HELP],
    "json": lambda ctx, line: [json.dumps(run_json(ctx, line), separators=(",", ":"))],
    "error": lambda ctx, message: ["ERROR " + message],
}


def run_command(command: Command, ctx: "ControlConnection | None" = None) -> list:
    """The answer lines for one command."""
    return COMMANDS[command.verb](ctx, *command.args)


# The JSON form: one object per line in, one object per line out.


class BadRequest(ValueError):
    """A JSON command that cannot be carried out; the message says why."""


def json_ids(request: dict) -> list:
    to = request.get("to")
    ids = [to] if isinstance(to, str) else to
    if not isinstance(ids, list) or not ids or len(ids) > 1000:
        raise BadRequest('"to" must be a client id or a list of 1-1000 of them')
    for client_id in ids:
        if not is_valid_client_id(client_id):
            raise BadRequest(f"invalid client id: {str(client_id)[:130]!r}")
    return ids


def json_text(request: dict) -> str:
    """A message's text: "data" as it is when a string, else as compact JSON."""
    if "data" not in request:
        raise BadRequest('"data" is missing')
    data = request["data"]
    return data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))


def op_send(ctx: object, request: dict) -> dict:
    ids, text, key = json_ids(request), json_text(request), request.get("key")
    if key is not None and not (isinstance(key, str) and 1 <= len(key) <= 200):
        raise BadRequest('"key" must be a string of 1-200 characters')
    now = time.time()
    if key is not None and (earlier := hub.keys.get(key, now)) is not None:
        return {**earlier, "duplicate": True}
    result = hub.send(ids, text, keep_offline=True)
    if not result.sockets and not result.queued:
        return {"ok": False, "error": "Client Not Found"}
    answer = {"ok": True, "sockets": result.sockets, "queued": result.queued}
    if hub.inbox is not None:
        answer["seq"] = result.seq
    if result.missing:
        answer["missing"] = result.missing
    if key is not None:
        hub.keys.put(key, answer, now)
    return answer


def op_list(ctx: object, request: dict) -> dict:
    return {
        "ok": True,
        "clients": [
            {
                "id": c.client_id,
                "peer": c.peer,
                "since": round(c.connected_at, 3),
                "origin": c.origin,
                "protocol": "wsboard.v1" if c.v1 else "",
                "queued_bytes": c.ws.queued_bytes,
            }
            for c in registry
        ],
    }


KICK_CODES = {
    CLOSE_NORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    1011,
    1012,
    CLOSE_TRY_AGAIN_LATER,
} | set(range(4000, 5000))


def op_kick(ctx: object, request: dict) -> dict:
    client_id = request.get("id")
    if not is_valid_client_id(client_id):
        raise BadRequest('"id" must be a client id')
    code, reason = request.get("code", CLOSE_KICKED), request.get("reason", "kicked")
    if code not in KICK_CODES or isinstance(code, bool):
        raise BadRequest('"code" must be 1000, 1001, 1008, 1011, 1012, 1013 or 4000-4999')
    if not isinstance(reason, str) or len(reason.encode()) > 123:
        raise BadRequest('"reason" must be a string of at most 123 bytes')
    count = kick(client_id, code, reason)
    return {"ok": True, "sockets": count} if count else {"ok": False, "error": "Client Not Found"}


def op_stats(ctx: object, request: dict) -> dict:
    return {
        "ok": True,
        "version": __version__,
        "sockets": len(registry),
        "control_connections": control_connections,
        "watchers": len(watchers),
        "refused": dict(refusals),
        "gc": gc_watch.stats(),
    }


def op_watch(ctx: "ControlConnection", request: dict) -> dict:
    ctx.watch()
    return {"ok": True, "watching": True}


def op_unwatch(ctx: "ControlConnection", request: dict) -> dict:
    ctx.unwatch()
    return {"ok": True, "watching": False}


JSON_OPS: dict = {
    "send": op_send,
    "broadcast": lambda ctx, request: {"ok": True, "sockets": hub.broadcast(json_text(request))},
    "list": op_list,
    "kick": op_kick,
    "ping": lambda ctx, request: {"ok": True, "pong": True},
    "stats": op_stats,
    "watch": op_watch,
    "unwatch": op_unwatch,
}


def run_json(ctx: "ControlConnection", line: bytes) -> dict:
    """Carry out one JSON command; every failure is an {"ok": false, "error": …} answer."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return {"ok": False, "error": "Malformed JSON"}
    if not isinstance(request, dict):
        return {"ok": False, "error": "A command must be a JSON object"}
    op = JSON_OPS.get(request.get("op")) if isinstance(request.get("op"), str) else None
    if op is None:
        answer = {"ok": False, "error": f"Unknown op: {str(request.get('op'))[:40]!r}"}
    else:
        try:
            answer = op(ctx, request)
        except BadRequest as exc:
            answer = {"ok": False, "error": str(exc)}
    if "ref" in request:  # lets a pipelining client match answers to requests
        answer["ref"] = request["ref"]
    return answer


# Control connections.


def split_lines(buffer: bytearray) -> tuple:
    """Complete lines in buffer, and what is left after the last \\n."""
    *lines, rest = bytes(buffer).split(b"\n")
    return lines, bytearray(rest)


class ControlConnection:
    """One client of the control socket. Answers and (when watching) events share the socket,
    so every write takes the lock; events wait in a bounded queue and a slow watcher is cut."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.write_lock = gevent.lock.Semaphore()
        self.events: gevent.queue.Queue | None = None
        self.pump: gevent.Greenlet | None = None

    def write(self, data: bytes) -> None:
        with gevent.Timeout(config.write_timeout, WriteTimedOut("control client is not reading")):
            with self.write_lock:
                self.sock.sendall(data)

    def watch(self) -> None:
        if self.events is None:
            self.events = gevent.queue.Queue(config.watch_queue)
            self.pump = gevent.spawn(self.pump_events)
            watchers.add(self)

    def unwatch(self) -> None:
        watchers.discard(self)
        if self.pump is not None:
            self.pump.kill(block=False)
        self.events = self.pump = None

    def push(self, line: str) -> None:
        try:
            self.events.put_nowait(line)
        except gevent.queue.Full:
            log.warning("dropped a watcher that fell %d events behind", config.watch_queue)
            self.unwatch()
            self.sock.shutdown(socket.SHUT_RDWR)

    def pump_events(self) -> None:
        events = self.events
        try:
            while True:
                lines = [events.get()]
                while not events.empty() and len(lines) < 256:
                    lines.append(events.get_nowait())
                self.write(("\n".join(lines) + "\n").encode("utf-8"))
        except (OSError, WebSocketError) as exc:
            log.info("watcher gone: %s", exc)
            watchers.discard(self)


control_connections = 0


def control_refusal(sock: socket.socket) -> str | None:
    """Why a new control connection may not talk to us, or None."""
    if control_connections >= config.max_control_connections:
        return "Too many control connections"
    if config.control_uids or config.control_gids:
        pid, uid, gid = peer_credentials(sock)
        if not peer_allowed(uid, gid, config.control_uids, config.control_gids):
            return f"Permission denied (pid {pid} uid {uid} gid {gid})"
    return None


def serve_control(sock: socket.socket, address: object) -> None:
    """One control connection: read lines, answer each in order, until EOF, abuse or idleness."""
    global control_connections
    ctx = ControlConnection(sock)
    refusal = control_refusal(sock)
    if refusal:
        refused("control", "control connection: %s", refusal)
        try:
            ctx.write(f"ERROR {refusal.split(' (')[0]}\n".encode())
        except (OSError, WriteTimedOut):
            pass
        sock.close()
        return
    control_connections += 1
    sock.settimeout(config.control_idle_timeout or None)
    buffer = bytearray()
    try:
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if ctx.events is not None:
                    continue  # a watcher may listen quietly for as long as it likes
                raise
            if not data:
                if buffer:  # a last line without \n still gets its answer
                    answer_lines(ctx, [bytes(buffer)])
                return
            buffer += data
            if b"\n" in data:
                lines, buffer = split_lines(buffer)
                if not answer_lines(ctx, lines):
                    return
            if len(buffer) > config.max_line:
                refuse_long_line(ctx)
                return
    except (OSError, WriteTimedOut) as exc:
        log.info("control connection ended: %s", exc or type(exc).__name__)
    finally:
        control_connections -= 1
        ctx.unwatch()
        sock.close()


CONTROL_FLUSH_BYTES = 64 * 1024


def answer_lines(ctx: ControlConnection, lines: Iterable[bytes]) -> bool:
    """Answer lines in order; False when one was too long and the connection must end.

    Answers are written whenever 64 KiB are pending, so a burst of LISTs cannot pile up.
    """
    pending: list = []
    size = 0
    cork.active = True
    try:
        for line in lines:
            if len(line) > config.max_line:
                flush_control(ctx, pending)
                refuse_long_line(ctx)
                return False
            command = parse_control_line(line)
            if command.verb == "error":
                log.warning("control error: %s: %r", command.args[0], line[:80])
            for answer in run_command(command, ctx):
                pending.append(answer)
                size += len(answer) + 1
            if size >= CONTROL_FLUSH_BYTES:
                flush_control(ctx, pending)
                pending, size = [], 0
                cork.active = True
        flush_control(ctx, pending)
        return True
    finally:
        cork.release()


def flush_control(ctx: ControlConnection, answers: list) -> None:
    """Let held frames out first (a write here may yield), then send the answers."""
    cork.release()
    if answers:
        ctx.write(("\n".join(answers) + "\n").encode("utf-8"))


def refuse_long_line(ctx: ControlConnection) -> None:
    log.warning("control error: line longer than %d bytes; closing", config.max_line)
    ctx.write(f"ERROR Line too long (limit {config.max_line} bytes)\n".encode())


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


@app.hook("after_request")
def security_headers() -> None:
    """Every answer: no framing, no sniffing, no referrer, scripts only from /static."""
    host = bottle.request.environ.get("HTTP_HOST", "")
    sockets = f" ws://{host} wss://{host}" if SAFE_HOST.fullmatch(host) else ""
    headers = bottle.response.headers
    headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self'{sockets}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Referrer-Policy"] = "no-referrer"
    if bottle.request.path in ("/", "/admin"):
        headers["Cache-Control"] = "no-store"


SAFE_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


@app.get("/")
def board_page() -> str:
    board_id = new_board_id()
    if config.secret_key:  # signed mode: the page gets a server-minted token for its id
        query = signed_query(config.secret_key, board_id, config.token_ttl)
    else:
        query = urlencode({"id": board_id})
    return render("board", board_id=board_id, query=query)


# The admin routes: a password when one is set, else this machine only.

verified_passwords: set = set()  # digests of passwords PBKDF2 has already accepted


def admin_password_ok(password: str) -> bool:
    """Check against the PBKDF2 hash in a worker thread, so a flood of guesses never blocks."""
    key = hashlib.sha256(f"{config.admin_hash}\0{password}".encode()).digest()
    if key in verified_passwords:
        return True
    ok = gevent.get_hub().threadpool.apply(password_matches, (password, config.admin_hash))
    if ok:
        if len(verified_passwords) >= 16:
            verified_passwords.clear()
        verified_passwords.add(key)
    return ok


def admin_refusal(environ: Mapping[str, str]) -> tuple | None:
    """(status, reason, headers) when this request may not use the admin routes, else None."""
    if not config.admin_hash:
        if is_local_request(environ):
            return None
        return 403, "The admin pages answer only to this machine until --admin-password is set", []
    credentials = basic_credentials(environ.get("HTTP_AUTHORIZATION", ""))
    if credentials and credentials[0] == "admin" and admin_password_ok(credentials[1]):
        return None
    return (
        401,
        "Admin password required",
        [("WWW-Authenticate", 'Basic realm="wsboard admin", charset="UTF-8"')],
    )


def cross_site_refusal(environ: Mapping[str, str]) -> tuple | None:
    """(status, reason) for a state-changing request that may come from another site."""
    if environ.get("HTTP_SEC_FETCH_SITE", "same-origin") not in ("same-origin", "none"):
        return 403, "Cross-site request refused"
    if not origin_allowed(environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST", ""), ()):
        return 403, "Cross-site request refused"
    if environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower() != "application/json":
        return 415, "Content-Type must be application/json"
    return None


def admin_only(route: Callable) -> Callable:
    @functools.wraps(route)
    def guarded(*args: object, **kwargs: object) -> object:
        refusal = admin_refusal(bottle.request.environ)
        if refusal is None:
            return route(*args, **kwargs)
        status, reason, headers = refusal
        refused(
            "admin",
            "%s %s from %s: %s",
            bottle.request.method,
            bottle.request.path,
            bottle.request.remote_addr,
            reason,
        )
        for name, value in headers:
            bottle.response.set_header(name, value)
        if bottle.request.path == "/sendMessage":
            return json_answer(status, True, reason)
        bottle.response.status = status
        bottle.response.content_type = "text/plain; charset=utf-8"
        return reason + "\n"

    return guarded


@app.get("/admin")
@admin_only
def admin_page() -> str:
    return render("admin", clients=list(registry), refusals=sorted(refusals.items()))


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
@admin_only
def send_message() -> str:
    cross_site = cross_site_refusal(bottle.request.environ)
    if cross_site:
        refused("csrf", "sendMessage from %s: %s", bottle.request.remote_addr, cross_site[1])
        return json_answer(cross_site[0], True, cross_site[1])
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
    result = hub.send([client_id], payload, keep_offline=config.offline_ok)
    if result.sockets or result.queued:
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


def bind_control_socket(path: str, mode: int = 0o660, gid: int | None = None) -> socket.socket:
    """A listening UNIX socket at path; a stale file is replaced, a live one kept."""
    try:
        existing = os.lstat(path).st_mode
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing):
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
    old_umask = os.umask(0o177)  # owner only until the group is right, not even for an instant
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
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
        listener = bind_control_socket(path, config.control_mode, config.control_group)
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
    hub.configure(new)


def start_background() -> list:
    """The greenlets a running server keeps: the heartbeat, and the webhook when set."""
    global webhook
    if gc_watch not in gc.callbacks:
        gc.callbacks.append(gc_watch)
    if config.webhook:
        webhook = Webhook(config.webhook, config.secret_key, config.webhook_queue)
    return [gevent.spawn(heartbeat), gevent.spawn(settle_gc)] + (
        [webhook.greenlet] if webhook else []
    )


def stop_background(greenlets: list) -> None:
    global webhook
    webhook = None
    gevent.killall(greenlets, block=False)


HTTP_HEADROOM = 1024  # page requests that may run beside max_connections WebSockets


def serve(cfg: Config) -> int:
    """Run the HTTP/WebSocket server and the control socket until SIGTERM or SIGINT."""
    http = WSGIServer(
        (cfg.host, cfg.port),
        app,
        spawn=gevent.pool.Pool(cfg.max_connections + HTTP_HEADROOM),
        backlog=cfg.backlog,
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
    background = start_background()
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
    drain(cfg.shutdown_timeout, cfg.drain_window)
    http.stop(timeout=1)
    control.stop()
    stop_background(background)
    log.info("stopped")
    return 0


def token_command(argv: Sequence[str]) -> int:
    """wsboard token ID [--ttl S]: print the query string that lets a browser connect as ID."""
    parser = argparse.ArgumentParser(
        prog="wsboard token",
        description="Print id=ID&exp=EXP&token=TOKEN for ws://HOST:PORT/websocket?... "
        "The secret comes from --secret, --secret-file or WSBOARD_SECRET(_FILE).",
    )
    parser.add_argument("client_id", metavar="ID")
    parser.add_argument("--ttl", type=_positive_int, help="seconds it stays valid [--token-ttl]")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(rest)
    if not is_valid_client_id(args.client_id):
        raise ConfigError(f"{args.client_id!r} is not a valid client id")
    if not cfg.secret_key:
        raise ConfigError("no secret: give --secret, --secret-file or WSBOARD_SECRET")
    print(signed_query(cfg.secret_key, args.client_id, args.ttl or cfg.token_ttl))
    return 0


def hash_password_command(argv: Sequence[str]) -> int:
    """wsboard hash-password: read a password on stdin, print its hash for --admin-password."""
    argparse.ArgumentParser(
        prog="wsboard hash-password",
        description="Read the admin password from standard input (or a prompt) and print the "
        "PBKDF2 hash to give as --admin-password / WSBOARD_ADMIN_PASSWORD.",
    ).parse_args(argv)
    if sys.stdin.isatty():
        password = getpass.getpass("Admin password: ")
        if getpass.getpass("Again: ") != password:
            raise ConfigError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise ConfigError("use a password of at least 8 characters")
    print(hash_password(password))
    return 0


SUBCOMMANDS = {"token": token_command, "hash-password": hash_password_command}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        cfg = load_config(argv)
    except ConfigError as exc:
        sys.stderr.write(f"wsboard: {exc}\n")
        return 2
    configure(cfg)
    return serve(cfg)


# gunicorn: gunicorn.conf.py's worker calls these inside the worker process.

worker_control: ControlServer | None = None
worker_background: list = []


def start_in_worker() -> None:
    """Configure from the environment and open the control socket in a gunicorn worker."""
    global worker_control
    configure(load_config([]))
    worker_control = ControlServer(config.control)
    worker_control.start()
    worker_background[:] = start_background()
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
        drain(config.shutdown_timeout, config.drain_window)
        control.stop()
        stop_background(worker_background)


if __name__ == "__main__":
    sys.exit(main())
