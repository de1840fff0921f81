"""wsboard: a small WebSocket push server that sits beside a request/response web app.

Browsers open ``ws://HOST:PORT/websocket?id=<client id>``; the app pushes to them over a
local UNIX socket with a line protocol (``LIST WEBSOCKETS``, ``SEND MESSAGE <id> <text>``).

The module reads top to bottom; each section has a banner and builds on those above it. A
browser's socket is followed from the adapter and its session to the hubs; a control line
from the hubs up through the actions and the verb table to its connection.

- Configuration: the OPTIONS table (flag, WSBOARD_* variable, default), ``Config``.
- Names and codes: client ids, ``CloseCode``, ``EndReason``, ``Refusal`` (a request turned
  away) and ``Closing`` (a refusal told inside a socket), and the one error family every
  operation raises: ``Refused`` (``BadRequest``, ``NotFound``, ``LimitReached``,
  ``BackplaneError``) with the answer texts (``CLIENT_NOT_FOUND``, ``TIMEOUT`` ...).
- Security: pure checks (tokens, with the previous secret while rotating, origins, hosts,
  passwords, proxies, peers); the token scheme itself is imported from ``wsboard_client``, its
  one home. The connect hook (``ask_connect_hook``, --connect-url): the app decides each
  handshake from the browser's cookies, its answer checked by ``hook_decision`` (pure).
- WebSocket adapter: ``BoardSocket`` and ``WebSocketHandler`` (gevent-websocket's defects
  mended), ``EventStream`` (a text/event-stream response as a socket, with the same writer),
  ``Handshake`` (a socket's request parsed once). A plain upgrade's head is peeked and
  read at once (``plain_upgrade``, pure, held to pywsgi's environ by a test); any other
  request is pywsgi's. The handler looks the path up in ``Board.protocols``, asks the connect
  hook when there is one, and opens the socket with that protocol (its 101, or an event
  stream's 200).
- A socket's session: ``start_session`` ... ``end_session``, driven by a read watcher (no
  greenlet waits on an idle socket, and a lone pong needs none); each message goes to the
  socket's protocol.
- Connections and delivery: ``Connection``, ``Registry``, the framings (plain, wsboard.v1,
  and the event stream's, one per stream since its ids carry the stream's position), what a
  resuming socket gets first (``opening_plan``), token refreshes and ``TokenClock`` (sockets
  close when their token's exp passes), ``SocketProtocol`` (a kind of socket: its request,
  framing, close codes and what it does with a browser's message; a new transport is a
  subclass and one more entry of ``Board.protocols``), ``WebSocketProtocol`` (/websocket) and
  ``EventStreamProtocol`` (/events), ``Batch`` and ``deliver``.
- Inbox, channel history, sticky joins and idempotency keys: ``Inbox`` (per id),
  ``History`` (per channel: offsets within an epoch, what a resume from ``since=`` gets),
  ``StickyJoins`` (channels an id's later sockets join too).
- Hubs: ``Hub`` (what the rest of the file may call of a hub) and ``SocketLike`` (what a hub
  may touch of a socket), both typing.Protocols; ``LocalHub`` is this process's (it also
  counts its channels' sockets when something wants it: ``count_notices`` says what a change
  tells). A new hub implements ``Hub``, passes tests/test_hub.py and is added to ``HUBS``.
- Scale-out: ``Backplane``, the hub of one process among many, composed of this process's
  ``LocalHub`` (which hands it presence and routing through ``LocalHooks``) and a
  ``Transport`` (a typing.Protocol: publish to a route, subscriptions per route, a home for
  presence, the shared inbox and idempotency keys). The backplane is generic: requests,
  ``Answers``, ``Tally``, the message kinds between processes (``HANDLERS``). A new bus
  (NATS, PostgreSQL LISTEN/NOTIFY) is one class implementing ``Transport``, paired with
  ``Backplane`` in ``HUBS`` as ``redis_hub`` pairs ``RedisTransport`` (the connection, the
  pub/sub link, the outbox, whose consecutive publishes to one route ride in one bundle
  (``publish_runs``), the Lua scripts, ``RedisInbox``, ``RedisHistory``, ``RedisSticky``);
  see docs/scaleout.md.
- Events: ``Events`` tells its registered sinks (watchers, the webhook, admin pages); a new
  sink is any object with ``push(line, lifecycle)``, added with ``Events.add``. Its observers
  (the Pusher webhooks) get each event's kind and fields, and the notices no sink is told
  (channels occupied, counted and vacated, client events, cache misses).
- Actions: ``Actions``, one method per operation (send, publish, kick, join, ...), for every
  front end: it checks the domain input, counts, and returns a result or raises ``Refused``.
  A new operation is a method here.
- Control line protocol: ``parse_control_line`` (pure) and ``VERBS``, whose rows carry their
  argument readers, usage, action and answer (a new verb is one row; ``HELP`` is made from
  it); ``parse_send_line``, the quick reading of a plain SEND line that a run is made of;
  the JSON ops in ``JSON_OPS`` call the same actions.
- Control connections: one greenlet per connection, batches, watchers; a run of SEND lines
  goes to the hub in groups, several under way at once (``GROUPS_IN_FLIGHT``).
- Web routes: the Bottle routes (a new route goes here); each finds its ``Board`` in the
  request and calls the actions. The admin page's JSON, Server-Sent Events and actions.
- The Pusher protocol: ``PusherFraming``, the signature checks (pure: channels, sign-in,
  API requests), ``PusherApp`` (the protocol of /app/KEY with its user sign-in, and the HTTP
  API, which calls the same actions), ``PusherWebhooks`` (Pusher's webhooks, an observer of
  ``Events``); see docs/pusher.md.
- Metrics and health: ``Counts`` and ``Buckets`` (plain counters the hot paths add to),
  ``BoardCollector`` (prometheus_client reads them at each scrape), ``/healthz``, ``/readyz``,
  ``/metrics`` and the ``--metrics-port`` app.
- The board: ``Board`` owns everything one process holds (config, hub, actions, protocols,
  events, counters, servers, background greenlets) and starts and stops it; ``app`` is the
  default one.
- Command line and gunicorn: ``main``, the subcommands, the worker's hooks.
"""

# Bottle keeps request state in thread-locals made at import time: patch before importing it.
from gevent import monkey

monkey.patch_all()

import argparse
import base64
import binascii
import bisect
import collections
import enum
import errno
import fnmatch
import functools
import gc
import getpass
import grp
import hashlib
import heapq
import hmac
import http.client
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import signal
import socket
import stat
import struct
import sys
import time
import typing
import urllib.request
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

import bottle
import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.queue
import gevent.socket
from gevent.pywsgi import Input, OldMessage, WSGIHandler, WSGIServer
from gevent.server import StreamServer
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.handler import WebSocketHandler as _GeventWebSocketHandler
from geventwebsocket.utf8validator import Utf8Validator
from geventwebsocket.websocket import Header
from geventwebsocket.websocket import WebSocket as _GeventWebSocket

from wsboard_client import (  # the token scheme's one home, shared with the clients
    MAX_TIMEOUT,
    PRIVATE_PREFIXES,
    mint_token,
    private_channels,
    signed_query,
    signed_string,  # noqa: F401 - wsboard.signed_string, as the docs and tests name it
)

try:  # optional: /metrics needs it (pip install 'wsboard[metrics]')
    import prometheus_client
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
except ImportError:  # pragma: no cover - the extra is installed wherever tests run
    prometheus_client = None

try:  # optional: only --redis needs it (pip install 'wsboard[redis]')
    import redis
    import redis.retry
    import redis.sentinel
    from redis.backoff import NoBackoff

    class SentinelBlockingPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
        """redis-py's pool that finds the primary through the sentinels, waiting for a free
        connection as wsboard's other pool does (its two parents, composed by their MRO)."""

except ImportError:  # pragma: no cover - the extra is installed wherever tests run
    redis = None

__version__ = "0.2.0"

# A greenlet that records its spawner and spawning stack costs a handshake ~10 us and every
# read a little (measured); nothing here reads them. GEVENT_TRACK_GREENLET_TREE=1 wins.
if "GEVENT_TRACK_GREENLET_TREE" not in os.environ:
    gevent.config.track_greenlet_tree = False

log = logging.getLogger("wsboard")
access_log = logging.getLogger("wsboard.access")

HERE = os.path.dirname(os.path.abspath(__file__))

# JSON without blanks, as every answer, frame and bus message is written; one encoder made
# once (json.dumps with separators= builds a new one on every call).
compact_json = json.JSONEncoder(separators=(",", ":")).encode


###############################################################################
# Configuration ###############################################################
###############################################################################
# Every setting is one row: a --flag, a WSBOARD_* environment variable and a default.
# Precedence: flag, then environment, then default. Values are checked where they enter.


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the setting."""


NOT_A_NUMBER = "is not a number"  # one wording for every number that does not parse


def _number(kind: type, text: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(NOT_A_NUMBER) from None


def _port(text: str) -> int:
    value = _number(int, text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0-65535")
    return value


def _port_or_off(text: str) -> int:
    return 0 if text.strip() == "0" else _port(text)


def _positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    value = _number(float, text)
    if not 0 < value < float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _seconds_or_off(text: str) -> float:
    """Seconds, where 0 turns the timeout off."""
    return 0.0 if _number(float, text) == 0 else _seconds(text)


def _count_or_off(text: str) -> int:
    """A count, where 0 turns the feature off."""
    value = _number(int, text)
    if value < 0:
        raise ValueError("must be 0 (off) or more")
    return value


def _history_size(text: str) -> int:
    value = _count_or_off(text)
    if value > MAX_HISTORY_LIMIT:
        raise ValueError(f"at most {MAX_HISTORY_LIMIT:,} publications a channel")
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


def _urls(text: str) -> tuple:
    """URLs separated by blanks (a repeated flag's values are joined so)."""
    return tuple(_url(part) for part in text.split())


SENTINEL_SCHEME = "redis+sentinel"


class SentinelTarget(NamedTuple):
    """What a redis+sentinel:// URL names: the sentinels and the primary's service."""

    sentinels: tuple  # ((host, port), ...)
    service: str
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(text: str) -> SentinelTarget:
    """redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT...]/SERVICE[?db=N] as a
    SentinelTarget; ValueError saying what is wrong."""
    parts = urlsplit(text)
    credentials, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for host_port in hosts.split(","):
        host, _, port = host_port.rpartition(":")
        number = bounded_int(port, 5)
        if not host or number is None or not 0 < number < 65536:
            raise ValueError(f"sentinel {host_port[:60]!r} must be HOST:PORT")
        sentinels.append((host.strip("[]"), number))
    service = parts.path.strip("/")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", service):
        raise ValueError("must name the primary's service: redis+sentinel://HOST:PORT/NAME")
    query = dict(parse_qsl(parts.query))
    db = bounded_int(query.pop("db", "0"), 5)
    if db is None or query:
        raise ValueError("takes ?db=N alone")
    username, _, password = credentials.partition(":")
    return SentinelTarget(
        tuple(sentinels), service, db, unquote(username) or None, unquote(password) or None
    )


def _redis_url(text: str) -> str:
    if not text:
        return text
    parts = urlsplit(text)
    if parts.scheme == SENTINEL_SCHEME:
        parse_sentinel_url(text)
    elif parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
        raise ValueError("must be a redis://, rediss://, unix:// or redis+sentinel:// URL")
    if redis is None:
        raise ValueError("needs the redis package: pip install 'wsboard[redis]'")
    return text


def _redis_prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text):
        raise ValueError("must be 1-64 characters from A-Z a-z 0-9 _ - .")
    return text


def _socket_path(text: str) -> str:
    if text == AUTO_CONTROL:
        return text
    if not text or "\0" in text:
        raise ValueError("must be a file path")
    if len(os.fsencode(text)) > 107:
        raise ValueError("is longer than the 107 bytes a UNIX socket path may have")
    return text


def _file_mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise ValueError(NOT_A_NUMBER + " (an octal file mode such as 0660)") from None
    if not 0 <= value <= 0o777:
        raise ValueError("must be an octal file mode such as 0660")
    if value & 0o600 != 0o600:
        raise ValueError("must let the owner read and write (0600 at least)")
    if value & 0o007:
        raise ValueError("must give other users no access (0660 at most): use --control-group")
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
    return frozenset(_number(int, part) for part in text.split(",") if part.strip())


def _words(text: str) -> tuple:
    """A comma-separated list, blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _networks(text: str) -> tuple:
    """A comma-separated list of addresses or networks (127.0.0.1, 10.0.0.0/8, ::1)."""
    return tuple(ipaddress.ip_network(part, strict=False) for part in _words(text))


def _pusher_name(text: str) -> str:
    if text and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise ConfigError("must be 1-64 characters from A-Z a-z 0-9 _ -")
    return text


def _pusher_webhook_events(text: str) -> frozenset:
    """Names of Pusher webhook events (comma-separated); empty: all of them."""
    names = frozenset(_words(text)) or frozenset(PUSHER_WEBHOOK_EVENTS)
    unknown = names - set(PUSHER_WEBHOOK_EVENTS)
    if unknown:
        raise ValueError(
            f"{sorted(unknown)[0][:40]!r} is not one of {', '.join(PUSHER_WEBHOOK_EVENTS)}"
        )
    return names


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


AUTO_CONTROL = "auto"  # see control_socket_path()
PUSHER_WEBHOOK_EVENTS = (  # what Pusher's webhooks may tell, by its names
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
)

# fmt: off
OPTIONS = (
    # Where it listens
    Option("host", "127.0.0.1", str,
           "address the HTTP/WebSocket server binds; 0.0.0.0 exposes it to the network"),
    Option("port", "8080", _port, "TCP port of the HTTP/WebSocket server"),
    Option("backlog", "1024", _positive_int,
           "connections the kernel may hold waiting for accept(); past it, new ones wait a "
           "second for a SYN retry (Linux caps it at net.core.somaxconn)"),
    Option("control", AUTO_CONTROL, _socket_path,
           "path of the UNIX control socket the backend app talks to; auto: "
           "/run/wsboard/wsboard.sock when that directory can be used, else "
           "$XDG_RUNTIME_DIR/wsboard.sock, else /tmp/wsboard-UID/wsboard.sock"),
    # Who may connect
    Option("secret", "", str,
           "turns on signed client ids: sockets must bring exp and token=HMAC-SHA256(secret, "
           "'ID.EXP'); at least 16 characters"),
    Option("secret_file", "", str, "read the secret from this file instead"),
    Option("secret_previous_file", "", str,
           "a file with the secret before the current one: tokens it signed are accepted "
           "while this is set (rotation); new tokens use the current one"),
    Option("token_ttl", "3600", _positive_int,
           "seconds a token minted by wsboard (board page, `wsboard token`) stays valid"),
    Option("connect_url", "", _url,
           "URL that each handshake of /websocket and /events is POSTed to, with the browser's "
           "cookies, before it connects: the app answers the id (and channels, meta, exp) or "
           "refuses; empty: off (ids come from the URL)"),
    Option("connect_headers", "", _words,
           "request headers passed on to --connect-url besides Cookie (comma-separated)"),
    Option("connect_timeout", "2", _seconds, "seconds --connect-url has to answer"),
    Option("allowed_origins", "", _words,
           "comma-separated browser origins allowed to open WebSockets, wildcards allowed "
           "(https://*.example.com); empty: the page's own host only (see --allowed-hosts)"),
    Option("allowed_hosts", "", _words,
           "comma-separated host names (wildcards allowed) this server is reached by, beside "
           "localhost and IP addresses; same-origin WebSockets and the password-less admin "
           "pages answer to no other Host (DNS rebinding)"),
    Option("admin_password", "", str,
           "password for /admin and /sendMessage (HTTP Basic, user admin), plain (8 characters "
           "at least) or as made by `wsboard hash-password`; empty: they answer to loopback only"),
    Option("trusted_proxies", "", _networks,
           "comma-separated proxy addresses whose X-Forwarded-For is believed"),
    Option("control_mode", "0660", _file_mode,
           "file mode of the control socket (never anything for other users)"),
    Option("control_group", "", _group, "group of the control socket (name or number)"),
    Option("control_uids", "", _ids,
           "comma-separated uids allowed on the control socket (checked with SO_PEERCRED)"),
    Option("control_gids", "", _ids, "comma-separated gids allowed on the control socket"),
    # Limits
    Option("max_connections", "10000", _positive_int,
           "open WebSockets at most (more: 503); lowered at start-up when the descriptor "
           "limit cannot hold it"),
    Option("max_connections_per_ip", "256", _positive_int,
           "open WebSockets per client address at most (more: 503)"),
    Option("max_sockets_per_id", "32", _positive_int,
           "open WebSockets per client id at most (more: 503)"),
    Option("max_handshakes_per_ip", "32", _positive_int,
           "connections per client address that may be still sending their request head "
           "(more: 503); trusted proxies are exempt"),
    Option("max_channels_per_socket", "100", _positive_int,
           "channels one WebSocket may be in at most (its URL's and those joined later)"),
    Option("max_control_connections", "256", _positive_int,
           "open control connections at most"),
    Option("max_line", "1048576", _positive_int,
           "longest control line in bytes; a longer one is refused and its connection closed"),
    Option("max_message", "65536", _positive_int,
           "largest message in bytes a browser may send; a larger one closes it with 1009"),
    Option("max_client_rate", "100", _count_or_off,
           "messages per second a browser may send (over one-second windows); past it the "
           "socket is closed with 1008; 0: no limit"),
    Option("handshake_timeout", "10", _seconds,
           "seconds a client gets to send its whole request head, and to idle between requests"),
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
    Option("inbox_total_bytes", "67108864", _positive_int,
           "bytes all inboxes keep together at most (the least recently used id's go first)"),
    Option("history", "0", _history_size,
           "publications kept per channel, numbered by offset, so a socket that reconnects "
           "(with since=) gets what its channels had meanwhile; 0: off"),
    Option("history_ttl", "300", _seconds, "seconds a channel's history keeps a publication"),
    Option("history_bytes", "67108864", _positive_int,
           "bytes all channels' histories keep together at most (the least recently published "
           "channel's go first)"),
    Option("session_ttl", "300", _seconds,
           "seconds an id's sticky joins outlive its last open socket"),
    Option("max_sticky_ids", "100000", _positive_int,
           "ids with sticky joins at most; past it, a sticky join is refused"),
    Option("offline_ok", "no", _yes_no,
           "with an inbox, SEND MESSAGE to an id with no open socket keeps the message and "
           "answers OK instead of ERROR Client Not Found"),
    Option("presence_grace", "5", _seconds_or_off,
           "seconds an id stays a member of a presence- channel after its last socket there "
           "goes, so a page reload is no leave; also how long its metadata outlives it; 0: none"),
    Option("idempotency_window", "300", _seconds,
           "seconds a JSON send's key is remembered, so a retry is not delivered twice"),
    Option("watch_queue", "10000", _positive_int,
           "events that may wait for a watcher that is not reading; messages from browsers "
           "may fill half of it, connects and disconnects the rest; past it: dropped"),
    Option("webhook", "", _url, "URL that events are POSTed to, signed with the secret"),
    Option("webhook_queue", "10000", _positive_int,
           "events that may wait for the webhook, shared as for --watch-queue, and for each "
           "--pusher-webhook; past it: dropped and counted"),
    # Compression
    Option("compression", "no", _yes_no,
           "permessage-deflate (RFC 7692) for WebSockets that offer it (browsers do), without "
           "context takeover: a broadcast or publish is deflated once for all of them"),
    Option("compression_min", "512", _count_or_off,
           "smallest message in bytes that is deflated with --compression; smaller ones go "
           "as they are"),
    # Scale-out
    Option("redis", "", _redis_url,
           "Redis URL (redis://[:password@]host:port/db, rediss://..., unix:///path, or "
           "redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[?db=N] to find "
           "the primary through Sentinel) that turns on scale-out: every process given it "
           "shares one id space; empty: one process, no Redis"),
    Option("redis_prefix", "wsboard", _redis_prefix,
           "prefix of wsboard's Redis keys and channels, so installations can share a Redis"),
    Option("redis_timeout", "1", _seconds,
           "seconds Redis gets to answer and a process holding a target gets to confirm; "
           "past it: ERROR Timeout (or ERROR Backplane Unavailable)"),
    Option("redis_wait", "0", _count_or_off,
           "replicas that a write which keeps data (an inbox message, channel history, an "
           "idempotency key) must reach (Redis WAIT) before wsboard answers OK or queued; not "
           "reached within --redis-timeout: ERROR Timeout (a message delivered to a socket of "
           "this process is OK at once); 0: none (a failover may lose the last writes: "
           "docs/scaleout.md)"),
    Option("redis_lost_timeout", "0", _seconds_or_off,
           "seconds the Redis link may stay down before this process closes its sockets "
           "with 1012 (spread over --drain-window) and refuses new ones with 503 until it is "
           "back, so browsers reconnect to a process still linked (behind a balancer that "
           "checks /readyz); 0: never (its sockets stay, served for what needs no Redis)"),
    Option("node_timeout", "10", _seconds,
           "seconds a process may miss its heartbeats (every fifth of this) before the others "
           "take it for dead: its subscriptions are cut and its presence memberships end"),
    # The Pusher protocol
    Option("pusher_app_id", "", _pusher_name,
           "turns on the Pusher protocol (pusher-js, Laravel Echo, the Pusher server SDKs) "
           "for this app id, with --pusher-key and --pusher-secret; empty: off"),
    Option("pusher_key", "", _pusher_name,
           "the app key: pusher-js connects to /app/KEY; it signs nothing"),
    Option("pusher_secret", "", str,
           "the app secret that signs channel auth and HTTP API requests (8 characters at "
           "least)"),
    Option("pusher_client_events", "no", _yes_no,
           "let members of private- and presence- channels send client-* events to the "
           "other members (off, as in Pusher)"),
    Option("pusher_activity_timeout", "120", _positive_int,
           "seconds of silence after which pusher-js pings (told in connection_established)"),
    Option("pusher_max_event", "10240", _positive_int,
           "largest event data in bytes that the HTTP API or a client event may carry"),
    Option("pusher_webhook", "", _urls,
           "URL that webhooks in Pusher's format are POSTed to (signed with --pusher-secret, "
           "batched, retried); repeat the flag (or separate URLs by blanks) for several"),
    Option("pusher_webhook_events", "", _pusher_webhook_events,
           "the webhook events to send, comma-separated, of " + ", ".join(
               PUSHER_WEBHOOK_EVENTS) + "; empty: all"),
    Option("pusher_subscription_count", "no", _yes_no,
           "tell sockets in a channel (not presence-) how many subscriptions it has, over all "
           "processes, when it changes (pusher:subscription_count; throttled)"),
    # Operations
    Option("metrics_port", "0", _port_or_off,
           "also serve /metrics, /healthz and /readyz, without a password, on this port "
           "(for a Prometheus that scrapes from inside); 0: /metrics is on the main port only, "
           "behind the admin password"),
    Option("metrics_host", "127.0.0.1", str, "address the --metrics-port server binds"),
    Option("log_level", "info", _log_level, "debug, info, warning or error"),
)
# fmt: on

PASSWORD_MIN = 8


class Config:
    """The settings in force: one attribute per row of OPTIONS, and what they derive."""

    def __init__(self, **values: object) -> None:
        for option in OPTIONS:
            value = values[option.name] if option.name in values else option.parse(option.default)
            setattr(self, option.name, value)
        unknown = set(values) - {option.name for option in OPTIONS}
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        self.secret_key = load_secret(self.secret, self.secret_file)
        self.previous_key = load_secret("", self.secret_previous_file)
        if self.previous_key and not self.secret_key:
            raise ConfigError("--secret-previous-file needs the current --secret or --secret-file")
        self.admin_hash = admin_hash(self.admin_password)
        pusher = (self.pusher_app_id, self.pusher_key, self.pusher_secret)
        if any(pusher) and not all(pusher):
            raise ConfigError(
                "the Pusher protocol needs all of --pusher-app-id, --pusher-key, --pusher-secret"
            )
        if self.pusher_secret and len(self.pusher_secret) < PASSWORD_MIN:
            raise ConfigError(f"--pusher-secret: at least {PASSWORD_MIN} characters")
        if (self.pusher_webhook or self.pusher_subscription_count) and not self.pusher_key:
            raise ConfigError(
                "--pusher-webhook and --pusher-subscription-count need the Pusher protocol "
                "(--pusher-app-id, --pusher-key, --pusher-secret)"
            )

    def __repr__(self) -> str:
        def shown(name: str) -> str:
            value = getattr(self, name)
            hidden = ("secret", "admin_password", "pusher_secret")
            if name == "redis":
                return repr(without_password(value))
            return "'***'" if name in hidden and value else repr(value)

        fields = ", ".join(f"{o.name}={shown(o.name)}" for o in OPTIONS)
        return f"Config({fields})"


def without_password(url: str) -> str:
    """url with the password in it (user:password@) shown as ***."""
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


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


def admin_hash(password: str) -> str:
    """The PBKDF2 hash the admin password is checked against; '' when there is none."""
    if not password:
        return ""
    if password.startswith(HASH_PREFIX.rstrip("$")):
        if parse_password_hash(password) is None:
            raise ConfigError(
                "the admin password looks like a hash but is malformed (a shell expands $ "
                "inside double quotes: put the hash in single quotes); make one with "
                "wsboard hash-password"
            )
        return password
    if len(password) < PASSWORD_MIN:
        raise ConfigError(f"the admin password must be at least {PASSWORD_MIN} characters")
    return hash_password(password)


SUBCOMMAND_HELP = (
    "commands: wsboard [OPTIONS] runs the server; wsboard token ID [--ttl S] prints a signed "
    "query string for ID; wsboard hash-password hashes an admin password read from stdin; "
    "wsboard check-config checks the settings and exits; wsboard gunicorn-conf prints the "
    "path of the gunicorn.conf.py installed with it; wsboard bind-control binds the control "
    "socket for gunicorn's master. On a running server: wsboard send ID TEXT, publish CHANNEL "
    "TEXT, broadcast TEXT, list [--json], online ID..., count [CHANNEL], kick ID, stats, "
    "watch. `wsboard COMMAND --help` for more."
)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsboard",
        usage=f"wsboard [OPTIONS] | wsboard {{{','.join(SUBCOMMANDS)}}} ...",
        description="WebSocket push server: browsers connect to /websocket?id=ID, "
        "the backend app pushes to them over a UNIX control socket. " + SUBCOMMAND_HELP,
        epilog="Each option can also be set by the environment variable named in brackets; "
        "a flag wins over the environment.",
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
            **({"action": "append"} if option.parse is _urls else {}),
        )
    return parser


def load_config(argv: Sequence[str] = (), environ: Mapping[str, str] = os.environ) -> Config:
    """Build the Config from flags and environment; raise ConfigError naming a bad value."""
    flags = vars(argument_parser().parse_args(list(argv)))
    values = {}
    for option in OPTIONS:
        if flags.get(option.name) is not None:
            source, raw = option.flag, flags[option.name]
            if isinstance(raw, list):  # a repeated flag
                raw = " ".join(raw)
        elif option.env in environ:
            source, raw = option.env, environ[option.env]
        else:
            continue
        try:
            values[option.name] = option.parse(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r}: {exc}") from None
    return Config(**values)


###############################################################################
# Names and codes #############################################################
###############################################################################
# An id ends up in control lines and on the admin page, so it may hold nothing that
# could break either: 1-128 characters from a small safe set.

CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
CLIENT_ID_BYTES = re.compile(CLIENT_ID.pattern.encode("ascii"))  # the same, over a line's bytes
CLIENT_ID_RULE = "1-128 characters from A-Z a-z 0-9 _ - . :"


def is_valid_client_id(value: object) -> bool:
    return isinstance(value, str) and CLIENT_ID.fullmatch(value) is not None


# Channel names follow Pusher's rules, so the Pusher endpoint can share the namespace.
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_\-=@,.;]{1,164}")
CHANNEL_RULE = "1-164 characters from A-Z a-z 0-9 _ - = @ , . ;"
PRESENCE_PREFIX = "presence-"  # such channels keep members: ids, not sockets
# Pusher's cache channels keep their last publication whatever --history says.
CACHE_PREFIXES = ("cache-", "private-cache-", "private-encrypted-cache-", "presence-cache-")
MAX_META_BYTES = 1024


def is_valid_channel(value: object) -> bool:
    return isinstance(value, str) and CHANNEL_NAME.fullmatch(value) is not None


# Pusher's user channels carry events to the sockets signed in as one user (pusher:signin):
# the app publishes to them; no socket joins one but those signed in as its user.
USER_CHANNEL_PREFIX = "#server-to-user-"
PUBLISH_CHANNEL_RULE = f"{CHANNEL_RULE}, or {USER_CHANNEL_PREFIX}<user id>"


def user_channel(user_id: str) -> str:
    return USER_CHANNEL_PREFIX + user_id


def is_user_channel(value: object) -> bool:
    return (
        isinstance(value, str)
        and value.startswith(USER_CHANNEL_PREFIX)
        and is_valid_client_id(value[len(USER_CHANNEL_PREFIX) :])
    )


def is_publish_channel(value: object) -> bool:
    """A channel the app may publish to: any channel, or a signed-in user's."""
    return is_valid_channel(value) or is_user_channel(value)


def bounded_int(text: str, digits: int) -> int | None:
    """text as a whole number when it is 1 to digits ASCII digits, else None. Every number
    from outside goes through here: int() of 4,300 digits or more raises, and never a 500."""
    if 0 < len(text) <= digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def new_board_id() -> str:
    """A random id for a board page, in the seed's form: 10 of A-Z 0-9."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(10))


class CloseCode(enum.IntEnum):
    """The WebSocket close codes wsboard sends (RFC 6455 7.4.1, and its own 4000)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    KICKED = 4000  # wsboard.js does not reconnect after it
    TOKEN_EXPIRED = 4001  # its token's exp passed, or its refresh was refused


# The codes a JSON kick may ask for: the ones a server may send for a reason of its own.
KICK_CODES = frozenset({1000, 1001, 1008, 1011, 1012, 1013} | set(range(4000, 5000)))


class EndReason(enum.Enum):
    """Why a socket's session ended: a bounded set (for counting), each with its log text."""

    CLIENT_CLOSED = "closed by client"
    CONNECTION_LOST = "connection lost"
    PING_TIMEOUT = "ping timeout"
    IDLE_TIMEOUT = "idle timeout"
    QUEUE_FULL = "send queue full"
    WRITE_TIMEOUT = "write timed out"
    MESSAGE_TOO_BIG = "message too big"
    PROTOCOL_ERROR = "protocol error"
    INVALID_UTF8 = "invalid UTF-8"
    RATE_LIMITED = "too many messages"
    KICKED = "kicked"
    SHUTDOWN = "server shutdown"
    TOKEN_EXPIRED = "token expired"
    BACKPLANE_LOST = "backplane lost"  # --redis-lost-timeout: reconnect to a linked process


# Answers every front end gives in the same words.
CLIENT_NOT_FOUND = "Client Not Found"  # the seed's answer: no open socket has that id
TIMEOUT = "Timeout"  # with --redis: a process that holds the target did not confirm in time
UNAVAILABLE = "Backplane Unavailable"  # with --redis: Redis cannot be reached
INTERNAL_ERROR = "Internal error"  # a bug: logged with its traceback, never a polite success
HISTORY_OFF = "History is off for this channel"  # POSITION or history without --history


class Refused(Exception):
    """An operation not carried out, for a reason its caller is told as it is. One family
    for every front end: a control line answers ERROR <reason>, a JSON op {"ok": false,
    "error": reason}, a web route its JSON error. Any other exception is a bug."""


class BadRequest(Refused):
    """Input that cannot be carried out as given (HTTP 400)."""


class PayloadTooLarge(BadRequest):
    """Data over a size limit (HTTP 413)."""


class NotFound(Refused):
    """No open socket has that id (or connection id)."""

    def __init__(self, reason: str = CLIENT_NOT_FOUND) -> None:
        super().__init__(reason)


class LimitReached(Refused):
    """A socket already in its limit of channels."""


class BackplaneError(Refused):
    """With --redis, an answer that cannot be known: TIMEOUT or UNAVAILABLE."""


class Refusal(NamedTuple):
    """Why a request, handshake or control connection is turned away: one shape for all."""

    status: int  # the HTTP status it is (a control connection is told only the reason)
    reason: str  # told to the client and logged
    kind: str  # the counter it is counted under
    headers: tuple = ()


class Closing(NamedTuple):
    """A refusal a protocol tells inside the socket, after its 101 (Pusher's 4xxx codes)."""

    code: int  # the close code
    reason: str  # told to the client and logged
    kind: str  # the counter it is counted under


###############################################################################
# Security ####################################################################
###############################################################################
# Small pure checks, each answering "why is this refused?" with a reason or None. The
# handshake, the admin routes and the control socket call them at their edges.

# Signed client ids (the token scheme, mint_token, signed_query) live in wsboard_client,
# the standard-library client, and are imported above: one home for server and clients.


def token_refusal(
    secret: bytes,
    client_id: str,
    exp: str,
    token: str,
    now: float,
    private: Sequence[str] = (),
) -> str | None:
    if not exp or not token:
        return "a signed id needs exp and token"
    expires = bounded_int(exp, 12)
    if expires is None:
        return "exp must be a Unix time"
    if expires < now:
        return "token expired"
    expected = mint_token(secret, client_id, expires, private).encode()
    # Hex in either case: PHP's hash_hmac gives lowercase, other tools may not.
    if not hmac.compare_digest(expected, token.lower().encode("utf-8", "surrogateescape")):
        if private:
            return "token does not match (it must sign the private and presence channels too)"
        return "token does not match"
    return None


# The connect hook: with --connect-url the app decides who connects, from the browser's own
# cookies (the PHP session), so no token rides in the URL. Its answer is input like any other.

HOOK_FAILED = "Connect hook failed"  # a 503: the app did not answer as it must
MAX_HOOK_ANSWER = 65536  # bytes of the app's answer read at most


class HookDecision(NamedTuple):
    """What the app answered for one handshake."""

    client_id: str
    channels: tuple
    meta: dict | None
    exp: str  # unix seconds as text, "" for none


def connect_hook_request(hs: "Handshake", path: str) -> bytes:
    """The JSON body the hook gets: what the browser asked, and from where."""
    request = {
        "id": hs.client_id or None,
        "channels": list(hs.channels),
        "peer": hs.peer,
        "origin": hs.origin,
        "path": path,
    }
    return compact_json(request).encode()


def hook_reason(body: bytes) -> str:
    """The app's reason for a refusal: a JSON "reason" or "error", else its text, printable
    and short."""
    text = body[:1000].decode("utf-8", "replace")
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            text = str(value.get("reason") or value.get("error") or "")
    except ValueError:
        pass
    shown = "".join(c for c in text if c.isprintable()).strip()[:200]
    return shown or "no reason given"


def hook_decision(status: int, body: bytes, max_channels: int) -> "HookDecision | Refusal":
    """The app's answer as a decision, or the Refusal it is (403 when the app said no, 503
    when it did not answer as it must)."""
    if status in (401, 403):
        return Refusal(403, f"Refused by the app: {hook_reason(body)}", "hook")
    if status != 200:
        return Refusal(503, f"{HOOK_FAILED} (status {status})", "hook_error")
    try:
        answer = strict_json(body)
    except BadRequest:
        answer = None
    why = ""
    if not isinstance(answer, dict):
        why = "not a JSON object"
    elif not is_valid_client_id(answer.get("id")):
        why = '"id" is not a client id'
    elif (
        not isinstance(answer.get("channels", []), list)
        or len(answer.get("channels", [])) > max_channels
    ):
        why = f'"channels" is not a list of at most {max_channels}'
    elif not all(is_valid_channel(c) for c in answer.get("channels", [])):
        why = '"channels" holds an invalid channel name'
    elif answer.get("meta") is not None and (
        not isinstance(answer["meta"], dict) or len(compact_json(answer["meta"])) > MAX_META_BYTES
    ):
        why = f'"meta" is not a JSON object of at most {MAX_META_BYTES} bytes'
    elif "exp" in answer and (
        isinstance(answer["exp"], bool)
        or not isinstance(answer["exp"], int)
        or not 0 < answer["exp"] < 10**12
    ):
        why = '"exp" is not a Unix time'
    if why:
        return Refusal(503, f"{HOOK_FAILED}: its answer's {why}", "hook_error")
    channels = tuple(dict.fromkeys(answer.get("channels", [])))
    exp = str(answer["exp"]) if "exp" in answer else ""
    return HookDecision(answer["id"], channels, answer.get("meta"), exp)


def granted(hs: "Handshake", decision: HookDecision, path: str) -> "Handshake | Refusal":
    """hs as the app decided: its id, its channels and the URL's public ones; a private or
    presence channel in the URL that the app did not grant is refused."""
    for channel in private_channels(hs.channels):
        if channel not in decision.channels:
            return Refusal(403, f"Channel {channel!r} not granted by the app", "hook")
    channels = tuple(dict.fromkeys((*decision.channels, *hs.channels)))
    return hs._replace(
        client_id=decision.client_id,
        channels=channels,
        meta=decision.meta,
        exp=decision.exp,
        token="",
    )


def ask_connect_hook(
    cfg: "Config", hs: "Handshake", environ: Mapping[str, str], path: str
) -> "Handshake | Refusal":
    """POST the handshake to --connect-url with the browser's Cookie (and the headers
    --connect-headers names); hs as the app decided, or the Refusal."""
    url = urlsplit(cfg.connect_url)
    headers = {"Content-Type": "application/json", "Connection": "close"}
    for name in ("Cookie", *cfg.connect_headers):
        value = environ.get("HTTP_" + name.upper().replace("-", "_"))
        if value:
            headers[name] = value
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    late = TimeoutError(f"no answer in {cfg.connect_timeout:g} s")
    connection = kind(url.hostname, url.port, timeout=cfg.connect_timeout)
    try:
        with gevent.Timeout(cfg.connect_timeout, late):
            connection.request("POST", target, connect_hook_request(hs, path), headers)
            response = connection.getresponse()
            body = response.read(MAX_HOOK_ANSWER + 1)
    except (OSError, http.client.HTTPException, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        return Refusal(503, f"{HOOK_FAILED}: {reason[:100]}", "hook_error")
    finally:
        connection.close()
    if len(body) > MAX_HOOK_ANSWER:
        return Refusal(
            503, f"{HOOK_FAILED}: an answer of more than {MAX_HOOK_ANSWER} bytes", "hook_error"
        )
    decision = hook_decision(response.status, body, cfg.max_channels_per_socket)
    if isinstance(decision, Refusal):
        return decision
    return granted(hs, decision, path)


# Origins and hosts: browsers send an Origin with every WebSocket handshake; other clients
# may send none. A Host is only believed when it cannot be an attacker's rebound name.

DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _host_port(netloc: str, scheme: str) -> tuple | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        return (parts.hostname or "", parts.port or DEFAULT_PORTS.get(scheme, 0))
    except ValueError:
        return None


def host_trusted(host: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether a Host header names this server in a way DNS rebinding cannot fake: an IP
    address, localhost, or a name the operator listed."""
    parts = _host_port(host.strip().lower(), "http")
    if parts is None or not parts[0]:
        return False
    name = parts[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost"):
        return True
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in allowed_hosts)


def origin_allowed(
    origin: str | None, host: str, patterns: Sequence[str], allowed_hosts: Sequence[str] = ()
) -> bool:
    """Whether a handshake's Origin may connect: listed patterns, else the request's own
    host, when that host is one a rebound name cannot pose as."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    if patterns:
        return any(fnmatch.fnmatchcase(origin, p.lower()) for p in patterns)
    scheme, _, netloc = origin.partition("://")
    if not netloc or "/" in netloc or scheme not in DEFAULT_PORTS:
        return False
    mine = _host_port(host.lower(), scheme)
    return (
        mine is not None
        and _host_port(netloc, scheme) == mine
        and host_trusted(host, allowed_hosts)
    )


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
        prefix, iterations, salt, digest = stored.split("$")
        if prefix + "$" != HASH_PREFIX or not (1 <= int(iterations) <= 10_000_000):
            return None
        salt, digest = bytes.fromhex(salt), bytes.fromhex(digest)
        return (int(iterations), salt, digest) if salt and len(digest) == 32 else None
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
    while trusted and hops and in_networks(ip, trusted):
        ip = hops.pop()
    return ip


def in_networks(ip: str, networks: Sequence) -> bool:
    if not networks:  # the usual case, asked at every request: no address to parse
        return False
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


def control_socket_path(setting: str, uid: int | None = None, environ: Mapping = os.environ) -> str:
    """Where the control socket goes. 'auto' picks a directory no other user can write to,
    so nobody can take the path first and receive what the app sends."""
    if setting != AUTO_CONTROL:
        return setting
    uid = os.getuid() if uid is None else uid
    candidates = ["/run/wsboard"]
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        candidates.append(runtime)
    candidates.append(f"/tmp/wsboard-{uid}")
    for directory in candidates:
        if private_directory(directory, uid, make=directory != runtime):
            return os.path.join(directory, "wsboard.sock")
    raise ConfigError(
        "no private directory for the control socket (tried " + ", ".join(candidates) + "); "
        "give --control PATH"
    )


def private_directory(path: str, uid: int, make: bool) -> bool:
    """Whether path is (or, with make, now is) a directory that only uid or root can write."""
    if make:
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid in (uid, 0)
        and not info.st_mode & 0o022
        and os.access(path, os.W_OK | os.X_OK)
    )


def directory_refusal(path: str) -> str | None:
    """Why the control socket's directory is unsafe (anyone may replace our socket), or None."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(directory)
    except OSError:
        return None  # bind() will say what is wrong
    if info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
        return f"{directory} is writable by everyone without the sticky bit"
    return None


def directory_warning(path: str) -> str | None:
    """A shared directory (like /tmp) where another user may take the path first."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(directory)
    except OSError:
        return None
    if info.st_mode & 0o002:
        return (
            f"the control socket is in {directory}, which every user can write to: another "
            "user could take the path first and receive what your app sends; use a private "
            "directory such as /run/wsboard (and note PHP-FPM's PrivateTmp hides /tmp sockets)"
        )
    return None


###############################################################################
# WebSocket adapter ###########################################################
###############################################################################
# gevent-websocket 0.10.1 is unmaintained; its known defects are mended here and only
# here (see docs/design.md): one writer per socket with a bounded backlog and a write
# timeout, inbound size capped before the payload is read, close frames that carry their
# code, a deadline on the whole request head, and refusals with a real HTTP status
# before any 101.

WEBSOCKET_PATH = "/websocket"
EVENTS_PATH = "/events"  # the same sockets as an event stream, for where WebSockets cannot go
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL = "wsboard.v1"  # frames become {"seq": n, "data": text}; see docs/protocol.md

OPCODE_TEXT = 0x1
OPCODE_CLOSE = 0x8
PING_FRAME = b"\x89\x00"  # an empty ping, the same bytes for every socket
MASKED_EMPTY_PONG_HEAD = b"\x8a\x80"  # how a client's answer to it begins (4 mask bytes follow)
FLUSH_BYTES = 256 * 1024  # queued frames joined into one write, up to this size


class MessageTooBig(WebSocketError):
    """A browser sent more than max_message bytes in one message."""


class WriteTimedOut(WebSocketError):
    """A socket did not take our bytes within write_timeout."""


class QueueFull(WebSocketError):
    """A socket's backlog is over queue_messages or queue_bytes: it cannot keep up."""


SHORT_TEXT_HEADS = [bytes((0x80 | OPCODE_TEXT, size)) for size in range(126)]  # made once


def text_frame(text: str) -> bytes:
    """One unmasked, final text frame, as a server sends it."""
    payload = text.encode("utf-8")
    size = len(payload)
    if size < 126:
        return SHORT_TEXT_HEADS[size] + payload
    if size < 0x10000:
        return struct.pack("!BBH", 0x80 | OPCODE_TEXT, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | OPCODE_TEXT, 127, size) + payload


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
    return struct.pack("!H", int(code)) + reason


def close_frame(code: int, reason: str) -> bytes:
    """One unmasked close frame, as a server sends it."""
    payload = close_payload(code, reason)
    return bytes(Header.encode_header(True, OPCODE_CLOSE, b"", len(payload), 0)) + payload


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR a client's payload with its 4-byte mask, at C speed via big integers."""
    length = len(payload)
    if not length:
        return b""
    key = (bytes(mask) * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")


def websocket_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()).decode()


def upgrade_response(key: str, subprotocol: str, deflate: int = 0) -> bytes:
    """The 101 that opens a WebSocket, written by us so nothing can come before it."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Accept: " + websocket_accept(key),
    ]
    if subprotocol:
        lines.append("Sec-WebSocket-Protocol: " + subprotocol)
    if deflate:
        lines.append("Sec-WebSocket-Extensions: " + deflate_answer(deflate))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


# permessage-deflate (RFC 7692), always without context takeover either way: a message is
# deflated on its own, so one broadcast is deflated once for every socket, and a socket
# keeps no compressor (nor inflater) between messages.

DEFLATE = "permessage-deflate"
DEFLATE_TAIL = b"\x00\x00\xff\xff"  # what a sync flush ends with, left off on the wire
RSV1 = Header.RSV0_MASK  # gevent-websocket counts the reserved bits from 0


def deflate_offer(header: str) -> int:
    """The window bits to deflate with for the first permessage-deflate offer in a
    Sec-WebSocket-Extensions header we can take; 0: none. An offer with an unknown, repeated
    or malformed parameter is declined (RFC 7692, 5); so is a window of 8, which zlib cannot
    keep to."""
    for offer in header.split(","):
        name, *params = (part.strip() for part in offer.split(";"))
        if name != DEFLATE:
            continue
        seen: set = set()
        bits = 15
        for param in params:
            key, has_value, value = (p.strip().strip('"') for p in param.partition("="))
            if key in seen:
                break
            seen.add(key)
            if (
                key in ("server_no_context_takeover", "client_no_context_takeover")
                and not has_value
            ):
                continue
            if key == "client_max_window_bits" and (not has_value or value in WINDOW_BITS):
                continue  # we inflate every message on its own, with any window
            if key == "server_max_window_bits" and value in WINDOW_BITS and value != "8":
                bits = int(value)
                continue
            break  # an unknown or malformed parameter: not this offer
        else:
            return bits
    return 0


WINDOW_BITS = frozenset(str(n) for n in range(8, 16))


def deflate_answer(bits: int) -> str:
    """The Sec-WebSocket-Extensions of a 101 that agreed to deflate with bits."""
    answer = f"{DEFLATE}; server_no_context_takeover; client_no_context_takeover"
    return answer + (f"; server_max_window_bits={bits}" if bits != 15 else "")


def deflated(payload: bytes, bits: int) -> bytes:
    """payload as one message's deflate block, with no dictionary from any earlier one."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -bits)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[: -len(DEFLATE_TAIL)] if data.endswith(DEFLATE_TAIL) else data


def inflated(data: bytes, limit: int) -> bytes:
    """A compressed message as it was, or MessageTooBig past limit bytes (a deflate bomb
    stops there), or ProtocolError when it is not deflate data."""
    inflater = zlib.decompressobj(-15)
    try:
        message = inflater.decompress(data + DEFLATE_TAIL, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"a compressed message that does not inflate: {exc}") from None
    if len(message) > limit or inflater.unconsumed_tail:
        raise MessageTooBig(f"message of more than {limit} bytes once inflated")
    return message


def compressed_frame(frame: bytes, bits: int, min_size: int) -> bytes:
    """A whole unmasked data frame (as a Framing makes it) deflated, with RSV1 set; as it
    is when its payload is under min_size."""
    length, start = frame[1] & 0x7F, 2
    if length == 126:
        start = 4
    elif length == 127:
        start = 10
    payload = frame[start:]
    if len(payload) < min_size:
        return frame
    data = deflated(payload, bits)
    return bytes(Header.encode_header(True, frame[0] & 0x0F, b"", len(data), RSV1)) + data


def http_response(status: int, reason: str, headers: Iterable = ()) -> bytes:
    """A whole plain-text HTTP/1.1 answer that closes the connection."""
    body = (reason + "\n").encode("utf-8")
    head = [
        f"HTTP/1.1 {status} {HTTP_STATUS.get(status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


HTTP_STATUS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    404: "Not Found",
    415: "Unsupported Media Type",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
}


def format_peer(address: object) -> str:
    """host:port for a TCP peer ([host]:port for IPv6), '-' where there is none."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "-"


RESUME_RULE = "epoch is 1-16 hex digits and last 1-16 digits"
SINCE_RULE = "<channel>:<epoch>:<offset>, the epoch 1-16 hex digits, the offset 1-16 digits"
LAST_EVENT_ID_RULE = "what the stream's id: lines said, <epoch>:<seq>|<channel>:<epoch>:<offset>..."


def resume_point(epoch: str, last: str) -> "tuple | Refusal":
    """(epoch, last seq) a reconnecting v1 client gave, ("", 0) when it gave none, or the
    Refusal of a malformed one."""
    if not epoch and not last:
        return "", 0
    seq = bounded_int(last, 16)
    if not re.fullmatch(r"[0-9a-f]{1,16}", epoch) or seq is None:
        return Refusal(400, f"Invalid resume point: {RESUME_RULE}", "handshake")
    return epoch, seq


class Handshake(NamedTuple):
    """An upgrade request to /websocket, parsed once for the checks and the connection."""

    client_id: str
    ip: str  # the browser's address (X-Forwarded-For from a trusted proxy)
    peer: str  # host:port as LIST shows it: the browser's address, our peer's port
    origin: str | None
    host: str
    key: str
    subprotocol: str  # the one we agreed to, or ''
    exp: str
    token: str
    epoch: str
    last: int
    channels: tuple = ()  # joined before the 101, in the order the URL names them
    since: tuple = ()  # (channel, epoch, offset) each: where a resume of that channel starts
    meta: dict | None = None  # what --connect-url's app attached to the id
    expires: int | None = None  # when its token (or the app's answer) runs out: it closes then
    deflate: int = 0  # permessage-deflate agreed: our window bits (9-15); 0: none


def parse_channels(names: Sequence[str], limit: int) -> "tuple | Refusal":
    """The channel= names of an upgrade, or the Refusal of a bad or oversized list."""
    if len(names) > limit:
        return Refusal(400, f"Too many channels (limit {limit})", "bad_channel")
    for name in names:
        if not is_valid_channel(name):
            shown = name[:40] + ("…" if len(name) > 40 else "")
            return Refusal(400, f"Invalid channel name {shown!r}: {CHANNEL_RULE}", "bad_channel")
    return tuple(dict.fromkeys(names))


def parse_since(values: Sequence[str], limit: int) -> "tuple | Refusal":
    """The since= positions of an upgrade, (channel, epoch, offset) each, or the Refusal of
    a malformed one."""
    if len(values) > limit:
        return Refusal(400, f"Too many since positions (limit {limit})", "handshake")
    positions: dict = {}
    for value in values:
        channel, _, rest = value.partition(":")
        epoch, _, offset_text = rest.partition(":")
        offset = bounded_int(offset_text, 16)
        if not (
            is_valid_channel(channel)
            and re.fullmatch(r"[0-9a-f]{1,16}", epoch)
            and offset is not None
        ):
            shown = value[:60] + ("…" if len(value) > 60 else "")
            return Refusal(400, f"Invalid since {shown!r}: {SINCE_RULE}", "handshake")
        if channel in positions:
            return Refusal(400, f"since names channel {channel!r} twice", "handshake")
        positions[channel] = (channel, epoch, offset)
    return tuple(positions.values())


def parse_last_event_id(value: str, limit: int) -> "tuple | Refusal":
    """An event stream's Last-Event-ID, what its id: lines said (EventStreamFraming): the
    inbox's "<epoch>:<seq>" (empty without an inbox), then "|<channel>:<epoch>:<offset>" for
    each channel; as (epoch, last seq, since), or the Refusal of a malformed one."""
    inbox, *channels = value.split("|")
    epoch, _, last = inbox.partition(":")
    resume = resume_point(epoch, last)
    since = parse_since(channels, limit)
    if isinstance(resume, Refusal) or isinstance(since, Refusal):
        return Refusal(400, f"Invalid Last-Event-ID: {LAST_EVENT_ID_RULE}", "handshake")
    return (*resume, since)


def parse_handshake(
    environ: Mapping[str, str],
    http_version: str,
    address: object,
    trusted: Sequence,
    max_channels: int = 100,
    client_id: str | None = None,
    websocket: bool = True,
    id_optional: bool = False,
) -> "Handshake | Refusal":
    """The upgrade request as a Handshake, or the Refusal of a malformed one. client_id:
    the socket's id is given (a Pusher socket's is its socket id), not read from the URL.
    websocket=False: an event stream's GET, which resumes from its Last-Event-ID."""
    if not websocket:
        return parse_stream_request(
            environ, http_version, address, trusted, max_channels, id_optional
        )
    if environ.get("REQUEST_METHOD") != "GET" or http_version != "HTTP/1.1":
        return Refusal(400, "WebSocket upgrades need GET over HTTP/1.1", "handshake")
    if "upgrade" not in environ.get("HTTP_CONNECTION", "").lower():
        return Refusal(400, "Connection: Upgrade header missing", "handshake")
    if environ.get("CONTENT_LENGTH", "0") not in ("", "0") or environ.get("HTTP_TRANSFER_ENCODING"):
        return Refusal(400, "An upgrade request has no body", "handshake")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return Refusal(426, "Only WebSocket version 13 is supported", "handshake")
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        raw_key = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw_key = b""
    if len(raw_key) != 16:
        return Refusal(400, "Sec-WebSocket-Key must be 16 bytes in base64", "handshake")
    offered = environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "")
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in (p.strip() for p in offered.split(",")) else ""
    hs = parsed_query(
        environ, address, trusted, max_channels, client_id, key, subprotocol, id_optional
    )
    extensions = environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS", "")
    if isinstance(hs, Refusal) or not extensions:
        return hs
    return hs._replace(deflate=deflate_offer(extensions[:4096]))


def parse_stream_request(
    environ: Mapping[str, str],
    http_version: str,
    address: object,
    trusted: Sequence,
    max_channels: int,
    id_optional: bool = False,
) -> "Handshake | Refusal":
    """An event stream's request (GET /events?…) as a Handshake, or its Refusal."""
    if environ.get("REQUEST_METHOD") != "GET" or http_version not in ("HTTP/1.0", "HTTP/1.1"):
        return Refusal(400, "An event stream is a GET over HTTP/1.x", "handshake")
    if environ.get("CONTENT_LENGTH", "0") not in ("", "0") or environ.get("HTTP_TRANSFER_ENCODING"):
        return Refusal(400, "An event stream's request has no body", "handshake")
    hs = parsed_query(environ, address, trusted, max_channels, None, "", "", id_optional)
    last_event_id = environ.get("HTTP_LAST_EVENT_ID", "")
    if isinstance(hs, Refusal) or not last_event_id:
        return hs
    resume = parse_last_event_id(last_event_id, max_channels)  # where it was: it wins
    if isinstance(resume, Refusal):
        return resume
    epoch, last, since = resume
    return hs._replace(epoch=epoch, last=last, since=since)


def parsed_query(
    environ: Mapping[str, str],
    address: object,
    trusted: Sequence,
    max_channels: int,
    client_id: str | None,
    key: str,
    subprotocol: str,
    id_optional: bool = False,
) -> "Handshake | Refusal":
    """What a socket's URL asks (its id, channels, resume points and token) as a Handshake.
    id_optional: the connect hook gives the id, so the URL may leave it out."""
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    ids = query.get("id", []) if client_id is None else [client_id]
    if id_optional and not ids:
        ids = [""]
    elif len(ids) != 1 or not is_valid_client_id(ids[0]):
        return Refusal(400, f"Invalid client id: give exactly one id of {CLIENT_ID_RULE}", "bad_id")
    channels = parse_channels(query.get("channel", []) if client_id is None else [], max_channels)
    if isinstance(channels, Refusal):
        return channels
    ip = client_ip(environ, trusted)
    port = address[1] if isinstance(address, tuple) and len(address) >= 2 else 0
    resume = resume_point(query.get("epoch", [""])[0], query.get("last", [""])[0])
    if isinstance(resume, Refusal):
        return resume
    epoch, last = resume
    since = parse_since(query.get("since", []) if client_id is None else [], max_channels)
    if isinstance(since, Refusal):
        return since
    return Handshake(
        client_id=ids[0],
        ip=ip,
        peer=format_peer((ip, port)) if ip else format_peer(address),
        origin=environ.get("HTTP_ORIGIN"),
        host=environ.get("HTTP_HOST", ""),
        key=key,
        subprotocol=subprotocol,
        exp=query.get("exp", [""])[0],
        token=query.get("token", [""])[0],
        epoch=epoch,
        last=last,
        channels=channels,
        since=since,
    )


def access_refusal(hs: Handshake, cfg: Config, now: float, signed: bool = True) -> Refusal | None:
    """Why a well-formed upgrade may not connect (origin, signature unless not signed: a
    Pusher socket's channels are signed one by one), or None."""
    if not origin_allowed(hs.origin, hs.host, cfg.allowed_origins, cfg.allowed_hosts):
        return Refusal(403, "Origin not allowed", "origin")
    if cfg.secret_key and signed:
        private = private_channels(hs.channels)
        reason = signed_refusal(cfg, hs.client_id, hs.exp, hs.token, now, private)
        if reason:
            return Refusal(403, "Signed id refused: " + reason, "token")
    return None


def signed_refusal(
    cfg: "Config", client_id: str, exp: str, token: str, now: float, private: Sequence[str]
) -> str | None:
    """Why a token does not sign client_id (and its private channels) until exp, with the
    current secret or, while it is set, the previous one; None: it does."""
    reason = token_refusal(cfg.secret_key, client_id, exp, token, now, private)
    if reason and cfg.previous_key:
        if token_refusal(cfg.previous_key, client_id, exp, token, now, private) is None:
            return None
    return reason


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


NOTHING = object()  # what receive() gives for frames that were no message (a ping, a pong)


class BoardSocket(_GeventWebSocket):
    """gevent-websocket's WebSocket with its write, read-limit and close defects mended.

    There is one writer: writes go straight to the kernel while the socket takes them; only
    under backpressure do frames wait in a bounded backlog, drained by a flusher greenlet
    that lives only while there is a backlog. So a sender never blocks on a slow browser,
    two greenlets never write at once, and an idle socket costs no greenlet for writing.
    Until open() the backlog holds everything, so nothing goes out before the 101.
    """

    __slots__ = (
        "sock",
        "raw",
        "cfg",
        "message_size",
        "backlog",
        "backlog_bytes",
        "half_close_after_flush",
        "finished",
        "pong_due",
        "end_reason",
        "end_detail",
        "rate_start",
        "rate_count",
        "protocol",
        "watcher",
        "heard_at",
    )

    allowed_flags = 0  # reserved bits a frame may carry: none, unless an extension says

    def __init__(
        self, sock: socket.socket, reader: SocketReader, cfg: Config, protocol: "SocketProtocol"
    ) -> None:
        # The stock __init__ wants a handler and its stream; ours reads and writes the socket.
        self.environ = self.handler = None
        self.closed = False
        self.stream = reader
        self.raw_read = reader.read
        self.utf8validator = Utf8Validator()
        self.sock = sock
        # gevent's socket has a __getattr__, so every read of its _sock took the slow path
        self.raw = getattr(sock, "_sock", sock)
        self.cfg = cfg
        self.message_size = 0
        self.backlog: collections.deque | None = collections.deque()  # held until open()
        self.backlog_bytes = 0
        self.half_close_after_flush = False
        self.finished = False  # the peer closed or the connection broke: nothing more to read
        self.pong_due = 0.0  # when an unanswered ping was sent (monotonic), 0 when none
        self.end_reason = EndReason.CONNECTION_LOST
        self.end_detail = ""
        self.rate_start = 0.0
        self.rate_count = 0
        self.protocol = protocol  # what kind of socket it is: its close codes, its messages
        self.watcher: object = None  # the read watcher that starts its session's reads
        self.heard_at = time.monotonic()  # when its last message came (idle timeout)

    @property
    def end_text(self) -> str:
        """Why the session ended, as the log and watch events say it."""
        return self.end_detail or self.end_reason.value

    def ended(self, reason: EndReason, detail: str = "") -> None:
        self.end_reason, self.end_detail = reason, detail

    def open(self, frames: list) -> None:
        """Write frames (the 101 and what must precede every message), then what waited."""
        held, self.backlog, self.backlog_bytes = self.backlog, None, 0
        self.write_frames(frames + list(held))

    def write_frames(self, frames: list) -> None:
        """Write several frames in one send() where the kernel takes them; queue the rest
        frame by frame, so a bound cuts between frames, never inside one."""
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        if self.backlog is not None:  # nothing of it is sent yet: it waits as one block
            self._write(data)
            return
        sent = self._send_now(data)
        if sent == len(data):
            return
        index = 0
        while sent >= len(frames[index]):  # skip the frames the kernel took whole
            sent -= len(frames[index])
            index += 1
        self._start_backlog(frames[index][sent:])
        if index + 1 < len(frames):
            self._write(b"".join(frames[index + 1 :]))

    def _send_now(self, data: bytes) -> int:
        """What the kernel takes of data without waiting."""
        try:  # gevent's socket wraps a non-blocking one: asked directly, no wrapper per frame
            return self.raw.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise WebSocketError(f"Socket is dead: {exc}") from None

    def _start_backlog(self, rest: bytes) -> None:
        """Queue the rest of a frame the kernel took in part: it goes whole, past any bound."""
        self.backlog = collections.deque([rest] if rest else [])
        self.backlog_bytes = len(rest)
        gevent.spawn(self._flush)

    def _write(self, data: bytes) -> None:
        """Write now if the kernel takes it all; else queue the rest, within the bounds."""
        if self.backlog is None:
            try:  # _send_now, inline: a broadcast pays this for every socket
                sent = self.raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise WebSocketError(f"Socket is dead: {exc}") from None
            if sent == len(data):
                return
            if sent:  # a frame begun must be finished, whatever the bounds say
                self._start_backlog(data[sent:])
                return
            self._start_backlog(b"")
        if (
            len(self.backlog) >= self.cfg.queue_messages
            or self.backlog_bytes + len(data) > self.cfg.queue_bytes
        ):
            self._overflow()
            raise QueueFull("send queue full")
        self.backlog.append(data)
        self.backlog_bytes += len(data)

    # The stock send_frame writes through raw_write: a method here, not the bound method the
    # stock __init__ keeps on the socket (a cycle: a closed socket waited for the collector).
    raw_write = _write

    def _flush(self) -> None:
        """Drain the backlog with blocking writes, each within write_timeout, then go idle."""
        backlog = self.backlog
        try:
            while backlog:
                chunk = [backlog.popleft()]  # what waits goes out in as few writes as it can
                size = len(chunk[0])
                while backlog and size < FLUSH_BYTES:
                    chunk.append(backlog.popleft())
                    size += len(chunk[-1])
                self.backlog_bytes -= size
                limit = (
                    self.cfg.close_timeout
                    if self.half_close_after_flush
                    else self.cfg.write_timeout
                )
                with gevent.Timeout(limit, WriteTimedOut("write timed out")):
                    self.sock.sendall(chunk[0] if len(chunk) == 1 else b"".join(chunk))
        except WriteTimedOut:
            if not self.closed:
                self.ended(EndReason.WRITE_TIMEOUT)
            self.abort()
        except (OSError, WebSocketError) as exc:
            if not self.closed:
                self.ended(EndReason.CONNECTION_LOST, str(exc) or type(exc).__name__)
            self.abort()
        finally:
            if self.backlog is backlog:
                self.backlog = None
                self.backlog_bytes = 0
            if self.half_close_after_flush:  # FIN after our close frame, never a RST before it
                self.half_close_after_flush = False
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def ping(self, now: float) -> None:
        """A heartbeat: a ping its pong must answer within --ping-timeout."""
        self.pong_due = now
        self.send_frame_bytes(PING_FRAME)

    def closing_bytes(self, code: int, reason: str) -> bytes:
        """What ends the stream in its own form: a close frame."""
        return close_frame(self.protocol.close_code(code), reason)

    def _overflow(self) -> None:
        """Too slow to keep up: drop what it has not begun to receive, queue a 1013 close."""
        head = self.backlog[0] if self.backlog else None  # a begun frame's rest: keep it whole
        self.backlog.clear()
        if head is not None:
            self.backlog.append(head)
        self.backlog.append(
            self.closing_bytes(CloseCode.TRY_AGAIN_LATER, "too slow: send queue full")
        )
        self.backlog_bytes = sum(len(b) for b in self.backlog)
        self.ended(EndReason.QUEUE_FULL)
        self.closed = True
        self.half_close_after_flush = True
        gevent.spawn_later(self.cfg.close_timeout, self._close_timed_out)

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
        if header.flags & ~self.allowed_flags:
            raise ProtocolError("reserved bits set without a negotiated extension")
        if not header.mask:
            raise ProtocolError("client frames must be masked")
        if header.opcode in (0x0, 0x1, 0x2):
            self.message_size = header.length + (self.message_size if header.opcode == 0 else 0)
            if self.message_size > self.cfg.max_message:
                raise MessageTooBig(f"message of more than {self.cfg.max_message} bytes")
        if not header.length:
            return header, b""
        try:
            payload = self.raw_read(header.length)
        except OSError:
            payload = b""
        if len(payload) != header.length:
            raise WebSocketError("Unexpected EOF reading frame payload")
        return header, unmask(payload, header.mask)

    def read_message(self) -> object:
        """The next message, as the stock read_message reads it, except that a ping or pong
        outside a message gives NOTHING when no more bytes are here: the reading greenlet
        then ends, and an idle socket parks none between heartbeats."""
        opcode = None
        compressed = False  # permessage-deflate: RSV1 on a message's first frame alone
        message = bytearray()
        while True:
            header, payload = self.read_frame()
            f_opcode = header.opcode
            if header.flags and f_opcode not in (self.OPCODE_TEXT, self.OPCODE_BINARY):
                raise ProtocolError("RSV1 is for the first frame of a message")
            if f_opcode in (self.OPCODE_TEXT, self.OPCODE_BINARY):
                if opcode:
                    raise ProtocolError(f"expected a continuation frame, got opcode {f_opcode}")
                self.utf8validator.reset()
                self.utf8validate_last = (True, True, 0, 0)
                opcode = f_opcode
                compressed = bool(header.flags)
            elif f_opcode == self.OPCODE_CONTINUATION:
                if not opcode:
                    raise ProtocolError("Unexpected frame with opcode=0")
            elif f_opcode in (self.OPCODE_PING, self.OPCODE_PONG):
                if f_opcode == self.OPCODE_PING:
                    self.handle_ping(header, payload)
                else:
                    self.handle_pong(header, payload)
                if opcode is None and not self.stream.pending:
                    return NOTHING
                continue
            elif f_opcode == self.OPCODE_CLOSE:
                self.handle_close(header, payload)
                return None
            else:
                raise ProtocolError(f"Unexpected opcode={f_opcode!r}")
            if opcode == self.OPCODE_TEXT and not compressed:
                self.validate_utf8(payload)
            message += payload
            if header.fin:
                break
        if compressed:
            message = bytearray(inflated(bytes(message), self.cfg.max_message))
        if opcode == self.OPCODE_TEXT:
            self.validate_utf8(message)
            return self._decode_bytes(message)
        return message

    def handle_close(self, header: Header, payload: bytes) -> None:
        self.finished = True
        if not self.closed:  # the client spoke first; when we did, our reason stands
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            self.ended(EndReason.CLIENT_CLOSED, f"closed by client ({code})" if code else "")
        super().handle_close(header, payload)

    def handle_pong(self, header: Header, payload: bytes) -> None:
        self.pong_due = 0.0

    def took_lone_pong(self) -> bool:
        """Read what waits, up to a pong's 6 bytes, without blocking: True when it was an
        empty masked pong (the answer to PING_FRAME), taken as receive() takes one. Else
        what was read waits in the stream for the reading greenlet, which meets it first."""
        if self.finished or self.stream.pending:
            return False
        try:
            data = self.raw.recv(6)
        except BlockingIOError:
            return True  # nothing after all: the watcher waits on
        except OSError:
            return False  # the reading greenlet meets the error (or EOF) and ends the session
        if len(data) < 6 or data[:2] != MASKED_EMPTY_PONG_HEAD:
            self.stream.pending = data
            return False
        self.pong_due = 0.0
        self.heard_at = time.monotonic()
        return True

    def handle_ping(self, header: Header, payload: bytes) -> None:
        if not self.closed:  # after our close frame we send nothing more (RFC 6455, 5.5.1)
            super().handle_ping(header, payload)

    class _NoApp:
        """gevent-websocket reports closes to current_app.on_close(); wsboard needs no report."""

        @staticmethod
        def on_close(*args: object) -> None:
            pass

    current_app = _NoApp()
    logger = log

    def receive(self) -> object | None:
        """The next message (NOTHING for a lone ping or pong, and for whatever comes after
        our close frame), or None once the peer has closed or the connection is gone.

        After we send a close frame we go on reading, so the peer can answer it, but drop
        every message: a browser past a limit gets nothing more done for it. A close we
        start is bounded by close_timeout.
        """
        if self.finished:
            return None
        try:
            message = self.read_message()
            self.pong_due = 0.0  # any frame shows the peer is alive
            self.heard_at = time.monotonic()
            if message is None or message is NOTHING:
                return message
            if self.closed:  # after our close frame nothing it sends is acted on (RFC 6455 5.5.1)
                return NOTHING
            if self.over_rate():
                self.end(EndReason.RATE_LIMITED, CloseCode.POLICY, "too many messages")
                return NOTHING  # read on until the peer answers our close
            return message
        except MessageTooBig:
            self.end(EndReason.MESSAGE_TOO_BIG, CloseCode.MESSAGE_TOO_BIG, "message too big")
        except TimeoutError:
            self.end(EndReason.IDLE_TIMEOUT, CloseCode.NORMAL, "idle timeout")
        except UnicodeError:
            self.end(EndReason.INVALID_UTF8, CloseCode.INVALID_DATA, "invalid UTF-8")
        except ProtocolError:
            self.end(EndReason.PROTOCOL_ERROR, CloseCode.PROTOCOL_ERROR, "protocol error")
        except (OSError, WebSocketError):
            self.closed = True
        self.finished = True
        return None

    def over_rate(self) -> bool:
        """Count a message into its one-second window; True once the window is over the limit."""
        limit = self.cfg.max_client_rate
        if not limit:
            return False
        now = time.monotonic()
        if now - self.rate_start >= 1.0:
            self.rate_start, self.rate_count = now, 0
        self.rate_count += 1
        return self.rate_count > limit

    def end(self, reason: EndReason, code: int, told: str = "", detail: str = "") -> None:
        """Close with code, telling the peer told; the log and watchers get reason (and detail)."""
        if self.closed:
            return
        self.ended(reason, detail)
        self.close(code, told or reason.value)

    def close(self, code: int | None = CloseCode.NORMAL, message: object = b"") -> None:
        """Send a close frame with its code and reason (stock 0.10.1 drops the code)."""
        if self.closed:
            return
        if code is not None:
            code = self.protocol.close_code(code)
        try:
            self.send_frame(close_payload(code, message), self.OPCODE_CLOSE)
        except (OSError, WebSocketError):
            pass
        finally:
            self.closed = True
            if not self.finished:  # we spoke first: the peer gets close_timeout to answer
                gevent.spawn_later(self.cfg.close_timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        if not self.finished:
            self.abort()


class EventStream(BoardSocket):
    """A text/event-stream response (/events) as a socket: the same writer, bounds and
    timeouts as a WebSocket's. Nothing comes from the browser but the end of the connection;
    pings are comment lines that nothing answers (a stream that cannot be written for
    --write-timeout ends), and the end is an event: close, with a retry: that spreads the
    reconnects of a shutdown over --drain-window."""

    __slots__ = ()

    @property
    def heard_at(self) -> float:  # a stream is never idle: --idle-timeout is for sockets
        return time.monotonic()

    @heard_at.setter
    def heard_at(self, value: float) -> None:
        pass

    def receive(self) -> object | None:
        """NOTHING for bytes (a browser sends none: they are dropped), None at the end."""
        if self.finished:
            return None
        self.stream.pending = b""
        try:
            data = self.sock.recv(4096)
        except OSError:
            data = b""
        if data:
            return NOTHING
        self.finished = True
        if not self.closed:
            self.ended(EndReason.CLIENT_CLOSED, "closed by client")
        self.closed = True
        return None

    def took_lone_pong(self) -> bool:
        return False  # nothing a browser sends here is read as a frame

    def ping(self, now: float) -> None:
        self.send_frame_bytes(b": ping\n\n")

    def closing_bytes(self, code: int, reason: str) -> bytes:
        name = "expired" if code == CloseCode.TOKEN_EXPIRED else "close"
        lines = named_event(name, {"code": code, "reason": reason})
        if code in (CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART, CloseCode.TRY_AGAIN_LATER):
            spread = 1000 + secrets.randbelow(int(1000 * self.cfg.drain_window) + 1)
            lines = f"retry: {spread}\n".encode() + lines  # when to come back
        return lines

    def close(self, code: int | None = CloseCode.NORMAL, message: object = b"") -> None:
        """End the stream with event: close, then FIN; the browser has close_timeout to go."""
        if self.closed:
            return
        reason = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
        try:
            self._write(self.closing_bytes(code or CloseCode.NORMAL, reason))
        except (OSError, WebSocketError):
            pass
        finally:
            self.closed = True
            if self.backlog is None:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            else:
                self.half_close_after_flush = True
            if not self.finished:
                gevent.spawn_later(self.cfg.close_timeout, self._close_timed_out)


def named_event(name: str, value: object) -> bytes:
    """One event of an event stream with a name and JSON data."""
    return f"event: {name}\ndata: {json.dumps(value, separators=(',', ':'))}\n\n".encode()


def event_stream_head(origin: str | None) -> bytes:
    """The 200 that opens an event stream (its body never ends), written by us."""
    lines = [
        "HTTP/1.1 200 OK",
        "Content-Type: text/event-stream; charset=utf-8",
        "Cache-Control: no-cache",
        "X-Accel-Buffering: no",  # nginx: pass each event on at once
        "Connection: close",
    ]
    if origin:  # an allowed page of another origin: EventSource with credentials needs this
        lines += [
            f"Access-Control-Allow-Origin: {origin}",
            "Access-Control-Allow-Credentials: true",
            "Vary: Origin",
        ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class DeflateSocket(BoardSocket):
    """A BoardSocket that agreed to permessage-deflate: its messages may come deflated
    (RSV1 on a message's first frame, inflated within --max-message), and what it is sent
    whole is deflated past --compression-min. Only such sockets carry its one more slot."""

    __slots__ = ("deflate_bits",)
    allowed_flags = RSV1

    def send_frame(self, message: object, opcode: int) -> None:
        if opcode not in (self.OPCODE_TEXT, self.OPCODE_BINARY):
            super().send_frame(message, opcode)
            return
        payload = self._encode_bytes(message) if opcode == self.OPCODE_TEXT else bytes(message)
        frame = bytes(Header.encode_header(True, opcode, b"", len(payload), 0)) + payload
        self.send_frame_bytes(compressed_frame(frame, self.deflate_bits, self.cfg.compression_min))


def no_delay(sock: socket.socket) -> None:
    """Nagle off for a session's socket: a second small frame would otherwise wait for the
    ACK of the first, which a client's delayed ACK holds 40 ms (200 ms on Windows)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # gone already: its first write will say so
            pass


class WebSocketHandler(_GeventWebSocketHandler):
    """Checks each request's head against its deadline and its address's share, upgrades
    /websocket after checking the request, and hands the socket to the board's session.

    Everything else goes to the Bottle app. Refusals get a real status before any 101.
    """

    head_ip = ""  # the address whose pending head this request counts against, while it does
    head_deadline: gevent.Timeout | None = None

    def MessageClass(self, rfile: object, *args: object) -> OldMessage:  # noqa: N802 - pywsgi's name
        return parse_head(rfile)

    @property
    def board(self) -> "Board":
        return board_of(self.server.application)

    def handle(self) -> None:
        board = self.board
        address = self.client_address
        ip = address[0] if isinstance(address, tuple) and address else ""
        if not board.begin_head(ip):
            refusal = Refusal(
                503,
                f"Too many requests in progress from this address "
                f"(limit {board.cfg.max_handshakes_per_ip})",
                "handshakes",
            )
            board.refused(refusal.kind, "request from %s: %s", format_peer(address), refusal.reason)
            try:
                self.socket.sendall(http_response(refusal.status, refusal.reason))
            except OSError:
                pass
            self.socket.close()
            return
        self.head_ip = ip
        self.socket.settimeout(board.cfg.handshake_timeout)  # a silent client holds nothing
        try:
            super().handle()
        finally:
            self.end_head()

    first_request = True  # a connection's first request may be a plain upgrade, read at once
    read_at_once = False  # it was: nothing of the socket sits in a buffered reader

    def __init__(self, sock: object, address: object, server: object, rfile: object = None):
        # No buffered reader yet: a plain upgrade reads its head without one.
        super().__init__(sock, address, server, rfile=NOT_YET if rfile is None else rfile)

    def handle_one_request(self) -> object:
        """A plain WebSocket upgrade is peeked and read in one piece and goes straight to
        run_application: pywsgi's buffered reader, header object, environ and head deadline
        were a third of a handshake's CPU (5,483 -> 7,914 handshakes/s at 10k with the reader
        made only when needed, measured). Any other request, and every request after the
        first, is pywsgi's."""
        if self.first_request:
            self.first_request = False
            answer = self.upgrade_at_once()
            if answer is not PYWSGI:
                return answer
        if self.rfile is NOT_YET:
            self.rfile = self.socket.makefile("rb", -1)
        return super().handle_one_request()

    def upgrade_at_once(self) -> object:
        """Answer the first request if it is a plain upgrade to a WebSocket protocol's path,
        returning what handle_one_request would; PYWSGI if it is not (nothing was read)."""
        try:  # peeked, not read: pywsgi reads from the start whatever is not for here
            data = self.socket.recv(PEEKED_HEAD, socket.MSG_PEEK)
        except OSError:
            return None  # silent past the deadline, or gone: ended quietly, as pywsgi does
        request = plain_upgrade(data, self.server.get_environ(), self.client_address)
        if request is None:
            return PYWSGI
        environ, length, self.requestline = request
        protocol = self.board.protocol_for(environ["PATH_INFO"])
        if protocol is None or not protocol.websocket or not protocol.wants(environ):
            return PYWSGI
        # The head only (it is queued: it was peeked); bytes after it wait for the session.
        if len(self.socket.recv(length)) != length:
            return None
        self.read_at_once = True
        self.end_head()
        self.command, self.path, self.request_version = self.requestline.split()
        self.close_connection = environ.get("HTTP_CONNECTION", "").lower() == "close"
        self.content_length = 0
        self.wsgi_input = environ["wsgi.input"] = Input(None, 0)
        environ["wsgi.input_terminated"] = False
        self.environ = environ
        self.application = self.server.application
        self.handle_one_response()
        return None if self.close_connection or self.socket is None else True

    def read_requestline(self) -> str:
        # The whole head (request line and headers) must arrive within handshake_timeout:
        # one byte every few seconds would otherwise hold a connection forever.
        self.cancel_deadline()
        self.head_deadline = gevent.Timeout.start_new(
            self.board.cfg.handshake_timeout, TimeoutError("request head not received in time")
        )
        return super().read_requestline()

    def read_request(self, raw_requestline: str) -> object:
        try:
            return super().read_request(raw_requestline)
        finally:
            self.end_head()

    def end_head(self) -> None:
        self.cancel_deadline()
        if self.head_ip:
            self.board.end_head(self.head_ip)
            self.head_ip = ""

    def cancel_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _handle_client_error(self, ex: Exception) -> tuple:
        """A malformed or too slow request head: one log line, never a traceback."""
        if isinstance(ex, TimeoutError):
            refusal = Refusal(408, "Request head not received in time", "http")
        elif "header" in str(ex).lower() and "more than" in str(ex).lower():
            refusal = Refusal(431, "Too many header fields", "http")
        else:
            refusal = Refusal(
                400, f"Malformed request: {str(ex)[:100] or type(ex).__name__}", "http"
            )
        self.board.refused(
            refusal.kind, "request from %s: %s", format_peer(self.client_address), refusal.reason
        )
        return (str(refusal.status), http_response(refusal.status, refusal.reason))

    def run_application(self) -> None:
        environ = self.environ
        path = environ.get("PATH_INFO", "")
        board = self.board
        protocol = board.protocol_for(path)
        if protocol is None or not protocol.wants(environ):
            return WSGIHandler.run_application(self)
        hs = parse_handshake(
            environ,
            self.request_version,
            self.client_address,
            board.cfg.trusted_proxies,
            board.cfg.max_channels_per_socket,
            client_id=protocol.given_id(board),
            websocket=protocol.websocket,
            id_optional=bool(board.cfg.connect_url and protocol.hooked),
        )
        if isinstance(hs, Refusal):
            return self.refuse(hs)
        hooked = bool(board.cfg.connect_url and protocol.hooked)
        if hooked:  # the app decides, not a token
            hs = ask_connect_hook(board.cfg, hs, environ, path)
            if isinstance(hs, Refusal):
                return self.refuse(hs)
        signed = protocol.signed and not hooked
        refusal = access_refusal(hs, board.cfg, time.time(), signed=signed)
        checked = hooked or (signed and bool(board.cfg.secret_key))
        if refusal is None and hs.exp and checked:  # the socket closes when its exp passes
            hs = hs._replace(expires=int(hs.exp))
        if refusal is None:
            closing = protocol.closing(path, environ.get("QUERY_STRING", ""))
            if closing is not None:  # a refusal this protocol tells inside the socket
                return self.upgrade(board, hs, protocol, closing)
        refusal = refusal or board.lost_refusal() or board.hub.admit(hs)
        if refusal:
            if board.shares_listener and board.hub.local_count() >= board.cfg.max_connections:
                step_aside(self.server)
            return self.refuse(refusal)
        self.upgrade(board, hs, protocol)

    def upgrade(
        self,
        board: "Board",
        hs: Handshake,
        protocol: "SocketProtocol",
        closing: "Closing | None" = None,
    ) -> None:
        """Register the socket, then write its 101: a SEND the moment the client has its 101
        must find it. The session goes on in a fresh, shallow greenlet."""
        leftover = b"" if self.read_at_once else buffered_leftover(self.rfile, self.socket)
        upgraded = getattr(self.server, "upgraded", None)
        if upgraded is not None:  # our server leaves it open when the handler returns
            sock = self.socket
            upgraded.add(sock)
        else:  # gunicorn's closes it then: the session takes the descriptor into its own
            sock = gevent.socket.socket(fileno=self.socket.detach())
        no_delay(sock)
        # Writes have their own timeout; a stream's reads wait only for its end.
        sock.settimeout((board.cfg.idle_timeout or None) if protocol.websocket else None)
        if hs.deflate and not (board.cfg.compression and protocol.websocket):
            hs = hs._replace(deflate=0)  # offered, not agreed to
        framing = protocol.framing_for(hs)
        if hs.deflate:
            ws = DeflateSocket(sock, SocketReader(sock, leftover), board.cfg, protocol)
            ws.deflate_bits = hs.deflate
            framing = deflating(framing, hs.deflate, board.cfg.compression_min)
        else:
            ws = protocol.socket_class(sock, SocketReader(sock, leftover), board.cfg, protocol)
        conn = Connection(
            hs.client_id,
            protocol.conn_id(board, hs),
            hs.peer,
            hs.ip,
            ws,
            framing,
            hs.origin or "",
        )
        if closing is not None:  # a protocol that refuses after the 101 (Pusher's 4xxx)
            board.refused(closing.kind, "websocket from %s: %s", hs.peer, closing.reason)
            ws.open([upgrade_response(hs.key, ""), *conn.framing.refusal(closing)])
            ws.close(closing.code, closing.reason)
            self.status = "101 Switching Protocols"
            self.close_connection = True
            self.socket = None
            gevent.spawn_raw(close_after_close, ws, sock, board.cfg.close_timeout)
            return
        replay = board.hub.attach(conn, hs)  # admitted above, with nothing yielding since
        if hs.expires is not None:
            board.tokens.set(conn, hs.expires, private_channels(hs.channels))
        try:
            ws.open([protocol.head(hs), *replay])
        except WebSocketError as exc:  # a replay too big for its queue: it closes, and goes
            log.warning("replay to %s %s cut short: %s", conn.client_id, conn.peer, exc)
        self.status = protocol.status
        self.close_connection = True  # this connection serves no more HTTP requests
        # The handshake's state is dead weight for the socket's whole life (~10 KB with the
        # buffered reader): let all of it go.
        self.environ = self.headers = self.rfile = self.wsgi_input.rfile = None
        self.socket = None
        start_session(board, conn, sock)

    def log_request(self) -> None:
        status = self.status.decode() if isinstance(self.status, bytes) else str(self.status)
        if not status.startswith(("101", SocketProtocol.status, EventStreamProtocol.status)):
            access_log.info(redact(self.format_request()))

    def refuse(self, refusal: Refusal) -> None:
        self.board.refused(
            refusal.kind,
            "websocket from %s: %s",
            format_peer(self.client_address),
            refusal.reason,
        )
        body = (refusal.reason + "\n").encode("utf-8")
        self.start_response(
            f"{refusal.status} {HTTP_STATUS.get(refusal.status, 'Error')}",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        self.result = [body]
        self.process_result()


def close_after_close(ws: "BoardSocket", sock: socket.socket, timeout: float) -> None:
    """Read a refused socket until the peer answers our close frame (bounded), then close."""
    try:
        while ws.receive() is not None:
            pass
    finally:
        close_gracefully(sock, timeout)


MAX_HEADERS = 100  # as http.client's parse_headers; more: 431
MAX_HEADER_LINE = 65536


def parse_head(rfile: object) -> OldMessage:
    """A request's header lines as pywsgi's headers object, without the email package (its
    parser was 10 % of a handshake, profiled): the same limits, the same type."""
    message = OldMessage()
    headers = message._headers
    while True:
        line = rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            message.status = "Line too long"
            return message
        if line in (b"\r\n", b"\n", b""):
            return message
        if len(headers) >= MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")
        text = line.decode("iso-8859-1")
        if text[0] in " \t":  # an obsolete folded line continues the one before
            if not headers:
                message.status = "Header line folded with nothing before it"
                return message
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {text.strip()}")
            continue
        name, colon, value = text.partition(":")
        if not colon or not name or name != name.strip():
            message.status = "Malformed header line"
            return message
        headers.append((name, value.strip()))


PEEKED_HEAD = 8192  # bytes peeked for a plain upgrade's whole head; a longer one goes to pywsgi
BODY_HEADERS = ("content-length", "content-type", "transfer-encoding")
PYWSGI = object()  # upgrade_at_once's "not a plain upgrade: pywsgi reads it"
NOT_YET = object()  # a handler's rfile until a request needs pywsgi's buffered reader
HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")


def plain_upgrade(data: bytes, base: Mapping[str, object], address: object) -> tuple | None:
    """(environ, head length, request line) if data begins with the whole head of a plain
    WebSocket upgrade: GET over HTTP/1.1 to an unescaped path, token header names, each
    header on one CRLF-ended line, no body. The environ is the one pywsgi would build (a
    test holds them to it). None for anything else: pywsgi reads that, with all its rules."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end]
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\n"):
        return None  # a bare CR or LF: pywsgi's line rules decide
    lines = head.decode("iso-8859-1").split("\r\n")
    requestline = lines[0]
    words = requestline.split()
    if len(words) != 3 or " ".join(words) != requestline or len(lines) > MAX_HEADERS + 1:
        return None
    method, target, version = words
    path, _, query = target.partition("?")
    if method != "GET" or version != "HTTP/1.1" or path[:1] != "/" or "%" in path:
        return None
    environ = dict(base)
    environ["REQUEST_METHOD"] = method
    environ["SCRIPT_NAME"] = ""
    environ["PATH_INFO"] = path
    environ["QUERY_STRING"] = query
    environ["SERVER_PROTOCOL"] = version
    if isinstance(address, tuple):
        environ["REMOTE_ADDR"] = str(address[0])
        environ["REMOTE_PORT"] = str(address[1])
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not HEADER_NAME.fullmatch(name) or name.lower() in BODY_HEADERS:
            return None
        key, value = "HTTP_" + name.replace("-", "_").upper(), value.strip()
        if key in environ:  # a repeated header: joined as pywsgi joins it
            environ[key] += ("; " if "COOKIE" in key else ",") + value
        else:
            environ[key] = value
    if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
        return None
    return environ, end + 4, requestline


def redact(line: str) -> str:
    """A request line fit for the log: tokens and API signatures (replayable for ten
    minutes) hidden."""
    return re.sub(r"((?:token|auth_signature)=)[^&\s]*", r"\1***", line)


###############################################################################
# A socket's session ##########################################################
###############################################################################
# A WebSocket's life after its 101 (WebSocketHandler.upgrade registered it): an open socket
# parks no greenlet. A read watcher on its descriptor starts a short one when bytes arrive,
# which reads whole messages (gevent-websocket's parser, blocking only inside a message),
# hands each to the socket's protocol and ends when none is left; an idle socket costs its
# objects alone (~2 KB against ~9 KB with a parked greenlet; see docs/performance.md). A
# heartbeat's pong that comes alone is taken by the watcher's callback, with no greenlet.


def start_session(board: "Board", conn: "Connection", sock: socket.socket) -> None:
    """The socket is registered and has its 101: say so, then wait for its bytes."""
    log.info("connect %s %s (%d open)", conn.client_id, conn.peer, board.hub.local_count())
    board.events.emit(
        "connect", id=conn.client_id, conn=conn.conn_id, peer=conn.peer, origin=conn.origin
    )
    ws = conn.ws
    ws.watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
    if ws.stream.pending:  # bytes that came with the handshake: read them now
        gevent.spawn_raw(read_session, board, conn, sock)
    else:
        ws.watcher.start(readable, board, conn, sock)


def readable(board: "Board", conn: "Connection", sock: socket.socket) -> None:
    """In the event loop: bytes (or EOF) are waiting; a greenlet reads them, unless they
    were a heartbeat's pong alone, taken here (a greenlet per pong cost idle CPU)."""
    ws = conn.ws
    if ws.took_lone_pong():
        return
    ws.watcher.stop()
    gevent.spawn_raw(read_session, board, conn, sock)


def read_session(board: "Board", conn: "Connection", sock: socket.socket) -> None:
    """Read messages while there are any, each to the socket's protocol; then wait again,
    or end the session."""
    ws = conn.ws
    try:
        while (message := ws.receive()) is not None:
            if message is not NOTHING:
                ws.protocol.receive(board, conn, message)
            if not ws.stream.pending:  # the watcher tells when more comes
                ws.watcher.start(readable, board, conn, sock)
                return
    except Exception:  # a bug must cost one socket, never the server
        log.exception("session of %s %s failed", conn.client_id, conn.peer)
    end_session(board, conn, sock)


def end_session(board: "Board", conn: "Connection", sock: socket.socket) -> None:
    """Unregister, close, say why, and let the descriptor go (after a graceful close)."""
    ws = conn.ws
    ws.watcher.stop()
    try:
        board.tokens.forget(conn)
        board.hub.detach(conn)
        ws.close()
        board.counts.closes[ws.end_reason.name.lower()] += 1
        log.info(
            "disconnect %s %s after %.1fs: %s",
            conn.client_id,
            conn.peer,
            time.time() - conn.connected_at,
            ws.end_text,
        )
        signed_in = {"user": conn.user} if conn.user is not None else {}
        board.events.emit(
            "disconnect",
            id=conn.client_id,
            conn=conn.conn_id,
            peer=conn.peer,
            reason=ws.end_text,
            **signed_in,
        )
    finally:
        ws.watcher.close()
        close_gracefully(sock, board.cfg.close_timeout)


###############################################################################
# Connections and delivery ####################################################
###############################################################################


class Connection:
    """One open WebSocket: who it is, where it comes from, how it is framed, the socket."""

    __slots__ = (
        "client_id",
        "conn_id",
        "peer",
        "ip",
        "ws",
        "framing",
        "origin",
        "connected_at",
        "channels",
        "users",
        "user",
    )

    def __init__(
        self,
        client_id: str,
        conn_id: str,
        peer: str,
        ip: str,
        ws: "BoardSocket",
        framing: "Framing",
        origin: str = "",
    ) -> None:
        self.client_id = client_id
        self.conn_id = conn_id  # unique across processes and restarts: "<digits>.<digits>"
        self.peer = peer
        self.ip = ip
        self.ws = ws
        self.framing = framing
        self.origin = origin
        self.connected_at = time.time()
        self.channels: set | None = None  # the channels it is in, once it joins any
        self.users: dict | None = None  # channel -> the user it is there as (Pusher presence)
        self.user: str | None = None  # the user it signed in as (pusher:signin)

    def member(self, channel: str) -> str:
        """Who this socket is in a presence channel: its id, or the user a Pusher auth named."""
        users = self.users
        return users[channel] if users is not None and channel in users else self.client_id


ID_ROUTE, CHANNEL_ROUTE = "i:", "c:"  # what Registry.watch names: an id's or a channel's


class Registry:
    """This process's sockets by client id, by connection id and by channel, with the
    counts the limits ask for. A socket's memberships end when it is removed."""

    def __init__(self, watch: Callable[[str, bool], None] | None = None) -> None:
        self.watch = watch  # told (name, True) when an id or channel gets its first socket here
        self.changed: set | None = None  # when counting: the channels joined or left since read
        self._by_id: dict[str, dict[Connection, None]] = {}
        self._by_conn: dict[str, Connection] = {}
        self._channels: dict[str, dict[Connection, None]] = {}
        self._presence: dict[str, collections.Counter] = {}  # channel -> member -> its sockets
        self._info: dict[str, dict] = {}  # channel -> member -> what it joined with (Pusher)
        self._listeners: dict[str, dict[Connection, None]] = {}  # who gets presence frames
        self._per_ip: collections.Counter = collections.Counter()
        self._count = 0  # kept, not summed: every handshake asks

    def add(self, conn: Connection) -> None:
        sockets = self._by_id.get(conn.client_id)
        if sockets is None:
            sockets = self._by_id[conn.client_id] = {}
            if self.watch is not None:
                self.watch(ID_ROUTE + conn.client_id, True)
        sockets[conn] = None
        self._by_conn[conn.conn_id] = conn
        self._per_ip[conn.ip] += 1
        self._count += 1

    def remove(self, conn: Connection) -> None:
        sockets = self._by_id.get(conn.client_id)
        if sockets is None or conn not in sockets:
            return
        for channel in list(conn.channels or ()):
            self.leave(conn, channel)
        del sockets[conn]
        self._by_conn.pop(conn.conn_id, None)
        self._count -= 1
        if not sockets:
            del self._by_id[conn.client_id]
            if self.watch is not None:
                self.watch(ID_ROUTE + conn.client_id, False)
        self._per_ip[conn.ip] -= 1
        if not self._per_ip[conn.ip]:
            del self._per_ip[conn.ip]

    def join(self, conn: Connection, channel: str, limit: int, info: object = None) -> bool:
        """Put conn in channel (a presence member with info, if any); False when it is in
        limit channels already."""
        if conn.channels is None:
            conn.channels = set()
        elif channel in conn.channels:
            return True
        if len(conn.channels) >= limit:
            return False
        conn.channels.add(channel)
        members = self._channels.get(channel)
        if members is None:
            members = self._channels[channel] = {}
            if self.watch is not None:
                self.watch(CHANNEL_ROUTE + channel, True)
        members[conn] = None
        if self.changed is not None and not channel.startswith(USER_CHANNEL_PREFIX):
            self.changed.add(channel)
        if channel.startswith(PRESENCE_PREFIX):
            member = conn.member(channel)
            self._presence.setdefault(channel, collections.Counter())[member] += 1
            if info is not None:
                self._info.setdefault(channel, {}).setdefault(member, info)
            if conn.framing.tells_presence:
                self._listeners.setdefault(channel, {})[conn] = None
        return True

    def leave(self, conn: Connection, channel: str) -> bool:
        if not conn.channels or channel not in conn.channels:
            return False
        conn.channels.discard(channel)
        members = self._channels[channel]
        del members[conn]
        if self.changed is not None and not channel.startswith(USER_CHANNEL_PREFIX):
            self.changed.add(channel)
        if not members:
            del self._channels[channel]
            if self.watch is not None:
                self.watch(CHANNEL_ROUTE + channel, False)
        listeners = self._listeners.get(channel)
        if listeners is not None:
            listeners.pop(conn, None)
            if not listeners:
                del self._listeners[channel]
        ids = self._presence.get(channel)
        if ids is not None:
            member = conn.member(channel)
            ids[member] -= 1
            if ids[member] <= 0:
                del ids[member]
                info = self._info.get(channel)
                if info is not None and info.pop(member, None) is not None and not info:
                    del self._info[channel]
            if not ids:
                del self._presence[channel]
        if conn.users:  # the user it was there as ends with its membership, however it left
            conn.users.pop(channel, None)
        return True

    def presence_sockets(self, channel: str, client_id: str) -> int:
        """The sockets client_id has in a presence channel (closing ones until they go)."""
        return self._presence.get(channel, {}).get(client_id, 0)

    def member_info(self, channel: str, member: str) -> object:
        """What member joined channel with (a Pusher user_info), or None."""
        info = self._info.get(channel)
        return info.get(member) if info is not None else None

    def presence_listeners(self, channel: str) -> list:
        """The sockets in a presence channel told who comes and goes (their framing says)."""
        return [c for c in self._listeners.get(channel, ()) if not c.ws.closed]

    def presence_ids(self, channel: str) -> list:
        """The ids with a socket in a presence channel, in the order they came."""
        return list(self._presence.get(channel, ()))

    def has(self, conn: Connection) -> bool:
        return conn in self._by_id.get(conn.client_id, ())

    def connection(self, conn_id: str) -> Connection | None:
        """The open socket with this connection id, if it is here."""
        conn = self._by_conn.get(conn_id)
        return conn if conn is not None and not conn.ws.closed else None

    def members(self, channel: str) -> list:
        """The sockets in channel that can still take a message."""
        return [c for c in self._channels.get(channel, ()) if not c.ws.closed]

    def channel_names(self) -> list:
        return list(self._channels)

    def channel_size(self, channel: str) -> int:
        """The sockets registered in channel, closing ones included."""
        return len(self._channels.get(channel, ()))

    def ids(self) -> list:
        """Every id with a registered socket here, closing ones included."""
        return list(self._by_id)

    def presence_channels(self) -> list:
        return list(self._presence)

    def count_for_id(self, client_id: str) -> int:
        """Sockets of client_id, closing ones included: they still hold resources."""
        return len(self._by_id.get(client_id, ()))

    def count_for_ip(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)

    def sockets_of(self, client_id: str) -> list:
        """The sockets of client_id that can still take a message."""
        return [c for c in self._by_id.get(client_id, ()) if not c.ws.closed]

    def sockets_held(self, client_id: str) -> list:
        """The sockets of client_id, closing ones too (deliver skips those): no filter."""
        return list(self._by_id.get(client_id, ()))

    def open_connections(self) -> list:
        """Every socket that can still take a message: what LIST shows and SEND reaches."""
        return [c for sockets in self._by_id.values() for c in sockets if not c.ws.closed]

    def __iter__(self) -> Iterator[Connection]:
        """Every registered socket, closing ones included (heartbeat, drain)."""
        return iter([conn for sockets in self._by_id.values() for conn in sockets])

    def __len__(self) -> int:
        return self._count


# Framings: what a message looks like on one kind of socket, and what such a socket gets
# before its first message. A subprotocol is one Framing, found by its name.


class Topic(NamedTuple):
    """What a message was sent to, for framings that say it (Pusher's channel and event)."""

    channel: str | None = None
    event: str | None = None
    user_id: str | None = None  # who sent a client event on a presence channel
    offsets: dict | None = None  # channel -> offset, for its channels that keep history


class Framing:
    """The seed's form: each message is one text frame holding exactly its text."""

    name = ""
    tells_presence = False  # its sockets are told presence members and changes
    per_channel = False  # a message to several channels reaches its sockets once per channel

    def message(self, text: str, seq: int | None, topic: Topic | None = None) -> bytes:
        return text_frame(text)

    def presence_change(self, conn: "Connection", channel: str, change: dict) -> bytes:
        """A member came ({"join": member}) or went ({"leave": {"id"}})."""
        return compact_frame({"presence": {"channel": channel, **change}})

    def presence_members(self, conn: "Connection", channel: str, members: list) -> bytes:
        """Who is in a presence channel conn just joined: [{"id", "meta"}, ...]."""
        return compact_frame({"presence": {"channel": channel, "members": members}})

    def subscription_count(self, channel: str, count: int) -> bytes | None:
        """How many subscriptions channel has (--pusher-subscription-count), for framings
        that tell it; None: not told."""
        return None

    def refusal(self, closing: "Closing") -> list:
        """Frames before the close, for a protocol that refuses after its 101."""
        return []

    def opening(
        self,
        inbox: "Inbox | None",
        conn: "Connection",
        hs: Handshake,
        now: float,
        history: "History | None" = None,
    ) -> list:
        """Frames the socket gets right after its 101: what was queued while the id had no
        socket, delivered once, to the first socket that comes."""
        if inbox is None:
            return []
        return [text_frame(text) for text in inbox.take_undelivered(conn.client_id, now)]


class V1Framing(Framing):
    """wsboard.v1: {"seq", "data"} frames, a hello first, and resume from the inbox."""

    name = SUBPROTOCOL
    tells_presence = True

    def message(self, text: str, seq: int | None, topic: Topic | None = None) -> bytes:
        if topic is not None and topic.offsets:
            value = {"seq": seq, "data": text, "offsets": topic.offsets}
            return text_frame(compact_json(value))
        return text_frame(compact_json({"seq": seq, "data": text}))

    def opening(
        self,
        inbox: "Inbox | None",
        conn: "Connection",
        hs: Handshake,
        now: float,
        history: "History | None" = None,
    ) -> list:
        """The hello, then what the socket missed: of its id's inbox, then of its channels."""
        plan = opening_plan(inbox, history, conn, hs, now)
        frames = [compact_frame({"hello": plan.hello})]
        frames += [compact_frame({"gap": gap}) for gap in plan.gaps[:1] if "channel" not in gap]
        frames += [self.message(text, seq) for seq, text in plan.missed]
        frames += [compact_frame({"gap": gap}) for gap in plan.gaps if "channel" in gap]
        mine = conn.channels or set()
        frames += [
            self.message(p.text, None, Topic(offsets=offsets_in(p.offsets, mine)))
            for p in plan.publications
        ]
        return frames


class OpeningPlan(NamedTuple):
    """What a socket that keeps positions gets first, whatever its framing: its hello, the
    gaps ({"after"} for the inbox first, then {"channel", "after"}), the inbox's missed
    (seq, text) and its channels' missed publications, each once, in the order made."""

    hello: dict
    gaps: list
    missed: list
    publications: list


def opening_plan(
    inbox: "Inbox | None", history: "History | None", conn: "Connection", hs: Handshake, now: float
) -> OpeningPlan:
    gaps: list = []
    missed: list = []
    if inbox is None:
        hello = {"inbox": False, "epoch": None, "seq": None, "conn": conn.conn_id}
    else:
        box, missed, gap = inbox.missed(conn.client_id, hs.epoch, hs.last, now)
        hello = {"inbox": True, "epoch": box.epoch, "seq": box.last_seq, "conn": conn.conn_id}
        if gap:
            gaps.append({"after": hs.last if hs.epoch == box.epoch else 0})
    if hs.expires is not None:  # when it closes unless refreshed ({"refresh": ...})
        hello["exp"] = hs.expires
    publications: list = []
    if history is not None:
        positions, channel_gaps, publications = resumed_channels(history, conn, hs, now)
        if positions or history.size:
            hello["channels"] = positions
        gaps += channel_gaps
    return OpeningPlan(hello, gaps, missed, publications)


def resumed_channels(history: "History", conn: "Connection", hs: Handshake, now: float) -> tuple:
    """({channel: {"epoch", "offset"}} of conn's channels that keep history, and what a
    resume from hs.since gives: a gap for each channel that lost some, then the
    publications after, each once, in the order they were made)."""
    since = {channel: (epoch, offset) for channel, epoch, offset in hs.since}
    mine = conn.channels or set()
    ordered = (*hs.channels, *sorted(mine - set(hs.channels)))
    asks = [
        (channel, *since.get(channel, (None, 0)))
        for channel in ordered
        if channel in mine and history.keeps(channel)
    ]
    positions, gaps, publications = {}, [], {}
    reads = history.read_many(asks, now, conn)
    for (channel, epoch, offset), (stream, after, gap) in zip(asks, reads, strict=True):
        if gap:
            gaps.append({"channel": channel, "after": offset if epoch == stream.epoch else 0})
        for publication in after:  # one to several channels: once, with all offsets
            if publication.number in publications:
                publications[publication.number].offsets.update(publication.offsets)
            else:
                publications[publication.number] = publication
        positions[channel] = {"epoch": stream.epoch, "offset": stream.offset}
    return positions, gaps, [p for _, p in sorted(publications.items())]


def offsets_in(offsets: dict, channels: Collection) -> dict:
    """Of a publication's offsets, those of the channels a socket is in."""
    return {channel: offset for channel, offset in offsets.items() if channel in channels}


def compact_frame(value: object) -> bytes:
    return text_frame(compact_json(value))


FRAMINGS = {"": Framing(), SUBPROTOCOL: V1Framing()}  # by the subprotocol a socket agreed to


class SocketProtocol:
    """A kind of socket, looked up by its path in Board.protocols: how its upgrade is checked
    and refused, how its frames are made, which close codes it sends, and what it does with
    a message from the browser. A new transport is a subclass and one more entry there."""

    signed = True  # with --secret, the URL's id must carry its token (access_refusal)
    websocket = True  # an upgrade to a WebSocket (else a response that streams)
    socket_class: type = BoardSocket  # what writes its frames and reads what comes
    status = "101 Switching Protocols"  # for the access log, which sockets keep out of
    hooked = True  # with --connect-url the app decides who connects (Pusher signs its own)

    def matches(self, path: str) -> bool:
        raise NotImplementedError

    def wants(self, environ: Mapping[str, str]) -> bool:
        """Whether the request at its path is for this protocol (else Bottle answers it)."""
        return environ.get("HTTP_UPGRADE", "").lower() == "websocket"

    def head(self, hs: Handshake) -> bytes:
        """What opens the socket before any frame: the 101."""
        return upgrade_response(hs.key, hs.subprotocol, hs.deflate)

    def given_id(self, board: "Board") -> str | None:
        """The socket's client id when the protocol gives it; None: the URL's id=."""
        return None

    def closing(self, path: str, query: str) -> "Closing | None":
        """A refusal told inside the socket after its 101, or None."""
        return None

    def framing_for(self, hs: Handshake) -> Framing:
        raise NotImplementedError

    def conn_id(self, board: "Board", hs: Handshake) -> str:
        return board.new_conn_id()

    def close_code(self, code: int) -> int:
        """The code this protocol closes with where wsboard would close with code."""
        return code

    def receive(self, board: "Board", conn: "Connection", message: object) -> None:
        raise NotImplementedError


class WebSocketProtocol(SocketProtocol):
    """/websocket?id=…, plain or wsboard.v1: what a browser sends goes to the event sinks
    (watchers, the webhook)."""

    def matches(self, path: str) -> bool:
        return path == WEBSOCKET_PATH

    def framing_for(self, hs: Handshake) -> Framing:
        return FRAMINGS[hs.subprotocol]

    def receive(self, board: "Board", conn: "Connection", message: object) -> None:
        if (
            isinstance(message, str)
            and message.startswith('{"refresh"')
            and conn.framing.name == SUBPROTOCOL
        ):
            return refresh_token(board, conn, message)
        events = board.events
        if not events.wanted:
            return
        if isinstance(message, str):
            events.emit("message", False, id=conn.client_id, conn=conn.conn_id, data=message)
        else:
            encoded = base64.b64encode(message).decode()
            events.emit("message", False, id=conn.client_id, conn=conn.conn_id, binary=encoded)


def refresh_token(board: "Board", conn: "Connection", message: str) -> None:
    """A wsboard.v1 socket's {"refresh":{"exp","token"}}: a new token for the same id and
    channels moves its close on, answered {"refreshed":{"exp"}}; else it closes with 4001
    and the reason."""
    try:
        refresh = strict_json(message).get("refresh")
    except (BadRequest, AttributeError):
        refresh = None
    held = board.tokens.until.get(conn)
    reason = None
    if not isinstance(refresh, dict):
        reason = 'a refresh is {"refresh":{"exp":…,"token":…}}'
    elif held is None or not board.cfg.secret_key:
        reason = "this socket has no token to refresh"
    else:
        exp, token = refresh.get("exp"), refresh.get("token")
        exp = str(exp) if isinstance(exp, int) and not isinstance(exp, bool) else ""
        token = token if isinstance(token, str) else ""
        reason = signed_refusal(board.cfg, conn.client_id, exp, token, time.time(), held[1])
    if reason is not None:
        conn.ws.end(EndReason.TOKEN_EXPIRED, CloseCode.TOKEN_EXPIRED, f"refresh refused: {reason}")
        return
    board.tokens.set(conn, int(exp), held[1])
    try:
        conn.ws.send_frame_bytes(compact_frame({"refreshed": {"exp": int(exp)}}))
    except WebSocketError:
        pass


class TokenClock:
    """When each socket with a token (or a connect hook's exp) closes: a heap swept every
    half second, so the close comes within a second of exp; a refresh moves it on."""

    def __init__(self) -> None:
        self.heap: list = []  # (exp, n, conn); stale entries are skipped when they come up
        self.until: dict = {}  # conn -> (exp, the private channels its token signed)
        self.numbers = itertools.count()

    def set(self, conn: "Connection", exp: int, private: Sequence[str]) -> None:
        self.until[conn] = (exp, tuple(private))
        heapq.heappush(self.heap, (exp, next(self.numbers), conn))

    def forget(self, conn: "Connection") -> None:
        self.until.pop(conn, None)

    def due(self, now: float) -> list:
        """The sockets whose time is up, each once."""
        due = []
        while self.heap and self.heap[0][0] <= now:
            exp, _, conn = heapq.heappop(self.heap)
            held = self.until.get(conn)
            if held is not None and held[0] == exp:
                del self.until[conn]
                due.append(conn)
        return due


class EventStreamFraming(V1Framing):
    """text/event-stream: a message is an event with no name (EventSource's onmessage) whose
    data: lines are its text's lines; the hello, gaps, presence and the end are named events
    with the JSON of wsboard.v1's frames. One instance per stream: an event that moves a
    position carries id:, the stream's whole position (its inbox seq and its channels'
    offsets), which EventSource sends back as Last-Event-ID when it reconnects."""

    name = "events"

    def __init__(self) -> None:
        self.epoch = ""  # the inbox's ("" without one)
        self.seq = 0
        self.offsets: dict = {}  # channel -> [epoch, offset]

    def position(self) -> str:
        inbox = f"{self.epoch}:{self.seq}" if self.epoch else ""
        return "|".join([inbox, *(f"{c}:{e}:{o}" for c, (e, o) in self.offsets.items())])

    def message(self, text: str, seq: int | None, topic: Topic | None = None) -> bytes:
        moved = False
        if seq is not None and self.epoch:
            self.seq, moved = seq, True
        if topic is not None and topic.offsets:
            for channel, offset in topic.offsets.items():
                at = self.offsets.get(channel)
                if at is not None:
                    at[1], moved = offset, True
        lines = [f"id: {self.position()}"] if moved else []
        lines += [f"data: {line}" for line in EVENT_LINE_BREAK.split(text)]
        return ("\n".join(lines) + "\n\n").encode()

    def presence_change(self, conn: "Connection", channel: str, change: dict) -> bytes:
        return named_event("presence", {"channel": channel, **change})

    def presence_members(self, conn: "Connection", channel: str, members: list) -> bytes:
        return named_event("presence", {"channel": channel, "members": members})

    def opening(
        self,
        inbox: "Inbox | None",
        conn: "Connection",
        hs: Handshake,
        now: float,
        history: "History | None" = None,
    ) -> list:
        """The hello, what the stream missed (each with its id), then an event with only an
        id: where it is now, which moves EventSource's lastEventId and dispatches nothing."""
        plan = opening_plan(inbox, history, conn, hs, now)
        hello, since = plan.hello, {c: (e, o) for c, e, o in hs.since}
        if hello["inbox"]:  # the replay moves it on from where the browser was
            self.epoch, self.seq = hello["epoch"], hs.last if hs.epoch == hello["epoch"] else 0
        for channel, at in hello.get("channels", {}).items():
            epoch, offset = since.get(channel, (None, 0))
            start = at["offset"] if epoch is None else offset if epoch == at["epoch"] else 0
            self.offsets[channel] = [at["epoch"], start]
        frames = [named_event("hello", hello)]
        frames += [named_event("gap", gap) for gap in plan.gaps if "channel" not in gap]
        frames += [self.message(text, seq) for seq, text in plan.missed]
        frames += [named_event("gap", gap) for gap in plan.gaps if "channel" in gap]
        mine = conn.channels or set()
        frames += [
            self.message(p.text, None, Topic(offsets=offsets_in(p.offsets, mine)))
            for p in plan.publications
        ]
        if hello["inbox"]:
            self.seq = hello["seq"]
        for channel, at in hello.get("channels", {}).items():
            self.offsets[channel] = [at["epoch"], at["offset"]]
        if self.epoch or self.offsets:
            frames.append(f"id: {self.position()}\n\n".encode())
        return frames


EVENT_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what ends a line of an event stream


class EventStreamProtocol(WebSocketProtocol):
    """/events?id=…: a socket of its id like /websocket's, for browsers whose WebSocket
    cannot get through (a proxy that drops upgrades): the same query, checks, limits and
    hub, as a text/event-stream response (EventStreamFraming, EventStream)."""

    websocket = False
    socket_class = EventStream
    status = "200 Event Stream"

    def matches(self, path: str) -> bool:
        return path == EVENTS_PATH

    def wants(self, environ: Mapping[str, str]) -> bool:
        return "HTTP_UPGRADE" not in environ

    def framing_for(self, hs: Handshake) -> Framing:
        return EventStreamFraming()  # one each: it keeps the stream's position

    def head(self, hs: Handshake) -> bytes:
        return event_stream_head(hs.origin)


class DeflatedFraming:
    """A framing's messages deflated (past min_size) for the sockets that agreed to
    permessage-deflate; everything else (openings, presence, refusals) as the framing
    says. One instance serves every such socket, so deliver() deflates a broadcast once."""

    def __init__(self, base: Framing, bits: int, min_size: int) -> None:
        self.base, self.bits, self.min_size = base, bits, min_size

    def message(self, text: str, seq: int | None, topic: Topic | None = None) -> bytes:
        return compressed_frame(self.base.message(text, seq, topic), self.bits, self.min_size)

    def __getattr__(self, name: str) -> object:
        return getattr(self.base, name)


DEFLATED: dict = {}  # (framing, bits, min size) -> its DeflatedFraming, made once


def deflating(framing: Framing, bits: int, min_size: int) -> "DeflatedFraming":
    key = (framing, bits, min_size)
    if key not in DEFLATED:
        DEFLATED[key] = DeflatedFraming(framing, bits, min_size)
    return DEFLATED[key]


class Batch:
    """Frames held for sockets while one control connection's lines are answered, then let
    out together: one send() per socket instead of one per message. Each control connection
    owns one; routes and heartbeats pass none and write at once."""

    __slots__ = ("held", "since")

    def __init__(self) -> None:
        self.held: dict = {}  # BoardSocket -> [frames]
        self.since = 0.0  # when the first frame now held was (perf_counter)

    def hold(self, ws: "BoardSocket", frame: bytes) -> None:
        frames = self.held.get(ws)
        if frames is None:
            if not self.held:
                self.since = time.perf_counter()
            self.held[ws] = [frame]
        else:
            frames.append(frame)

    def release(self) -> float | None:
        """Write what is held; return how long its oldest frame waited, None if nothing."""
        if not self.held:
            return None
        held, self.held = self.held, {}
        for ws, frames in held.items():
            if ws.closed:
                continue
            try:
                ws.write_frames(frames)
            except WebSocketError as exc:
                log.warning("dropped a socket while writing held frames: %s", exc)
        return time.perf_counter() - self.since


YIELD_EVERY = 1024  # sockets written between turns for everyone else


def deliver(
    conns: list[Connection],
    text: str,
    seq: int | None,
    batch: Batch | None = None,
    hold: bool = True,
    topic: Topic | None = None,
    count: "Delivered | None" = None,
) -> int:
    """Write one message to conns, encoded once per framing; return how many took it (and
    add it to count).

    With a batch, frames are held (hold) or, for a broadcast, held only behind frames
    already held for that socket, so one connection's messages keep their order.
    """
    encoded: dict = {}
    if len(conns) <= YIELD_EVERY:
        delivered, sent = deliver_chunk(conns, text, seq, batch, hold, topic, encoded)
    else:
        delivered = sent = 0
        for start in range(0, len(conns), YIELD_EVERY):
            if start:
                gevent.sleep(0)  # a fan-out to many sockets lets the others run meanwhile
            chunk = conns[start : start + YIELD_EVERY]
            took, size = deliver_chunk(chunk, text, seq, batch, hold, topic, encoded)
            delivered, sent = delivered + took, sent + size
    if count is not None:
        count.messages += delivered
        count.bytes += sent
    return delivered


def deliver_chunk(
    conns: list[Connection],
    text: str,
    seq: int | None,
    batch: Batch | None,
    hold: bool,
    topic: Topic | None,
    encoded: dict,
) -> tuple:
    """deliver() to a few sockets without a turn for anyone else: (sockets, bytes) taken.
    encoded: framing -> frame, shared by the chunks of one message."""
    delivered = sent = 0
    for conn in conns:
        ws = conn.ws
        if ws.closed:  # closing: reported once when it was cut, skipped after
            continue
        frame = encoded.get(conn.framing)
        if frame is None:
            frame = encoded[conn.framing] = conn.framing.message(text, seq, topic)
        try:
            if batch is not None and (hold or ws in batch.held):
                batch.hold(ws, frame)
            else:
                ws.send_frame_bytes(frame)
            delivered += 1
            sent += len(frame)
        except QueueFull:
            log.warning("dropped %s %s: send queue full", conn.client_id, conn.peer)
        except WebSocketError as exc:
            ws.ended(EndReason.CONNECTION_LOST, str(exc))
            ws.abort()
            log.warning("dropped %s %s: %s", conn.client_id, conn.peer, exc)
    return delivered, sent


class Delivered:
    """Frames a hub handed to its sockets since start, and their bytes (for /metrics)."""

    __slots__ = ("messages", "bytes")

    def __init__(self) -> None:
        self.messages = self.bytes = 0


###############################################################################
# Inbox, channel history and idempotency keys #################################
###############################################################################


class Box:
    """One id's inbox: its recent messages as (seq, text, time), and its epoch."""

    __slots__ = ("epoch", "next_seq", "items", "bytes", "touched", "undelivered")

    def __init__(self, now: float) -> None:
        self.epoch = secrets.token_hex(4)  # a new box numbers from 1 again: the epoch tells
        self.next_seq = 1
        self.items: collections.deque = collections.deque()
        self.bytes = 0
        self.touched = now
        self.undelivered = 0  # seq of the first message kept while the id had no socket

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1


class Inbox:
    """Recent messages per id, numbered, so a client that reconnects can catch up.

    Bounded by messages and bytes per id, by age, by how many ids it keeps and by the bytes
    of all of them together (the least recently used id's box goes first).
    """

    def __init__(
        self, size: int, max_bytes: int, ttl: float, max_ids: int, total_bytes: int = 1 << 62
    ) -> None:
        self.size, self.max_bytes, self.ttl, self.max_ids = size, max_bytes, ttl, max_ids
        self.total_limit = total_bytes
        self.total_bytes = 0
        self._boxes: collections.OrderedDict[str, Box] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._boxes)

    def box(self, client_id: str, now: float) -> Box:
        box = self._boxes.get(client_id)
        if box is None:
            box = self._boxes[client_id] = Box(now)
            while len(self._boxes) > self.max_ids:
                self._drop_oldest()
        else:
            self._boxes.move_to_end(client_id)
        box.touched = now
        return box

    def _drop_oldest(self) -> None:
        _, box = self._boxes.popitem(last=False)
        self.total_bytes -= box.bytes

    def _pop(self, box: Box) -> None:
        removed = len(box.items.popleft()[1])
        box.bytes -= removed
        self.total_bytes -= removed

    def add(self, client_id: str, text: str, now: float, offline: bool = False) -> int:
        """Keep text for client_id; return its sequence number. offline: no socket took it."""
        box = self.box(client_id, now)
        seq = box.next_seq
        box.next_seq += 1
        box.items.append((seq, text, now))
        box.bytes += len(text)
        self.total_bytes += len(text)
        if offline and not box.undelivered:
            box.undelivered = seq
        while box.items and (len(box.items) > self.size or box.bytes > self.max_bytes):
            self._pop(box)
        while self.total_bytes > self.total_limit and len(self._boxes) > 1:
            self._drop_oldest()
        while self.total_bytes > self.total_limit and box.items:
            self._pop(box)
        return seq

    def take_undelivered(self, client_id: str, now: float) -> list:
        """The texts kept while client_id had no socket, once: the next call gets none."""
        box = self._boxes.get(client_id)
        if box is None or not box.undelivered:
            return []
        first, box.undelivered = box.undelivered, 0
        return [text for seq, text, _ in box.items if seq >= first]

    def missed(self, client_id: str, epoch: str, last: int, now: float) -> tuple:
        """(box, [(seq, text)] after last, gap): gap when some of what followed is gone."""
        box = self.box(client_id, now)
        box.undelivered = 0  # a resuming client gets them now, by number
        first_kept = box.items[0][0] if box.items else box.next_seq
        if epoch and epoch != box.epoch:  # numbered by another box or server: all is new
            return box, [(seq, text) for seq, text, _ in box.items], True
        if not epoch:  # a first connection: everything kept for it is news
            last = 0
        return box, [(seq, text) for seq, text, _ in box.items if seq > last], last + 1 < first_kept

    def expire(self, now: float, connected: Callable[[str], bool]) -> None:
        for client_id in list(self._boxes):
            box = self._boxes[client_id]
            while box.items and now - box.items[0][2] > self.ttl:
                self._pop(box)
            if not box.items and now - box.touched > self.ttl and not connected(client_id):
                del self._boxes[client_id]


class Publication(NamedTuple):
    """One publication as the history of its channels keeps it."""

    number: int  # this process's order of publications, across channels
    text: str
    event: str | None
    offsets: dict  # channel -> its offset there, for each of its channels that keeps history
    at: float


class Stream:
    """One channel's history: its epoch, its last offset and its recent publications."""

    __slots__ = ("epoch", "offset", "items", "bytes", "touched")

    def __init__(self, now: float) -> None:
        self.epoch = secrets.token_hex(4)  # a new stream numbers from 1 again: the epoch tells
        self.offset = 0
        self.items: collections.deque = collections.deque()
        self.bytes = STREAM_BYTES
        self.touched = now


STREAM_BYTES = 200  # what a channel's record costs against --history-bytes, beside its items
PUBLICATION_BYTES = 100  # what a kept publication costs beside its text
HISTORY_META_TTL = 86400  # an idle channel's epoch and offset outlive its items this long
MAX_HISTORY_LIMIT = 10_000  # publications one history request may ask for


class History:
    """Recent publications per channel, numbered 1, 2, 3 ... within an epoch, so a socket
    that reconnects, or a page rendered a moment ago, gets what its channels had meanwhile.

    Bounded by publications per channel, by age, and by the bytes of all channels together:
    the least recently published channel's oldest go first, then whole idle channels (the
    next publication there begins a new epoch, so a resume from before is told of a gap).
    """

    def __init__(self, size: int, ttl: float, total_bytes: int) -> None:
        self.size, self.ttl, self.total_limit = size, ttl, total_bytes
        self.total_bytes = 0
        self.streams: collections.OrderedDict[str, Stream] = collections.OrderedDict()
        self.numbers = itertools.count(1)

    def __len__(self) -> int:
        return len(self.streams)

    def keeps(self, channel: str) -> bool:
        return (
            self.size > 0 and not channel.startswith(USER_CHANNEL_PREFIX)
        ) or channel.startswith(CACHE_PREFIXES)

    def read_many(self, asks: list, now: float, reader: object = None) -> list:
        """For each (channel, epoch, offset): what since() answers; an epoch of None asks
        only where the channel is: (stream, [], False)."""
        return [
            self.since(c, e, o, now) if e is not None else (self.stream(c, now), [], False)
            for c, e, o in asks
        ]

    def last(self, channel: str, limit: int, now: float) -> tuple:
        """(stream, its last limit publications)."""
        stream = self.stream(channel, now)
        return stream, list(stream.items)[-limit:] if limit else []

    def stream(self, channel: str, now: float, reader: object = None) -> Stream:
        stream = self.streams.get(channel)
        if stream is None:
            stream = self.streams[channel] = Stream(now)
            self.total_bytes += STREAM_BYTES
            self._bound(stream)
        else:
            self.streams.move_to_end(channel)
        stream.touched = now
        return stream

    def position(self, channel: str, now: float) -> tuple:
        """(epoch, last offset) of channel: what a page rendered now resumes from."""
        stream = self.stream(channel, now)
        return stream.epoch, stream.offset

    def add(self, channels: Sequence[str], text: str, event: str | None, now: float) -> dict:
        """Keep a publication in each of channels that keeps history; return its offsets."""
        offsets: dict = {}
        publication = None
        cost, keep = len(text) + PUBLICATION_BYTES, self.size or 1  # a cache channel's last
        for channel in channels:
            if not self.size and not channel.startswith(CACHE_PREFIXES):
                continue
            stream = self.streams.get(channel)  # self.stream, inlined: this is the hot path
            if stream is None:
                stream = self.stream(channel, now)
            else:
                self.streams.move_to_end(channel)
                stream.touched = now
            if publication is None:
                publication = Publication(next(self.numbers), text, event, offsets, now)
            stream.offset += 1
            offsets[channel] = stream.offset
            items = stream.items
            items.append(publication)
            stream.bytes += cost
            self.total_bytes += cost
            if len(items) > keep:
                self._pop(stream)
            if self.total_bytes > self.total_limit:
                self._bound(stream)
        return offsets

    def _pop(self, stream: Stream) -> None:
        cost = len(stream.items.popleft().text) + PUBLICATION_BYTES
        stream.bytes -= cost
        self.total_bytes -= cost

    def _bound(self, keep: Stream) -> None:
        """Past the byte bound: the oldest channel's oldest publications go, then idle
        channels whole; keep (the channel just written) keeps its record."""
        while self.total_bytes > self.total_limit and self.streams:
            channel, oldest = next(iter(self.streams.items()))
            if oldest.items:
                self._pop(oldest)
            elif oldest is keep:
                break
            else:
                del self.streams[channel]
                self.total_bytes -= STREAM_BYTES

    def since(
        self, channel: str, epoch: str, offset: int, now: float, reader: object = None
    ) -> tuple:
        """(stream, [Publication] after offset, gap): gap when some of what followed is
        gone (evicted, expired, or numbered in another epoch). reader: the socket whose
        opening reads it (a shared history notes where it read)."""
        stream = self.stream(channel, now)
        items = stream.items
        if epoch != stream.epoch:
            return stream, list(items), True
        first_kept = items[0].offsets[channel] if items else stream.offset + 1
        after = [p for p in items if p.offsets[channel] > offset]
        return stream, after, offset + 1 < first_kept

    def expire(self, now: float, in_use: Callable[[str], bool]) -> None:
        for channel in list(self.streams):
            stream = self.streams[channel]
            while stream.items and now - stream.items[0].at > self.ttl:
                self._pop(stream)
            idle = now - stream.touched > max(self.ttl, HISTORY_META_TTL)
            if not stream.items and idle and not in_use(channel):
                del self.streams[channel]
                self.total_bytes -= STREAM_BYTES


class StickyJoins:
    """The channels the backend put an id in with a sticky join: every socket of the id,
    open now or later, is in them until a LEAVE for that id, or until the id has had no
    open socket for --session-ttl seconds. Bounded per id by --max-channels-per-socket and
    in ids by --max-sticky-ids."""

    def __init__(self, ttl: float, max_channels: int, max_ids: int) -> None:
        self.ttl, self.max_channels, self.max_ids = ttl, max_channels, max_ids
        self.channels: dict[str, dict] = {}  # id -> {channel: None}, in the order joined
        self.away: dict[str, float] = {}  # id with no open socket -> since when

    def __len__(self) -> int:
        return len(self.channels)

    def add(self, client_id: str, channel: str, connected: bool, now: float) -> bool:
        """Make channel sticky for client_id; False when that passes a bound."""
        channels = self.channels.get(client_id)
        if channels is None:
            if len(self.channels) >= self.max_ids:
                return False
            channels = self.channels[client_id] = {}
            if not connected:
                self.away[client_id] = now
        if channel not in channels and len(channels) >= self.max_channels:
            return False
        channels[channel] = None
        return True

    def remove(self, client_id: str, channel: str) -> bool:
        channels = self.channels.get(client_id)
        if channels is None or channel not in channels:
            return False
        del channels[channel]
        if not channels:
            del self.channels[client_id]
            self.away.pop(client_id, None)
        return True

    def ask(self, client_id: str) -> str:
        """Begin reading client_id's sticky channels (here: nothing to wait for)."""
        return client_id

    def of(self, asked: str) -> list:
        """The sticky channels of what ask() began."""
        return list(self.channels.get(asked, ()))

    def connected(self, client_id: str) -> None:
        self.away.pop(client_id, None)

    def gone(self, client_id: str, now: float) -> None:
        """client_id's last socket closed: its sticky joins last --session-ttl more."""
        if client_id in self.channels:
            self.away[client_id] = now

    def expire(self, now: float) -> None:
        for client_id, since in list(self.away.items()):
            if now - since > self.ttl:
                del self.away[client_id]
                self.channels.pop(client_id, None)


class SendResult(NamedTuple):
    sockets: int  # sockets that took it now
    queued: int  # ids with no open socket whose inbox keeps it for later
    seq: dict  # id -> sequence number, when the inbox is on
    missing: list  # ids that got nothing
    duplicate: bool = False  # a retry of a keyed send: nothing was sent again
    unconfirmed: tuple = ()  # ids (among missing) whose fate is unknown: see trouble
    trouble: str = ""  # why: TIMEOUT or UNAVAILABLE (scale-out only)


new_send_result = functools.partial(tuple.__new__, SendResult)  # all 7 fields, quicker


class IdempotencyKeys:
    """The results of sends that carried a key, so a retry within the window sends nothing
    twice. Results, not answers: each retry is answered with its own ref."""

    def __init__(self, window: float, max_keys: int = 100_000) -> None:
        self.window, self.max_keys = window, max_keys
        self._results: collections.OrderedDict[str, tuple] = collections.OrderedDict()

    def get(self, key: str, now: float) -> SendResult | None:
        self.expire(now)
        found = self._results.get(key)
        return found[1] if found else None

    def put(self, key: str, result: SendResult, now: float) -> None:
        self._results[key] = (now, result)
        while len(self._results) > self.max_keys:
            self._results.popitem(last=False)

    def expire(self, now: float) -> None:
        while self._results and now - next(iter(self._results.values()))[0] > self.window:
            self._results.popitem(last=False)


###############################################################################
# Hubs ########################################################################
###############################################################################
# A hub is the only way to the sockets: the actions, the sessions, the limits, the
# heartbeat, the drain and the metrics call what Hub lists and nothing else. LocalHub holds
# this process's sockets; a Backplane reaches every process's. A new hub implements Hub (and
# passes the contract tests in tests/test_hub.py) and is added to HUBS. A hub touches of a
# socket only what SocketLike lists (the tests' RecordingSocket implements it).


@typing.runtime_checkable
class SocketLike(typing.Protocol):
    """What a hub may touch of a socket (BoardSocket)."""

    closed: bool  # it is closing or gone: skipped by every delivery
    queued_bytes: int  # what waits for the kernel (listings show it)

    def send_frame_bytes(self, frame: bytes) -> None: ...  # WebSocketError once closed

    def write_frames(self, frames: list) -> None: ...

    def end(self, reason: "EndReason", code: int, told: str = "", detail: str = "") -> None: ...

    def ended(self, reason: "EndReason", detail: str = "") -> None: ...

    def abort(self) -> None: ...


@typing.runtime_checkable
class Hub(typing.Protocol):
    """What the rest of this file may call of a hub. Sends, publishes and listings raise
    BackplaneError when their answer cannot be known; count_all=False lets a hub stop
    counting sockets once one took a send (the plain SEND needs only OK)."""

    cfg: Config
    node: str  # what this process's connection ids begin with
    registry: "Registry"  # this process's own sockets
    delivered: "Delivered"  # frames handed to this process's sockets

    # Life.
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def unready_reason(self) -> str | None: ...

    def expire(self, now: float) -> None: ...

    def sync(self) -> None: ...  # what this hub changed is in force everywhere (bounded)

    # A socket's own life.
    def admit(self, hs: Handshake) -> Refusal | None: ...

    def attach(self, conn: "Connection", hs: Handshake) -> list: ...

    def detach(self, conn: "Connection") -> None: ...

    def subscribe(
        self, conn: "Connection", channel: str, user: tuple | None = None
    ) -> list | None: ...

    def unsubscribe(self, conn: "Connection", channel: str) -> bool: ...

    # Sending.
    def send(
        self,
        ids: Sequence[str],
        text: str,
        keep_offline: bool,
        key: str | None = None,
        batch: "Batch | None" = None,
        count_all: bool = True,
    ) -> "SendResult": ...

    def start_sends(
        self, sends: Sequence[tuple], batch: "Batch | None" = None, count_all: bool = True
    ) -> Callable[[], list]: ...  # sends under way; the call waits for their results

    def send_to_connection(self, conn_id: str, text: str, batch: "Batch | None" = None) -> int: ...

    def broadcast(self, text: str, batch: "Batch | None" = None) -> int: ...

    def publish(
        self,
        channels: Sequence[str],
        text: str,
        except_conn: str | None = None,
        batch: "Batch | None" = None,
        event: str | None = None,
        user_id: str | None = None,
    ) -> int: ...

    def kick(self, client_id: str, code: int, reason: str) -> int: ...

    def kick_connection(self, conn_id: str, code: int, reason: str) -> int: ...

    def terminate_user(self, user_id: str, code: int, reason: str) -> int: ...

    # Channels, presence, metadata.
    def join(
        self,
        channel: str,
        client_id: str | None = None,
        conn_id: str | None = None,
        sticky: bool = False,
    ) -> tuple: ...

    def leave(
        self, channel: str, client_id: str | None = None, conn_id: str | None = None
    ) -> tuple: ...

    def set_meta(self, client_id: str, meta: dict | None) -> int: ...

    def presence(self, channel: str) -> list: ...

    # Channel history (BadRequest(HISTORY_OFF) where a channel keeps none).
    def position(self, channel: str) -> tuple: ...

    def history_page(self, channel: str, since: tuple | None, limit: int) -> "HistoryPage": ...

    # What there is.
    def online(self, ids: Sequence[str]) -> list: ...

    def count(self, channel: str | None = None) -> tuple: ...

    def clients(self) -> list: ...

    def channel_clients(self, channel: str) -> list: ...

    def channels(self) -> dict: ...

    def stats(self) -> dict: ...

    def local_connections(self) -> list: ...

    def local_count(self) -> int: ...


class HistoryPage(NamedTuple):
    """What a history request gets: the channel's epoch and last offset, its kept
    publications asked for as (offset, text, event), and whether some before them are gone."""

    epoch: str
    offset: int
    publications: list
    gap: bool


def replayed(conn: "Connection", offsets: dict, floors: dict) -> bool:
    """A publication heard that conn's opening replay already gave it, or one heard while
    its opening is read (held, then given unless the replay has it: Backplane.attach)."""
    if (conn, None) in floors:
        return True
    told = [(channel, offset) for channel, offset in offsets.items() if (conn, channel) in floors]
    return bool(told) and all(offset <= floors[(conn, channel)] for channel, offset in told)


def offset_groups(members: list, channel: str, offsets: dict, several: bool) -> Iterator:
    """(offsets told, sockets) for a publication's delivery to channel's members: one
    group, unless it went to several channels, where a socket is told the offsets of those
    it is in."""
    if not offsets:
        yield None, members
    elif not several:
        yield ({channel: offsets[channel]} if channel in offsets else None), members
    else:
        groups: dict = {}
        for conn in members:
            key = tuple(c for c in offsets if conn.channels and c in conn.channels)
            groups.setdefault(key, []).append(conn)
        for key, group in groups.items():
            yield ({c: offsets[c] for c in key} or None), group


class ClientRow(NamedTuple):
    """One socket as listings show it, wherever it is held."""

    client_id: str
    conn_id: str
    peer: str
    since: float
    origin: str
    protocol: str
    queued_bytes: int
    meta: dict | None = None
    user: str | None = None  # the user it signed in as (Pusher)


class LocalHooks(typing.Protocol):
    """Where a hub that composes a LocalHub takes over from it (the backplane does). A
    LocalHub is its own hooks: the defaults below say what they do in one process."""

    def settle(self, conn: "Connection") -> None: ...  # conn can be reached from everywhere

    def member_joined(self, channel: str, member: dict) -> None: ...  # first socket of an id

    def member_left(self, channel: str, client_id: str) -> None: ...  # its last one, after grace

    def members_frames(self, conn: "Connection", channel: str) -> list: ...  # conn's member list

    def channels_counted(self, rows: list) -> None: ...  # (channel, sockets here, held here)


CHANNEL_COUNT_PERIOD = 0.5  # seconds between counts of the channels that changed (throttle)
CHANNEL_WEBHOOK_EVENTS = frozenset({"channel_occupied", "channel_vacated"})


def counts_channels(cfg: Config) -> bool:
    """Whether channels are counted: for subscription counts, or for a Pusher webhook that
    tells channels occupied and vacated."""
    wanted = cfg.pusher_webhook_events & CHANNEL_WEBHOOK_EVENTS
    return bool(cfg.pusher_subscription_count or (cfg.pusher_webhook and wanted))


def count_notices(
    channel: str, was_held: bool, held: bool, old: int, new: int, counting: bool
) -> list:
    """What the observers are told of a channel whose count went from old to new sockets
    over every process, held (occupied) before and after: [(kind, fields)], in order."""
    notices = []
    if held and not was_held:
        notices.append(("occupied", {"channel": channel}))
    if counting and new != old and new > 0 and not channel.startswith(PRESENCE_PREFIX):
        notices.append(("subscription_count", {"channel": channel, "count": new}))
    if was_held and not held:
        notices.append(("vacated", {"channel": channel}))
    return notices


class LocalHub:
    """The sockets of this process, their inbox, their channels' history and the idempotency
    keys, in memory. hooks: the hub composing this one, where it takes over (LocalHooks);
    inbox, history, sticky: shared ones (it then delivers publications numbered elsewhere);
    keeps_history=False: history is not this process's to keep."""

    def __init__(
        self,
        cfg: Config,
        events: "Events | None" = None,
        node: str = "",
        hooks: LocalHooks | None = None,
        inbox: object = None,
        history: object = None,
        keeps_history: bool = True,
        sticky: object = None,
    ) -> None:
        self.cfg = cfg
        self.node = node or "1"  # what connection ids begin with: "<node>.<n>"
        self.events = events if events is not None else Events()
        self.hooks: LocalHooks = hooks if hooks is not None else self
        self.registry = Registry()
        self.meta: dict[str, dict] = {}  # what the backend attached to an id, while it is here
        self.leaving: dict[tuple, object] = {}  # (channel, id) -> its delayed leave's timer
        self.forgetting: dict[str, object] = {}  # id -> its metadata's delayed drop's timer
        self.awaiting: dict = {}  # (conn, channel) -> presence changes held behind its list
        if inbox is None and cfg.inbox:
            inbox = Inbox(
                cfg.inbox, cfg.inbox_bytes, cfg.inbox_ttl, cfg.inbox_ids, cfg.inbox_total_bytes
            )
        self.inbox = inbox
        if history is None and keeps_history and (cfg.history or cfg.pusher_key):  # cache-
            history = History(cfg.history, cfg.history_ttl, cfg.history_bytes)
        self.history = history
        if sticky is None:
            sticky = StickyJoins(cfg.session_ttl, cfg.max_channels_per_socket, cfg.max_sticky_ids)
        self.sticky = sticky
        self.keys = IdempotencyKeys(cfg.idempotency_window)
        self.delivered = Delivered()
        self.told_counts: dict = {}  # channel -> its sockets when last counted, while held
        self.counter: gevent.Greenlet | None = None
        if counts_channels(cfg):
            self.registry.changed = set()

    # Sockets coming and going: admit and attach are called back to back, nothing yielding
    # between them, so no limit can be passed by handshakes in flight.

    def admit(self, hs: Handshake) -> Refusal | None:
        """Why one more socket for this handshake would pass a connection limit, or None."""
        cfg, registry = self.cfg, self.registry
        if len(registry) >= cfg.max_connections:
            reason = f"Too many connections (limit {cfg.max_connections})"
        elif registry.count_for_ip(hs.ip) >= cfg.max_connections_per_ip:
            reason = f"Too many connections from this address (limit {cfg.max_connections_per_ip})"
        elif registry.count_for_id(hs.client_id) >= cfg.max_sockets_per_id:
            reason = f"Too many sockets for this id (limit {cfg.max_sockets_per_id})"
        else:
            return None
        return Refusal(503, reason, "limit")

    def attach(self, conn: Connection, hs: Handshake) -> list:
        """Register conn, in its URL's channels and its id's sticky joins; return the frames
        it gets before any message (its framing says)."""
        asked = self.sticky.ask(conn.client_id)  # a shared store answers while it registers
        self.registry.add(conn)
        self._keep_meta(conn.client_id)
        if hs.meta is not None:  # what the connect hook's app attached to the id
            self.meta[conn.client_id] = hs.meta
        self.sticky.connected(conn.client_id)
        limit = self.cfg.max_channels_per_socket  # hs.channels is bounded by it too
        joined = [channel for channel in hs.channels if self.registry.join(conn, channel, limit)]
        self.hooks.settle(conn)
        # Its id's sticky joins before its first frame, so a resume from since= covers them.
        sticky = [c for c in self.sticky.of(asked) if c not in hs.channels]
        later = [channel for channel in sticky if self.registry.join(conn, channel, limit)]
        if later:
            self.hooks.settle(conn)  # their routes are in force too
            joined += later
        frames = conn.framing.opening(self.inbox, conn, hs, time.time(), self.history)
        for channel in joined:
            frames += self._joined(conn, channel)
        return frames

    def settle(self, conn: Connection) -> None:
        """Wait until a socket just registered can be reached from everywhere (here: it is)."""

    def start(self) -> None:
        """Begin the hub's background work: counting channels, when anything wants it."""
        if self.registry.changed is not None and self.counter is None:
            self.counter = gevent.spawn(self._count_channels_forever)

    def sync(self) -> None:
        """Wait until what this hub changed is in force everywhere (here it is at once)."""

    def stop(self) -> None:
        """End it, after the sockets have gone: their channels are counted a last time."""
        if self.counter is not None:
            self.counter.kill(block=False)
            self.counter = None
            self.count_channels()

    def drop_timers(self) -> None:
        """Forget the delayed leaves and metadata drops (a composing hub's stop tells them)."""
        for timer in [*self.leaving.values(), *self.forgetting.values()]:
            timer.close()
        self.leaving.clear()
        self.forgetting.clear()

    def unready_reason(self) -> str | None:
        """Why this hub cannot serve now (for /readyz), or None."""
        return None

    def detach(self, conn: Connection) -> None:
        if not self.registry.has(conn):
            return
        channels = [c for c in conn.channels or () if c.startswith(PRESENCE_PREFIX)]
        members = [(channel, conn.member(channel)) for channel in channels]
        self.registry.remove(conn)
        for channel, member in members:
            self._left(member, channel)
        if not self.registry.count_for_id(conn.client_id):
            self.sticky.gone(conn.client_id, time.time())
            if conn.client_id in self.meta:
                self._later(self.forgetting, conn.client_id, self._forget_meta, conn.client_id)

    # Presence: a presence- channel's members are ids. An id joins with its first socket
    # there and leaves presence_grace seconds after its last one, unless one comes back.

    def _later(self, pending: dict, key: object, action: Callable, *args: object) -> None:
        if key in pending:
            return
        if not self.cfg.presence_grace:
            action(*args)
            return

        def run() -> None:
            pending.pop(key, None)
            action(*args)

        # A bare timer while it waits (236 bytes against a greenlet's 1,000: a reconnect
        # storm leaves one per member); the action gets its greenlet when it is due.
        timer = pending[key] = gevent.get_hub().loop.timer(self.cfg.presence_grace)
        timer.start(gevent.spawn_raw, run)

    def _keep_meta(self, client_id: str) -> None:
        timer = self.forgetting.pop(client_id, None)
        if timer is not None:
            timer.close()

    def _forget_meta(self, client_id: str) -> None:
        if not self.registry.count_for_id(client_id):
            self.meta.pop(client_id, None)

    def member(self, member: str, channel: str) -> dict:
        """A presence member as listings show it: its id, and the metadata the backend
        attached to that id or (for a Pusher user) the user_info it joined with."""
        meta = self.meta.get(member)
        if meta is None:
            meta = self.registry.member_info(channel, member)
        return {"id": member, "meta": meta}

    def tell_members(self, channel: str, change: dict) -> None:
        """Tell channel's listeners here of a member's change, but not the sockets of the
        member that came (its own list says it); held behind a member list still coming."""
        frames: dict = {}  # encoded once per framing
        joined = change.get("join", {}).get("id")
        for conn in self.registry.presence_listeners(channel):
            if conn.member(channel) == joined:
                continue
            frame = frames.get(conn.framing)
            if frame is None:
                frame = frames[conn.framing] = conn.framing.presence_change(conn, channel, change)
            held = self.awaiting.get((conn, channel))
            if held is not None:
                held.append(frame)
                continue
            try:
                conn.ws.send_frame_bytes(frame)
            except WebSocketError:
                pass

    def _joined(self, conn: Connection, channel: str) -> list:
        """After conn joined channel: tell the others when its id is new there; return the
        member list for conn (a wsboard.v1 socket)."""
        if self.registry.channel_size(channel) == 1:  # occupied before anything else is told
            self._count_now(channel)
        if not channel.startswith(PRESENCE_PREFIX):
            return []
        member = conn.member(channel)
        timer = self.leaving.pop((channel, member), None)
        if timer is not None:  # back within the grace: it never left
            timer.close()
        elif self.registry.presence_sockets(channel, member) == 1:  # its first
            self.hooks.member_joined(channel, self.member(member, channel))
        if not conn.framing.tells_presence:
            return []
        return self.hooks.members_frames(conn, channel)

    # Channel counts: the channels joined or left are counted every CHANNEL_COUNT_PERIOD
    # (a channel's first socket here and its last member's leave at once, so that the
    # observers hear channel_occupied before member_added and member_removed before
    # channel_vacated). A channel is held while it has sockets or members in their grace.

    def _count_channels_forever(self) -> None:
        while True:
            gevent.sleep(CHANNEL_COUNT_PERIOD)
            try:
                self.count_channels()
            except Exception:
                log.exception("counting channels failed")

    def count_channels(self, only: Sequence[str] | None = None) -> None:
        """Count the channels that changed since last counted (or only those) and hand
        (channel, sockets here, held here) each to the hooks."""
        changed = self.registry.changed
        if changed is None:
            return
        if only is None:
            names, self.registry.changed = changed, set()
        else:
            names = only
            changed.difference_update(only)
        if names:
            self.hooks.channels_counted(self.channel_rows(names))

    def channel_rows(self, names: Iterable[str] | None = None) -> list:
        """(channel, sockets here, held here) of names (every channel held here by default)."""
        grace = {channel for channel, _ in self.leaving}
        if names is None:
            names = {*self.registry.channel_names(), *grace}
            names = [n for n in names if not n.startswith(USER_CHANNEL_PREFIX)]
        rows = []
        for channel in names:
            sockets = self.registry.channel_size(channel)
            rows.append((channel, sockets, bool(sockets) or channel in grace))
        return rows

    def _count_now(self, channel: str) -> None:
        if self.registry.changed is not None:
            self.count_channels([channel])

    def channels_counted(self, rows: list) -> None:
        """One process: its counts are the channels' counts."""
        counting = self.cfg.pusher_subscription_count
        for channel, sockets, held in rows:
            was = self.told_counts.get(channel)
            if held:
                self.told_counts[channel] = sockets
            else:
                self.told_counts.pop(channel, None)
            new = sockets if held else 0
            notices = count_notices(channel, was is not None, held, was or 0, new, counting)
            for kind, fields in notices:
                if kind == "subscription_count":
                    self.tell_count(channel, new)
                self.events.notice(kind, **fields)

    def tell_count(self, channel: str, total: int) -> None:
        """Tell channel's sockets here (those whose framing says it) its subscription count
        over every process."""
        frames: dict = {}  # encoded once per framing
        for conn in self.registry.members(channel):
            frame = frames.get(conn.framing)
            if frame is None:
                frame = frames[conn.framing] = conn.framing.subscription_count(channel, total)
            if frame:
                try:
                    conn.ws.send_frame_bytes(frame)
                except WebSocketError:
                    pass

    def member_joined(self, channel: str, member: dict) -> None:
        """An id became one of channel's members: tell the others and the sinks."""
        self.tell_members(channel, {"join": member})
        self.events.emit("join", channel=channel, id=member["id"], meta=member["meta"])

    def member_left(self, channel: str, client_id: str) -> None:
        self.tell_members(channel, {"leave": {"id": client_id}})
        self.events.emit("leave", channel=channel, id=client_id)

    def members_frames(self, conn: Connection, channel: str) -> list:
        """What a socket that is told presence gets first on joining a presence channel."""
        return [conn.framing.presence_members(conn, channel, self.presence(channel))]

    def _left(self, client_id: str, channel: str) -> None:
        if self.registry.presence_sockets(channel, client_id):
            return
        self._later(self.leaving, (channel, client_id), self._leave_now, client_id, channel)

    def _leave_now(self, client_id: str, channel: str) -> None:
        if not self.registry.presence_sockets(channel, client_id):
            self.hooks.member_left(channel, client_id)
            if not self.registry.channel_size(channel) and all(
                key[0] != channel for key in self.leaving
            ):  # vacated after its last member left
                self._count_now(channel)

    def set_meta(self, client_id: str, meta: dict | None) -> int:
        """Attach meta to an id with open sockets (None takes it off); return its sockets."""
        sockets = self.registry.sockets_of(client_id)
        if not sockets:
            return 0
        if meta is None:
            self.meta.pop(client_id, None)
        else:
            self.meta[client_id] = meta
        return len(sockets)

    def presence(self, channel: str) -> list:
        """The members of a presence channel: its ids, with their metadata."""
        return [self.member(i, channel) for i in self.registry.presence_ids(channel)]

    # Delivery.

    def send(
        self,
        ids: Iterable[str],
        text: str,
        keep_offline: bool,
        key: str | None = None,
        batch: Batch | None = None,
        count_all: bool = True,
    ) -> SendResult:
        """Send text to every socket of each id, keeping it in the inbox when that is on.
        With a key, a retry within the window is answered from the first send, in one step.
        count_all=False: the answer may stop counting once a socket took it (scale-out)."""
        if key is None and self.inbox is None:
            return self.send_unkept(ids, text, batch)
        now = time.time()
        if key is not None and (earlier := self.keys.get(key, now)) is not None:
            return earlier._replace(duplicate=True)
        sockets, queued, seqs, missing = 0, 0, {}, []
        registry, inbox = self.registry, self.inbox
        for client_id in ids if len(ids) == 1 else dict.fromkeys(ids):
            # deliver skips closing sockets itself; the inbox must know whether any is open
            conns = (
                registry.sockets_held(client_id)
                if inbox is None
                else registry.sockets_of(client_id)
            )
            seq = None
            if inbox is not None and (conns or keep_offline):
                seq = seqs[client_id] = self.inbox.add(client_id, text, now, offline=not conns)
            delivered = deliver(conns, text, seq, batch, count=self.delivered) if conns else 0
            sockets += delivered
            if not delivered:
                if seq is None:
                    missing.append(client_id)
                else:
                    queued += 1
        result = SendResult(sockets, queued, seqs, missing)
        if key is not None and (sockets or queued):  # a failed send may be tried again
            self.keys.put(key, result, now)
        return result

    def start_sends(
        self, sends: Sequence[tuple], batch: Batch | None = None, count_all: bool = True
    ) -> Callable[[], list]:
        """Several sends, (ids, text, keep_offline) each, in order: done before it returns."""
        if self.inbox is None:
            unkept = self.send_unkept
            results = [unkept(ids, text, batch) for ids, text, _ in sends]
        else:
            send = self.send
            results = [send(ids, text, keep, None, batch) for ids, text, keep in sends]
        return lambda: results

    def send_unkept(self, ids: Sequence[str], text: str, batch: Batch | None) -> SendResult:
        """send() without inbox or key, the control socket's hot path: each id's sockets get
        text, and nothing is numbered or kept."""
        sockets, missing = 0, []
        held = self.registry.sockets_held  # deliver skips closing sockets itself
        for client_id in ids if len(ids) == 1 else dict.fromkeys(ids):
            conns = held(client_id)
            took = deliver(conns, text, None, batch, count=self.delivered) if conns else 0
            if not took:
                missing.append(client_id)
            sockets += took
        return new_send_result((sockets, 0, {}, missing, False, (), ""))

    def broadcast(self, text: str, batch: Batch | None = None) -> int:
        """Send text to every open socket (not kept in any inbox); return how many took it."""
        conns = self.registry.open_connections()
        return deliver(conns, text, None, batch, hold=False, count=self.delivered)

    def send_to_connection(self, conn_id: str, text: str, batch: Batch | None = None) -> int:
        """Send text to one socket by its connection id (not kept in the inbox)."""
        conn = self.registry.connection(conn_id)
        return deliver([conn], text, None, batch, count=self.delivered) if conn is not None else 0

    def publish(
        self,
        channels: Sequence[str],
        text: str,
        except_conn: str | None = None,
        batch: Batch | None = None,
        event: str | None = None,
        user_id: str | None = None,
        offsets: dict | None = None,
        floors: dict | None = None,
    ) -> int:
        """Send text to every socket in any of channels but the one except_conn names: once
        to each wsboard socket, once per channel to a Pusher one (its events name their
        channel); event names it for Pusher sockets. Return how many took it. Not kept in
        any inbox. Kept in the channels' history, or given the offsets a shared history
        numbered it with; floors: (socket, channel) -> the offset its opening replayed."""
        if offsets is None:
            history = self.history
            offsets = {} if history is None else history.add(channels, text, event, time.time())
        seen: set = set()
        delivered = 0
        for channel in channels:
            members = self.registry.members(channel)
            if except_conn is not None or seen:  # one channel, nobody left out: as it is
                members = [
                    c
                    for c in members
                    if c.conn_id != except_conn and (c.framing.per_channel or c not in seen)
                ]
            if len(channels) > 1:
                seen.update(members)
            if floors and offsets:
                members = [c for c in members if not replayed(c, offsets, floors)]
            for told, group in offset_groups(members, channel, offsets, len(channels) > 1):
                topic = Topic(channel, event, user_id, told)
                delivered += deliver(
                    group, text, None, batch, hold=False, topic=topic, count=self.delivered
                )
        return delivered

    # Channel history.

    def _history_of(self, channel: str) -> History:
        if self.history is None or not self.history.keeps(channel):
            raise BadRequest(HISTORY_OFF)
        return self.history

    def position(self, channel: str) -> tuple:
        """(epoch, last offset) of channel's history."""
        return self._history_of(channel).position(channel, time.time())

    def history_page(self, channel: str, since: tuple | None, limit: int) -> "HistoryPage":
        """channel's kept publications: after since (epoch, offset), the first limit of
        them; without since, the last limit."""
        history, now = self._history_of(channel), time.time()
        if since is None:
            (stream, items), gap = history.last(channel, limit, now), False
        else:
            stream, items, gap = history.since(channel, since[0], since[1], now)
            items = items[:limit]
        kept = [(p.offsets[channel], p.text, p.event) for p in items]
        return HistoryPage(stream.epoch, stream.offset, kept, gap)

    def subscribe(self, conn: Connection, channel: str, user: tuple | None = None) -> list | None:
        """conn (a socket of this process) asks to be in channel, as user (id, info) in a
        presence channel: the frames it gets, or None when it is in its limit of channels."""
        already = conn.channels is not None and channel in conn.channels
        if user is not None and not already:
            if conn.users is None:
                conn.users = {}
            conn.users[channel] = user[0]
        limit = self.cfg.max_channels_per_socket
        if not self.registry.join(conn, channel, limit, user[1] if user else None):
            if user is not None and conn.users:
                conn.users.pop(channel, None)
            return None
        self.hooks.settle(conn)  # its route is in force before it is told it is in
        if already:
            if not channel.startswith(PRESENCE_PREFIX):
                return []
            return self.hooks.members_frames(conn, channel)
        return self._joined(conn, channel)

    def unsubscribe(self, conn: Connection, channel: str) -> bool:
        """conn (a socket of this process) leaves channel; False when it was not in it."""
        member = conn.member(channel)
        if not self.registry.leave(conn, channel):
            return False
        if channel.startswith(PRESENCE_PREFIX):
            self._left(member, channel)
        return True

    def terminate_user(self, user_id: str, code: int, reason: str) -> int:
        """Close every socket of id user_id, every socket signed in as that user and every
        socket in a presence channel as that user (Pusher's terminate_connections); return
        how many."""
        conns = dict.fromkeys(self.registry.sockets_of(user_id))
        for conn in self.registry.open_connections():
            if conn.user == user_id or (conn.users and user_id in conn.users.values()):
                conns[conn] = None
        for conn in conns:
            conn.ws.end(EndReason.KICKED, code, reason, f"kicked ({code} {reason})")
        return len(conns)

    def _targets(self, client_id: str | None, conn_id: str | None) -> list:
        if conn_id is not None:
            conn = self.registry.connection(conn_id)
            return [conn] if conn is not None else []
        return self.registry.sockets_of(client_id)

    def join(
        self,
        channel: str,
        client_id: str | None = None,
        conn_id: str | None = None,
        sticky: bool = False,
    ) -> tuple:
        """Put the id's open sockets (or one connection) in channel: (found, now in it).
        sticky: the id's sockets opened later too (LimitReached past a bound)."""
        conns = self._targets(client_id, conn_id)
        if sticky and not self.sticky.add(client_id, channel, bool(conns), time.time()):
            raise LimitReached(
                f"{TOO_MANY_STICKY} (limit {self.cfg.max_sticky_ids} ids, "
                f"{self.cfg.max_channels_per_socket} channels an id)"
            )
        limit, joined = self.cfg.max_channels_per_socket, 0
        for conn in conns:
            already = conn.channels is not None and channel in conn.channels
            if self.registry.join(conn, channel, limit):
                joined += 1
                if not already:
                    for frame in self._joined(conn, channel):
                        try:
                            conn.ws.send_frame_bytes(frame)
                        except WebSocketError:
                            pass
        return len(conns), joined

    def leave(
        self, channel: str, client_id: str | None = None, conn_id: str | None = None
    ) -> tuple:
        """Take the id's open sockets (or one connection) out of channel, and end the id's
        sticky join of it: (found, taken out); a sticky join ended counts as found."""
        conns = self._targets(client_id, conn_id)
        unstuck = client_id is not None and self.sticky.remove(client_id, channel)
        members = dict.fromkeys(c.member(channel) for c in conns)
        left = sum(self.registry.leave(c, channel) for c in conns)
        if left and channel.startswith(PRESENCE_PREFIX):
            for member in members:
                self._left(member, channel)
        return len(conns) or int(unstuck), left

    def online(self, ids: Sequence[str]) -> list:
        """The ids asked, in the order asked, that have at least one open socket."""
        return [i for i in dict.fromkeys(ids) if self.registry.sockets_of(i)]

    def count(self, channel: str | None = None) -> tuple:
        """(open sockets, distinct ids among them), everywhere or in channel."""
        sockets, ids = self.count_with_ids(channel)
        return sockets, len(ids)

    def count_with_ids(self, channel: str | None = None) -> list:
        """[open sockets, their distinct ids], everywhere or in channel: a backplane adds up
        the sockets of every process and counts the ids once."""
        registry = self.registry
        conns = registry.open_connections() if channel is None else registry.members(channel)
        return [len(conns), list({c.client_id for c in conns})]

    def channel_clients(self, channel: str) -> list:
        return [self._row(c) for c in self.registry.members(channel)]

    def channels(self) -> dict:
        """Each channel with an open socket in it, and how many."""
        counts = {name: len(self.registry.members(name)) for name in self.registry.channel_names()}
        return {name: count for name, count in counts.items() if count}

    def kick_connection(self, conn_id: str, code: int, reason: str) -> int:
        conn = self.registry.connection(conn_id)
        if conn is None:
            return 0
        conn.ws.end(EndReason.KICKED, code, reason, f"kicked ({code} {reason})")
        return 1

    def kick(self, client_id: str, code: int, reason: str) -> int:
        conns = self.registry.sockets_of(client_id)
        for conn in conns:
            conn.ws.end(EndReason.KICKED, code, reason, f"kicked ({code} {reason})")
        return len(conns)

    # What there is.

    def clients(self) -> list:
        return [self._row(c) for c in self.registry.open_connections()]

    def _row(self, c: Connection) -> ClientRow:
        return ClientRow(
            c.client_id,
            c.conn_id,
            c.peer,
            c.connected_at,
            c.origin,
            c.framing.name,
            c.ws.queued_bytes,
            self.meta.get(c.client_id),
            c.user,
        )

    def stats(self) -> dict:
        return {
            "sockets": len(self.registry.open_connections()),
            "inbox_ids": len(self.inbox) if self.inbox is not None else 0,
            "inbox_bytes": self.inbox.total_bytes if self.inbox is not None else 0,
            "history_channels": len(self.history) if self.history is not None else 0,
            "history_bytes": self.history.total_bytes if self.history is not None else 0,
            "sticky_ids": len(self.sticky),
            "sticky_away": len(self.sticky.away),
            "backplane": {"state": "off"},
        }

    # This process's own sockets, for the heartbeat, the drain and the limits.

    def local_connections(self) -> list:
        return list(self.registry)

    def local_count(self) -> int:
        return len(self.registry)

    def expire(self, now: float) -> None:
        if self.inbox is not None:
            self.inbox.expire(now, self.registry.count_for_id)
        if self.history is not None:
            self.history.expire(now, lambda channel: bool(self.registry.members(channel)))
        self.sticky.expire(now)
        self.keys.expire(now)


###############################################################################
# Scale-out: the backplane ####################################################
###############################################################################
# With --redis every process shares one id space, and its hub is a Backplane: this
# process's LocalHub (``here``, which hands over presence and routing through LocalHooks)
# composed with a transport that carries messages between processes. Routing rides on
# subscriptions: each process listens on a route for every client id and every channel it
# holds sockets of (the Registry's watch says when one comes or goes), so a SEND is one
# message that only the holders hear; the transport says how many heard it, so how many
# answers to wait for, and each holder answers with the sockets that took it, so OK means
# delivered. A process that dies drops out of routing with its connection; one that hangs
# is cut off by the others after --node-timeout. Listings ask every live process and wait
# for all of them, or say Timeout.
#
# The backplane is generic: requests and their Answers, the Tally of a send, the message
# kinds between processes (HANDLERS) and who else holds an id. What it needs of a bus is
# the Transport protocol; RedisTransport (the next section) is the one there is. A NATS or
# PostgreSQL LISTEN/NOTIFY transport would implement Transport alone (publish to a route and
# say how many heard it, one subscription per route, and a home for presence counts, the
# shared inbox and idempotency keys) and be paired with Backplane in HUBS, as redis_hub does.


json_string = json.encoder.encode_basestring_ascii  # json's own escaping (C), as compact_json's


def bus_send(node: str, client_id: str, text: str, request: str | None) -> str:
    """The bus message of a plain send (kind "s", delivered here first: "h"), as the JSON
    compact_json would write: the hot path of a cross-process SEND, 4x faster written so.
    With request, every holder answers it; without ("q"), none does."""
    tail = f'"r":{json_string(request)}}}' if request is not None else '"q":1}'
    return (
        f'{{"k":"s","o":{json_string(node)},"i":{json_string(client_id)},'
        f'"t":{json_string(text)},"h":1,{tail}'
    )


class Answers:
    """The answers to one request: as many as the transport said processes heard it."""

    __slots__ = ("expected", "values", "done", "error", "reply")

    def __init__(self) -> None:
        self.expected = -1
        self.values: list = []
        self.done = gevent.event.Event()
        self.error = ""  # TIMEOUT or UNAVAILABLE when the request's fate is not known
        self.reply: object = None  # what the bus answered (how many heard it, a script's list)

    def heard(self, reply: object) -> None:
        self.reply = reply
        self.expect(reply[0] if isinstance(reply, list) else reply)

    def fail(self, error: str) -> None:
        self.error = self.error or error
        self.done.set()

    def expect(self, heard: int) -> None:
        self.expected = heard
        if len(self.values) >= heard:
            self.done.set()

    def add(self, value: object) -> None:
        self.values.append(value)
        if 0 <= self.expected <= len(self.values):
            self.done.set()

    @property
    def complete(self) -> bool:
        return 0 <= self.expected <= len(self.values)

    def unknown(self) -> str:
        """Why what was asked is not known (TIMEOUT, UNAVAILABLE), or "" when it is."""
        return self.error or ("" if self.complete else TIMEOUT)


class Tally:
    """What one send reached, counted as its answers come in: a SendResult at the end."""

    __slots__ = ("sockets", "queued", "seq", "missing", "unconfirmed", "trouble")

    def __init__(self) -> None:
        self.sockets = self.queued = 0
        self.seq: dict = {}
        self.missing: list = []
        self.unconfirmed: list = []
        self.trouble = TIMEOUT

    def miss(self, client_id: str, trouble: str = "") -> None:
        """client_id got nothing; trouble: its fate is not known, and why."""
        self.missing.append(client_id)
        if trouble:
            self.unconfirmed.append(client_id)
            self.trouble = trouble

    def result(self) -> SendResult:
        return new_send_result((
            self.sockets, self.queued, self.seq, self.missing, False, tuple(self.unconfirmed),
            self.trouble,
        ))  # fmt: skip


class Transport(typing.Protocol):
    """What a Backplane asks of the bus between processes. A route is a name: "all", "ev",
    "n:<node>", ID_ROUTE + id or CHANNEL_ROUTE + channel; a message is a dict (or its JSON
    text, written already: bus_send). The transport
    calls its backplane back: heard(message, batch) for each message, in order, and
    burst_done() after each burst; link_came_up() and link_went_down(); wanted_routes()
    when it subscribes anew. Calls that must know an answer raise BackplaneError."""

    up: bool  # messages flow both ways now
    inbox: "RedisInbox | None"  # the shared inbox, when --inbox is on
    history: "RedisHistory | None"  # channels' shared history (--history, cache- channels)
    sticky: "RedisSticky"  # sticky joins, read as a socket opens

    def start(self) -> None: ...

    def stop(self) -> None: ...  # this process leaves: its memberships end, told once

    def stats(self) -> dict: ...  # state, processes, bundles, since, reconnects, error, routes…

    # Routes and messages.
    def route_changed(self, route: str, wanted: bool) -> None: ...

    def wait_routes(self) -> None: ...  # until the routes asked for so far are in force

    def routes_settled(self) -> bool: ...  # no route change is on its way

    def publish(self, route: str, message: dict | str, answers: Answers | None = None) -> None: ...

    def listeners_later(self, route: str, answers: Answers) -> None: ...  # in publish order

    def listeners(self, routes: list) -> list: ...  # how many processes hear each, now

    def beat(self) -> None: ...  # this process lives; those that stopped beating are ended

    # What lives in the shared store.
    def send_numbered(
        self, client_id: str, text: str, keep_offline: bool, head: dict, answers: Answers
    ) -> None: ...

    def publish_numbered(
        self, channels: list, route: str, message: dict, payload: list, answers: Answers
    ) -> None: ...

    def stick(self, client_id: str, channel: str) -> bool: ...

    def unstick(self, client_id: str, channel: str) -> bool: ...

    def keep_sticky(self, ids: list) -> None: ...

    def claim(self, key: str) -> SendResult | None: ...

    def settle_key(self, key: str, result: SendResult) -> bool: ...  # False: not replicated

    def member_changed(self, kind: str, channel: str, client_id: str, meta: object) -> None: ...

    def rejoin(self, memberships: dict) -> None: ...  # {"channel id": meta} held here

    def count_channels(self, rows: list, whole: bool = False) -> None: ...  # whole: all held here

    def sync(self) -> None: ...  # the membership changes queued so far are in force

    def set_watching(self, watched: bool) -> None: ...

    def watchers(self) -> set: ...


class EventRelay:
    """The sink that hands this process's events to the others' watchers. The webhook is
    told only by the process where an event happened, so it gets each event once."""

    def __init__(self, backplane: "Backplane") -> None:
        self.backplane = backplane

    def push(self, line: str, lifecycle: bool) -> None:
        backplane = self.backplane
        backplane.transport.publish(
            "ev", {"k": "ev", "o": backplane.node, "l": lifecycle, "e": line}
        )


class Backplane:
    """The hub of one process among many: its sockets (a LocalHub) reached from every
    process through a transport (see the banner). Implements Hub and LocalHooks."""

    FIXED = ("all", "ev")  # routes every process hears, beside its own n:<node>

    def __init__(
        self,
        cfg: Config,
        transport: "Callable[[Backplane], Transport]",
        events: "Events | None" = None,
        node: str = "",
    ) -> None:
        self.cfg = cfg
        self.node = node or str(10**11 + secrets.randbelow(9 * 10**11))
        self.events = events if events is not None else Events()
        self.transport: Transport = transport(self)
        self.inbox, self.history = self.transport.inbox, self.transport.history
        self.here = LocalHub(
            cfg,
            self.events,
            self.node,
            hooks=self,
            inbox=self.inbox,
            history=self.history,
            keeps_history=False,  # only the shared one
            sticky=self.transport.sticky,
        )
        self.registry = self.here.registry
        self.registry.watch = self._route_changed
        self.delivered = self.here.delivered
        # Events go to the other processes only while one of them has a watcher.
        self.relay = EventRelay(self)
        self.events.changed = self._watchers_changed
        self.watched_here = False
        self.watch_notice_at = 0.0
        self.requests = itertools.count(1)
        self.answers: dict[str, Answers] = {}
        self.others: dict = {}  # id held here -> how many other processes hold it (None: unknown)
        self.recount_at: dict = {}  # id -> when others[id] is to be counted again
        self.heard_here: dict = {}  # id -> when another process last said it gained it
        self.announcing: dict = {}  # id -> Event set once its "here" is answered
        self.fresh: list = []  # ids that got their first socket here, not yet announced
        self.replies: list = []  # (origin, request, value) to send after the reader's batch
        self.floors: dict = {}  # Connection -> last seq its opening gave it, while it resumes
        self.channel_floors: dict = {}  # (Connection, channel) -> last offset its opening read
        self.opening: dict = {}  # Connection -> numbered publications heard while it opens
        self.heart: gevent.Greenlet | None = None

    # Life.

    def start(self) -> None:
        self.transport.start()
        self.here.start()
        self.heart = gevent.spawn(self._heartbeat)

    def stop(self) -> None:
        """Leave: end this process's memberships (their leaves are told), its channel
        counts and its record."""
        self.here.drop_timers()
        self.here.stop()
        if self.heart is not None:
            self.heart.kill(block=True, timeout=1)
        self.transport.stop()

    def unready_reason(self) -> str | None:
        return None if self.transport.up else "backplane down"

    def expire(self, now: float) -> None:
        """Keys and inboxes expire in the shared store by themselves."""

    def sync(self) -> None:
        """Wait (bounded) until the memberships queued so far are in force and everything
        published before now has been heard here."""
        self.transport.sync()
        try:
            self._query("n:" + self.node, "channels")
        except BackplaneError:
            pass

    # A socket's own life: this process's part is the local hub's. Opening frames from the
    # shared inbox: later messages at or below the floor came with them.

    def admit(self, hs: Handshake) -> Refusal | None:
        return self.here.admit(hs)

    def attach(self, conn: Connection, hs: Handshake) -> list:
        # What is numbered (inbox sends, channel publications) and heard while its opening
        # is read waits for it: then it gets what its replay did not.
        if self.inbox is not None or self.history is not None:
            self.opening[conn] = []
        if self.history is not None:
            self.channel_floors[(conn, None)] = 0
        try:
            frames = self.here.attach(conn, hs)
        finally:
            held = self.opening.pop(conn, ())
            self.channel_floors.pop((conn, None), None)
        if self.inbox is not None and conn.client_id in self.inbox.opened:
            # Read after its route was in force: what is heard now up to that number, it has.
            self.floors[conn] = self.inbox.opened.pop(conn.client_id)
            gevent.spawn_later(5 * self.cfg.redis_timeout, self.floors.pop, conn, None)
        if self.history is not None and self.history.opened:
            read = [key for key in self.history.opened if key[0] is conn]
            for key in read:
                self.channel_floors[key] = self.history.opened.pop(key)
            gevent.spawn_later(5 * self.cfg.redis_timeout, self._forget_floors, conn)
        for message in held:  # after the replay (the socket is not open yet), if not in it
            self._deliver_held(conn, message)
        return frames

    def _deliver_held(self, conn: Connection, message: dict) -> None:
        if message["k"] == "s":
            seq = message["s"]
            if seq > self.floors.get(conn, 0):
                deliver([conn], message["t"], seq, None, count=self.delivered)
            return
        offsets = offsets_in(message["of"], conn.channels or ())
        if (
            not offsets
            or conn.conn_id == message["x"]
            or replayed(conn, offsets, self.channel_floors)
        ):
            return
        topic = Topic(next(iter(offsets)), message.get("e"), message.get("u"), offsets)
        deliver([conn], message["t"], None, None, hold=False, topic=topic, count=self.delivered)

    def _forget_floors(self, conn: Connection) -> None:
        for key in [key for key in self.channel_floors if key[0] is conn]:
            del self.channel_floors[key]

    def detach(self, conn: Connection) -> None:
        self.floors.pop(conn, None)
        if self.channel_floors:
            self._forget_floors(conn)
        self.here.detach(conn)

    def subscribe(self, conn: Connection, channel: str, user: tuple | None = None) -> list | None:
        return self.here.subscribe(conn, channel, user)

    def unsubscribe(self, conn: Connection, channel: str) -> bool:
        return self.here.unsubscribe(conn, channel)

    def local_connections(self) -> list:
        return self.here.local_connections()

    def position(self, channel: str) -> tuple:  # the shared history, read by here
        return self.here.position(channel)

    def history_page(self, channel: str, since: tuple | None, limit: int) -> HistoryPage:
        return self.here.history_page(channel, since, limit)

    def local_count(self) -> int:
        return self.here.local_count()

    # Routes: which ids and channels this process holds, as the transport's subscriptions.

    def _route_changed(self, route: str, wanted: bool) -> None:
        self.transport.route_changed(route, wanted)
        if route.startswith(ID_ROUTE):
            client_id = route[len(ID_ROUTE) :]
            if wanted:
                self.others[client_id] = None  # not known until announced
                self.fresh.append(client_id)
            else:
                self.others.pop(client_id, None)
                self.recount_at.pop(client_id, None)
                if self.transport.up:
                    self.transport.publish(route, {"k": "gone", "o": self.node, "i": client_id})

    def wanted_routes(self) -> list:
        return [
            *self.FIXED,
            "n:" + self.node,
            *(ID_ROUTE + i for i in self.registry.ids()),
            *(CHANNEL_ROUTE + c for c in self.registry.channel_names()),
        ]

    def settle(self, conn: Connection) -> None:
        """A socket was just registered: wait (bounded) until the bus routes its id and
        channels here, so a SEND from any process the moment it has its 101 finds it."""
        fresh, self.fresh = self.fresh, []
        if not self.transport.up:
            return
        self.transport.wait_routes()
        for client_id in fresh:
            self._announce(client_id)
        if conn.client_id in self.announcing:  # another socket's doing
            self.announcing[conn.client_id].wait(self.cfg.redis_timeout)

    # The transport's calls back.

    def heard(self, message: dict, batch: Batch) -> None:
        """A message from the bus (run on the transport's reader, in order)."""
        handler = self.HANDLERS.get(message.get("k"))
        if handler is not None:
            handler(self, message, batch)

    def burst_done(self) -> None:
        """The reader has nothing more buffered: its held frames are out, answer now."""
        self._send_replies()

    def link_came_up(self) -> None:
        self.recount_at.clear()  # every id is recounted, its route now in force
        gevent.spawn(self._rejoin)

    def link_went_down(self) -> None:
        for answers in self.answers.values():
            answers.fail(TIMEOUT)  # asked, perhaps carried out: not known
        for client_id in self.others:
            self.others[client_id] = None  # who else holds it is learnt anew when the link is back

    def _rejoin(self) -> None:
        """The link is (back) up: the bus's view of this process is made true again."""
        try:
            self.transport.rejoin(self._memberships())
            if self.registry.changed is not None:
                self.transport.count_channels(self.here.channel_rows(), whole=True)
            self.transport.beat()
            self._recount()
            self._recount_watchers()
        except BackplaneError:
            pass

    def _memberships(self) -> dict:
        """{"channel id": meta} of every presence membership here, with those whose leave
        waits out the grace."""
        here, registry = self.here, self.registry
        pairs = [(c, i) for c in registry.presence_channels() for i in registry.presence_ids(c)]
        pairs += list(here.leaving)
        return {f"{c} {i}": here.member(i, c)["meta"] for c, i in pairs}

    def _heartbeat(self) -> None:
        """This process says it lives, and what others hold and watch is counted anew."""
        while True:
            gevent.sleep(self.cfg.node_timeout / 5)
            if not self.transport.up:
                continue
            try:
                self.transport.beat()
                self._recount()
                self._recount_watchers()
                held = self.here.sticky.held
                self.transport.keep_sticky([i for i in held if self.registry.count_for_id(i)])
            except BackplaneError:
                pass
            except Exception:
                log.exception("backplane heartbeat failed")

    # Sending and asking.

    def _ask(self, route: str, message: dict, send: Callable | None = None) -> tuple:
        """Publish a request to route (through send(message, answers=)); (answers,
        complete) once every process that heard it has answered, or the timeout is over."""
        if not self.transport.up:
            raise BackplaneError(UNAVAILABLE)
        request = str(next(self.requests))
        message["o"], message["r"] = self.node, request
        answers = self.answers[request] = Answers()
        try:
            if send is None:
                self.transport.publish(route, message, answers)
            else:
                send(message, answers=answers)
            answers.done.wait(self.cfg.redis_timeout)
        finally:
            del self.answers[request]
        if answers.error:
            raise BackplaneError(answers.error)
        return answers.values, answers.complete

    def _ask_all(self, route: str, message: dict, send: Callable | None = None) -> list:
        values, complete = self._ask(route, message, send)
        if not complete:
            raise BackplaneError(TIMEOUT)
        return values

    def _answer(self, message: dict, value: object) -> None:
        """Answer a request once the frames it made have left the reader's batch."""
        self.replies.append((message["o"], message["r"], value))

    def _send_replies(self) -> None:
        replies, self.replies = self.replies, []
        elsewhere: dict = {}  # origin -> [[request, value]]: one message each per burst
        for origin, request, value in replies:
            if origin == self.node:
                answers = self.answers.get(request)
                if answers is not None:
                    answers.add(value)
            else:
                elsewhere.setdefault(origin, []).append([request, value])
        for origin, answered in elsewhere.items():
            self.transport.publish("n:" + origin, {"k": "a", "rs": answered})

    def send(
        self,
        ids: Iterable[str],
        text: str,
        keep_offline: bool,
        key: str | None = None,
        batch: Batch | None = None,
        count_all: bool = True,
    ) -> SendResult:
        if key is not None:
            earlier = self.transport.claim(key)
            if earlier is not None:
                return earlier._replace(duplicate=True)
        (result,) = self.start_sends([(ids, text, keep_offline)], batch, count_all)()
        if key is not None and not self.transport.settle_key(key, result):
            raise BackplaneError(TIMEOUT)  # done, but its key may not outlive a failover
        return result

    def start_sends(
        self, sends: Sequence[tuple], batch: Batch | None = None, count_all: bool = True
    ) -> Callable[[], list]:
        """Several sends, (ids, text, keep_offline) each, in order, their bus part in one
        round trip: what a control connection's run of SEND lines becomes. They are under
        way when this returns; the call it returns waits for their answers, so the caller
        may start the next run meanwhile. count_all=False: once a socket here took it, the
        answer need not wait to count the others."""
        sends = [
            (ids if len(ids) == 1 else list(dict.fromkeys(ids)), text, keep)
            for ids, text, keep in sends
        ]
        if self.inbox is not None:
            return self._send_numbered(sends)
        return self._send_here_first(sends, batch, count_all)

    def _send_here_first(
        self, sends: list, batch: Batch | None, count_all: bool
    ) -> Callable[[], list]:
        """This process's sockets get it at once. The bus is told only when some other process
        may hold the id (self.others says), or none here does; those copies are marked so
        that this process, hearing its own, does not deliver twice."""
        tallies, waits = [], []
        for ids, text, _ in sends:
            tally = Tally()
            tallies.append(tally)
            for client_id in ids:
                conns = self.registry.sockets_of(client_id)
                took = deliver(conns, text, None, batch, count=self.delivered) if conns else 0
                tally.sockets += took
                if conns and self.others.get(client_id) == 0:  # nobody else has it
                    if not took:
                        tally.miss(client_id)
                    continue
                if not self.transport.up:
                    if not took:
                        tally.miss(client_id, UNAVAILABLE)
                    continue
                answers = request = None
                if not (took and not count_all):  # else no answer is wanted
                    request = str(next(self.requests))
                    answers = self.answers[request] = Answers()
                    waits.append((tally, client_id, took, request, answers))
                message = bus_send(self.node, client_id, text, request)
                self.transport.publish(ID_ROUTE + client_id, message, answers)
        deadline = time.monotonic() + self.cfg.redis_timeout

        def results() -> list:
            for tally, client_id, took, _, answers in self._awaited(waits, deadline):
                elsewhere = sum(answers.values)
                tally.sockets += elsewhere
                if not took and not elsewhere:
                    tally.miss(client_id, answers.unknown())
            return [tally.result() for tally in tallies]

        return results

    def _send_numbered(self, sends: list) -> Callable[[], list]:
        """With the inbox: the transport numbers, keeps and publishes each message in one
        step, and this process delivers its own copies when it hears them, in number order."""
        if not self.transport.up:
            unnumbered = [self._send_here(ids, text, None) for ids, text, _ in sends]
            return lambda: unnumbered
        tallies, waits = [], []
        for ids, text, keep_offline in sends:
            tally = Tally()
            tallies.append(tally)
            for client_id in ids:
                request = str(next(self.requests))
                answers = self.answers[request] = Answers()
                waits.append((tally, client_id, 0, request, answers))
                head = {"k": "s", "o": self.node, "r": request, "i": client_id, "t": text}
                self.transport.send_numbered(client_id, text, keep_offline, head, answers)
        deadline = time.monotonic() + self.cfg.redis_timeout

        def results() -> list:
            for tally, client_id, _, _, answers in self._awaited(waits, deadline):
                heard, seq = answers.reply[:2] if isinstance(answers.reply, list) else (0, 0)
                if seq:
                    tally.seq[client_id] = seq
                took = sum(answers.values)
                tally.sockets += took
                if took:
                    continue
                if answers.reply is not None and not heard and seq:
                    tally.queued += 1  # kept for when it comes
                else:
                    tally.miss(client_id, answers.unknown())
            return [tally.result() for tally in tallies]

        return results

    def _awaited(self, waits: list, deadline: float) -> Iterator[tuple]:
        """Each (tally, id, took, request, answers) once its answers are in, or the one
        deadline for all of them is past; the requests are forgotten after."""
        try:
            for wait in waits:
                wait[4].done.wait(max(0.0, deadline - time.monotonic()))
                yield wait
        finally:
            for wait in waits:
                del self.answers[wait[3]]

    def _send_here(self, ids: list, text: str, batch: Batch | None) -> SendResult:
        """The bus cannot be reached: this process's sockets still get it (unnumbered)."""
        tally = Tally()
        for client_id in ids:
            conns = self.registry.sockets_of(client_id)
            took = deliver(conns, text, None, batch, count=self.delivered) if conns else 0
            tally.sockets += took
            if not took:
                tally.miss(client_id, UNAVAILABLE)
        return tally.result()

    def send_to_connection(self, conn_id: str, text: str, batch: Batch | None = None) -> int:
        message = {"k": "sc", "cn": conn_id, "t": text}
        return sum(self._ask_all("n:" + conn_id.partition(".")[0], message))

    def broadcast(self, text: str, batch: Batch | None = None) -> int:
        if not self.transport.up:  # refused whole, so that a retry doubles nothing
            raise BackplaneError(UNAVAILABLE)
        here = self.here.broadcast(text, batch)
        return here + sum(self._ask_all("all", {"k": "b", "t": text, "h": 1}))

    def publish(
        self,
        channels: Sequence[str],
        text: str,
        except_conn: str | None = None,
        batch: Batch | None = None,
        event: str | None = None,
        user_id: str | None = None,
    ) -> int:
        # One channel: only the processes with members hear it. Several: every process, so
        # a socket in two of them still gets it once.
        if not self.transport.up:
            raise BackplaneError(UNAVAILABLE)
        route = CHANNEL_ROUTE + channels[0] if len(channels) == 1 else "all"
        message = {"k": "pub", "c": list(channels), "t": text, "x": except_conn}
        if event is not None:
            message["e"] = event
        if user_id is not None:
            message["u"] = user_id
        history = self.history
        kept = [c for c in channels if history.keeps(c)] if history is not None else []
        if kept:  # numbered in Redis; every holder, this process too, delivers as it hears
            payload = [text, event]
            send = functools.partial(self.transport.publish_numbered, kept, route, payload=payload)
            return sum(self._ask_all(route, message, send))
        here = self.here.publish(channels, text, except_conn, batch, event, user_id, offsets={})
        return here + sum(self._ask_all(route, {**message, "h": 1}))

    def _target_route(self, client_id: str | None, conn_id: str | None) -> str:
        return "n:" + conn_id.partition(".")[0] if conn_id else ID_ROUTE + client_id

    def join(
        self,
        channel: str,
        client_id: str | None = None,
        conn_id: str | None = None,
        sticky: bool = False,
    ) -> tuple:
        if sticky and not self.transport.stick(client_id, channel):
            raise LimitReached(
                f"{TOO_MANY_STICKY} (limit {self.cfg.max_sticky_ids} ids, "
                f"{self.cfg.max_channels_per_socket} channels an id)"
            )
        message = {"k": "j", "c": channel, "i": client_id, "cn": conn_id, "st": int(sticky)}
        values = self._ask_all(self._target_route(client_id, conn_id), message)
        return sum(v[0] for v in values), sum(v[1] for v in values)

    def leave(
        self, channel: str, client_id: str | None = None, conn_id: str | None = None
    ) -> tuple:
        unstuck = client_id is not None and self.transport.unstick(client_id, channel)
        message = {"k": "l", "c": channel, "i": client_id, "cn": conn_id}
        values = self._ask_all(self._target_route(client_id, conn_id), message)
        return sum(v[0] for v in values) or int(unstuck), sum(v[1] for v in values)

    def kick(self, client_id: str, code: int, reason: str) -> int:
        message = {"k": "k", "i": client_id, "code": code, "why": reason}
        return sum(self._ask_all(ID_ROUTE + client_id, message))

    def kick_connection(self, conn_id: str, code: int, reason: str) -> int:
        message = {"k": "kc", "cn": conn_id, "code": code, "why": reason}
        return sum(self._ask_all("n:" + conn_id.partition(".")[0], message))

    def set_meta(self, client_id: str, meta: dict | None) -> int:
        return sum(self._ask_all(ID_ROUTE + client_id, {"k": "m", "i": client_id, "meta": meta}))

    def terminate_user(self, user_id: str, code: int, reason: str) -> int:
        if not self.transport.up:
            raise BackplaneError(UNAVAILABLE)
        here = self.here.terminate_user(user_id, code, reason)
        message = {"k": "tu", "i": user_id, "code": code, "why": reason, "h": 1}
        return here + sum(self._ask_all("all", message))

    # What there is: asked of every process that can have it.

    def _query(self, route: str, name: str, *args: object) -> list:
        return self._ask_all(route, {"k": "q", "q": name, "a": list(args)})

    def clients(self) -> list:
        rows = [ClientRow(*row) for rows in self._query("all", "clients") for row in rows]
        return sorted(rows, key=lambda row: row.since)

    def channel_clients(self, channel: str) -> list:
        rows = self._query(CHANNEL_ROUTE + channel, "channel", channel)
        return sorted((ClientRow(*row) for part in rows for row in part), key=lambda r: r.since)

    def online(self, ids: Sequence[str]) -> list:
        found = {i for part in self._query("all", "online", list(ids)) for i in part}
        return [i for i in dict.fromkeys(ids) if i in found]

    def count(self, channel: str | None = None) -> tuple:
        route = "all" if channel is None else CHANNEL_ROUTE + channel
        parts = self._query(route, "count", channel)
        return sum(p[0] for p in parts), len({i for p in parts for i in p[1]})

    def channels(self) -> dict:
        counts: collections.Counter = collections.Counter()
        for part in self._query("all", "channels"):
            counts.update(part)
        return dict(counts)

    def presence(self, channel: str) -> list:
        members: dict = {}
        for part in self._query(CHANNEL_ROUTE + channel, "presence", channel):
            for member in part:
                if members.get(member["id"], {}).get("meta") is None:
                    members[member["id"]] = member
        return list(members.values())

    def stats(self) -> dict:
        link = self.transport.stats()
        return {
            "sockets": len(self.registry.open_connections()),
            "inbox_ids": 0,
            "inbox_bytes": 0,
            "history_channels": 0,
            "history_bytes": 0,
            "sticky_ids": len(self.here.sticky),  # those held here; the rest are in Redis
            "sticky_away": 0,
            "backplane": {
                "state": link["state"],
                "node": self.node,
                **{k: link[k] for k in ("processes", "bundles", "since", "reconnects", "error")},
                "routes": link["routes"],
                "ids_elsewhere_too": sum(1 for n in self.others.values() if n),
                "ids_not_counted": sum(1 for n in self.others.values() if n is None),
                "waiting": link["waiting"],
                "dropped": link["dropped"],
            },
        }

    # What other processes ask of this one (run on the transport's reader, in order).

    def _ours(self, message: dict) -> bool:
        """A copy of what this process already delivered here itself."""
        return "h" in message and message["o"] == self.node

    def _on_send(self, message: dict, batch: Batch) -> None:
        if self._ours(message):
            took = 0
        else:
            conns, seq = self.registry.sockets_of(message["i"]), message.get("s")
            held = 0
            if conns and seq is not None and self.opening:  # it waits for their openings
                waiting = [c for c in conns if c in self.opening]
                for conn in waiting:
                    self.opening[conn].append(message)
                conns, held = [c for c in conns if c not in self.opening], len(waiting)
            if conns and seq is not None and self.floors:
                conns = [c for c in conns if seq > self.floors.get(c, 0)]
            took = held + (
                deliver(conns, message["t"], seq, batch, count=self.delivered) if conns else 0
            )
        if "q" not in message:
            self._answer(message, took)

    def _on_send_to_connection(self, message: dict, batch: Batch) -> None:
        self._answer(message, self.here.send_to_connection(message["cn"], message["t"], batch))

    def _on_broadcast(self, message: dict, batch: Batch) -> None:
        took = 0 if self._ours(message) else self.here.broadcast(message["t"], batch)
        self._answer(message, took)

    def _on_publish(self, message: dict, batch: Batch) -> None:
        if self._ours(message):
            self._answer(message, 0)
            return
        event, user_id, offsets = message.get("e"), message.get("u"), message.get("of", {})
        held = 0
        if offsets and self.opening:
            for conn in self.opening:
                if conn.channels and not conn.channels.isdisjoint(offsets):
                    self.opening[conn].append(message)
                    held += 1
        sockets = self.here.publish(
            message["c"], message["t"], message["x"], batch, event, user_id, offsets,
            self.channel_floors,
        )  # fmt: skip
        self._answer(message, sockets + held)  # those held get it once their opening is out

    # Who else holds an id: a process that gains one says so ("here", answered by every
    # holder, before its socket's 101) and one that loses it says "gone"; the heartbeat
    # recounts from the bus. Sends to an id nobody else holds never touch the bus.

    def _on_here(self, message: dict, batch: Batch) -> None:
        client_id = message["i"]
        held = client_id in self.others
        if held and message["o"] != self.node:
            if self.others[client_id] is not None:
                self.others[client_id] += 1
            self.heard_here[client_id] = time.monotonic()
        self._answer(message, int(held and message["o"] != self.node))

    def _on_gone(self, message: dict, batch: Batch) -> None:
        client_id = message["i"]
        if message["o"] != self.node and self.others.get(client_id):
            self.others[client_id] -= 1

    def _announce(self, client_id: str) -> None:
        """Tell the other holders of client_id that this process has it too, and learn how
        many they are; until then (or if that fails) every send to it asks the bus."""
        done = self.announcing[client_id] = gevent.event.Event()
        try:
            # Our route is in force: if the bus counts no other listener, nobody is to be told
            # (one that subscribes later counts us, and says "here" itself).
            counted = Answers()
            self.transport.listeners_later(ID_ROUTE + client_id, counted)
            counted.done.wait(self.cfg.redis_timeout)
            if counted.error or counted.reply is None:
                return
            others = 0
            if counted.reply > 1:
                values, complete = self._ask(ID_ROUTE + client_id, {"k": "here", "i": client_id})
                if not complete:
                    return
                others = sum(values)
            if client_id in self.others:
                self.others[client_id] = others
                self.recount_at[client_id] = time.monotonic() + 1.0  # its route may be young
        except BackplaneError:
            pass
        finally:
            done.set()
            if self.announcing.get(client_id) is done:
                del self.announcing[client_id]

    def _recount(self) -> None:
        """Who else holds each id, from the bus's own count of listeners (less this process):
        puts right what a lost notice made wrong. A "here" heard meanwhile is kept. An id is
        counted a second after its announce, then about once per --node-timeout (at a
        random point of its second half, so that 100,000 ids do not all come due in one
        heartbeat); an id not known (a link came up) at the next heartbeat."""
        now = time.monotonic()
        busy = set(self.announcing) | set(self.fresh)  # their routes may not be in force yet
        ids = [i for i, at in self.recount_at.items() if at <= now and i not in busy]
        if self.transport.routes_settled():
            ids += [
                i
                for i, n in self.others.items()
                if n is None and i not in self.recount_at and i not in busy
            ]
        period = self.cfg.node_timeout
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            asked = time.monotonic()
            counts = self.transport.listeners([ID_ROUTE + i for i in chunk])
            for client_id, listeners in zip(chunk, counts, strict=True):
                if client_id not in self.others:
                    continue
                others = max(0, listeners - 1)
                if self.heard_here.get(client_id, 0) > asked:
                    others = max(others, self.others[client_id] or 0)
                self.others[client_id] = others
                self.recount_at[client_id] = asked + period * (0.5 + random.random() / 2)
        self.heard_here.clear()

    def _on_join(self, message: dict, batch: Batch) -> None:
        found = self.here.join(message["c"], message["i"], message["cn"])
        if message.get("st") and found[0]:  # its sockets here keep the sticky join alive
            self.here.sticky.held.add(message["i"])
        self._answer(message, list(found))

    def _on_leave(self, message: dict, batch: Batch) -> None:
        found = self.here.leave(message["c"], message["i"], message["cn"])
        self._answer(message, list(found))

    def _on_kick(self, message: dict, batch: Batch) -> None:
        self._answer(message, self.here.kick(message["i"], message["code"], message["why"]))

    def _on_terminate_user(self, message: dict, batch: Batch) -> None:
        if self._ours(message):
            self._answer(message, 0)
            return
        took = self.here.terminate_user(message["i"], message["code"], message["why"])
        self._answer(message, took)

    def _on_kick_connection(self, message: dict, batch: Batch) -> None:
        code, why = message["code"], message["why"]
        self._answer(message, self.here.kick_connection(message["cn"], code, why))

    def _on_meta(self, message: dict, batch: Batch) -> None:
        self._answer(message, self.here.set_meta(message["i"], message["meta"]))

    QUERIES = {
        "clients": lambda here: [list(row) for row in here.clients()],
        "channel": lambda here, channel: [list(r) for r in here.channel_clients(channel)],
        "online": lambda here, ids: here.online(ids),
        "count": lambda here, channel: here.count_with_ids(channel),
        "channels": lambda here: here.channels(),
        "presence": lambda here, channel: here.presence(channel),
    }

    def _on_query(self, message: dict, batch: Batch) -> None:
        self._answer(message, self.QUERIES[message["q"]](self.here, *message["a"]))

    def _on_answer(self, message: dict, batch: Batch) -> None:
        for request, value in message["rs"]:
            answers = self.answers.get(request)
            if answers is not None:
                answers.add(value)

    def _on_presence(self, message: dict, batch: Batch) -> None:
        self.here.tell_members(message["c"], message["change"])

    def _on_event(self, message: dict, batch: Batch) -> None:
        if message["o"] != self.node:
            self.events.tell(message["e"], message["l"])

    def _watchers_changed(self) -> None:
        watched = self.events.watched
        if watched == self.watched_here:
            return
        self.watched_here = watched
        try:
            self.transport.set_watching(watched)
        except BackplaneError:
            pass  # the heartbeat says it again
        if watched and self.transport.up:  # once answered, every process sends its events here
            try:
                self._ask("all", {"k": "watching"})
            except BackplaneError:
                pass

    def _on_watching(self, message: dict, batch: Batch) -> None:
        if message["o"] != self.node:
            self.watch_notice_at = time.monotonic()
            self.events.add(self.relay)
        self._answer(message, 1)

    def _recount_watchers(self) -> None:
        asked = time.monotonic()
        if self.watched_here:
            self.transport.set_watching(True)
        if self.transport.watchers() - {self.node}:
            self.events.add(self.relay)
        elif self.watch_notice_at < asked:  # no watcher came meanwhile
            self.events.remove(self.relay)

    def _on_count(self, message: dict, batch: Batch) -> None:
        self.here.tell_count(message["c"], message["n"])

    HANDLERS = {
        "s": _on_send,
        "sc": _on_send_to_connection,
        "b": _on_broadcast,
        "pub": _on_publish,
        "j": _on_join,
        "l": _on_leave,
        "k": _on_kick,
        "kc": _on_kick_connection,
        "tu": _on_terminate_user,
        "m": _on_meta,
        "q": _on_query,
        "a": _on_answer,
        "p": _on_presence,
        "ev": _on_event,
        "here": _on_here,
        "gone": _on_gone,
        "watching": _on_watching,
        "cnt": _on_count,
    }

    # Presence across processes: the transport keeps this process's memberships in the
    # shared store, in order; a member joins or leaves when the first process gains it or
    # the last one loses it, and that process alone tells the event sinks (LocalHooks).

    def member_joined(self, channel: str, member: dict) -> None:
        self.transport.member_changed("join", channel, member["id"], member["meta"])

    def channels_counted(self, rows: list) -> None:
        """This process's counts go to the shared store, in order with the memberships;
        what they change over every process is told by the process that changed it."""
        self.transport.count_channels(rows)

    def member_left(self, channel: str, client_id: str) -> None:
        self.transport.member_changed("leave", channel, client_id, None)

    def members_frames(self, conn: Connection, channel: str) -> list:
        """The member list needs every process: it follows soon, and until it is sent the
        socket's presence changes wait behind it."""
        self.here.awaiting[(conn, channel)] = []
        gevent.spawn(self._send_members, conn, channel)
        return []

    def _send_members(self, conn: Connection, channel: str) -> None:
        try:
            members = self.presence(channel)
        except BackplaneError:
            members = self.here.presence(channel)
        held = self.here.awaiting.pop((conn, channel), [])
        frames = [conn.framing.presence_members(conn, channel, members), *held]
        try:
            if not conn.ws.closed:
                conn.ws.write_frames(frames)
        except WebSocketError:
            pass


###############################################################################
# Scale-out: the Redis transport ##############################################
###############################################################################
# The backplane's bus on Redis. Routes are pub/sub channels (under --redis-prefix): one
# pub/sub link, read by one greenlet, subscribes this process to its routes, and PUBLISH's
# count says how many processes heard a message. Every publish of this process takes one
# lane (the outbox, pipelined), so every process hears them in the order they were made.
# Presence counts and the inbox live in Redis, each change one Lua script, so one atomic
# step; what Redis loses is put back by the live processes when it returns (rejoin).

# The inbox: KEYS box meta, box list, the id's route; ARGV text, keep when nobody heard
# (1/0), size, ttl, an epoch for a new box, the message without its "s" and closing brace.
# Numbering, keeping and publishing are one step, so every process hears an id's
# messages in the order of their numbers.
INBOX_SEND = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'undelivered', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local heard = redis.call('PUBLISH', KEYS[3], ARGV[6] .. ',"s":' .. seq .. '}')
if heard == 0 and ARGV[2] ~= '1' then
  redis.call('HINCRBY', KEYS[1], 'seq', -1)
  return {0, 0, epoch}
end
local now = redis.call('TIME')
redis.call('RPUSH', KEYS[2], cjson.encode({seq, ARGV[1], tonumber(now[1])}))
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
if heard == 0 and redis.call('HGET', KEYS[1], 'undelivered') == '0' then
  redis.call('HSET', KEYS[1], 'undelivered', seq)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {heard, seq, epoch}
"""

# A socket opens: KEYS box meta, box list; ARGV an epoch for a new box, ttl, take (1: only
# what was kept while the id had no socket), the reader's epoch and last seq. Returns
# {epoch, last seq, first undelivered, items}; the undelivered mark is cleared, so they are
# given once. A reader ahead of the box in its epoch saw what Redis lost: a new epoch.
INBOX_OPEN = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  if ARGV[3] == '1' then return {'', 0, 0, {}} end
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'undelivered', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
if ARGV[4] == epoch and tonumber(ARGV[5]) > tonumber(redis.call('HGET', KEYS[1], 'seq')) then
  epoch = ARGV[1]  -- the reader saw numbers this Redis lost (a failover): number anew
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'undelivered', 0)
  redis.call('DEL', KEYS[2])
end
local first = tonumber(redis.call('HGET', KEYS[1], 'undelivered'))
redis.call('HSET', KEYS[1], 'undelivered', 0)
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
if ARGV[3] == '1' and first == 0 then return {epoch, seq, 0, {}} end
return {epoch, seq, first, redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# Presence: KEYS this process's memberships, the channel's member counts, the all route;
# ARGV "channel id", id, the change to publish, quiet (1: publish nothing). A member is an
# id with a socket there on some process; the count says on how many.
PRESENCE_JOIN = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[2], 1) ~= 1 then return 0 end
if ARGV[4] ~= '1' then redis.call('PUBLISH', KEYS[3], ARGV[3]) end
return 1
"""

PRESENCE_LEAVE = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 1
"""

# A process is gone: KEYS its memberships, the node list, its record; ARGV the prefix,
# its name. Ends every membership it held and forgets it; returns the {channel, id} that
# left presence altogether (their leaves are published here, once).
REAP = """
local left = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local space = string.find(member, ' ', 1, true)
  local channel, id = string.sub(member, 1, space - 1), string.sub(member, space + 1)
  local counts = ARGV[1] .. ':pc:' .. channel
  if redis.call('HINCRBY', counts, id, -1) <= 0 then
    redis.call('HDEL', counts, id)
    redis.call('PUBLISH', ARGV[1] .. ':all', '{"k":"p","c":' .. cjson.encode(channel) ..
      ',"change":{"leave":{"id":' .. cjson.encode(id) .. '}}}')
    table.insert(left, channel)
    table.insert(left, id)
  end
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('SREM', ARGV[1] .. ':watching', ARGV[2])
return left
"""

# A process's count of a channel: KEYS the channel's counts (node -> sockets, while held),
# the process's counted channels, the channel's route; ARGV the node, the channel, its
# sockets there, held (1/0), whether a changed total is published (1/0). Returns {held
# before, held after, total before, total after} over every process; publishes a changed
# total to the channel's route for its sockets' subscription counts.
CHANNEL_COUNT = """
local function total(key)
  local n = 0
  for _, v in ipairs(redis.call('HVALS', key)) do n = n + tonumber(v) end
  return n
end
local was_held, old = redis.call('EXISTS', KEYS[1]), total(KEYS[1])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
local held, new = redis.call('EXISTS', KEYS[1]), total(KEYS[1])
if ARGV[5] == '1' and new ~= old and new > 0 then
  local told = '{"k":"cnt","c":' .. cjson.encode(ARGV[2]) .. ',"n":' .. new .. '}'
  redis.call('PUBLISH', KEYS[3], told)
end
return {was_held, held, old, new}
"""

# A process is gone: KEYS its counted channels; ARGV the prefix, its name, whether changed
# totals are published (1/0). Takes its counts out; returns {channel, held after, total
# before, total after} of each channel it held.
REAP_COUNTS = """
local told = {}
for _, channel in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local counts = ARGV[1] .. ':cc:' .. channel
  local old = 0
  for _, v in ipairs(redis.call('HVALS', counts)) do old = old + tonumber(v) end
  local new = old - tonumber(redis.call('HGET', counts, ARGV[2]) or '0')
  redis.call('HDEL', counts, ARGV[2])
  if ARGV[3] == '1' and new ~= old and new > 0 and string.sub(channel, 1, 9) ~= 'presence-' then
    redis.call('PUBLISH', ARGV[1] .. ':c:' .. channel,
      '{"k":"cnt","c":' .. cjson.encode(channel) .. ',"n":' .. new .. '}')
  end
  table.insert(told, channel)
  table.insert(told, redis.call('EXISTS', counts))
  table.insert(told, old)
  table.insert(told, new)
end
redis.call('DEL', KEYS[1])
return told
"""

# Channel history: KEYS a meta hash and a list per channel (meta1, list1, meta2, ...), then
# the route and the publication counter; ARGV how many channels, the message without its
# closing brace, the entry's payload, the ttl, the meta ttl, an epoch for a new channel,
# then each channel's size and name. Numbering, keeping and publishing are one step, so
# every process hears a channel's publications in the order of their offsets.
HISTORY_PUBLISH = """
local n = tonumber(ARGV[1])
local now = redis.call('TIME')[1]
local number = redis.call('INCR', KEYS[2 * n + 2])
local told, result = {}, {0}
for i = 1, n do
  local meta, list = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('HSETNX', meta, 'epoch', ARGV[6]) == 1 then
    redis.call('HSET', meta, 'offset', 0)
  end
  local offset = redis.call('HINCRBY', meta, 'offset', 1)
  redis.call('RPUSH', list, offset .. ' ' .. number .. ' ' .. now .. ' ' .. ARGV[3])
  redis.call('LTRIM', list, -tonumber(ARGV[6 + i]), -1)
  redis.call('EXPIRE', list, ARGV[4])
  redis.call('EXPIRE', meta, ARGV[5])
  table.insert(told, cjson.encode(ARGV[6 + n + i]) .. ':' .. offset)
  table.insert(result, offset)
end
local message = ARGV[2] .. ',"of":{' .. table.concat(told, ',') .. '}}'
result[1] = redis.call('PUBLISH', KEYS[2 * n + 1], message)
return result
"""

# A channel's history read: KEYS meta, list; ARGV an epoch for a new channel, the meta
# ttl, the offset to read after (-1: none), how many of the last to read, the reader's
# epoch. Returns {epoch, last offset, entries}: all kept when the reader's epoch differs;
# a reader ahead of the channel in its epoch saw what Redis lost: a new epoch.
HISTORY_READ = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local after, want = tonumber(ARGV[3]), tonumber(ARGV[4])
if after > offset and ARGV[5] == epoch then
  epoch = ARGV[1]  -- the reader saw offsets this Redis lost (a failover): number anew
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('DEL', KEYS[2])
  return {epoch, 0, {}}
end
if after >= 0 then
  if ARGV[5] ~= epoch then return {epoch, offset, redis.call('LRANGE', KEYS[2], 0, -1)} end
  want = offset - after
end
if want <= 0 then return {epoch, offset, {}} end
return {epoch, offset, redis.call('LRANGE', KEYS[2], -want, -1)}
"""

# Sticky joins: KEYS the id's channels (a hash), the ids with any (a sorted set by expiry);
# ARGV the channel, the session ttl, the channel limit, the id limit, the id. 1: in force,
# 0: past a limit. A holder of the id's sockets keeps both alive (STICKY_KEEP); after its
# last socket anywhere, they expire --session-ttl later.
STICKY_JOIN = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  local known = redis.call('EXISTS', KEYS[1]) == 1
  if not known and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 0 end
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
  redis.call('HSET', KEYS[1], ARGV[1], '')
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[5])
return 1
"""

# KEYS the id's channels, the sorted set; ARGV the channel, the id. 1: it was sticky.
STICKY_LEAVE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end
return 1
"""

# KEYS the sorted set, then each id's channels; ARGV the ttl, then the ids. Returns the ids
# whose sticky joins are gone (ended by a LEAVE elsewhere).
STICKY_KEEP = """
local now = tonumber(redis.call('TIME')[1])
local gone = {}
for i = 2, #KEYS do
  if redis.call('EXPIRE', KEYS[i], ARGV[1]) == 1 then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
  else
    table.insert(gone, ARGV[i])
  end
end
return gone
"""

# A heartbeat: KEYS the node list; ARGV this process, node timeout. Returns the processes
# whose last beat is older than the timeout, by Redis's clock (hosts' clocks may differ), to
# the microsecond: in whole seconds a beat at x.9 looked a second old at x+1.05.
BEAT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
redis.call('ZADD', KEYS[1], string.format('%.6f', now), ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now - tonumber(ARGV[2])))
"""


class BoxView(NamedTuple):
    """An inbox box as a hello tells it: its epoch and its last number."""

    epoch: str
    last_seq: int


class RedisInbox:
    """The inbox kept in Redis: any process numbers an id's messages from one counter, and
    a client resumes on whichever process it reaches. Bounded per id by --inbox and by age
    (the box expires --inbox-ttl after its last message); Redis's maxmemory bounds the rest."""

    def __init__(self, transport: "RedisTransport") -> None:
        self.transport = transport
        self.opened: dict = {}  # id -> the last number its latest opening read (see attach)

    def _open(self, client_id: str, take: bool, epoch: str = "", last: int = 0) -> list:
        transport = self.transport
        keys = [transport.key("im", client_id), transport.key("ib", client_id)]
        args = [secrets.token_hex(4), int(transport.cfg.inbox_ttl), int(take), epoch, last]
        return transport.call(transport.scripts["inbox_open"], keys, args)

    def _items(self, raw: list, now: float) -> list:
        """(seq, text) of raw items no older than the ttl."""
        ttl, items = self.transport.cfg.inbox_ttl, []
        for entry in raw:
            seq, text, at = json.loads(entry)
            if now - at <= ttl:
                items.append((int(seq), text))
        return items

    def take_undelivered(self, client_id: str, now: float) -> list:
        try:
            _, _, first, raw = self._open(client_id, take=True)
        except BackplaneError:
            return []
        return [text for seq, text in self._items(raw, now) if first and seq >= first]

    def missed(self, client_id: str, epoch: str, last: int, now: float) -> tuple:
        try:
            box_epoch, last_seq, _, raw = self._open(client_id, False, epoch, last)
        except BackplaneError:  # numbered by nothing now: a new epoch tells of the gap later
            return BoxView(secrets.token_hex(4), 0), [], bool(epoch)
        box_epoch = box_epoch.decode() if isinstance(box_epoch, bytes) else box_epoch
        box, items = BoxView(box_epoch, int(last_seq)), self._items(raw, now)
        self.opened[client_id] = box.last_seq
        first_kept = items[0][0] if items else box.last_seq + 1
        if epoch and epoch != box.epoch:
            return box, items, True
        if not epoch:
            last = 0
        return box, [(seq, text) for seq, text in items if seq > last], last + 1 < first_kept


class StreamView(NamedTuple):
    """A channel's history as Redis has it: its epoch and its last offset."""

    epoch: str
    offset: int


class RedisHistory:
    """Channel history kept in Redis: one counter of offsets per channel for every process,
    so a socket resumes on whichever process it reaches. Bounded per channel by --history
    (a cache channel's last), by age (its list expires --history-ttl after its last
    publication; older entries are skipped), and by Redis's maxmemory. Reads answer what
    History's do."""

    total_bytes = 0  # in Redis, not here

    def __init__(self, transport: "RedisTransport") -> None:
        self.transport = transport
        self.size, self.ttl = transport.cfg.history, transport.cfg.history_ttl
        self.opened: dict = {}  # (socket, channel) -> the offset its opening read

    def __len__(self) -> int:
        return 0

    def keeps(self, channel: str) -> bool:
        return (
            self.size > 0 and not channel.startswith(USER_CHANNEL_PREFIX)
        ) or channel.startswith(CACHE_PREFIXES)

    def _read(self, channel: str, after: int = -1, last: int = 0, epoch: str = "") -> tuple:
        transport = self.transport
        keys = [transport.key("hm", channel), transport.key("hs", channel)]
        args = [secrets.token_hex(4), HISTORY_META_TTL, after, last, epoch]
        got_epoch, offset, raw = transport.call(transport.scripts["history_read"], keys, args)
        got_epoch = got_epoch.decode() if isinstance(got_epoch, bytes) else got_epoch
        return StreamView(got_epoch, int(offset)), raw

    def _publications(self, channel: str, raw: list, now: float) -> list:
        kept = []
        for entry in raw:
            offset, number, at, payload = entry.decode().split(" ", 3)
            if now - int(at) <= self.ttl:
                text, event = json.loads(payload)
                kept.append(Publication(int(number), text, event, {channel: int(offset)}, int(at)))
        return kept

    def stream(self, channel: str, now: float, reader: object = None) -> StreamView:
        view, _ = self._read(channel)
        if reader is not None:
            self.opened[(reader, channel)] = view.offset
        return view

    def position(self, channel: str, now: float) -> tuple:
        view = self.stream(channel, now)
        return view.epoch, view.offset

    def since(
        self, channel: str, epoch: str, offset: int, now: float, reader: object = None
    ) -> tuple:
        view, raw = self._read(channel, after=offset, epoch=epoch)
        if reader is not None:
            self.opened[(reader, channel)] = view.offset
        return self._after(channel, view, raw, epoch, offset, now)

    def _after(
        self, channel: str, view: StreamView, raw: list, epoch: str, offset: int, now: float
    ) -> tuple:
        items = self._publications(channel, raw, now)
        if epoch != view.epoch:
            return view, items, True
        first_kept = items[0].offsets[channel] if items else view.offset + 1
        return view, [p for p in items if p.offsets[channel] > offset], offset + 1 < first_kept

    def read_many(self, asks: list, now: float, reader: object = None) -> list:
        """What History.read_many answers, every channel read in one round trip."""
        transport = self.transport
        pipe = transport.redis.pipeline(transaction=False)
        for channel, epoch, offset in asks:
            keys = [transport.key("hm", channel), transport.key("hs", channel)]
            after = offset if epoch is not None else -1
            args = [secrets.token_hex(4), HISTORY_META_TTL, after, 0, epoch or ""]
            transport.scripts["history_read"](keys, args, client=pipe)
        try:
            replies = transport.call(pipe.execute) if asks else []
        except BackplaneError:  # numbered by nothing now: a new epoch tells of the gap later
            return [(StreamView(secrets.token_hex(4), 0), [], e is not None) for _, e, _ in asks]
        results = []
        for (channel, epoch, offset), (got_epoch, last, raw) in zip(asks, replies, strict=True):
            got_epoch = got_epoch.decode() if isinstance(got_epoch, bytes) else got_epoch
            view = StreamView(got_epoch, int(last))
            if reader is not None:
                self.opened[(reader, channel)] = view.offset
            if epoch is None:
                results.append((view, [], False))
            else:
                results.append(self._after(channel, view, raw, epoch, offset, now))
        return results

    def last(self, channel: str, limit: int, now: float) -> tuple:
        view, raw = self._read(channel, last=limit)
        return view, self._publications(channel, raw, now)[-limit:] if limit else []

    def expire(self, now: float, in_use: Callable[[str], bool]) -> None:
        """Entries expire in Redis by themselves."""


class RedisSticky:
    """Sticky joins kept in Redis, read as a socket opens (what LocalHub asks of
    StickyJoins). They are made and ended by the backplane (RedisTransport.stick and
    unstick); this process keeps those of the ids it holds alive (keep_sticky)."""

    def __init__(self, transport: "RedisTransport") -> None:
        self.transport = transport
        self.held: set = set()  # ids with sticky joins and a socket here
        self.away: dict = {}  # none here: in Redis, the ids with no socket just expire

    def __len__(self) -> int:
        return len(self.held)

    def ask(self, client_id: str) -> tuple:
        """Read client_id's sticky channels through the outbox, in the same round trip as
        what else waits there: its answer comes while the socket registers."""
        answers = Answers()
        self.transport.read_later("HKEYS", self.transport.key("st", client_id), answers)
        return client_id, answers

    def of(self, asked: tuple) -> list:
        client_id, answers = asked
        answers.done.wait(self.transport.cfg.redis_timeout)
        if answers.error or not answers.reply:
            return []  # none, or Redis away: the socket opens with its URL's channels only
        self.held.add(client_id)
        return [channel.decode() for channel in answers.reply]

    def connected(self, client_id: str) -> None:
        """Its sockets here keep it alive: of() noted it."""

    def gone(self, client_id: str, now: float) -> None:
        self.held.discard(client_id)

    def remove(self, client_id: str, channel: str) -> bool:
        return False  # the backplane ended it in Redis (unstick) before asking the holders

    def expire(self, now: float) -> None:
        """They expire in Redis."""


OUTBOX_SIZE = 100_000  # publishes (or membership changes) that may wait for Redis
OUTBOX_READS = frozenset({"HKEYS"})  # plain reads that may ride in the outbox's round trip
OUTBOX_KEEPS = frozenset({"inbox_send", "history_publish"})  # writes --redis-wait waits for


def redis_pool(cfg: Config) -> "redis.ConnectionPool":
    """The connection pool of --redis: to its URL, or to the primary the sentinels name
    (found again after a failover)."""
    settings = dict(
        max_connections=16,
        timeout=cfg.redis_timeout,  # for a free connection: a full pool is an outage too
        socket_timeout=cfg.redis_timeout,
        socket_connect_timeout=cfg.redis_timeout,
        socket_keepalive=True,
        health_check_interval=0,
        protocol=2,  # pub/sub as plain replies, read by our own loop
        retry=redis.retry.Retry(NoBackoff(), 0),  # a retry hides an outage, or doubles
    )
    if not cfg.redis.startswith(SENTINEL_SCHEME + ":"):
        return redis.BlockingConnectionPool.from_url(cfg.redis, **settings)
    target = parse_sentinel_url(cfg.redis)
    asking = {"socket_timeout": cfg.redis_timeout, "socket_connect_timeout": cfg.redis_timeout}
    sentinel = redis.sentinel.Sentinel(list(target.sentinels), sentinel_kwargs=asking)
    credentials = {"db": target.db, "username": target.username, "password": target.password}
    return SentinelBlockingPool(target.service, sentinel, **credentials, **settings)


def redis_address(pool: "redis.ConnectionPool") -> str:
    """Where the pool's commands go (host:port or a socket path), asking the sentinels when
    it has them. Raises redis.RedisError."""
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        host, port = pool.get_master_address()
        return f"{format_host(host)}:{port} (primary of {pool.service_name!r}, from the sentinels)"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return kwargs["path"]
    return f"{format_host(kwargs.get('host', 'localhost'))}:{kwargs.get('port', 6379)}"


NO_CLUSTER = (
    "not supported (wsboard counts PUBLISH's listeners, which Cluster's plain pub/sub "
    "miscounts; see docs/scaleout.md): give a standalone or Sentinel-managed Redis"
)


def redis_at_start(cfg: Config) -> tuple:
    """(where --redis leads now, why it may not be used or None), asked once at start-up:
    a Redis Cluster is refused; an unreachable Redis is not (the link keeps trying)."""
    pool = redis_pool(cfg)
    try:
        where = redis_address(pool)
        cluster = redis.Redis(connection_pool=pool).info("cluster").get("cluster_enabled")
    except (redis.RedisError, OSError) as exc:
        return f"unreachable for now ({type(exc).__name__}: {exc})", None
    finally:
        pool.disconnect()
    return where, f"{where} is a Redis Cluster node: {NO_CLUSTER}" if cluster else None


def link_address(link: object) -> str:
    """Where a connection is: host:port or its socket path."""
    path = getattr(link, "path", None)
    if path:
        return path
    return f"{format_host(getattr(link, 'host', '?'))}:{getattr(link, 'port', '?')}"


def replicated(reply: object, replicas: int) -> bool:
    """Whether a WAIT's reply says the writes before it reached replicas replicas."""
    return isinstance(reply, int) and reply >= replicas


def not_primary(exc: BaseException) -> bool:
    """Whether a Redis reply says the node is no primary to write to (a replica, a primary
    cut from its replicas, one loading its data): for wsboard, a link down."""
    errors = redis.exceptions
    kinds = (errors.ReadOnlyError, errors.MasterDownError, errors.BusyLoadingError)
    return isinstance(exc, kinds) or str(exc).startswith(("READONLY", "MASTERDOWN", "LOADING"))


BUS_VERSION = 2  # what this process's bus messages may be, said in its node record
BUNDLES_SINCE = 2  # the first BUS_VERSION that reads a JSON list of messages (a bundle)


class Bundled(list):
    """The answers of publishes that rode in one PUBLISH: each hears its count."""


BUNDLE_BYTES = 256 * 1024  # a bundle stays far below Redis's pub/sub output buffer limit


def publish_runs(items: list) -> list:
    """Outbox items, (command, args, answers) each, with every run of consecutive publishes
    to one route made one PUBLISH of a JSON list of their messages: one command for Redis
    and one message for each listener instead of many, in the same order."""
    runs: list = []
    for command, args, answers in items:
        last = runs[-1] if runs else None
        if (
            command == "PUBLISH"
            and last is not None
            and last[0] == "PUBLISH"
            and last[1] == args[0]
            and last[3] + len(args[1]) < BUNDLE_BYTES
        ):
            last[2].append(args[1])
            last[3] += len(args[1]) + 1
            last[4].append(answers)
        elif command == "PUBLISH":
            runs.append(["PUBLISH", args[0], [args[1]], len(args[1]), [answers]])
        else:
            runs.append([command, args, None, 0, answers])
    out = []
    for command, args, datas, _, answers in runs:
        if datas is None:
            out.append((command, args, answers))
        elif len(datas) == 1:
            out.append((command, (args, datas[0]), answers[0]))
        else:
            out.append((command, (args, "[" + ",".join(datas) + "]"), Bundled(answers)))
    return out


class RedisTransport:
    """A Backplane's bus on Redis (see the banner): implements Transport."""

    def __init__(self, backplane: Backplane) -> None:
        if redis is None:
            raise ConfigError("--redis needs the redis package: pip install 'wsboard[redis]'")
        self.backplane = backplane
        self.cfg = cfg = backplane.cfg
        self.node = backplane.node
        self.events = backplane.events  # presence changes are told where Redis confirms them
        self.pool = redis_pool(cfg)
        self.redis = redis.Redis(connection_pool=self.pool)
        self.scripts = {
            name: self.redis.register_script(source)
            for name, source in (
                ("inbox_send", INBOX_SEND),
                ("inbox_open", INBOX_OPEN),
                ("history_publish", HISTORY_PUBLISH),
                ("history_read", HISTORY_READ),
                ("sticky_join", STICKY_JOIN),
                ("sticky_leave", STICKY_LEAVE),
                ("sticky_keep", STICKY_KEEP),
                ("join", PRESENCE_JOIN),
                ("leave", PRESENCE_LEAVE),
                ("reap", REAP),
                ("count", CHANNEL_COUNT),
                ("reap_counts", REAP_COUNTS),
                ("beat", BEAT),
            )
        }
        self.inbox = RedisInbox(self) if cfg.inbox else None
        self.history = RedisHistory(self) if cfg.history or cfg.pusher_key else None  # cache-
        self.sticky = RedisSticky(self)
        # The pub/sub link: one connection, read by one greenlet, written by the link's
        # greenlet before it is up and by the subscriber's after.
        self.link = None
        self.up = False
        self.link_client_id = 0
        self.link_since = 0.0
        self.link_error = ""
        self.reconnects = 0
        self.subscribed: set = set()  # routes asked of Redis on the link now
        self.changes: dict = {}  # route -> wanted, not yet asked
        self.changed = gevent.event.Event()
        self.next_batch = gevent.event.Event()  # set when the changes waiting now are in force
        self.inflight: dict = {}  # ping token -> Event of a batch sent
        self.last_batch = gevent.event.Event()
        self.last_batch.set()
        self.batches = itertools.count(1)
        # Bounded: while Redis is away nothing may pile up without end (what does not fit is
        # dropped and counted; memberships are put right by rejoin).
        self.outbox: gevent.queue.Queue = gevent.queue.Queue(OUTBOX_SIZE)
        self.presence_queue: gevent.queue.Queue = gevent.queue.Queue(OUTBOX_SIZE)
        self.dropped = 0
        self.probe_sent = self.probe_seen = 0
        self.probe_at = 0.0
        self.nodes_seen = 0
        self.bundles = False  # publishes may ride in bundles: every process reads them
        self.boot = None  # the token of the Redis this process last saw; a new one: it lost all
        self.address = "?"  # where the link is (or was last)
        # WAIT gives up within the round trip's own timeout, so its answer always comes.
        self.wait_ms = max(1, int(cfg.redis_timeout * 1000 * 0.8))
        self.recount_quietly = False
        self.greenlets: list = []
        self.warned = Throttle(10)
        self.stopping = False

    # Names in Redis.

    def key(self, *parts: str) -> str:
        return ":".join((self.cfg.redis_prefix, *parts))

    def call(self, command: object, *args: object) -> object:
        """One Redis command (or script): its answer, or BackplaneError(UNAVAILABLE)."""
        try:
            if callable(command):
                return command(*args)
            return self.redis.execute_command(command, *args)
        except redis.TimeoutError as exc:  # sent, not answered: it may still be carried out
            self._trouble(exc)
            raise BackplaneError(TIMEOUT) from None
        except (redis.RedisError, OSError) as exc:
            self._trouble(exc)
            raise BackplaneError(UNAVAILABLE) from None

    def _trouble(self, exc: Exception) -> None:
        if not_primary(exc):
            self._cut(f"{self.address} answered {str(exc)[:80]!r}: not the primary")
        self.link_error = f"{type(exc).__name__}: {exc}"
        if self.warned():
            log.warning("redis: %s", self.link_error)

    def _enqueue(self, item: tuple, queue: gevent.queue.Queue | None = None) -> None:
        """Queue for the outbox (or the presence writer); past its bound, drop and count."""
        try:
            (self.outbox if queue is None else queue).put_nowait(item)
        except gevent.queue.Full:
            self.dropped += 1
            answers = item[2] if queue is None else None
            if answers is not None:
                answers.fail(UNAVAILABLE)
            if self.warned():
                log.warning("redis is not keeping up: %d publishes dropped so far", self.dropped)

    def publish(self, route: str, message: dict | str, answers: Answers | None = None) -> None:
        """PUBLISH through the outbox; answers hears how many processes heard it."""
        data = message if isinstance(message, str) else compact_json(message)
        self._enqueue(("PUBLISH", (self.key(route), data), answers))

    def listeners_later(self, route: str, answers: Answers) -> None:
        """How many processes subscribe to route, asked behind what was published before."""
        self._enqueue(("NUMSUB", (self.key(route),), answers))

    def read_later(self, command: str, key: str, answers: Answers) -> None:
        """A read (HKEYS) in the outbox's next round trip; answers.reply gets its reply."""
        self._enqueue((command, (key,), answers))

    def listeners(self, routes: list) -> list:
        counts = self.call("PUBSUB", "NUMSUB", *(self.key(r) for r in routes))
        return [int(n) for n in counts[1::2]]

    # Start and stop.

    def start(self) -> None:
        self.greenlets = [
            gevent.spawn(self._link_forever),
            gevent.spawn(self._subscriber),
            gevent.spawn(self._publisher),
            gevent.spawn(self._presence_writer),
        ]

    def stop(self) -> None:
        """End this process's memberships (their leaves are told) and its record."""
        self.stopping = True
        gevent.killall(self.greenlets, block=True, timeout=1)
        self.greenlets = []
        try:
            self._reap(self.node)
            while not self.outbox.empty():
                self._publish_some()
        except BackplaneError:
            pass
        if self.link is not None:
            self.link.disconnect()
        self.up = False
        self.pool.disconnect()

    def stats(self) -> dict:
        return {
            "state": "up" if self.up else "down",
            "processes": self.nodes_seen,
            "bundles": self.bundles,
            "since": round(self.link_since, 3) if self.up else None,
            "reconnects": max(0, self.reconnects - 1),
            "error": "" if self.up else self.link_error,
            "routes": len(self.subscribed),
            "waiting": self.outbox.qsize(),
            "dropped": self.dropped,
        }

    # Routes as subscriptions of the link.

    def route_changed(self, route: str, wanted: bool) -> None:
        self.changes[route] = wanted
        self.changed.set()

    def wait_routes(self) -> None:
        event = self.next_batch if self.changes else self.last_batch
        event.wait(self.cfg.redis_timeout)

    def routes_settled(self) -> bool:
        return not self.inflight and not self.changes

    def _subscriber(self) -> None:
        """Ask Redis for the routes that changed, many in one command, then a PING whose
        PONG says they are in force."""
        while True:
            self.changed.wait()
            self.changed.clear()
            link = self.link
            if link is None or not self.changes:
                continue
            changes, self.changes = self.changes, {}
            done, self.next_batch = self.next_batch, gevent.event.Event()
            add = [r for r, wanted in changes.items() if wanted and r not in self.subscribed]
            drop = [r for r, wanted in changes.items() if not wanted and r in self.subscribed]
            self.subscribed.update(add)
            self.subscribed.difference_update(drop)
            try:
                self._send_batch(link, add, drop, done)
            except (redis.RedisError, OSError) as exc:
                self._trouble(exc)  # the reader sees the link break and starts again
                done.set()

    def _send_batch(self, link: object, add: list, drop: list, done: gevent.event.Event) -> None:
        prefix = self.cfg.redis_prefix + ":"
        for i in range(0, len(add), 10_000):
            link.send_command("SUBSCRIBE", *(prefix + r for r in add[i : i + 10_000]))
        for i in range(0, len(drop), 10_000):
            link.send_command("UNSUBSCRIBE", *(prefix + r for r in drop[i : i + 10_000]))
        token = f"b{next(self.batches)}"
        self.inflight[token] = done
        self.last_batch = done
        link.send_command("PING", token)

    # The link: connect, subscribe, read until it breaks, start again.

    def _link_forever(self) -> None:
        pause = 0.1
        while True:
            try:
                self._link_once()
            except (redis.RedisError, OSError) as exc:
                self._trouble(exc)
            except Exception:
                log.exception("redis link failed")
            finally:
                self._link_down()
            if self.link_since and time.time() - self.link_since > 10:
                pause = 0.1  # it held for a while: this is a new outage
            gevent.sleep(pause)
            pause = min(1.0, pause * 2)

    def _link_once(self) -> None:
        kwargs = dict(self.pool.connection_kwargs, socket_timeout=None)  # the probe watches it
        link = self.pool.connection_class(**kwargs)
        late = redis.TimeoutError("Redis did not answer the link's set-up in time")
        with gevent.Timeout(self.cfg.redis_timeout, late):  # a frozen Redis still accepts
            link.connect()
            link.send_command("ROLE")
            role = link.read_response()[0]
            link.send_command("INFO", "cluster")
            cluster = b"cluster_enabled:1" in link.read_response()
            link.send_command("CLIENT", "SETNAME", f"wsboard-{self.node}")
            link.read_response()
            link.send_command("CLIENT", "ID")
            self.link_client_id = int(link.read_response())
        self.address = link_address(link)
        if cluster:
            raise redis.ConnectionError(f"{self.address} is a Redis Cluster node: {NO_CLUSTER}")
        if role != b"master":  # a demoted primary (or a replica) serves reads, not us
            self.pool.disconnect()  # its connections too: found anew (through the sentinels)
            raise redis.ConnectionError(f"{self.address} is a {role.decode()}, not the primary")
        self.changes.clear()
        routes = self.backplane.wanted_routes()
        self.subscribed = set(routes)
        done = gevent.event.Event()
        self._send_batch(link, routes, [], done)
        self.link = link
        self.changed.set()  # anything that changed meanwhile
        # Up once Redis confirms every route; a link that cannot get there starts again.
        gevent.spawn_later(self.cfg.redis_timeout + len(routes) / 20_000, self._up_or_cut, link)
        self._read(link, done)

    def _cut(self, why: str) -> None:
        """The node is no primary to write to: the link goes down (and comes back through
        _link_once, which checks ROLE), the pool's connections are made anew."""
        link = self.link
        if link is not None:
            log.warning("redis: %s; reconnecting", why)
            link.disconnect()
        self.pool.disconnect()

    def _up_or_cut(self, link: object) -> None:
        if self.link is link and not self.up:
            log.warning("redis link not confirmed in time; starting it again")
            link.disconnect()

    def _link_down(self) -> None:
        was_up, self.up, link, self.link = self.up, False, self.link, None
        if link is not None:
            link.disconnect()
        for event in self.inflight.values():
            event.set()
        self.inflight.clear()
        self.backplane.link_went_down()
        if was_up and not self.stopping:
            log.warning("redis link down: %s; local sockets are still served", self.link_error)

    def _read(self, link: object, first: gevent.event.Event) -> None:
        batch = Batch()
        backplane = self.backplane
        while True:
            response = link.read_response(disconnect_on_error=False)
            kind = response[0]
            if kind == b"message":
                try:
                    message = json.loads(response[2])
                    if isinstance(message, list):  # a bundle (publish_runs): each in order
                        for one in message:
                            backplane.heard(one, batch)
                    elif message.get("k") == "probe":
                        self.probe_seen = max(self.probe_seen, message["n"])
                    else:
                        backplane.heard(message, batch)
                except Exception:  # one bad message costs itself, never the link
                    log.exception("redis message failed: %r", response[2][:200])
            elif kind == b"pong":
                event = self.inflight.pop(response[1].decode(), None)
                if event is not None:
                    event.set()
                if event is first:
                    self._link_up()
            if not link.can_read(0):  # nothing more buffered: let the held frames out
                batch.release()
                backplane.burst_done()

    def _link_up(self) -> None:
        self.probe_seen = self.probe_sent
        self.up = True
        self.link_since = time.time()
        self.reconnects += 1
        log.info(
            "redis link up to %s (node %s, client %d)", self.address, self.node, self.link_client_id
        )
        self.backplane.link_came_up()

    # What lives in Redis: numbered sends, idempotency keys, presence, watchers.

    def send_numbered(
        self, client_id: str, text: str, keep_offline: bool, head: dict, answers: Answers
    ) -> None:
        """Number, keep and publish text to client_id's route in one script; answers hears
        [how many heard it, its number, the box's epoch]."""
        keys = [self.key("im", client_id), self.key("ib", client_id)]
        keys.append(self.key(ID_ROUTE + client_id))
        args = [
            text,
            int(keep_offline),
            self.cfg.inbox,
            int(self.cfg.inbox_ttl),
            secrets.token_hex(4),
            json.dumps(head)[:-1],  # the script adds "s", the number it gives
        ]
        self._enqueue(("inbox_send", (keys, args), answers))

    def publish_numbered(
        self, channels: list, route: str, message: dict, payload: list, answers: Answers
    ) -> None:
        """Number message in each of channels' history, keep it and publish it to route in
        one script; it arrives with "of", its offsets; answers hears [how many heard it,
        the offsets in order]."""
        history = self.history
        keys = []
        for channel in channels:
            keys += [self.key("hm", channel), self.key("hs", channel)]
        keys += [self.key(route), self.key("hn")]
        args = [
            len(channels),
            compact_json(message)[:-1],  # the script adds "of"
            compact_json(payload),
            int(self.cfg.history_ttl),
            HISTORY_META_TTL,
            secrets.token_hex(4),
            *(history.size or 1 for _ in channels),
            *channels,
        ]
        self._enqueue(("history_publish", (keys, args), answers))

    def stick(self, client_id: str, channel: str) -> bool:
        """Make channel sticky for client_id; False past a limit."""
        cfg = self.cfg
        keys = [self.key("st", client_id), self.key("stz")]
        args = [channel, int(cfg.session_ttl), cfg.max_channels_per_socket, cfg.max_sticky_ids]
        return bool(self.call(self.scripts["sticky_join"], keys, [*args, client_id]))

    def unstick(self, client_id: str, channel: str) -> bool:
        keys = [self.key("st", client_id), self.key("stz")]
        return bool(self.call(self.scripts["sticky_leave"], keys, [channel, client_id]))

    def keep_sticky(self, ids: list) -> None:
        """Keep the sticky joins of ids (held here) alive; forget those ended elsewhere."""
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            keys = [self.key("stz"), *(self.key("st", i) for i in chunk)]
            args = [int(self.cfg.session_ttl), *chunk]
            for client_id in self.call(self.scripts["sticky_keep"], keys, args):
                self.sticky.held.discard(client_id.decode())

    def claim(self, key: str) -> SendResult | None:
        """Take key for this send, or the result of the send that took it first (waiting,
        bounded, while that one is still going on); None: go ahead."""
        name, pending = self.key("key", key), int(self.cfg.redis_timeout * 5000)
        deadline = time.monotonic() + 2 * self.cfg.redis_timeout
        try:
            while True:
                # Pending, for as long as a send may take: a sender that died frees the key.
                if self.call("SET", name, "", "NX", "PX", pending):
                    return None
                stored = self.call("GET", name)
                if stored:
                    fields = json.loads(stored)
                    return SendResult(*fields[:4], False, tuple(fields[4]), fields[5])
                if time.monotonic() > deadline:
                    raise BackplaneError(TIMEOUT)
                gevent.sleep(0.01)
        except BackplaneError as exc:
            if str(exc) == TIMEOUT:
                raise
            return None  # no Redis: no other process can be sent to anyway

    def settle_key(self, key: str, result: SendResult) -> bool:
        """Keep the send's result under key; False: --redis-wait's replicas did not get it
        in time (a failover could forget it, and a retry deliver twice)."""
        name = self.key("key", key)
        try:
            if result.sockets or result.queued:
                fields = [*result[:4], list(result.unconfirmed), result.trouble]
                window = int(self.cfg.idempotency_window * 1000)
                self.call("SET", name, json.dumps(fields), "XX", "PX", window)
                if self.cfg.redis_wait:
                    acked = self.call("WAIT", self.cfg.redis_wait, self.wait_ms)
                    return replicated(acked, self.cfg.redis_wait)
            else:
                self.call("DEL", name)  # a failed send may be tried again
        except BackplaneError:
            pass
        return True

    def member_changed(self, kind: str, channel: str, client_id: str, meta: object) -> None:
        """An id joined ("join") or left ("leave") a presence channel here: queued for the
        presence writer, which keeps Redis's counts in order."""
        self._enqueue((kind, channel, client_id, meta), self.presence_queue)

    def sync(self) -> None:
        done = gevent.event.Event()
        self.presence_queue.put(("sync", done, "", None))
        done.wait(self.cfg.redis_timeout)

    def _presence_keys(self, channel: str, node: str | None = None) -> list:
        return [self.key("pn", node or self.node), self.key("pc", channel), self.key("all")]

    def _presence_change(
        self, kind: str, channel: str, client_id: str, meta: object, quiet: bool = False
    ) -> int:
        change = (
            {"join": {"id": client_id, "meta": meta}}
            if kind == "join"
            else {"leave": {"id": client_id}}
        )
        message = compact_json({"k": "p", "c": channel, "change": change})
        args = [f"{channel} {client_id}", client_id, message, int(quiet)]
        return self.call(self.scripts[kind], self._presence_keys(channel), args)

    def count_channels(self, rows: list, whole: bool = False) -> None:
        """This process's counts of channels ((channel, sockets, held) each), queued for
        the presence writer; whole: they are all it holds (the others it counted end)."""
        self._enqueue(("count", rows, "", whole), self.presence_queue)

    def _count(self, rows: list, whole: bool) -> None:
        """Write this process's counts in one round trip; tell what they changed."""
        if whole:
            held = {row[0] for row in rows}
            counted = self.call("SMEMBERS", self.key("cn", self.node))
            rows = [*rows, *((c, 0, False) for c in map(bytes.decode, counted) if c not in held)]
        publish = self.cfg.pusher_subscription_count
        pipe = self.redis.pipeline(transaction=False)
        for channel, sockets, held in rows:
            keys = [self.key("cc", channel), self.key("cn", self.node)]
            keys.append(self.key(CHANNEL_ROUTE + channel))
            told = int(publish and not channel.startswith(PRESENCE_PREFIX))
            self.scripts["count"](keys, [self.node, channel, sockets, int(held), told], client=pipe)
        replies = self.call(pipe.execute, False)
        quiet = whole and self.recount_quietly
        if whole:
            self.recount_quietly = False
        for (channel, _, _), reply in zip(rows, replies, strict=True):
            if isinstance(reply, Exception):
                log.error("redis refused a channel count: %s", reply)
                continue
            was_held, held, old, new = reply
            if quiet and held:
                continue  # Redis lost its counts: these channels did not just fill
            for kind, fields in count_notices(channel, was_held, held, old, new, publish):
                self.events.notice(kind, **fields)

    def _presence_writer(self) -> None:
        while True:
            kind, channel, client_id, meta = self.presence_queue.get()
            if kind == "sync":
                channel.set()
                continue
            if kind == "count":
                try:
                    self._count(channel, meta)
                except BackplaneError:
                    pass  # counted anew when the link is back
                continue
            try:
                if self._presence_change(kind, channel, client_id, meta):
                    fields = {"meta": meta} if kind == "join" else {}
                    self.events.emit(kind, channel=channel, id=client_id, **fields)
            except BackplaneError:
                pass  # put right by rejoin when the link is back

    def rejoin(self, memberships: dict) -> None:
        """Make Redis's view of this process's memberships ({"channel id": meta}) true. When
        Redis lost everything (restarted empty) they are put back without telling anyone."""
        self.call("SET", self.key("boot"), secrets.token_hex(8), "NX")
        boot = self.call("GET", self.key("boot"))
        quiet = self.boot is not None and boot != self.boot  # Redis began anew
        self.boot = boot
        self.recount_quietly = quiet  # the channels held here were not newly occupied
        recorded = {m.decode() for m in self.call("SMEMBERS", self.key("pn", self.node))}
        for member in memberships.keys() - recorded:
            channel, _, client_id = member.partition(" ")
            meta = memberships[member]
            if self._presence_change("join", channel, client_id, meta, quiet) and not quiet:
                self.events.emit("join", channel=channel, id=client_id, meta=meta)
        for member in recorded - memberships.keys():
            channel, _, client_id = member.partition(" ")
            if self._presence_change("leave", channel, client_id, None):
                self.events.emit("leave", channel=channel, id=client_id)

    def set_watching(self, watched: bool) -> None:
        self.call("SADD" if watched else "SREM", self.key("watching"), self.node)

    def watchers(self) -> set:
        return {n.decode() for n in self.call("SMEMBERS", self.key("watching"))}

    # Heartbeats: this process says it lives, checks that its link really hears, and
    # ends the processes that stopped beating.

    def beat(self) -> None:
        self._check_probe()
        role = self.call("ROLE")[0]
        if role != b"master":  # demoted under us: REPLICAOF, or a failover behind a proxy
            self._cut(f"{self.address} is a {role.decode()} now, not the primary")
            raise BackplaneError(UNAVAILABLE)
        record = self.key("node", self.node)
        self.call(
            "HSET",
            record,
            "pubsub",
            self.link_client_id,
            "pid",
            os.getpid(),
            "host",
            socket.gethostname(),
            "bus",
            BUS_VERSION,
        )
        self.call("EXPIRE", record, int(self.cfg.node_timeout * 3) + 1)
        stale = self.call(
            self.scripts["beat"], [self.key("nodes")], [self.node, self.cfg.node_timeout]
        )
        nodes = self.call("ZRANGE", self.key("nodes"), 0, -1)
        self.nodes_seen = len(nodes)
        self.bundles = self._everyone_reads_bundles(nodes)
        for node in stale:
            node = node.decode()
            lock = self.key("reap", node)  # one process reaps it, so its leaves are told once
            if node != self.node and self.call("SET", lock, self.node, "NX", "PX", 10_000):
                self._reap(node)
                self.call("DEL", lock)

    def _everyone_reads_bundles(self, nodes: list) -> bool:
        """Whether every live process (nodes, from the beat) speaks BUS_VERSION 2 or later:
        while an older one shares the prefix (a rolling upgrade), no bundle is published."""
        pipe = self.redis.pipeline(transaction=False)
        for node in nodes:
            pipe.hget(self.key("node", node.decode()), "bus")
        versions = self.call(pipe.execute)
        return all(v is not None and v.isdigit() and int(v) >= BUNDLES_SINCE for v in versions)

    def _check_probe(self) -> None:
        """A link can look open and hear nothing (a half-open TCP connection, a Redis that
        dropped us): a message published to ourselves must come back in time."""
        if (
            self.probe_sent > self.probe_seen
            and time.monotonic() - self.probe_at > self.cfg.redis_timeout
        ):
            log.warning("redis link hears nothing (probe %d lost); reconnecting", self.probe_sent)
            link = self.link
            if link is not None:
                link.disconnect()
            return
        self.probe_sent += 1
        self.probe_at = time.monotonic()
        self.call(
            "PUBLISH", self.key("n", self.node), json.dumps({"k": "probe", "n": self.probe_sent})
        )

    def _reap(self, node: str) -> None:
        """node stopped beating: cut its link (so nothing is routed to it) and end its
        memberships; their leaves are told once, from here."""
        client_id = self.call("HGET", self.key("node", node), "pubsub")
        if node != self.node and client_id:
            log.warning("process %s missed its heartbeats: cutting it off", node)
            try:
                self.call("CLIENT", "KILL", "ID", int(client_id))
            except BackplaneError:
                pass
        keys = [self.key("pn", node), self.key("nodes"), self.key("node", node)]
        left = self.call(self.scripts["reap"], keys, [self.cfg.redis_prefix, node])
        for channel, client_id in zip(left[::2], left[1::2], strict=True):
            self.events.emit("leave", channel=channel.decode(), id=client_id.decode())
        publish = self.cfg.pusher_subscription_count
        args = [self.cfg.redis_prefix, node, int(publish)]
        told = self.call(self.scripts["reap_counts"], [self.key("cn", node)], args)
        for n in range(0, len(told), 4):
            channel, held, old, new = told[n].decode(), *told[n + 1 : n + 4]
            for kind, fields in count_notices(channel, True, held, old, new, publish):
                self.events.notice(kind, **fields)

    # The outbox: requests, answers and events, many per round trip, in order.

    def _publisher(self) -> None:
        while True:
            try:
                self._publish_some()
            except BackplaneError:
                pass  # whoever waited for an answer says Timeout

    def _publish_some(self) -> None:
        """One pipeline of what waits in the outbox, in order: every publish of this
        process takes this one lane, so every process hears them in the order they were made."""
        taken = [self.outbox.get()]
        while not self.outbox.empty() and len(taken) < 512:
            taken.append(self.outbox.get_nowait())
        items = publish_runs(taken) if self.bundles else taken
        pipe = self.redis.pipeline(transaction=False)
        for command, args, _ in items:
            if command == "PUBLISH":
                pipe.execute_command("PUBLISH", *args)
            elif command == "NUMSUB":
                pipe.execute_command("PUBSUB", "NUMSUB", *args)
            elif command in OUTBOX_READS:
                pipe.execute_command(command, *args)
            else:
                self.scripts[command](*args, client=pipe)
        replicas = self.cfg.redis_wait
        waits = replicas and any(command in OUTBOX_KEEPS for command, _, _ in items)
        if waits:  # one WAIT covers every write of this round trip
            pipe.execute_command("WAIT", replicas, self.wait_ms)
        try:
            replies = self.call(pipe.execute, False)  # one failed script fails only itself
        except BackplaneError as exc:
            for _, _, answers in taken:
                if answers is not None:
                    answers.fail(str(exc))
            raise
        unreplicated = waits and not replicated(replies.pop(), replicas)
        for (command, _, waiting), reply in zip(items, replies, strict=True):
            if unreplicated and command in OUTBOX_KEEPS and not isinstance(reply, Exception):
                reply = BackplaneError(TIMEOUT)  # kept by the primary alone: a failover loses it
            if isinstance(reply, Exception) and not isinstance(reply, BackplaneError):
                log.error("redis refused a command: %s", reply)
                self._trouble(reply)
                reply = BackplaneError(UNAVAILABLE)
            for answers in waiting if isinstance(waiting, Bundled) else (waiting,):
                if answers is None:
                    pass
                elif isinstance(reply, BackplaneError):
                    answers.fail(str(reply))
                elif command == "NUMSUB":  # [route, listeners]: nothing else is awaited
                    answers.heard(0)
                    answers.reply = int(reply[1])
                elif command in OUTBOX_READS:
                    answers.heard(0)
                    answers.reply = reply
                else:
                    answers.heard(reply)


def redis_hub(cfg: Config, events: "Events | None" = None, node: str = "") -> Backplane:
    """The hub of --redis: a Backplane on a RedisTransport."""
    return Backplane(cfg, RedisTransport, events, node)


HUBS: dict = {"local": LocalHub, "redis": redis_hub}


###############################################################################
# Events: what happens, told to the registered sinks ##########################
###############################################################################
# A sink is any object with push(line, lifecycle) that never blocks: watchers on the
# control socket and the webhook today. Messages from browsers may fill half of a sink's
# queue; the rest is kept for connects and disconnects, so a flood cannot push them out.


class Events:
    """Builds each event once and hands it to every registered sink; observers (the Pusher
    webhooks) get each event's kind and fields, and the notices no sink is told."""

    def __init__(self) -> None:
        self.sinks: list = []
        self.observers: list = []  # callables (kind, fields)
        self.changed: Callable[[], None] | None = None  # told when a sink comes or goes

    def add(self, sink: object) -> None:
        if sink not in self.sinks:
            self.sinks.append(sink)
            if self.changed is not None:
                self.changed()

    def remove(self, sink: object) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)
            if self.changed is not None:
                self.changed()

    @property
    def watched(self) -> bool:
        """A sink here wants every process's events (a watcher)."""
        return any(getattr(sink, "everywhere", False) for sink in self.sinks)

    @property
    def wanted(self) -> bool:
        return bool(self.sinks)

    @property
    def noticed(self) -> bool:
        """An observer wants notices (see notice)."""
        return bool(self.observers)

    def notice(self, kind: str, **fields: object) -> None:
        """Tell the observers of something only they are told (a channel occupied or
        vacated, a client event, a cache miss, a subscription count)."""
        for observer in self.observers:
            try:
                observer(kind, fields)
            except Exception:  # an observer's bug must not fail what happened
                log.exception("an observer failed on a %s event", kind)

    def emit(self, kind: str, lifecycle: bool = True, **fields: object) -> None:
        """Tell every sink and observer that something happened; never waits for any."""
        if self.observers:
            self.notice(kind, **fields)
        if not self.sinks:
            return
        event = {"event": kind, "time": round(time.time(), 3), **fields}
        line = compact_json(event)
        for sink in list(self.sinks):
            sink.push(line, lifecycle)

    def tell(self, line: str, lifecycle: bool) -> None:
        """An event from another process (scale-out): for the sinks that want every
        process's events (watchers), not those told only where it happened (the webhook)."""
        for sink in list(self.sinks):
            if getattr(sink, "everywhere", False):
                sink.push(line, lifecycle)


class EventQueue:
    """A sink's bounded queue: messages may take half of it, lifecycle events all of it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.queue: gevent.queue.Queue = gevent.queue.Queue(size)
        self.dropped = 0

    def offer(self, line: str, lifecycle: bool) -> bool:
        """Queue line; False when it had to be dropped."""
        if not lifecycle and self.queue.qsize() >= self.size // 2:
            self.dropped += 1
            return False
        try:
            self.queue.put_nowait(line)
            return True
        except gevent.queue.Full:
            self.dropped += 1
            return False


class Webhook:
    """Events POSTed to the app one by one, in order, signed with the secret, retried with
    backoff; a bounded queue in front, so a slow or dead endpoint never holds delivery up."""

    TRIES = 5

    def __init__(self, url: str, secret: bytes, size: int) -> None:
        self.url, self.secret = url, secret
        self.events = EventQueue(size)
        self.greenlet = gevent.spawn(self.run)
        self.warned = Throttle(10)
        self.delivered = self.failed = 0  # events posted, and given up on

    @property
    def dropped(self) -> int:
        return self.events.dropped

    def push(self, line: str, lifecycle: bool) -> None:
        if not self.events.offer(line, lifecycle) and self.warned():
            log.warning("webhook queue full: %d events dropped so far", self.dropped)

    def run(self) -> None:
        while True:
            self.post(self.events.queue.get().encode())

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
                self.delivered += 1
                return True
            except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
                log.warning("webhook attempt %d failed: %s", attempt + 1, exc)
                gevent.sleep(min(30.0, 0.5 * 2**attempt))
        log.error("webhook gave up on an event after %d attempts", self.TRIES)
        self.failed += 1
        return False


class Throttle:
    """True at most once per period: for log lines that an attack could repeat."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.last = -float("inf")

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.period:
            return False
        self.last = now
        return True


###############################################################################
# Actions: one function per operation ##########################################
###############################################################################
# Every front end (control lines, JSON ops, the admin page and its forms, the Pusher HTTP
# API and sockets) parses its wire form, calls one of these and formats what it returns.
# An action checks the domain input once, counts once, and returns a plain result or
# raises Refused (BadRequest, NotFound, LimitReached; BackplaneError with --redis). A new
# operation is a method here, then a row in VERBS and an entry in JSON_OPS.


def send_refusal(result: SendResult) -> Refused:
    """Why a send reached nobody: no such client, or (scale-out) it cannot be known."""
    return BackplaneError(result.trouble) if result.unconfirmed else NotFound()


def check_text(text: str, what: str = "the text") -> str:
    """text as it may go out in a frame: valid Unicode (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} must be valid Unicode (no lone surrogates)") from None
    return text


class Actions:
    """The operations of one board, each once for every front end."""

    def __init__(self, board: "Board") -> None:
        self.board = board

    @property
    def hub(self) -> "LocalHub":
        return self.board.hub

    # Sending.

    def send(
        self,
        ids: Sequence[str],
        text: str,
        keep_offline: bool | None = None,
        key: str | None = None,
        batch: Batch | None = None,
        count_all: bool = True,
    ) -> SendResult:
        """text to every socket of ids (kept for the offline when keep_offline, the
        server's --offline default when None); refused when it reached nobody."""
        if key is not None and not (isinstance(key, str) and 1 <= len(key) <= 200):
            raise BadRequest('"key" must be a string of 1-200 characters')
        keep = self.board.cfg.offline_ok if keep_offline is None else keep_offline
        result = self.hub.send(ids, text, keep, key=key, batch=batch, count_all=count_all)
        self.board.counts.sent(result)
        if not (result.sockets or result.queued):
            raise send_refusal(result)
        return result

    def start_send_group(
        self, sends: Sequence[tuple], batch: Batch | None = None
    ) -> Callable[[], list]:
        """Consecutive SEND lines, (client_id, text) each, carried out together. They are
        under way when this returns; the call it returns gives, for each, its SendResult or
        the Refused it is."""
        keep = self.board.cfg.offline_ok
        pending = self.hub.start_sends(
            [([client_id], text, keep) for client_id, text in sends], batch, count_all=False
        )

        def results() -> list:
            done = pending()
            self.board.counts.sent_all(done)
            return [r if r.sockets or r.queued else send_refusal(r) for r in done]

        return results

    def send_to_connection(self, conn_id: str, text: str, batch: Batch | None = None) -> int:
        if not self.hub.send_to_connection(conn_id, text, batch):
            raise NotFound()
        return 1

    def broadcast(self, text: str, batch: Batch | None = None) -> int:
        return self.hub.broadcast(text, batch)

    def publish(
        self,
        channels: Sequence[str],
        text: str,
        except_conn: str | None = None,
        batch: Batch | None = None,
        event: str | None = None,
        user_id: str | None = None,
    ) -> int:
        """text to every socket in channels, but except_conn; event names it for Pusher."""
        if event is not None and not (
            isinstance(event, str)
            and 1 <= len(event) <= PUSHER_MAX_EVENT_NAME
            and not event.startswith(PUSHER_RESERVED)
        ):
            raise BadRequest(
                f'"event" must be an event name of 1-{PUSHER_MAX_EVENT_NAME} characters'
            )
        names = list(dict.fromkeys(channels))
        return self.hub.publish(names, text, except_conn, batch, event=event, user_id=user_id)

    def kick(
        self,
        client_id: str | None = None,
        conn_id: str | None = None,
        code: object = CloseCode.KICKED,
        reason: object = "kicked",
    ) -> int:
        """Close the id's sockets (or one connection) with code and reason: how many."""
        if isinstance(code, bool) or not isinstance(code, int) or code not in KICK_CODES:
            raise BadRequest('"code" must be 1000, 1001, 1008, 1011, 1012, 1013 or 4000-4999')
        if not isinstance(reason, str) or len(reason.encode("utf-8", "replace")) > 123:
            raise BadRequest('"reason" must be a string of at most 123 bytes')
        check_text(reason, '"reason"')
        if conn_id is not None:
            count = self.hub.kick_connection(conn_id, int(code), reason)
        else:
            count = self.hub.kick(client_id, int(code), reason)
        if not count:
            raise NotFound()
        return count

    # Channels, presence and metadata.

    def join(
        self,
        channel: str,
        client_id: str | None = None,
        conn_id: str | None = None,
        sticky: object = False,
    ) -> int:
        """Put the id's sockets (or one connection) in channel: how many are in it now.
        sticky: the id's sockets opened later too, until LEAVE or --session-ttl after its
        last one (an id with no socket now is no error then)."""
        if not isinstance(sticky, bool) or (sticky and client_id is None):
            raise BadRequest('"sticky" must be true or false, and true needs "id"')
        found, joined = self.hub.join(channel, client_id, conn_id, sticky)
        if sticky and not found:
            return 0
        if not found:
            raise NotFound()
        if not joined:
            limit = self.board.cfg.max_channels_per_socket
            raise LimitReached(f"{TOO_MANY_CHANNELS} (limit {limit})")
        return joined

    def leave(self, channel: str, client_id: str | None = None, conn_id: str | None = None) -> int:
        found, left = self.hub.leave(channel, client_id, conn_id)
        if not found:
            raise NotFound()
        return left

    def set_meta(self, client_id: object, meta: object) -> int:
        if not is_valid_client_id(client_id):
            raise BadRequest('"id" must be a client id')
        if meta is not None and not isinstance(meta, dict):
            raise BadRequest('"meta" must be a JSON object (or null to take it off)')
        if meta is not None and len(compact_json(meta)) > MAX_META_BYTES:
            raise BadRequest(f'"meta" must be at most {MAX_META_BYTES} bytes of JSON')
        sockets = self.hub.set_meta(client_id, meta)
        if not sockets:
            raise NotFound()
        return sockets

    def presence(self, channel: str) -> list:
        if not channel.startswith(PRESENCE_PREFIX):
            raise BadRequest(f'"channel" must be a presence channel ({PRESENCE_PREFIX}...)')
        return self.hub.presence(channel)

    # What there is.

    def online(self, ids: object) -> list:
        """The ids asked, in order, that have an open socket."""
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_ONLINE_IDS:
            raise BadRequest(f'"ids" must be a list of 1-{MAX_ONLINE_IDS} client ids')
        if not all(is_valid_client_id(i) for i in ids):
            raise BadRequest('"ids" must hold client ids only')
        return self.hub.online(ids)

    def count(self, channel: str | None = None) -> tuple:
        """(open sockets, distinct ids), everywhere or in channel."""
        return self.hub.count(channel)

    def clients(self) -> list:
        return self.hub.clients()

    def channel_clients(self, channel: str) -> list:
        return self.hub.channel_clients(channel)

    def channels(self) -> dict:
        return self.hub.channels()

    def terminate_user(self, user_id: str, code: int, reason: str) -> int:
        """Close every socket of user_id, and every one there as that user (Pusher's
        terminate_connections): how many."""
        return self.hub.terminate_user(user_id, code, reason)

    # Channel history.

    def position(self, channel: str) -> tuple:
        """(epoch, last offset) of channel: a page rendered now connects with since= it."""
        return self.hub.position(channel)

    def history(self, channel: str, since: object = None, limit: object = None) -> HistoryPage:
        """channel's kept publications (after since {"epoch", "offset"}, at most limit)."""
        if limit is None:
            limit = MAX_HISTORY_LIMIT
        elif (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 0 <= limit <= MAX_HISTORY_LIMIT
        ):
            raise BadRequest(f'"limit" must be a whole number from 0 to {MAX_HISTORY_LIMIT}')
        if since is not None:
            since = history_since(since)
        return self.hub.history_page(channel, since, limit)


def history_since(since: object) -> tuple:
    """A history request's {"epoch", "offset"} as (epoch, offset), or BadRequest."""
    epoch = since.get("epoch") if isinstance(since, dict) else None
    offset = since.get("offset") if isinstance(since, dict) else None
    if (
        not isinstance(epoch, str)
        or not re.fullmatch(r"[0-9a-f]{1,16}", epoch)
        or isinstance(offset, bool)
        or not isinstance(offset, int)
        or not 0 <= offset < 10**16
    ):
        raise BadRequest('"since" must be {"epoch": 1-16 hex digits, "offset": a whole number}')
    return epoch, offset


###############################################################################
# Control line protocol #######################################################
###############################################################################
# Lines end in \n (a \r before it is dropped). Every line gets exactly one answer, in
# order: the seed's PHP client waits for one and would hang on silence. Verbs are whole
# words looked up in VERBS, so a verb never matches by prefix (KICKME is no KICK). A new
# verb is one row of VERBS: its words, its arguments, its usage (HELP shows it), the
# action it calls and how its result is answered.


class Command(NamedTuple):
    verb: str
    args: tuple = ()


new_command = functools.partial(tuple.__new__, Command)  # ((verb, args)), quicker than Command()

# What a line can be refused with before it is carried out (answered ERROR <text>).
UNKNOWN_COMMAND = "Unknown command"
MISSING_ID, INVALID_ID = "Missing client id", "Invalid client id"
MISSING_TEXT, BAD_UTF8 = "Missing message text", "Message is not valid UTF-8"
MISSING_CHANNEL, INVALID_CHANNEL = "Missing channel", "Invalid channel name"


def parse_client_id(raw: bytes) -> str | Command:
    """raw (spaces after it dropped) as a client id, or the error Command that refuses it."""
    raw = raw.rstrip(b" ")
    if not raw:
        return Command("error", (MISSING_ID,))
    if CLIENT_ID_BYTES.fullmatch(raw) is None:
        return Command("error", (INVALID_ID,))
    return raw.decode("ascii")


def parse_text(raw: bytes) -> str | Command:
    """raw as a message's text, or the error Command that refuses it."""
    if not raw:
        return Command("error", (MISSING_TEXT,))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return Command("error", (BAD_UTF8,))


def parse_channel(raw: bytes, valid: Callable[[object], bool] = is_valid_channel) -> str | Command:
    """raw as a channel name, or the error Command that refuses it."""
    if not raw:
        return Command("error", (MISSING_CHANNEL,))
    name = raw.decode("ascii", "replace")
    return name if valid(name) else Command("error", (INVALID_CHANNEL,))


MAX_ONLINE_IDS = 1000
TOO_MANY_IDS = f"Too many ids (limit {MAX_ONLINE_IDS})"

# Argument readers: each takes its raw bytes (a word, or for the last argument the rest of
# the line) and gives its value or the error Command that refuses it.


id_arg = parse_client_id


def channel_arg(raw: bytes) -> str | Command:
    return parse_channel(raw.rstrip(b" "))


def publish_channel_arg(raw: bytes) -> str | Command:
    """A channel PUBLISH may name: a user's (#server-to-user-<id>) too."""
    return parse_channel(raw.rstrip(b" "), is_publish_channel)


def optional_channel_arg(raw: bytes) -> str | None | Command:
    return channel_arg(raw) if raw.strip(b" ") else None


text_arg = parse_text  # as it is: spaces at either end are part of the text


def ids_arg(raw: bytes) -> list | Command:
    raw_ids = raw.split()
    if not raw_ids:
        return Command("error", (MISSING_ID,))
    if len(raw_ids) > MAX_ONLINE_IDS:
        return Command("error", (TOO_MANY_IDS,))
    ids = [parse_client_id(raw_id) for raw_id in raw_ids]
    return next((i for i in ids if isinstance(i, Command)), ids)


def parse_args(readers: tuple, rest: bytes) -> tuple | Command:
    """The arguments after a verb: each reader but the last takes a word, the last takes the
    rest of the line. A verb without arguments takes nothing but spaces."""
    if not readers:
        return () if not rest.strip(b" ") else Command("error", (UNKNOWN_COMMAND,))
    args: tuple = ()
    for read in readers[:-1]:
        raw, _, rest = rest.partition(b" ")
        value = read(raw)
        if type(value) is Command:
            return value
        args += (value,)
    value = readers[-1](rest)
    return value if type(value) is Command else (*args, value)


def framed(rows: Iterable[str]) -> list:
    """A listing's answer lines, framed as LIST WEBSOCKETS frames it."""
    return ["=== START ===", *rows, "=== END ==="]


def socket_rows(rows: Iterable[ClientRow]) -> list:
    return framed(f"{row.client_id} {row.peer}" for row in rows)


class Verb(NamedTuple):
    name: str  # the Command's verb (and its metric's label)
    args: tuple  # its argument readers, in order
    usage: str  # as HELP shows it
    act: Callable  # (actions, batch, *args) -> its result; raises Refused
    answer: Callable  # its result -> the answer lines
    groups: bool = False  # a run of such lines may be carried out in one hub call


# fmt: off
VERBS = {
    b"LIST WEBSOCKETS": Verb(
        "list", (), "LIST WEBSOCKETS",
        lambda actions, batch: actions.clients(), socket_rows),
    b"SEND MESSAGE": Verb(
        "send", (id_arg, text_arg), "SEND MESSAGE <id> <text>",
        lambda actions, batch, client_id, text: actions.send(
            [client_id], text, batch=batch, count_all=False),
        lambda result: ["OK"], groups=True),
    b"BROADCAST": Verb(
        "broadcast", (text_arg,), "BROADCAST <text>",
        lambda actions, batch, text: actions.broadcast(text, batch),
        lambda count: [f"OK {count}"]),
    b"KICK": Verb(
        "kick", (id_arg,), "KICK <id>",
        lambda actions, batch, client_id: actions.kick(client_id),
        lambda count: [f"OK {count}"]),
    b"JOIN": Verb(
        "join", (channel_arg, id_arg), "JOIN <channel> <id>",
        lambda actions, batch, channel, client_id: actions.join(channel, client_id),
        lambda count: [f"OK {count}"]),
    b"LEAVE": Verb(
        "leave", (channel_arg, id_arg), "LEAVE <channel> <id>",
        lambda actions, batch, channel, client_id: actions.leave(channel, client_id),
        lambda count: [f"OK {count}"]),
    b"PUBLISH": Verb(
        "publish", (publish_channel_arg, text_arg), "PUBLISH <channel> <text>",
        lambda actions, batch, channel, text: actions.publish([channel], text, batch=batch),
        lambda count: [f"OK {count}"]),
    b"ONLINE": Verb(
        "online", (ids_arg,), "ONLINE <id> [<id> ...]",
        lambda actions, batch, ids: actions.online(ids),
        lambda ids: [" ".join(["OK", *ids])]),
    b"COUNT": Verb(
        "count", (optional_channel_arg,), "COUNT [<channel>]",
        lambda actions, batch, channel: actions.count(channel),
        lambda counts: [f"OK {counts[0]} {counts[1]}"]),
    b"LIST CHANNEL": Verb(
        "list_channel", (channel_arg,), "LIST CHANNEL <channel>",
        lambda actions, batch, channel: actions.channel_clients(channel), socket_rows),
    b"LIST CHANNELS": Verb(
        "list_channels", (), "LIST CHANNELS",
        lambda actions, batch: actions.channels(),
        lambda counts: framed(f"{name} {count}" for name, count in counts.items())),
    b"POSITION": Verb(
        "position", (channel_arg,), "POSITION <channel>",
        lambda actions, batch, channel: actions.position(channel),
        lambda position: [f"OK {position[0]} {position[1]}"]),
    b"PING": Verb(
        "ping", (), "PING",
        lambda actions, batch: None, lambda _: ["PONG"]),
    b"HELP": Verb(
        "help", (), "HELP",
        lambda actions, batch: help_line(), lambda line: [line]),
}
# fmt: on
VERBS_BY_NAME = {verb.name: verb for verb in VERBS.values()}


def by_first_word(verbs: Mapping[bytes, Verb]) -> dict:
    """{first word: [(key, verb)]}, the longer keys first (LIST WEBSOCKETS before a LIST),
    so a line's verb is found from its first word without splitting the line."""
    found: dict = {}
    for key, verb in sorted(verbs.items(), key=lambda item: -len(item[0])):
        found.setdefault(key.split(b" ")[0], []).append((key, verb))
    return found


VERBS_BY_FIRST_WORD = by_first_word(VERBS)


def parse_control_line(line: bytes) -> Command:
    """A control line (without its \\n) as a Command; refusals are Command('error', (text,))."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if line.startswith(b"{"):
        return Command("json", (line,))
    space = line.find(b" ")
    for key, verb in VERBS_BY_FIRST_WORD.get(line if space < 0 else line[:space], ()):
        if line.startswith(key) and line[len(key) : len(key) + 1] in (b"", b" "):
            args = parse_args(verb.args, line[len(key) + 1 :])
            return args if type(args) is Command else new_command((verb.name, args))
    return Command("error", (UNKNOWN_COMMAND,))


# A SEND line as it usually comes, matched whole in one call: a run of them is the control
# socket's hot path, where parse_control_line's steps cost more than carrying one out.
SEND_LINE = re.compile(rb"SEND MESSAGE (" + CLIENT_ID_BYTES.pattern + rb") (.+)", re.DOTALL)


def parse_send_line(line: bytes) -> tuple | None:
    """A well-formed SEND MESSAGE line's (client id, text), as parse_control_line reads it;
    None for any other line, which parse_control_line then reads (and refuses if it must)."""
    match = SEND_LINE.fullmatch(line)
    if match is None:
        return None
    raw_id, raw_text = match.groups()
    if raw_text[-1] == 13:  # a CRLF line's \r is not part of the text
        raw_text = raw_text[:-1]
        if not raw_text:
            return None
    try:
        return raw_id.decode("ascii"), raw_text.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_control_line(line: bytes) -> Command:
    """parse_control_line, with a plain SEND line read the quick way."""
    send = parse_send_line(line)
    return new_command(("send", send)) if send is not None else parse_control_line(line)


def help_line() -> str:
    ops = ", ".join(sorted(JSON_OPS))
    return (
        "OK commands: "
        + " | ".join(verb.usage for verb in VERBS.values())
        + f" | a JSON object per line with op {ops}"
    )


def run_command(command: Command, ctx: "ControlConnection") -> list:
    """The answer lines for one command; a bug costs one ERROR line, never the answer."""
    if command.verb == "json":
        return [compact_json(run_json(ctx, *command.args))]
    if command.verb == "error":
        return ["ERROR " + command.args[0]]
    verb = VERBS_BY_NAME[command.verb]
    try:
        return verb.answer(verb.act(ctx.board.actions, ctx.batch, *command.args))
    except Refused as exc:
        return [f"ERROR {exc}"]
    except Exception:
        log.exception("control command %s failed", command.verb)
        return ["ERROR " + INTERNAL_ERROR]


# The JSON form: one object per line in, one object per line out.


def _no_constant(name: str) -> object:
    raise BadRequest(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"number out of range: {text[:40]}")
    return value


def strict_json(data: bytes | str) -> object:
    """JSON as browsers can read it back: no NaN or Infinity, no number that overflows;
    nesting too deep is malformed, not a crash."""
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise BadRequest("JSON nested too deeply") from None
    except BadRequest:
        raise
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("Malformed JSON") from None


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
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest('"data" must be valid Unicode (no lone surrogates)') from None
        return data
    return compact_json(data)


CONN_ID = re.compile(r"[0-9]{1,20}\.[0-9]{1,20}")


def json_conn(request: dict, field: str = "conn") -> str | None:
    """A connection id ("<digits>.<digits>") from request[field], or None when absent."""
    conn = request.get(field)
    if conn is None:
        return None
    if not (isinstance(conn, str) and CONN_ID.fullmatch(conn)):
        raise BadRequest(f'"{field}" must be a connection id such as "123.4"')
    return conn


def json_channel(request: dict) -> str:
    channel = request.get("channel")
    if not is_valid_channel(channel):
        raise BadRequest(f'"channel" must be a channel name of {CHANNEL_RULE}')
    return channel


def json_channels(request: dict) -> list:
    channels = request.get("channel")
    channels = [channels] if isinstance(channels, str) else channels
    if not isinstance(channels, list) or not 1 <= len(channels) <= 100:
        raise BadRequest('"channel" must be a channel name or a list of 1-100 of them')
    for channel in channels:
        if not is_publish_channel(channel):
            raise BadRequest(f"invalid channel name: {str(channel)[:170]!r}")
    return channels


def json_target(request: dict) -> tuple:
    """(client id, None) or (None, connection id): who a join, leave or kick is for."""
    conn = json_conn(request)
    if conn is not None:
        return None, conn
    client_id = request.get("id")
    if not is_valid_client_id(client_id):
        raise BadRequest('"id" must be a client id (or give "conn", a connection id)')
    return client_id, None


def op_send(ctx: "ControlConnection", request: dict) -> dict:
    actions = ctx.board.actions
    if "conn" in request and "to" not in request:  # one socket, by its connection id
        sockets = actions.send_to_connection(json_conn(request), json_text(request), ctx.batch)
        return {"ok": True, "sockets": sockets}
    result = actions.send(
        json_ids(request), json_text(request), True, request.get("key"), ctx.batch
    )
    answer = {"ok": True, "sockets": result.sockets, "queued": result.queued}
    if ctx.board.cfg.inbox:
        answer["seq"] = result.seq
    if result.missing:
        answer["missing"] = result.missing
    if result.unconfirmed:  # among missing: a process holding them did not say
        answer["unconfirmed"] = list(result.unconfirmed)
        answer["trouble"] = result.trouble
    if result.duplicate:
        answer["duplicate"] = True
    return answer


def client_row_json(row: ClientRow) -> dict:
    return {
        "id": row.client_id,
        "conn": row.conn_id,
        "peer": row.peer,
        "since": round(row.since, 3),
        "origin": row.origin,
        "protocol": row.protocol,
        "queued_bytes": row.queued_bytes,
        "meta": row.meta,
        **({"user": row.user} if row.user is not None else {}),
    }


def op_kick(ctx: "ControlConnection", request: dict) -> dict:
    client_id, conn = json_target(request)
    code, reason = request.get("code", CloseCode.KICKED), request.get("reason", "kicked")
    return {"ok": True, "sockets": ctx.board.actions.kick(client_id, conn, code, reason)}


def op_publish(ctx: "ControlConnection", request: dict) -> dict:
    channels, text = json_channels(request), json_text(request)
    except_conn, event = json_conn(request, "except"), request.get("event")
    sockets = ctx.board.actions.publish(channels, text, except_conn, ctx.batch, event=event)
    return {"ok": True, "sockets": sockets}


def op_join(ctx: "ControlConnection", request: dict) -> dict:
    channel, (client_id, conn) = json_channel(request), json_target(request)
    sticky = request.get("sticky", False)
    return {"ok": True, "sockets": ctx.board.actions.join(channel, client_id, conn, sticky)}


def op_leave(ctx: "ControlConnection", request: dict) -> dict:
    channel, (client_id, conn) = json_channel(request), json_target(request)
    return {"ok": True, "sockets": ctx.board.actions.leave(channel, client_id, conn)}


def op_count(ctx: "ControlConnection", request: dict) -> dict:
    channel = json_channel(request) if "channel" in request else None
    sockets, ids = ctx.board.actions.count(channel)
    return {"ok": True, "sockets": sockets, "ids": ids}


def op_channel(ctx: "ControlConnection", request: dict) -> dict:
    members = ctx.board.actions.channel_clients(json_channel(request))
    return {
        "ok": True,
        "members": [
            {"id": r.client_id, "conn": r.conn_id, "peer": r.peer, "meta": r.meta} for r in members
        ],
    }


def op_position(ctx: "ControlConnection", request: dict) -> dict:
    epoch, offset = ctx.board.actions.position(json_channel(request))
    return {"ok": True, "epoch": epoch, "offset": offset}


def op_history(ctx: "ControlConnection", request: dict) -> dict:
    channel = json_channel(request)
    page = ctx.board.actions.history(channel, request.get("since"), request.get("limit"))
    publications = []
    for offset, text, event in page.publications:
        publication = {"offset": offset, "data": text}
        if event is not None:
            publication["event"] = event
        publications.append(publication)
    answer = {"ok": True, "epoch": page.epoch, "offset": page.offset}
    return {**answer, "publications": publications, "gap": page.gap}


def op_watch(ctx: "ControlConnection", request: dict) -> dict:
    ctx.watch()
    return {"ok": True, "watching": True}


def op_unwatch(ctx: "ControlConnection", request: dict) -> dict:
    ctx.unwatch()
    return {"ok": True, "watching": False}


# op -> (ctx, request) -> the answer; each parses its fields and calls one action.
JSON_OPS: dict = {
    "send": op_send,
    "broadcast": lambda ctx, request: {
        "ok": True,
        "sockets": ctx.board.actions.broadcast(json_text(request), ctx.batch),
    },
    "list": lambda ctx, request: {
        "ok": True,
        "clients": [client_row_json(row) for row in ctx.board.actions.clients()],
    },
    "kick": op_kick,
    "publish": op_publish,
    "join": op_join,
    "leave": op_leave,
    "online": lambda ctx, request: {
        "ok": True,
        "online": ctx.board.actions.online(request.get("ids")),
    },
    "count": op_count,
    "channel": op_channel,
    "position": op_position,
    "history": op_history,
    "channels": lambda ctx, request: {"ok": True, "channels": ctx.board.actions.channels()},
    "meta": lambda ctx, request: {
        "ok": True,
        "sockets": ctx.board.actions.set_meta(request.get("id"), request.get("meta")),
    },
    "presence": lambda ctx, request: {
        "ok": True,
        "members": ctx.board.actions.presence(json_channel(request)),
    },
    "ping": lambda ctx, request: {"ok": True, "pong": True},
    "stats": lambda ctx, request: {"ok": True, **ctx.board.stats()},
    "watch": op_watch,
    "unwatch": op_unwatch,
}


def run_json(ctx: "ControlConnection", line: bytes) -> dict:
    """Carry out one JSON command; every failure is an {"ok": false, "error": …} answer."""
    try:
        request = strict_json(line)
    except BadRequest as exc:
        return {"ok": False, "error": str(exc)}
    if not isinstance(request, dict):
        return {"ok": False, "error": "A command must be a JSON object"}
    op = JSON_OPS.get(request.get("op")) if isinstance(request.get("op"), str) else None
    if op is None:
        answer = {"ok": False, "error": f"Unknown op: {str(request.get('op'))[:40]!r}"}
    else:
        began = time.perf_counter()
        try:
            answer = op(ctx, request)
        except Refused as exc:
            answer = {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("JSON op %s failed", request.get("op"))
            answer = {"ok": False, "error": INTERNAL_ERROR}
        ctx.board.counts.command("json_" + request["op"], time.perf_counter() - began)
    if "ref" in request:  # lets a pipelining client match answers to requests
        answer["ref"] = request["ref"]
    return answer


###############################################################################
# Control connections #########################################################
###############################################################################


SHUTTING_DOWN = "Shutting down"  # a line that came after SIGTERM: it was not carried out
LINE_TOO_LONG = "Line too long"  # then the connection is closed
TOO_MANY_CONTROL = "Too many control connections"  # said to a connection past the limit
PERMISSION_DENIED = "Permission denied"  # said to a peer not in --control-uids/--control-gids
TOO_MANY_CHANNELS = "Too many channels"  # a JOIN past --max-channels-per-socket
TOO_MANY_STICKY = "Too many sticky joins"  # past --max-sticky-ids, or an id's channel limit

# Every ERROR a control connection can be answered with (those with a limit are told it in
# brackets after the text); docs/protocol.md lists them all (tests/test_docs.py checks).
CONTROL_REFUSALS = (
    CLIENT_NOT_FOUND,
    UNKNOWN_COMMAND,
    MISSING_ID,
    INVALID_ID,
    MISSING_TEXT,
    BAD_UTF8,
    MISSING_CHANNEL,
    INVALID_CHANNEL,
    TOO_MANY_IDS,
    TOO_MANY_CHANNELS,
    LINE_TOO_LONG,
    TOO_MANY_CONTROL,
    PERMISSION_DENIED,
    TIMEOUT,
    UNAVAILABLE,
    SHUTTING_DOWN,
    INTERNAL_ERROR,
    HISTORY_OFF,
)


def shutting_down_answer(line: bytes) -> str:
    """What a line gets once the server is shutting down: ERROR, or a JSON error (with its
    ref, so a pipelining client can tell which requests were not carried out)."""
    if not line.lstrip().startswith(b"{"):
        return "ERROR " + SHUTTING_DOWN
    answer: dict = {"ok": False, "error": SHUTTING_DOWN}
    try:
        request = strict_json(line)
    except BadRequest:
        request = None
    if isinstance(request, dict) and "ref" in request:
        answer["ref"] = request["ref"]
    return compact_json(answer)


def split_lines(buffer: bytearray) -> tuple:
    """Complete lines in buffer, and what is left after the last \\n."""
    *lines, rest = bytes(buffer).split(b"\n")
    return lines, bytearray(rest)


CONTROL_FLUSH_BYTES = 64 * 1024
SEND_GROUP = 256  # SEND lines carried out together, at most
GROUPS_IN_FLIGHT = 4  # groups under way before the oldest one's answers are waited for
CONTROL_SLICE = 0.005  # seconds one connection's lines may run before everyone else's turn


class ControlConnection:
    """One client of the control socket, with the batch its frames are held in. Answers
    and (when watching) events share the socket, so every write takes the lock; events
    wait in a bounded queue, and a watcher that falls behind on connects is cut."""

    everywhere = True  # a watcher hears every process's events

    def __init__(self, board: "Board", sock: socket.socket | None = None) -> None:
        self.board = board
        self.sock = sock
        self.frames = Batch()  # where a read's frames wait, to go out together
        self.batch: Batch | None = self.frames  # what the lines being answered hold frames in
        self.write_lock = gevent.lock.Semaphore()
        self.events: EventQueue | None = None
        self.pump: gevent.Greenlet | None = None
        self.waiting_since: float | None = time.monotonic()  # since when it waits (None: busy)
        self.cut_idle = False  # closed by the idle sweep (Board.control_idle_sweep)

    def write(self, data: bytes) -> None:
        """Write data whole within --write-timeout, a wait for another writer included. What
        the kernel takes at once needs no timer, nor sendall's SO_SNDBUF query per call."""
        limit = self.board.cfg.write_timeout
        deadline = time.monotonic() + limit
        if not self.write_lock.acquire(timeout=limit):
            raise WriteTimedOut("control client is not reading")
        try:
            try:
                sent = self.sock.send(data, 0, 0.0)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                timeout = WriteTimedOut("control client is not reading")
                with gevent.Timeout(max(0.0, deadline - time.monotonic()), timeout):
                    self.sock.sendall(memoryview(data)[sent:])
        finally:
            self.write_lock.release()

    def watch(self) -> None:
        if self.events is None:
            self.events = EventQueue(self.board.cfg.watch_queue)
            self.pump = gevent.spawn(self.pump_events)
            self.board.events.add(self)

    def unwatch(self) -> None:
        self.board.events.remove(self)
        if self.pump is not None:
            self.pump.kill(block=False)
        self.events = self.pump = None

    def push(self, line: str, lifecycle: bool) -> None:
        if self.events.offer(line, lifecycle) or not lifecycle:
            return
        log.warning("dropped a watcher that fell %d events behind", self.board.cfg.watch_queue)
        self.board.counts.watchers_cut += 1
        self.unwatch()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def pump_events(self) -> None:
        queue = self.events.queue
        try:
            while True:
                lines = [queue.get()]
                while not queue.empty() and len(lines) < 256:
                    lines.append(queue.get_nowait())
                self.write(("\n".join(lines) + "\n").encode("utf-8"))
        except (OSError, WebSocketError) as exc:
            log.info("watcher gone: %s", exc)
            self.board.events.remove(self)

    def serve(self) -> None:
        """Read lines, answer each in order, until EOF, abuse or idleness (which the
        board's sweep judges: a timeout on every recv cost a SEND a tenth of its latency)."""
        sock, cfg = self.sock, self.board.cfg
        sock.settimeout(None)
        buffer = bytearray()
        while True:
            self.waiting_since = time.monotonic()
            data = sock.recv(65536)
            self.waiting_since = None  # answering is not idling, however long it takes
            if not data:
                if buffer and not self.cut_idle:  # a last line without \n gets its answer
                    self.answer_lines([bytes(buffer)])
                return
            if not buffer and data.endswith(b"\n"):  # the usual read: whole lines only
                lines = data.split(b"\n")
                lines.pop()
                if not self.answer_lines(lines):
                    return
                continue
            buffer += data
            if b"\n" in data:
                lines, buffer = split_lines(buffer)
                if not self.answer_lines(lines):
                    return
            if len(buffer) > cfg.max_line:
                self.refuse_long_line()
                return

    def answer_lines(self, lines: list[bytes]) -> bool:
        """Answer lines in order; False when one was too long and the connection must end.

        Answers go out whenever 64 KiB are pending or the connection has had its slice of
        time; then everyone else gets a turn, so no batch can hold the server. A run of SEND
        lines goes to the hub in groups of SEND_GROUP (one call: answered and counted once);
        with --redis up to GROUPS_IN_FLIGHT groups are under way at once: the next group is
        read and started while the bus answers the ones before, so a run's pace is not one
        bus round trip per group. A plain SEND line is read by parse_send_line, at a quarter
        of parse_control_line's cost.
        """
        if len(lines) == 1:
            return self.answer_line(lines[0])
        max_line = self.board.cfg.max_line
        self.batch = self.frames
        pending: list = []
        sends: list = []  # SEND lines not yet started
        flying: collections.deque = collections.deque()  # started groups' answers, in order
        size = 0
        started = time.monotonic()
        try:
            for line in lines:
                if len(line) > max_line:
                    self.flush(pending + self.settle(flying, sends))
                    self.refuse_long_line()
                    return False
                if self.board.draining:  # a shutdown never waits for a batch to be carried out
                    pending += [*self.settle(flying, sends), shutting_down_answer(line)]
                    sends = []
                    continue
                args = parse_send_line(line)  # a plain SEND line: no Command, no verb look-up
                if args is None:
                    command = parse_control_line(line)
                    verb = VERBS_BY_NAME.get(command.verb)
                    args = command.args if verb is not None and verb.groups else None
                if args is not None:
                    sends.append(args)
                    if len(sends) < SEND_GROUP:
                        continue
                    flying.append(self.start_group(sends))
                    answers = flying.popleft()() if len(flying) > GROUPS_IN_FLIGHT else []
                else:
                    answers = self.settle(flying, sends) + self.carry_out(command, line)
                sends = []
                for answer in answers:
                    pending.append(answer)
                    size += len(answer) + 1
                if size >= CONTROL_FLUSH_BYTES or time.monotonic() - started >= CONTROL_SLICE:
                    self.flush(pending)
                    pending, size = [], 0
                    gevent.sleep(0)
                    started = time.monotonic()
            if sends:
                flying.append(self.start_group(sends))
                sends = []
            self.release()  # the frames go out before their answers are gathered
            self.flush(pending + self.settle(flying, sends))
            return True
        finally:
            if flying:  # the connection failed: what was started still settles its requests
                self.settle(flying, [])
            self.release()

    def answer_line(self, line: bytes) -> bool:
        """A read of one line is carried out as it comes, its frames written at once:
        nothing waits for it, and a lone SEND is the latency that matters."""
        if len(line) > self.board.cfg.max_line:
            self.refuse_long_line()
            return False
        self.batch = None
        if self.board.draining:
            answers = [shutting_down_answer(line)]
        else:
            answers = self.carry_out(read_control_line(line), line)
        self.write(("\n".join(answers) + "\n").encode("utf-8"))
        return True

    def carry_out(self, command: Command, line: bytes) -> list:
        """One command's answer lines, counted (and logged when refused as it was read)."""
        if command.verb == "error":
            log.warning("control error: %s: %r", command.args[0], line[:80])
        began = time.perf_counter()
        answers = run_command(command, self)
        if command.verb != "json":  # run_json counts its op
            self.board.counts.command(command.verb, time.perf_counter() - began)
        return answers

    def settle(self, flying: collections.deque, sends: list) -> list:
        """The answers of every group under way, and of sends (started now), in order."""
        if sends:
            flying.append(self.start_group(sends))
        answers: list = []
        while flying:
            answers += flying.popleft()()
        return answers

    def start_group(self, sends: list) -> Callable[[], list]:
        """A run of SEND lines, started together; the call it returns gives their answers."""
        board = self.board
        began = time.perf_counter()
        try:
            pending = board.actions.start_send_group(sends, self.batch)
        except Exception:
            log.exception("control command send failed")
            failed = ["ERROR " + INTERNAL_ERROR] * len(sends)
            return lambda: failed

        def answers() -> list:
            try:
                results = pending()
            except Exception:
                log.exception("control command send failed")
                return ["ERROR " + INTERNAL_ERROR] * len(sends)
            board.counts.command("send", time.perf_counter() - began, len(results))
            answer = VERBS_BY_NAME["send"].answer
            return [
                f"ERROR {result}" if isinstance(result, Refused) else answer(result)[0]
                for result in results
            ]

        return answers

    def release(self) -> None:
        """Let held frames out; time how long the oldest waited for the kernel."""
        waited = self.frames.release()
        if waited is not None:
            self.board.counts.delivery.observe(waited)

    def flush(self, answers: list) -> None:
        """Let held frames out first, then send the answers."""
        self.release()
        if answers:
            self.write(("\n".join(answers) + "\n").encode("utf-8"))

    def cut_if_idle(self, now: float, timeout: float) -> None:
        """End the connection when it has waited timeout for a line; a watcher may listen
        quietly for as long as it likes."""
        since = self.waiting_since
        if self.events is None and since is not None and now - since >= timeout:
            log.info("control connection idle for %gs: closing", timeout)
            self.cut_idle = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # its recv sees EOF
            except OSError:
                pass

    def refuse_long_line(self) -> None:
        max_line = self.board.cfg.max_line
        log.warning("control error: line longer than %d bytes; closing", max_line)
        self.write(f"ERROR {LINE_TOO_LONG} (limit {max_line} bytes)\n".encode())


###############################################################################
# Web routes and pages ########################################################
###############################################################################
# One Bottle app serves every Board: each request finds its board in the environ, where
# Board.__call__ put it. A new route is a function here that calls request_board().


def find_views() -> str:
    """views/ beside this file (a checkout), else the installed wsboard_views package."""
    candidate = os.path.join(HERE, "views")
    if os.path.isfile(os.path.join(candidate, "board.tpl")):
        return candidate
    import importlib.util

    spec = importlib.util.find_spec("wsboard_views")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    raise RuntimeError("wsboard: cannot find its views (a checkout's views/ or wsboard_views)")


VIEWS = find_views()
STATIC = os.path.join(VIEWS, "static")
MAX_FORM_BYTES = 1024 * 1024

routes = bottle.Bottle()


def request_board() -> "Board":
    return bottle.request.environ["wsboard.board"]


def render(name: str, **values: object) -> str:
    return bottle.template(name, template_lookup=[VIEWS], **values)


@routes.hook("after_request")
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


@routes.get("/")
def board_page() -> str:
    """The board, under a fresh id; /?channel=A&channel=B puts it in those channels."""
    cfg = request_board().cfg
    channels = parse_channels(bottle.request.query.getall("channel"), cfg.max_channels_per_socket)
    if isinstance(channels, Refusal):
        bottle.response.status = channels.status
        bottle.response.content_type = "text/plain; charset=utf-8"
        return channels.reason + "\n"
    board_id = new_board_id()
    if cfg.secret_key:  # signed mode: the page gets a server-minted token for its id
        query = signed_query(cfg.secret_key, board_id, cfg.token_ttl, channels=channels)
    else:
        query = urlencode([("id", board_id), *(("channel", c) for c in channels)])
    # Where its channels' history is as it is rendered: it connects with nothing lost.
    actions, since = request_board().actions, []
    for channel in channels:
        try:
            epoch, offset = actions.position(channel)
        except Refused:  # this channel keeps no history
            continue
        since.append(("since", f"{channel}:{epoch}:{offset}"))
    if since:
        query += "&" + urlencode(since)
    return render("board", board_id=board_id, query=query)


# The admin routes: a password when one is set, else this machine only, by a Host that
# no rebound name can pose as.


def admin_refusal(board: "Board", environ: Mapping[str, str]) -> Refusal | None:
    """Why this request may not use the admin routes, or None."""
    cfg = board.cfg
    if not cfg.admin_hash:
        if not is_local_request(environ):
            return Refusal(
                403,
                "The admin pages answer only to this machine until --admin-password is set",
                "admin",
            )
        if not host_trusted(environ.get("HTTP_HOST", ""), cfg.allowed_hosts):
            return Refusal(
                403, "Host not allowed without --admin-password (see --allowed-hosts)", "admin"
            )
        return None
    credentials = basic_credentials(environ.get("HTTP_AUTHORIZATION", ""))
    if credentials and credentials[0] == "admin" and board.admin_password_ok(credentials[1]):
        return None
    return Refusal(
        401,
        "Admin password required",
        "admin",
        (("WWW-Authenticate", 'Basic realm="wsboard admin", charset="UTF-8"'),),
    )


def cross_site_refusal(board: "Board", environ: Mapping[str, str]) -> Refusal | None:
    """Why a state-changing request may come from another site, or None."""
    if environ.get("HTTP_SEC_FETCH_SITE", "same-origin") not in ("same-origin", "none"):
        return Refusal(403, "Cross-site request refused", "csrf")
    if not origin_allowed(
        environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST", ""), (), board.cfg.allowed_hosts
    ):
        return Refusal(403, "Cross-site request refused", "csrf")
    if environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower() != "application/json":
        return Refusal(415, "Content-Type must be application/json", "csrf")
    return None


def admin_only(route: Callable) -> Callable:
    @functools.wraps(route)
    def guarded(*args: object, **kwargs: object) -> object:
        board = request_board()
        refusal = admin_refusal(board, bottle.request.environ)
        if refusal is None:
            return route(*args, **kwargs)
        board.refused(
            refusal.kind,
            "%s %s from %s: %s",
            bottle.request.method,
            bottle.request.path,
            bottle.request.remote_addr,
            refusal.reason,
        )
        for name, value in refusal.headers:
            bottle.response.set_header(name, value)
        if bottle.request.path == "/sendMessage":
            return json_answer(refusal.status, True, refusal.reason)
        bottle.response.status = refusal.status
        bottle.response.content_type = "text/plain; charset=utf-8"
        return refusal.reason + "\n"

    return guarded


# The admin page is rendered with its first page of clients, then keeps itself up to date:
# /admin/events tells it (Server-Sent Events) that sockets came or went, and it asks
# /admin/state.json for the page it shows, filtered and paged by the server.

ADMIN_PAGE_SIZE = 100  # clients per page
ADMIN_MAX_PAGE = 1000
ADMIN_CHANNELS = 200  # channels the page lists, the fullest first
ADMIN_STREAMS = 16  # admin pages that may be open at once (each holds a request)


def parse_admin_query(query: Mapping[str, str]) -> "tuple | Refusal":
    """(filter, offset, limit) of a state request, or the Refusal of a bad number."""
    text = query.get("q", "")[:200].strip().lower()
    offset = bounded_int(query.get("offset", "0"), 9)
    limit = bounded_int(query.get("limit", str(ADMIN_PAGE_SIZE)), 9)
    if offset is None or limit is None:
        return Refusal(400, "offset and limit must be whole numbers of 1-9 digits", "admin")
    return text, offset, max(1, min(limit, ADMIN_MAX_PAGE))


def client_matches(row: ClientRow, text: str) -> bool:
    """The filter: a case-insensitive part of the id, connection id, peer, origin, protocol
    or signed-in user."""
    fields = (row.client_id, row.conn_id, row.peer, row.origin, row.protocol or "plain")
    return any(text in field.lower() for field in (*fields, row.user or ""))


def client_json(row: ClientRow) -> dict:
    return {
        "id": row.client_id,
        "conn": row.conn_id,
        "peer": row.peer,
        "since": round(row.since, 3),
        "origin": row.origin,
        "protocol": row.protocol or "plain",
        "queued": row.queued_bytes,
        "meta": row.meta,
        "user": row.user,
    }


def admin_state(board: "Board", text: str, offset: int, limit: int) -> dict:
    """What the admin page shows: counters, one page of clients, channels, refusals.
    Raises BackplaneError."""
    hub, actions = board.hub, board.actions
    clients = actions.clients()
    matched = [row for row in clients if client_matches(row, text)] if text else clients
    channels = sorted(actions.channels().items(), key=lambda item: (-item[1], item[0]))
    return {
        "stats": {
            "sockets": len(clients),
            "ids": len({row.client_id for row in clients}),
            "channels": len(channels),
            "control_connections": board.control_connections,
            "watchers": board.watcher_count(),
            "delivered": hub.delivered.messages,
            "refused": sum(board.refusals.values()),
            "webhook_dropped": board.webhook_dropped(),
            "backplane": ("down" if hub.unready_reason() else "up") if board.cfg.redis else "off",
        },
        "clients": {
            "total": len(clients),
            "matched": len(matched),
            "offset": offset,
            "limit": limit,
            "rows": [client_json(row) for row in matched[offset : offset + limit]],
        },
        "channels": [
            {
                "name": name,
                "sockets": count,
                "members": (
                    [m["id"] for m in actions.presence(name)]
                    if name.startswith(PRESENCE_PREFIX)
                    else None
                ),
            }
            for name, count in channels[:ADMIN_CHANNELS]
        ],
        "refusals": dict(sorted(board.refusals.items())),
    }


@routes.get("/admin")
@admin_only
def admin_page() -> str:
    board = request_board()
    try:
        state = admin_state(board, "", 0, ADMIN_PAGE_SIZE)
    except BackplaneError as exc:
        bottle.abort(503, f"The admin page cannot list every process: {exc}")
    return render("admin", state=state, meta_text=meta_text)


def meta_text(meta: object) -> str:
    return "" if meta is None else json.dumps(meta, ensure_ascii=False, separators=(",", ":"))


@routes.get("/admin/state.json")
@admin_only
def admin_state_json() -> str:
    board = request_board()
    query = parse_admin_query(bottle.request.query)
    bottle.response.content_type = "application/json"
    bottle.response.set_header("Cache-Control", "no-store")
    if isinstance(query, Refusal):
        bottle.response.status = query.status
        return json.dumps({"error": query.reason})
    text, offset, limit = query
    try:
        return compact_json(admin_state(board, text, offset, limit))
    except BackplaneError as exc:
        bottle.response.status = 503
        return json.dumps({"error": str(exc)})


class AdminStream:
    """An open admin page, as an event sink: it only needs to know that something changed
    (it then asks for its page), so it keeps one flag, never a queue."""

    everywhere = True  # with --redis, other processes' sockets count too

    def __init__(self) -> None:
        self.changed = gevent.event.Event()

    def push(self, line: str, lifecycle: bool) -> None:
        if lifecycle:
            self.changed.set()


ADMIN_KEEPALIVE = 15.0  # seconds between comments that keep a quiet stream open
ADMIN_COALESCE = 0.5  # seconds a change waits for more, so a burst is one refresh


@routes.get("/admin/events")
@admin_only
def admin_events() -> object:
    """Server-Sent Events: "change" when sockets come, go, join or leave."""
    board = request_board()
    if board.admin_streams >= ADMIN_STREAMS:
        bottle.response.status = 503
        bottle.response.content_type = "text/plain; charset=utf-8"
        return f"Too many admin pages open (limit {ADMIN_STREAMS})\n"
    sink = AdminStream()
    board.admin_streams += 1
    board.events.add(sink)
    bottle.response.content_type = "text/event-stream"
    bottle.response.set_header("Cache-Control", "no-store")
    bottle.response.set_header("X-Accel-Buffering", "no")  # nginx: pass each event on at once

    def stream() -> Iterator[bytes]:
        try:
            yield b"retry: 2000\n\n"
            while True:
                if sink.changed.wait(ADMIN_KEEPALIVE):
                    gevent.sleep(ADMIN_COALESCE)
                    sink.changed.clear()
                    yield b"event: change\ndata: {}\n\n"
                else:
                    yield b": still here\n\n"
        finally:
            board.events.remove(sink)
            board.admin_streams -= 1

    return stream()


def admin_action(handle: Callable[["Board", dict], str]) -> str:
    """A state-changing admin request: its JSON body checked, then handle(board, body)
    gives the answer's message. A refusal answers {"error": true, …}: 200 for Client Not
    Found (as /sendMessage answers it), 400 for bad input, 503 when it cannot be known."""
    board = request_board()
    try:
        data = strict_json(admin_json_body(board).decode("utf-8"))
    except (UnicodeDecodeError, BadRequest):
        return json_answer(400, True, "Body must be a JSON object")
    if not isinstance(data, dict):
        return json_answer(400, True, "Body must be a JSON object")
    try:
        return json_answer(200, False, handle(board, data))
    except NotFound as exc:
        return json_answer(200, True, str(exc))
    except BackplaneError as exc:
        return json_answer(503, True, str(exc))
    except Refused as exc:
        return json_answer(400, True, str(exc))


def admin_target(data: dict) -> tuple:
    """(client id, None) or (None, connection id) of an admin action; BadRequest if neither."""
    conn = data.get("conn")
    if conn is not None:
        if not (isinstance(conn, str) and CONN_ID.fullmatch(conn)):
            raise BadRequest("conn must be a connection id (digits.digits)")
        return None, conn
    if not is_valid_client_id(data.get("clientId")):
        raise BadRequest("clientId must be a valid client id (or give conn)")
    return data["clientId"], None


def admin_message(data: dict) -> str:
    """The form's message as wsboard's pages get it: {"message": …}."""
    message = data.get("message")
    if not isinstance(message, str):
        raise BadRequest("message must be a string")
    check_text(message, "message")
    return compact_json({"message": message})


def do_send(board: "Board", data: dict) -> str:
    client_id, conn = admin_target(data)
    payload = admin_message(data)
    if conn is not None:
        return str(board.actions.send_to_connection(conn, payload))
    return str(board.actions.send([client_id], payload, count_all=False).sockets)


def do_kick(board: "Board", data: dict) -> str:
    client_id, conn = admin_target(data)
    return str(board.actions.kick(client_id, conn))


def do_broadcast(board: "Board", data: dict) -> str:
    return str(board.actions.broadcast(admin_message(data)))


@routes.post("/admin/send")
@admin_only
def admin_send() -> str:
    """{"clientId" or "conn", "message"}: like /sendMessage, or to one connection."""
    return admin_action(do_send)


@routes.post("/admin/kick")
@admin_only
def admin_kick() -> str:
    """{"clientId" or "conn"}: closes its sockets with 4000 (wsboard.js does not come back)."""
    return admin_action(do_kick)


@routes.post("/admin/broadcast")
@admin_only
def admin_broadcast() -> str:
    """{"message"}: to every open socket, as {"message": …}."""
    return admin_action(do_broadcast)


def json_answer(status: int, error: bool, message: str) -> str:
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return json.dumps({"error": error, "message": message})


def parse_admin_form(body: bytes, field: str, valid: Callable, rule: str) -> tuple:
    """(body[field], body["message"]) from an admin form's JSON body, or BadRequest."""
    try:
        data = strict_json(body.decode("utf-8"))
    except (UnicodeDecodeError, BadRequest):
        raise BadRequest("Body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("Body must be a JSON object")
    target, message = data.get(field), data.get("message")
    if not valid(target):
        raise BadRequest(f"{field} must be {rule}")
    if not isinstance(message, str):
        raise BadRequest("message must be a string")
    return target, check_text(message, "message")


def parse_send_request(body: bytes) -> tuple:
    """(client_id, message) from the admin form's JSON body, or BadRequest."""
    return parse_admin_form(body, "clientId", is_valid_client_id, "a valid client id")


def parse_publish_request(body: bytes) -> tuple:
    """(channel, message) from the admin page's publish form, or BadRequest."""
    return parse_admin_form(body, "channel", is_valid_channel, f"a channel name of {CHANNEL_RULE}")


class BodyIncomplete(Exception):
    """The client sent less of its body than its Content-Length said."""


def read_body(timeout: float) -> bytes:
    """The request body (its size checked by the caller), within the time a client gets to
    send it."""
    length = bottle.request.content_length
    try:
        with gevent.Timeout(timeout, TimeoutError):
            body = bottle.request.environ["wsgi.input"].read(length) if length > 0 else b""
    except (OSError, ValueError):  # TimeoutError is an OSError; pywsgi raises IOError on EOF
        raise BodyIncomplete from None
    if len(body) < length:
        raise BodyIncomplete
    return body


def json_refusal(status: int, message: str, close: bool = False) -> bottle.HTTPResponse:
    """An answer in /sendMessage's shape that ends the request where it is raised (and
    the connection too, when close: its body did not come whole)."""
    headers = {"Content-Type": "application/json", **({"Connection": "close"} if close else {})}
    return bottle.HTTPResponse(json.dumps({"error": True, "message": message}), status, headers)


def admin_json_body(board: "Board") -> bytes:
    """The body of a state-changing admin request, after the cross-site, encoding, size
    and time checks; each failure is raised as the answer (json_refusal)."""
    cross_site = cross_site_refusal(board, bottle.request.environ)
    if cross_site:
        board.refused(
            cross_site.kind,
            "%s from %s: %s",
            bottle.request.path,
            bottle.request.remote_addr,
            cross_site.reason,
        )
        raise json_refusal(cross_site.status, cross_site.reason)
    if bottle.request.get_header("Transfer-Encoding"):  # Bottle would spool it whole first
        raise json_refusal(411, "Send the body with a Content-Length")
    if bottle.request.content_length > MAX_FORM_BYTES:
        raise json_refusal(413, f"Body larger than {MAX_FORM_BYTES} bytes")
    try:
        return read_body(board.cfg.handshake_timeout)
    except BodyIncomplete:
        raise json_refusal(408, "The body did not arrive whole in time", close=True) from None


@routes.post("/sendMessage")
@admin_only
def send_message() -> str:
    """The seed's form: {"clientId", "message"} sends {"message": …} to the id; answers
    {"error": false, "message": ""} or {"error": true, "message": "Client Not Found"},
    both with 200 (a contract), and 4xx for a request it cannot read."""
    board = request_board()
    try:
        client_id, message = parse_send_request(admin_json_body(board))
        payload = compact_json({"message": message})
        board.actions.send([client_id], payload, count_all=False)
    except BadRequest as exc:
        log.warning("sendMessage refused: %s", exc)
        return json_answer(400, True, str(exc))
    except Refused as exc:  # no such client, or with --redis not known: the seed's 200
        return json_answer(200, True, str(exc))
    return json_answer(200, False, "")


@routes.post("/publish")
@admin_only
def publish() -> str:
    """The admin page's publish form: {"channel", "message"}; answers like /sendMessage,
    with the number of sockets that took it as the message."""
    board = request_board()
    try:
        channel, message = parse_publish_request(admin_json_body(board))
        payload = compact_json({"message": message})
        count = board.actions.publish([channel], payload)
    except BadRequest as exc:
        log.warning("publish refused: %s", exc)
        return json_answer(400, True, str(exc))
    except BackplaneError as exc:
        return json_answer(503, True, str(exc))
    return json_answer(200, False, str(count))


@routes.get(WEBSOCKET_PATH)
def websocket_without_upgrade() -> str:
    bottle.response.status = 426
    bottle.response.set_header("Upgrade", "websocket")
    bottle.response.content_type = "text/plain; charset=utf-8"
    return "This URL takes WebSocket connections: ws://HOST:PORT/websocket?id=ID\n"


@routes.get("/static/<filename:path>")
def static(filename: str) -> object:
    return bottle.static_file(filename, root=STATIC)


@routes.error(404)
@routes.error(405)
@routes.error(500)
def plain_error(error: bottle.HTTPError) -> str:
    bottle.response.content_type = "text/plain; charset=utf-8"
    return f"{error.status_line}\n"


###############################################################################
# The Pusher protocol #########################################################
###############################################################################
# pusher-js (and Laravel Echo on it) connect to /app/<key>; the Pusher server SDKs call the
# HTTP API under /apps/<app id>/. Nothing of it is a second system: Pusher channels are
# wsboard channels, a Pusher socket id is a connection id, and a Pusher socket's client id
# is its socket id, so the control socket, the admin page, watchers and the Redis hub see
# both kinds of socket alike. Only the framing and the signatures are Pusher's. See
# docs/pusher.md.

PUSHER_PATH = "/app/"
PUSHER_PROTOCOLS = range(5, 8)  # the protocol versions pusher-js speaks (7 today)
PUSHER_DEFAULT_EVENT = "message"  # what a wsboard SEND or PUBLISH is called on a Pusher socket
PUSHER_MAX_CHANNELS = 100  # channels one HTTP API event may name (Pusher's limit)
PUSHER_MAX_BATCH = 10  # events one batch_events may hold (Pusher's limit)
PUSHER_MAX_EVENT_NAME = 200
PUSHER_TIMESTAMP_SKEW = 600  # seconds an API request's auth_timestamp may be off
PUSHER_RESERVED = ("pusher:", "pusher_internal:")  # event names only the server may send


class PusherCode(enum.IntEnum):
    """Pusher's close codes. pusher-js reads the range: 4000-4099 do not reconnect,
    4100-4199 reconnect after a back-off, 4200-4299 reconnect at once."""

    APP_NOT_FOUND = 4001
    UNSUPPORTED_PROTOCOL = 4007
    NO_PROTOCOL = 4008
    UNAUTHORIZED = 4009  # terminate_connections: this user is not to come back
    OVER_CAPACITY = 4100
    RECONNECT = 4200
    INACTIVE = 4202


def pusher_close_code(code: int) -> int:
    """A wsboard close code as Pusher's: a server going away or an idle socket reconnects
    now; any other trouble backs off; 4000 and up (kicks) mean what they say."""
    if code >= 4000:
        return code
    if code in (CloseCode.GOING_AWAY, CloseCode.SERVICE_RESTART):
        return PusherCode.RECONNECT
    if code == CloseCode.NORMAL:
        return PusherCode.INACTIVE
    return PusherCode.OVER_CAPACITY


def pusher_sign(secret: str, message: str) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def pusher_channel_auth(
    key: str, secret: str, socket_id: str, channel: str, channel_data: str | None = None
) -> str:
    """The auth a backend gives pusher-js for a private or presence channel:
    key:hex(HMAC-SHA256(secret, "socket_id:channel[:channel_data]"))."""
    message = f"{socket_id}:{channel}" + (f":{channel_data}" if channel_data is not None else "")
    return f"{key}:{pusher_sign(secret, message)}"


def pusher_auth_refusal(
    key: str, secret: str, socket_id: str, channel: str, auth: object, channel_data: object
) -> str | None:
    """Why a subscription's auth does not open channel to this socket, or None."""
    if not isinstance(auth, str) or not auth:
        return f"Auth required to subscribe to {channel}"
    signed = channel_data if channel.startswith(PRESENCE_PREFIX) else None
    if signed is not None and not isinstance(signed, str):
        return "channel_data must be a JSON string"
    expected = pusher_channel_auth(key, secret, socket_id, channel, signed)
    if not hmac.compare_digest(auth.encode("utf-8", "replace"), expected.encode()):
        return f"Invalid signature: expected HMAC SHA256 hex digest of {socket_id}:{channel}" + (
            ":channel_data" if signed is not None else ""
        )
    return None


PUSHER_MAX_USER_DATA = 10240  # bytes of a pusher:signin's user_data


def pusher_user_auth(key: str, secret: str, socket_id: str, user_data: str) -> str:
    """The auth a backend gives pusher-js to sign in (the SDKs' authenticateUser):
    key:hex(HMAC-SHA256(secret, "socket_id::user::user_data"))."""
    return f"{key}:{pusher_sign(secret, f'{socket_id}::user::{user_data}')}"


def pusher_signed_user(key: str, secret: str, socket_id: str, data: object) -> str:
    """The user id a pusher:signin's data ({auth, user_data}) signs for this socket.
    Raises BadRequest saying why it signs none."""
    if not isinstance(data, dict):
        raise BadRequest('pusher:signin needs {"auth", "user_data"}')
    auth, user_data = data.get("auth"), data.get("user_data")
    if not isinstance(user_data, str):
        raise BadRequest("user_data must be a JSON string")
    if len(user_data.encode("utf-8", "replace")) > PUSHER_MAX_USER_DATA:
        raise BadRequest(f"user_data is larger than {PUSHER_MAX_USER_DATA} bytes")
    if not isinstance(auth, str) or not auth:
        raise BadRequest("Auth required to sign in")
    expected = pusher_user_auth(key, secret, socket_id, user_data)
    if not hmac.compare_digest(auth.encode("utf-8", "replace"), expected.encode()):
        raise BadRequest(
            f"Invalid signature: expected HMAC SHA256 hex digest of {socket_id}::user::user_data"
        )
    user = strict_json(user_data)  # BadRequest when it is not JSON
    if not isinstance(user, dict):
        raise BadRequest("user_data must be a JSON object")
    user_id = user.get("id")
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if not is_valid_client_id(user_id):
        raise BadRequest(f"user_data's id must be {CLIENT_ID_RULE}")
    return user_id


def pusher_user(channel_data: str) -> "tuple | str":
    """(user_id, user_info) from a presence subscription's channel_data, or why not."""
    try:
        data = strict_json(channel_data)
    except BadRequest:
        return "channel_data must be JSON"
    if not isinstance(data, dict):
        return "channel_data must be a JSON object"
    user_id = data.get("user_id")
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if not is_valid_client_id(user_id):
        return f"channel_data's user_id must be {CLIENT_ID_RULE}"
    info = data.get("user_info")
    if info is not None and len(json.dumps(info)) > MAX_META_BYTES:
        return f"user_info is larger than {MAX_META_BYTES} bytes"
    return user_id, info


def pusher_api_refusal(
    key: str, secret: str, method: str, path: str, query: str, body: bytes, now: float
) -> Refusal | None:
    """Why an HTTP API request is not signed by this app (Pusher's auth_* parameters, the
    body's MD5, a timestamp within ten minutes), or None."""
    params: dict = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in params:
            return Refusal(400, f"Parameter {name[:40]!r} given twice", "pusher_api")
        params[name] = value
    signature = params.pop("auth_signature", "")
    if params.get("auth_key") != key:
        return Refusal(401, "Unknown auth_key", "pusher_api")
    if params.get("auth_version") != "1.0":
        return Refusal(401, "auth_version must be 1.0", "pusher_api")
    stamp = bounded_int(params.get("auth_timestamp", ""), 12)
    if stamp is None:
        return Refusal(401, "auth_timestamp must be a Unix time", "pusher_api")
    if abs(now - stamp) > PUSHER_TIMESTAMP_SKEW:
        return Refusal(
            401, f"Timestamp expired: {int(now - stamp)} s off, allowed is 600 s", "pusher_api"
        )
    md5 = hashlib.md5(body).hexdigest()
    if (body or "body_md5" in params) and params.get("body_md5") != md5:
        return Refusal(401, "body_md5 does not match the body", "pusher_api")
    signed = "&".join(f"{k}={v}" for k, v in sorted((k.lower(), v) for k, v in params.items()))
    expected = pusher_sign(secret, f"{method}\n{path}\n{signed}")
    if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode()):
        return Refusal(401, "Invalid signature: you should have sent HmacSHA256(...)", "pusher_api")
    return None


def pusher_event(event: str, data: object, channel: str | None = None, **fields: str) -> bytes:
    """One Pusher frame: data a string (pusher-js decodes JSON in it), or an object for
    pusher:error as Pusher sends it."""
    message = {"event": event, **({"channel": channel} if channel is not None else {})}
    return compact_frame({**message, "data": data, **fields})


class PusherFraming(Framing):
    """Pusher's frames: {"event", "channel", "data"}; connection_established first; member
    lists and changes as pusher_internal events. Its sockets get a channel message once per
    channel, as Pusher's do, since each event names its channel."""

    name = "pusher"
    tells_presence = True
    per_channel = True

    def __init__(self, activity_timeout: int) -> None:
        self.activity_timeout = activity_timeout

    def message(self, text: str, seq: int | None, topic: Topic | None = None) -> bytes:
        if topic is None:
            return pusher_event(PUSHER_DEFAULT_EVENT, text)
        fields = {"user_id": topic.user_id} if topic.user_id is not None else {}
        return pusher_event(topic.event or PUSHER_DEFAULT_EVENT, text, topic.channel, **fields)

    def opening(
        self,
        inbox: "Inbox | None",
        conn: "Connection",
        hs: Handshake,
        now: float,
        history: "History | None" = None,
    ) -> list:
        data = {"socket_id": conn.conn_id, "activity_timeout": self.activity_timeout}
        return [pusher_event("pusher:connection_established", json.dumps(data))]

    def refusal(self, closing: Closing) -> list:
        return [pusher_event("pusher:error", {"code": closing.code, "message": closing.reason})]

    def presence_change(self, conn: "Connection", channel: str, change: dict) -> bytes:
        if "join" in change:
            member = change["join"]
            data = {"user_id": member["id"]}
            if member.get("meta") is not None:
                data["user_info"] = member["meta"]
            return pusher_event("pusher_internal:member_added", json.dumps(data), channel)
        data = {"user_id": change["leave"]["id"]}
        return pusher_event("pusher_internal:member_removed", json.dumps(data), channel)

    def presence_members(self, conn: "Connection", channel: str, members: list) -> bytes:
        presence = {
            "ids": [m["id"] for m in members],
            "hash": {m["id"]: m["meta"] for m in members},
            "count": len(members),
        }
        data = json.dumps({"presence": presence})
        return pusher_event("pusher_internal:subscription_succeeded", data, channel)

    def subscription_count(self, channel: str, count: int) -> bytes | None:
        data = json.dumps({"subscription_count": count})
        return pusher_event("pusher_internal:subscription_count", data, channel)


PUSHER_INFO = frozenset({"subscription_count", "user_count"})  # what info= may ask of a channel


def channel_info_wanted(info: str, channels: Iterable[str]) -> frozenset:
    """The attributes info ("a,b") asks of channels, or BadRequest for an unknown one or a
    user_count of a channel that is not a presence channel."""
    wanted = frozenset(part.strip() for part in info.split(",") if part.strip())
    unknown = wanted - PUSHER_INFO
    if unknown:
        raise BadRequest(f"Unknown info attribute {sorted(unknown)[0][:40]!r}")
    if "user_count" in wanted and not all(c.startswith(PRESENCE_PREFIX) for c in channels):
        raise BadRequest("user_count is for presence- channels only")
    return wanted


class PusherTrigger(NamedTuple):
    """An event of the HTTP API, checked whole: what trigger publishes."""

    name: str
    data: str
    channels: list
    socket_id: str | None
    info: frozenset


def pusher_trigger_request(body: dict, max_event: int) -> PusherTrigger:
    """One event of the API ({name, data, channel or channels, socket_id?, info?}),
    checked whole before anything is published. Raises BadRequest (PayloadTooLarge for data
    over max_event bytes)."""
    name, data = body.get("name"), body.get("data")
    if not isinstance(name, str) or not 1 <= len(name) <= PUSHER_MAX_EVENT_NAME:
        raise BadRequest(f"name must be an event name of 1-{PUSHER_MAX_EVENT_NAME} characters")
    if name.startswith(PUSHER_RESERVED):
        raise BadRequest("Event names beginning with pusher: are the server's own")
    if not isinstance(data, str):
        raise BadRequest("data must be a string (the SDKs encode objects as JSON)")
    try:
        size = len(data.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest("data must be valid Unicode") from None
    if size > max_event:
        raise PayloadTooLarge(f"data over {max_event} bytes")
    channels = body.get("channels", [body["channel"]] if "channel" in body else None)
    if not isinstance(channels, list) or not 1 <= len(channels) <= PUSHER_MAX_CHANNELS:
        raise BadRequest(f"channels must be a list of 1-{PUSHER_MAX_CHANNELS} channel names")
    for channel in channels:
        if not is_publish_channel(channel):
            raise BadRequest(f"Invalid channel name {str(channel)[:170]!r}: {PUBLISH_CHANNEL_RULE}")
    socket_id = body.get("socket_id")
    if socket_id is not None and not (isinstance(socket_id, str) and CONN_ID.fullmatch(socket_id)):
        raise BadRequest("socket_id must be a socket id: digits.digits")
    info = body.get("info")
    if info is not None and not isinstance(info, str):
        raise BadRequest("info must be a string: attribute names separated by commas")
    wanted = channel_info_wanted(info or "", channels)
    return PusherTrigger(name, data, list(dict.fromkeys(channels)), socket_id, wanted)


def decoded(data: object) -> object:
    """A client frame's data: some clients send it as a JSON string (None if it is not JSON)."""
    if not isinstance(data, str):
        return data
    try:
        return strict_json(data)
    except BadRequest:
        return None


class PusherApp(SocketProtocol):
    """The one Pusher app this process serves, as the protocol of /app/KEY (its sockets'
    frames in, Pusher's close codes) and its HTTP API."""

    hooked = False  # its channels are signed one by one; its id is its socket id
    signed = False  # a Pusher socket's channels are signed one by one, not its id

    def __init__(self, board: "Board") -> None:
        cfg = board.cfg
        self.board = board
        self.app_id, self.key, self.secret = cfg.pusher_app_id, cfg.pusher_key, cfg.pusher_secret
        activity = cfg.pusher_activity_timeout
        if cfg.idle_timeout:  # pusher-js must ping before the idle timeout closes it
            activity = max(1, min(activity, int(cfg.idle_timeout / 2)))
        self.framing = PusherFraming(activity)

    def matches(self, path: str) -> bool:
        return path.startswith(PUSHER_PATH)

    def given_id(self, board: "Board") -> str:
        return board.new_conn_id()  # a Pusher socket's id is its socket id

    def conn_id(self, board: "Board", hs: Handshake) -> str:
        return hs.client_id

    def framing_for(self, hs: Handshake) -> Framing:
        return self.framing

    def close_code(self, code: int) -> int:
        return pusher_close_code(code)

    def closing(self, path: str, query: str) -> Closing | None:
        """Why pusher-js may not connect here: Pusher answers after the 101, with a
        pusher:error and a close code that tells pusher-js not to retry."""
        if path[len(PUSHER_PATH) :] != self.key:
            return Closing(PusherCode.APP_NOT_FOUND, "App key not known here", "pusher")
        versions = parse_qs(query).get("protocol", [])
        if not versions:
            return Closing(PusherCode.NO_PROTOCOL, "No protocol version given", "pusher")
        version = versions[0]
        if bounded_int(version, 3) not in PUSHER_PROTOCOLS:
            return Closing(
                PusherCode.UNSUPPORTED_PROTOCOL,
                f"Unsupported protocol version {version[:10]!r}",
                "pusher",
            )
        return None

    # A Pusher socket's frames.

    @staticmethod
    def write(conn: Connection, *frames: bytes) -> None:
        if conn.ws.closed:  # nothing after our close frame (RFC 6455 5.5.1)
            return
        try:
            conn.ws.write_frames(list(frames))
        except WebSocketError:
            pass

    def error(self, conn: Connection, message: str, code: int | None = None) -> None:
        self.write(conn, pusher_event("pusher:error", {"code": code, "message": message}))

    def receive(self, board: "Board", conn: Connection, message: object) -> None:
        """One frame from a Pusher socket: answered, never raised."""
        if not isinstance(message, str):
            return self.error(conn, "Binary frames are not part of the Pusher protocol")
        try:
            event = strict_json(message)
        except BadRequest:
            return self.error(conn, "Frames must be JSON")
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            return self.error(conn, 'Frames must be JSON objects with an "event" name')
        name, data = event["event"], event.get("data")
        if name == "pusher:ping":
            return self.write(conn, pusher_event("pusher:pong", "{}"))
        if name in ("pusher:subscribe", "pusher:unsubscribe"):
            data = decoded(data)
            if not isinstance(data, dict) or not is_publish_channel(data.get("channel")):
                return self.error(conn, f"{name} needs a channel name of {PUBLISH_CHANNEL_RULE}")
            if name == "pusher:unsubscribe":
                self.board.hub.unsubscribe(conn, data["channel"])
                return None
            return self.subscribe(conn, data["channel"], data)
        if name == "pusher:signin":
            return self.signin(conn, decoded(data))
        if name.startswith("client-"):
            return self.client_event(conn, name, event.get("channel"), data)
        return self.error(conn, f"Unsupported event {name[:PUSHER_MAX_EVENT_NAME]!r}")

    def signin(self, conn: Connection, data: object) -> None:
        """pusher:signin: bind the socket to the user its app signed, and put it in that
        user's channel, so that events to the user reach it from now on."""
        try:
            user_id = pusher_signed_user(self.key, self.secret, conn.conn_id, data)
        except BadRequest as exc:
            self.board.refused("pusher", "sign-in of %s: %s", conn.conn_id, exc)
            return self.error(conn, f"Sign-in refused: {exc}", PusherCode.UNAUTHORIZED)
        if conn.user not in (None, user_id):
            return self.error(conn, f"Signed in as {conn.user} already", PusherCode.UNAUTHORIZED)
        if self.board.hub.subscribe(conn, user_channel(user_id)) is None:
            limit = self.board.cfg.max_channels_per_socket
            return self.error(conn, f"Sign-in refused: too many channels (limit {limit})")
        conn.user = user_id
        signed = typing.cast(dict, data)["user_data"]  # a string: pusher_signed_user checked it
        self.write(conn, pusher_event("pusher:signin_success", json.dumps({"user_data": signed})))
        self.board.events.emit("signin", id=conn.client_id, conn=conn.conn_id, user=user_id)
        return None

    def subscription_error(self, conn: Connection, channel: str, reason: str, status: int) -> None:
        self.board.refused("pusher", "subscription of %s to %s: %s", conn.conn_id, channel, reason)
        data = {"type": "AuthError", "error": reason, "status": status}
        self.write(conn, pusher_event("pusher:subscription_error", data, channel))

    def subscribe(self, conn: Connection, channel: str, data: dict) -> None:
        user = None
        if channel.startswith(USER_CHANNEL_PREFIX) and channel != user_channel(conn.user or ""):
            reason = "Only a socket signed in as its user may subscribe to " + channel
            return self.subscription_error(conn, channel, reason, 403)
        if channel.startswith(PRIVATE_PREFIXES):
            channel_data = data.get("channel_data")
            reason = pusher_auth_refusal(
                self.key, self.secret, conn.conn_id, channel, data.get("auth"), channel_data
            )
            if reason is None and channel.startswith(PRESENCE_PREFIX):
                user = pusher_user(channel_data)
                reason = user if isinstance(user, str) else None
            if reason is not None:
                return self.subscription_error(conn, channel, reason, 401)
        frames = self.board.hub.subscribe(conn, channel, user)
        if frames is None:
            limit = self.board.cfg.max_channels_per_socket
            return self.subscription_error(conn, channel, f"Too many channels (limit {limit})", 400)
        if not channel.startswith(PRESENCE_PREFIX):
            frames = [pusher_event("pusher_internal:subscription_succeeded", "{}", channel)]
        if channel.startswith(CACHE_PREFIXES):
            frames.append(self.cached(channel))
        if frames:  # a presence channel's list may follow from the other processes
            self.write(conn, *frames)
        return None

    def cached(self, channel: str) -> bytes:
        """A cache channel's last event, or pusher:cache_miss when it has none kept."""
        try:
            last = self.board.hub.history_page(channel, None, 1).publications
        except BadRequest:  # not a channel that keeps history
            last = []
        if not last:
            self.board.events.notice("cache_miss", channel=channel)
            return compact_frame({"event": "pusher:cache_miss", "channel": channel})
        _, text, event = last[-1]
        return pusher_event(event or PUSHER_DEFAULT_EVENT, text, channel)

    def client_event(self, conn: Connection, name: str, channel: object, data: object) -> None:
        """A client-* event from a member of a private or presence channel, to the others."""
        if not self.board.cfg.pusher_client_events:
            return self.error(conn, "Client events are off (--pusher-client-events)")
        if not (isinstance(channel, str) and channel.startswith(PRIVATE_PREFIXES)):
            return self.error(conn, "Client events go to private- and presence- channels only")
        if not conn.channels or channel not in conn.channels:
            return self.error(conn, f"Subscribe to {channel} before sending events to it")
        if len(name) > PUSHER_MAX_EVENT_NAME:
            return self.error(conn, f"Event names are {PUSHER_MAX_EVENT_NAME} characters at most")
        text = data if isinstance(data, str) else compact_json(data)
        if len(text.encode("utf-8", "replace")) > self.board.cfg.pusher_max_event:
            return self.error(conn, f"Event data over {self.board.cfg.pusher_max_event} bytes")
        user_id = conn.member(channel) if channel.startswith(PRESENCE_PREFIX) else None
        try:
            self.board.actions.publish([channel], text, conn.conn_id, event=name, user_id=user_id)
        except Refused as exc:
            return self.error(conn, f"Not delivered: {exc}")
        if self.board.events.noticed:
            fields = {"user_id": user_id} if user_id is not None else {}
            self.board.events.notice(
                "client_event", channel=channel, event=name, data=text, socket_id=conn.conn_id,
                **fields,
            )  # fmt: skip
        return None

    # The HTTP API: what the server SDKs call.

    @staticmethod
    def trigger(event: "PusherTrigger", actions: "Actions") -> dict:
        """Publish an event checked by pusher_trigger_request; its channels' info when asked."""
        actions.publish(event.channels, event.data, event.socket_id, event=event.name)
        if not event.info:
            return {}
        return {
            "channels": {c: PusherApp.channel_info(actions, c, event.info) for c in event.channels}
        }

    @staticmethod
    def channel_info(actions: "Actions", channel: str, wanted: frozenset) -> dict:
        """The attributes wanted (checked by channel_info_wanted) of one channel."""
        answer = {}
        if "subscription_count" in wanted:
            answer["subscription_count"] = actions.count(channel)[0]
        if "user_count" in wanted:
            answer["user_count"] = len(actions.presence(channel))
        return answer

    def answer(self, method: str, resource: str, query: dict, body: bytes) -> dict:
        """The JSON object an authenticated API request gets. Raises BadRequest,
        PayloadTooLarge, NoSuchCall or BackplaneError."""
        actions = self.board.actions
        parts = resource.split("/")
        if method == "POST" and resource in ("events", "batch_events"):
            try:
                request = strict_json(body.decode("utf-8"))
            except (UnicodeDecodeError, BadRequest):
                raise BadRequest("Body must be a JSON object") from None
            if not isinstance(request, dict):
                raise BadRequest("Body must be a JSON object")
            max_event = self.board.cfg.pusher_max_event
            if resource == "events":
                return self.trigger(pusher_trigger_request(request, max_event), actions)
            batch = request.get("batch")
            if not isinstance(batch, list) or not 1 <= len(batch) <= PUSHER_MAX_BATCH:
                raise BadRequest(f"batch must be a list of 1-{PUSHER_MAX_BATCH} events")
            if not all(isinstance(item, dict) for item in batch):
                raise BadRequest("Each event of a batch must be a JSON object")
            events = []  # all checked before any is published: a 4xx means nothing was done
            for n, item in enumerate(batch):
                try:
                    events.append(pusher_trigger_request(item, max_event))
                except BadRequest as exc:
                    raise type(exc)(f"batch[{n}]: {exc}") from None
            results = [self.trigger(event, actions) for event in events]
            return {"batch": results} if any(results) else {}
        if method == "GET" and parts == ["channels"]:
            return {"channels": self.channel_list(actions, query)}
        if method == "GET" and len(parts) == 2 and parts[0] == "channels":
            channel = parts[1]
            if not is_valid_channel(channel):
                raise BadRequest(f"Invalid channel name: {CHANNEL_RULE}")
            wanted = channel_info_wanted(query.get("info", ""), [channel])
            occupied = actions.count(channel)[0] > 0
            return {"occupied": occupied, **self.channel_info(actions, channel, wanted)}
        if method == "GET" and len(parts) == 3 and parts[0] == "channels" and parts[2] == "users":
            channel = parts[1]
            if not (is_valid_channel(channel) and channel.startswith(PRESENCE_PREFIX)):
                raise BadRequest("Users are listed for presence- channels only")
            return {"users": [{"id": m["id"]} for m in actions.presence(channel)]}
        if (
            method == "POST"
            and len(parts) == 3
            and parts[0] == "users"
            and parts[2] == "terminate_connections"
        ):
            if not is_valid_client_id(parts[1]):
                raise BadRequest(f"user id must be {CLIENT_ID_RULE}")
            actions.terminate_user(parts[1], PusherCode.UNAUTHORIZED, "connections terminated")
            return {}
        raise NoSuchCall(f"No such API call: {method} {resource[:100]}")

    @staticmethod
    def channel_list(actions: "Actions", query: dict) -> dict:
        prefix = query.get("filter_by_prefix", "")
        wanted = channel_info_wanted(query.get("info", ""), [])
        if "user_count" in wanted and not prefix.startswith(PRESENCE_PREFIX):
            raise BadRequest("user_count needs filter_by_prefix=presence-")
        counts = actions.channels()  # every process's counts in one round trip
        names = sorted(  # users' channels are no channels of the app's, as in Pusher
            name for name in counts if name.startswith(prefix) and is_valid_channel(name)
        )
        listed: dict = {name: {} for name in names}
        for name in names:
            if "subscription_count" in wanted:
                listed[name]["subscription_count"] = counts[name]
            if "user_count" in wanted:
                listed[name]["user_count"] = len(actions.presence(name))
        return listed


class NoSuchCall(BadRequest):
    """No such API call (HTTP 404)."""


def pusher_json(status: int, value: dict) -> str:
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return compact_json(value)


@routes.post("/users/<user_id>/terminate_connections")
def pusher_terminate(user_id: str) -> str:
    """The Python SDK (3.3) leaves /apps/<id> out of this one path: the key names the app."""
    pusher = request_board().pusher
    if pusher is None:
        return pusher_json(404, {"error": "Unknown app id"})
    return pusher_api(pusher.app_id, f"users/{user_id}/terminate_connections")


@routes.route("/apps/<app_id>/<resource:path>", method=["GET", "POST"])
def pusher_api(app_id: str, resource: str) -> str:
    """Pusher's HTTP API: signed requests only; every answer a JSON object (the SDKs want
    one with 200, and a reason with the 4xx)."""
    board = request_board()
    pusher = board.pusher
    if pusher is None or app_id != pusher.app_id:
        return pusher_json(404, {"error": "Unknown app id"})
    request = bottle.request
    if request.get_header("Transfer-Encoding"):
        return pusher_json(411, {"error": "Send the body with a Content-Length"})
    if request.content_length > MAX_FORM_BYTES:
        return pusher_json(413, {"error": f"Body larger than {MAX_FORM_BYTES} bytes"})
    try:
        body = read_body(board.cfg.handshake_timeout)
    except BodyIncomplete:
        bottle.response.set_header("Connection", "close")
        return pusher_json(408, {"error": "The body did not arrive whole in time"})
    query_string = request.environ.get("QUERY_STRING", "")
    refusal = pusher_api_refusal(
        pusher.key, pusher.secret, request.method, request.path, query_string, body, time.time()
    )
    if refusal is not None:
        board.refused(refusal.kind, "%s %s: %s", request.method, request.path, refusal.reason)
        return pusher_json(refusal.status, {"error": refusal.reason})
    query = dict(parse_qsl(query_string, keep_blank_values=True))
    try:
        return pusher_json(200, pusher.answer(request.method, resource, query, body))
    except PayloadTooLarge as exc:
        return pusher_json(413, {"error": str(exc)})
    except NoSuchCall as exc:
        return pusher_json(404, {"error": str(exc)})
    except BackplaneError as exc:
        return pusher_json(503, {"error": str(exc)})
    except Refused as exc:
        return pusher_json(400, {"error": str(exc)})


# Pusher's webhooks: what happened to channels, members and client events, in Pusher's
# format, batched within Pusher's quarter second and signed with the app secret, so the
# SDKs' validators accept them. They are told where it happened, once over every process
# (Events' observers); each URL has its own bounded queue and sender, so a slow endpoint
# delays only itself and never a delivery to a browser.

PUSHER_WEBHOOK_WINDOW = 0.25  # seconds an event waits for others to share its POST (Pusher's)
PUSHER_WEBHOOK_BATCH = 100  # events one POST may carry
PUSHER_WEBHOOK_TIMEOUT = 4  # seconds an endpoint has to answer (Pusher asks for 4)
PUSHER_WEBHOOK_RETRY_FOR = 300  # seconds a failed POST is retried, backing off (Pusher's 5 min)
PUSHER_WEBHOOK_KINDS = frozenset(
    {"join", "leave", "occupied", "vacated", "client_event", "cache_miss", "subscription_count"}
)


def pusher_webhook_event(kind: str, fields: Mapping) -> dict | None:
    """A wsboard event or notice (kind, fields) as Pusher's webhooks name it, or None."""
    channel = fields.get("channel")
    if kind not in PUSHER_WEBHOOK_KINDS or not is_valid_channel(channel):
        return None  # a user's channel is no channel of the app's
    if kind in ("join", "leave"):
        name = "member_added" if kind == "join" else "member_removed"
        return {"name": name, "channel": channel, "user_id": fields["id"]}
    if kind in ("occupied", "vacated"):
        return {"name": f"channel_{kind}", "channel": channel}
    if kind == "subscription_count":
        return {"name": kind, "channel": channel, "subscription_count": fields["count"]}
    if kind == "cache_miss":
        return {"name": kind, "channel": channel}
    event = {"name": kind, "channel": channel, "event": fields["event"], "data": fields["data"]}
    event["socket_id"] = fields["socket_id"]
    if fields.get("user_id") is not None:
        event["user_id"] = fields["user_id"]
    return event


def pusher_webhook_request(key: str, secret: str, events: list, now: float) -> tuple:
    """(body, headers) of one webhook POST: X-Pusher-Signature is hex(HMAC-SHA256(secret,
    body)), as the SDKs' validators check it."""
    body = compact_json({"time_ms": int(now * 1000), "events": events})
    raw = body.encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"wsboard/{__version__}",
        "X-Pusher-Key": key,
        "X-Pusher-Signature": hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest(),
    }
    return raw, headers


class PusherWebhook:
    """One --pusher-webhook URL: a bounded queue of events, POSTed in batches, in order,
    by one greenlet; a failed POST is retried with backoff for PUSHER_WEBHOOK_RETRY_FOR
    seconds, meanwhile what does not fit the queue is dropped, counted and logged."""

    def __init__(self, url: str, key: str, secret: str, size: int) -> None:
        self.url, self.key, self.secret, self.size = url, key, secret, size
        self.queue: collections.deque = collections.deque()
        self.ready = gevent.event.Event()
        self.idle = gevent.event.Event()  # nothing queued, nothing being posted
        self.idle.set()
        self.warned = Throttle(10)
        self.delivered = self.failed = self.dropped = self.posts = 0  # events, but posts
        self.greenlet = gevent.spawn(self.run)

    def push(self, event: dict) -> None:
        if len(self.queue) >= self.size:
            self.dropped += 1
            if self.warned():
                log.warning(
                    "pusher webhook %s is not keeping up: %d events dropped so far",
                    self.url,
                    self.dropped,
                )
            return
        self.queue.append(event)
        self.idle.clear()
        self.ready.set()

    def run(self) -> None:
        while True:
            self.ready.wait()
            if len(self.queue) < PUSHER_WEBHOOK_BATCH:
                gevent.sleep(PUSHER_WEBHOOK_WINDOW)  # what comes meanwhile shares the POST
            count = min(len(self.queue), PUSHER_WEBHOOK_BATCH)
            batch = [self.queue.popleft() for _ in range(count)]
            try:
                if batch:
                    self.post(batch)
            except Exception:  # a bug must cost one batch, never the webhook
                log.exception("pusher webhook %s failed on %d events", self.url, len(batch))
                self.failed += len(batch)
            if not self.queue:
                self.ready.clear()
                self.idle.set()

    def post(self, batch: list) -> bool:
        body, headers = pusher_webhook_request(self.key, self.secret, batch, time.time())
        give_up_at, delay = time.monotonic() + PUSHER_WEBHOOK_RETRY_FOR, 0.5
        while True:
            self.posts += 1
            try:
                with gevent.Timeout(PUSHER_WEBHOOK_TIMEOUT, TimeoutError("no answer in time")):
                    request = urllib.request.Request(self.url, data=body, headers=headers)
                    with urllib.request.urlopen(request, timeout=PUSHER_WEBHOOK_TIMEOUT) as answer:
                        answer.read(65536)
                self.delivered += len(batch)
                return True
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if time.monotonic() + delay > give_up_at:
                    log.error(
                        "pusher webhook %s gave up on %d events: %s", self.url, len(batch), exc
                    )
                    self.failed += len(batch)
                    return False
                if self.warned():
                    log.warning("pusher webhook %s failed, retrying: %s", self.url, exc)
                gevent.sleep(delay)
                delay = min(30.0, delay * 2)

    def stats(self) -> dict:
        return {
            "url": self.url,
            "delivered": self.delivered,
            "failed": self.failed,
            "dropped": self.dropped,
            "waiting": len(self.queue),
            "posts": self.posts,
        }


class PusherWebhooks:
    """The observer (of Events) that turns what happens into Pusher's webhook events, for
    each --pusher-webhook URL."""

    def __init__(self, cfg: Config) -> None:
        self.wanted = cfg.pusher_webhook_events
        self.hooks = [
            PusherWebhook(url, cfg.pusher_key, cfg.pusher_secret, cfg.webhook_queue)
            for url in cfg.pusher_webhook
        ]

    def __call__(self, kind: str, fields: Mapping) -> None:
        if kind not in PUSHER_WEBHOOK_KINDS:  # most events (messages) stop here
            return
        event = pusher_webhook_event(kind, fields)
        if event is not None and event["name"] in self.wanted:
            for hook in self.hooks:
                hook.push(event)

    @property
    def greenlets(self) -> list:
        return [hook.greenlet for hook in self.hooks]

    def flush(self, timeout: float) -> None:
        """Wait (at most timeout) until what is queued has been posted (at shutdown)."""
        gevent.wait([hook.idle for hook in self.hooks], timeout=timeout)

    def totals(self) -> dict:
        return {
            result: sum(getattr(hook, result) for hook in self.hooks)
            for result in ("delivered", "failed", "dropped")
        }


###############################################################################
# Metrics and health ##########################################################
###############################################################################
# What happened is counted in plain integers on the hot paths; prometheus_client reads
# them at each scrape through BoardCollector and writes the exposition format. Its own
# Histogram takes a lock per observation (3.7 µs under gevent, measured), too dear for
# every control line, so histograms here are Buckets, handed over as metric families.

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5)  # fmt: skip
GC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
SEND_ANSWERS = {CLIENT_NOT_FOUND: "not_found", TIMEOUT: "timeout", UNAVAILABLE: "unavailable"}


class Buckets:
    """A histogram's counts: observations per upper bound (the last one unbounded), and
    their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times

    def cumulative(self) -> list:
        """[(le, observations at or below it)], ending with +Inf, as Prometheus wants."""
        running, rows = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            rows.append((bound, running))
        return rows


class Counts:
    """What one process did since start: sends by answer, commands by verb (with their
    latency), closes by reason, watchers cut off, and how long held frames waited."""

    def __init__(self) -> None:
        self.sends: collections.Counter = collections.Counter()  # ok, not_found, ...
        self.commands: collections.Counter = collections.Counter()
        self.command_seconds: dict[str, Buckets] = {}
        self.closes: collections.Counter = collections.Counter()  # EndReason names
        self.watchers_cut = 0
        self.delivery = Buckets(LATENCY_BUCKETS)  # a read's held frames, until the kernel has them

    def sent(self, result: SendResult) -> None:
        if result.sockets or result.queued:
            self.sends["ok"] += 1
        else:
            self.sends[SEND_ANSWERS.get(str(send_refusal(result)), "not_found")] += 1

    def sent_all(self, results: list) -> None:
        """sent() for each of a group's results: the OKs added at once."""
        refused = [r for r in results if not (r.sockets or r.queued)]
        if len(refused) < len(results):
            self.sends["ok"] += len(results) - len(refused)
        for result in refused:
            self.sent(result)

    def command(self, verb: str, seconds: float, times: int = 1) -> None:
        """times commands of verb, each answered after seconds (a group's)."""
        self.commands[verb] += times
        buckets = self.command_seconds.get(verb)
        if buckets is None:
            buckets = self.command_seconds[verb] = Buckets(LATENCY_BUCKETS)
        buckets.observe(seconds, times)


def not_ready_reason(board: "Board") -> str | None:
    """Why this process should get no traffic now (for /readyz), or None."""
    if board.draining:
        return "draining"
    if not board.started:
        return "starting"
    return board.hub.unready_reason()


class BoardCollector:
    """One process's figures for prometheus_client, read at each scrape."""

    def __init__(self, board: "Board") -> None:
        self.board = board

    def collect(self) -> Iterator:
        board, hub = self.board, self.board.hub
        counts = board.counts
        info = GaugeMetricFamily("wsboard_info", "This process", labels=["version", "node"])
        info.add_metric([__version__, hub.node], 1)
        yield info
        ready = GaugeMetricFamily("wsboard_ready", "1 when /readyz answers 200")
        ready.add_metric([], 0 if not_ready_reason(board) else 1)
        yield ready
        conns = hub.registry.open_connections()
        by_protocol = collections.Counter(c.framing.name or "plain" for c in conns)
        sockets = GaugeMetricFamily(
            "wsboard_sockets", "Open WebSockets here, by protocol", labels=["protocol"]
        )
        for protocol in ("plain", SUBPROTOCOL, "pusher"):
            sockets.add_metric([protocol], by_protocol.get(protocol, 0))
        yield sockets
        for name, doc, value in (
            ("wsboard_client_ids", "Client ids with an open socket here", len(hub.registry.ids())),
            ("wsboard_channels", "Channels with a socket here", len(hub.registry.channel_names())),
            ("wsboard_control_connections", "Open control connections", board.control_connections),
            ("wsboard_watchers", "Control connections watching events", board.watcher_count()),
            ("wsboard_queued_bytes", "Bytes waiting for sockets that are not reading",
             sum(c.ws.queued_bytes for c in conns)),
        ):  # fmt: skip
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "wsboard_messages_delivered", "Frames handed to sockets", value=hub.delivered.messages
        )
        yield CounterMetricFamily(
            "wsboard_delivered_bytes", "Bytes of the frames handed to sockets",
            value=hub.delivered.bytes,
        )  # fmt: skip
        yield self.labelled(
            "wsboard_sends", "SENDs by answer", "answer",
            {"ok": 0, "not_found": 0, "timeout": 0, "unavailable": 0, **counts.sends},
        )  # fmt: skip
        yield self.labelled("wsboard_refusals", "Refusals by kind", "kind", board.refusals)
        closes = {reason.name.lower(): 0 for reason in EndReason}
        yield self.labelled("wsboard_closes", "Sockets closed, by reason", "reason",
                            {**closes, **counts.closes})  # fmt: skip
        yield CounterMetricFamily(
            "wsboard_slow_consumer_cutoffs",
            "Sockets cut off for not reading (send queue full or write timed out)",
            value=counts.closes["queue_full"] + counts.closes["write_timeout"],
        )
        webhook = board.webhook
        pusher_hooks = board.pusher_webhooks.totals() if board.pusher_webhooks else {}
        backplane = hub.stats()["backplane"]
        overflows = {
            "socket": counts.closes["queue_full"],
            "watcher": counts.watchers_cut,
            "webhook": webhook.dropped if webhook else 0,
            "pusher_webhook": pusher_hooks.get("dropped", 0),
            "backplane": backplane.get("dropped", 0),
        }
        yield self.labelled("wsboard_queue_overflows", "Bounded queues that overflowed", "queue",
                            overflows)  # fmt: skip
        yield self.labelled(
            "wsboard_webhook_events", "Events the webhook posted or gave up on", "result",
            {"ok": webhook.delivered if webhook else 0, "failed": webhook.failed if webhook else 0},
        )  # fmt: skip
        yield self.labelled(
            "wsboard_pusher_webhook_events",
            "Pusher webhook events posted, given up on or dropped (queue full), every URL",
            "result",
            {r: pusher_hooks.get(r, 0) for r in ("delivered", "failed", "dropped")},
        )
        yield self.labelled("wsboard_control_commands", "Control commands by verb (or JSON op)",
                            "verb", counts.commands)  # fmt: skip
        latency = HistogramMetricFamily(
            "wsboard_control_command_seconds", "Time to answer a control command", labels=["verb"]
        )
        for verb, buckets in sorted(counts.command_seconds.items()):
            latency.add_metric([verb], buckets.cumulative(), buckets.total)
        yield latency
        yield self.histogram(
            "wsboard_delivery_seconds",
            "How long a control read's held frames waited for the kernel (the oldest of each)",
            counts.delivery,
        )
        yield self.histogram(
            "wsboard_gc_pause_seconds", "Full garbage collections", board.gc_watch.pauses
        )
        if backplane["state"] != "off":
            up = GaugeMetricFamily("wsboard_backplane_up", "1 while the Redis link is up")
            up.add_metric([], 1 if backplane["state"] == "up" else 0)
            yield up
            yield GaugeMetricFamily(
                "wsboard_backplane_processes", "Live processes seen", value=backplane["processes"]
            )
            yield GaugeMetricFamily(
                "wsboard_backplane_waiting", "Publishes waiting for Redis",
                value=backplane["waiting"],
            )  # fmt: skip
            yield CounterMetricFamily(
                "wsboard_backplane_reconnects", "Times the Redis link came back",
                value=backplane["reconnects"],
            )  # fmt: skip

    @staticmethod
    def labelled(name: str, doc: str, label: str, values: Mapping) -> "CounterMetricFamily":
        family = CounterMetricFamily(name, doc, labels=[label])
        for key, value in sorted(values.items()):
            family.add_metric([key], value)
        return family

    @staticmethod
    def histogram(name: str, doc: str, buckets: Buckets) -> "HistogramMetricFamily":
        family = HistogramMetricFamily(name, doc)
        family.add_metric([], buckets.cumulative(), buckets.total)
        return family


def metrics_answer(board: "Board") -> tuple:
    """(status, content type, body) of a scrape."""
    if prometheus_client is None:
        text = "/metrics needs prometheus_client: pip install 'wsboard[metrics]'\n"
        return 501, "text/plain; charset=utf-8", text.encode()
    if board.metrics is None:
        board.metrics = prometheus_client.CollectorRegistry(auto_describe=False)
        board.metrics.register(BoardCollector(board))
    body = prometheus_client.generate_latest(board.metrics)
    return 200, prometheus_client.CONTENT_TYPE_LATEST, body


def health_answer(board: "Board", path: str) -> tuple:
    """(status, text) of /healthz (it serves) or /readyz (it should get traffic)."""
    if path == "/healthz":
        return 200, "ok\n"
    reason = not_ready_reason(board)
    return (503, f"not ready: {reason}\n") if reason else (200, "ready\n")


@routes.get("/healthz")
@routes.get("/readyz")
def health() -> str:
    """For load balancers and Kubernetes probes: no password, no work."""
    status, text = health_answer(request_board(), bottle.request.path)
    bottle.response.status = status
    bottle.response.content_type = "text/plain; charset=utf-8"
    bottle.response.set_header("Cache-Control", "no-store")
    return text


@routes.get("/metrics")
@admin_only
def metrics() -> bytes:
    status, kind, body = metrics_answer(request_board())
    bottle.response.status = status
    bottle.response.content_type = kind
    return body


class MetricsApp:
    """The --metrics-port server's WSGI app: /metrics, /healthz, /readyz, no password (it
    binds 127.0.0.1 unless told otherwise)."""

    def __init__(self, board: "Board") -> None:
        self.board = board

    def __call__(self, environ: dict, start_response: Callable) -> Iterable:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            status, kind, body = metrics_answer(self.board)
        elif path in ("/healthz", "/readyz"):
            status, text = health_answer(self.board, path)
            kind, body = "text/plain; charset=utf-8", text.encode()
        else:
            status, kind, body = 404, "text/plain; charset=utf-8", b"Not Found\n"
        start_response(
            f"{status} {HTTP_STATUS.get(status, 'Error')}",
            [("Content-Type", kind), ("Content-Length", str(len(body)))],
        )
        return [body]


###############################################################################
# The board: one process's state, started and stopped #########################
###############################################################################


def freeze_step(count: int, previous: int, frozen_at: int) -> str | None:
    """What freeze_gc does when its check finds count sockets (previous at the check before,
    frozen_at when it last froze): None while they stay near frozen_at. "young" as soon as
    they grew, settled or not: a socket is no cycle, so one that closes is freed, frozen or
    not, and the new objects need only a collection of the young generations before they are
    frozen too (a full one stalled a worker of 16,000 sockets for about 100 ms, and one of
    16,700 under load for 370-530 ms). "all" once they shrank and (nearly) settled: unfreeze
    and collect everything, so no cycle that died while frozen is kept."""
    if abs(count - frozen_at) < max(1000, frozen_at // 10):
        return None
    if count > frozen_at:
        return "young"
    return "all" if abs(count - previous) <= max(100, previous // 100) else None


class GCWatch:
    """Times the collector's full (generation 2) passes: the pauses every socket feels."""

    def __init__(self) -> None:
        self.full = 0
        self.last_ms = self.max_ms = 0.0
        self.started = 0.0
        self.pauses = Buckets(GC_BUCKETS)

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.full += 1
            pause = time.perf_counter() - self.started
            self.pauses.observe(pause)
            self.last_ms = pause * 1000
            self.max_ms = max(self.max_ms, self.last_ms)

    def stats(self) -> dict:
        return {
            "full": self.full,
            "last_ms": round(self.last_ms, 2),
            "max_ms": round(self.max_ms, 2),
        }


class AcceptGuard:
    """Out of descriptors, accept() fails on every try: pause accepting for a moment and
    say so in one line a minute, rather than a traceback per try. A full gunicorn worker
    steps aside the same way (step_aside)."""

    out_of_descriptors: Throttle | None = None
    paused = False

    def pause_accepting(self, seconds: float) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.stop_accepting()
            gevent.spawn_later(seconds, self.resume_accepting)

    def do_read(self) -> object:
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            if self.out_of_descriptors is None:
                self.out_of_descriptors = Throttle(60)
            if self.out_of_descriptors():
                log.error("cannot accept connections: %s (raise ulimit -n)", exc.strerror)
            self.pause_accepting(0.1)
            return None

    def resume_accepting(self) -> None:
        self.paused = False
        if not self.closed:
            self.start_accepting()


STEP_ASIDE = 0.25  # seconds a full gunicorn worker leaves the shared listener to the others


def step_aside(server: object) -> None:
    """A gunicorn worker at --max-connections stops accepting for a moment. Its workers share
    one listening socket, and the kernel hands a connection to whichever accepts first, not
    to one with room: in a restart storm a full worker would take (and refuse with 503)
    reconnects the others could hold. It still answers 503 to what it took, and takes again
    after STEP_ASIDE seconds, so when every worker is full clients hear so at once."""
    pause = getattr(server, "pause_accepting", None)
    if pause is not None:
        pause(STEP_ASIDE)


class HTTPServer(AcceptGuard, WSGIServer):
    """gevent's WSGIServer, quiet and patient when descriptors run out, and leaving open the
    sockets its handlers upgraded: their sessions own them now (no second socket object)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.upgraded: set = set()

    def do_close(self, sock: socket.socket, *args: object) -> None:
        if sock in self.upgraded:
            self.upgraded.discard(sock)
            return
        super().do_close(sock, *args)


class ControlStreamServer(AcceptGuard, StreamServer):
    """gevent's StreamServer for the control socket, likewise."""


def guarded(server_class: type) -> type:
    """server_class with the accept guard, for gunicorn's own WSGIServer subclass."""
    return type("Guarded" + server_class.__name__, (AcceptGuard, server_class), {})


HTTP_HEADROOM = 1024  # page requests that may run beside max_connections WebSockets
FD_RESERVE = 64  # descriptors for listeners, logs, the webhook and refusing a few more


def descriptor_plan(soft: int, hard: int, max_connections: int, max_control: int) -> tuple:
    """(soft limit to ask for, max_connections, max_control_connections, HTTP headroom)
    that fit the descriptor limit, so a client past a limit gets a 503, never EMFILE."""
    want = max_connections + HTTP_HEADROOM + max_control + FD_RESERVE
    reachable = want if hard == resource.RLIM_INFINITY else min(want, hard)
    soft = max(soft, reachable)
    if soft >= want:
        return soft, max_connections, max_control, HTTP_HEADROOM
    room = max(soft - FD_RESERVE, 3)
    control = max(1, min(max_control, room // 8))
    headroom = max(1, min(HTTP_HEADROOM, room // 8))
    return soft, max(1, room - control - headroom), control, headroom


class ControlSocketInUse(RuntimeError):
    """Another server answers on the control socket path, or the path is not ours to use."""


def bind_control_socket(path: str, mode: int = 0o660, gid: int | None = None) -> socket.socket:
    """A listening UNIX socket at path; a stale file is replaced, a live one kept."""
    reason = directory_refusal(path)
    if reason:
        raise ControlSocketInUse(
            f"{reason}: anyone could replace the socket; use another directory"
        )
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ControlSocketInUse(f"{path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1)
            probe.connect(path)
            owner = "" if existing.st_uid == os.getuid() else f" (owned by uid {existing.st_uid})"
            raise ControlSocketInUse(f"another server is listening on {path}{owner}")
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

    def __init__(self, board: "Board", path: str, listener: socket.socket | None = None) -> None:
        cfg = board.cfg
        self.path = path
        self.inode = 0  # the file is ours to remove when we bound it; gunicorn's master did else
        if listener is None:
            warning = directory_warning(path)
            if warning:
                log.warning(warning)
            listener = bind_control_socket(path, cfg.control_mode, cfg.control_group)
            self.inode = os.lstat(path).st_ino
        self.server = ControlStreamServer(listener, board.serve_control, backlog=None)

    def start(self) -> None:
        self.server.start()

    def close(self) -> None:
        """Stop accepting; the connections being served go on."""
        self.server.close()

    def stop(self) -> None:
        self.server.stop(timeout=1)
        if self.inode:
            remove_control_socket(self.path, self.inode)


def close_gracefully(sock: socket.socket, timeout: float) -> None:
    """FIN first, then read out what the peer still sends: closing a socket with unread bytes
    makes the kernel send a RST, which can destroy the close frame we just wrote."""
    try:
        sock.shutdown(socket.SHUT_WR)
        with gevent.Timeout(timeout, False):
            while sock.recv(65536):
                pass
    except OSError:
        pass
    finally:
        sock.close()


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("wsboard").setLevel(level.upper())
    # Each record would ask threading for the current thread: under gevent every greenlet
    # is a new one, and making its _DummyThread was 4 % of a handshake (profiled). The
    # process id stays: gunicorn's own lines in a worker format it with %(process)d.
    logging.logThreads = False


def close_spread(conns: list, why: EndReason, code: int, reason: str, window: float) -> None:
    """Close conns with code, spread over window seconds in up to 50 steps, so that they do
    not all reconnect at once."""
    batches = max(1, min(len(conns), 50))
    for i, conn in enumerate(conns):
        conn.ws.end(why, code, reason)
        if window and (i + 1) % max(1, len(conns) // batches) == 0 and i + 1 < len(conns):
            gevent.sleep(window / batches)


SHUTDOWN_REASON = "server shutting down; reconnect"
LOST_REASON = "backplane lost; reconnect to another server"


PING_CHUNK = 64  # sockets a heartbeat round pings at once: their pongs come back together
PING_SPREAD = 0.25  # of the interval, over which a round's chunks are spread evenly


class Board:
    """Everything one wsboard process holds, made from one Config: the hub (and through it
    the sockets), the events and their sinks, counters, the servers and the background
    greenlets. It is also the WSGI application: pages go to the routes, upgrades to its
    sessions. Start-up and shutdown are written here once, for every way it runs."""

    def __init__(self, cfg: Config | None = None) -> None:
        self.configure(cfg or Config())

    def configure(self, cfg: Config) -> None:
        """Put cfg in force: everything is made anew from it (before start() only)."""
        self.cfg = cfg
        self.events = Events()
        self.conn_prefix = str(10**11 + secrets.randbelow(9 * 10**11))  # new every start
        self.hub = HUBS["redis" if cfg.redis else "local"](cfg, self.events, self.conn_prefix)
        self.actions = Actions(self)
        self.pusher = PusherApp(self) if cfg.pusher_app_id else None
        # Each kind of socket by its path; a new transport is one more entry.
        self.protocols: list = [
            WebSocketProtocol(),
            EventStreamProtocol(),
            *([self.pusher] if self.pusher else []),
        ]
        self.refusals: collections.Counter = collections.Counter()
        self.quiet_refusals = {"hook_error": Throttle(10)}
        self.tokens = TokenClock()
        self.counts = Counts()
        self.metrics = None  # prometheus_client's registry, made at the first scrape
        self.metrics_server: WSGIServer | None = None
        self.started = False  # serving, after start-up (for /readyz)
        self.backplane_lost = False  # down past --redis-lost-timeout: sockets go elsewhere
        self.draining = False  # shutting down (for /readyz)
        self.shares_listener = False  # a gunicorn worker: its siblings accept on its socket
        self.controls: dict[ControlConnection, None] = {}  # open control connections
        self.admin_streams = 0
        self.heads: collections.Counter = collections.Counter()  # request heads in progress
        self.gc_watch = GCWatch()
        self.verified_passwords: set = set()  # digests of passwords PBKDF2 already accepted
        self.conn_numbers = itertools.count(1)
        self.webhook: Webhook | None = None
        self.pusher_webhooks: PusherWebhooks | None = None
        self.background: list = []
        self.http: WSGIServer | None = None
        self.control: ControlServer | None = None
        self.control_path = ""
        self.stopping = gevent.event.Event()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable:
        environ["wsboard.board"] = self
        return routes(environ, start_response)

    # Small services for the other sections.

    def refused(self, kind: str, message: str, *args: object) -> None:
        """Refusals are logged once each and counted by kind; the admin page shows them."""
        self.refusals[kind] += 1
        throttle = self.quiet_refusals.get(kind)
        if throttle is None or throttle():  # an app that is down: one line per burst
            log.warning("refused " + message, *args)

    def new_conn_id(self) -> str:
        return f"{self.conn_prefix}.{next(self.conn_numbers)}"

    def protocol_for(self, path: str) -> SocketProtocol | None:
        """The kind of socket served at path, or None: not a socket's path."""
        return next((p for p in self.protocols if p.matches(path)), None)

    def begin_head(self, ip: str) -> bool:
        """Count a connection whose request head is still coming; False past the cap."""
        if ip and not in_networks(ip, self.cfg.trusted_proxies):
            if self.heads[ip] >= self.cfg.max_handshakes_per_ip:
                return False
        self.heads[ip] += 1
        return True

    def end_head(self, ip: str) -> None:
        self.heads[ip] -= 1
        if self.heads[ip] <= 0:
            del self.heads[ip]

    def admin_password_ok(self, password: str) -> bool:
        """Check against the PBKDF2 hash in a worker thread, so a flood of guesses never blocks."""
        stored = self.cfg.admin_hash
        key = hashlib.sha256(f"{stored}\0{password}".encode("utf-8", "replace")).digest()
        if key in self.verified_passwords:
            return True
        ok = gevent.get_hub().threadpool.apply(password_matches, (password, stored))
        if ok:
            if len(self.verified_passwords) >= 16:
                self.verified_passwords.clear()
            self.verified_passwords.add(key)
        return ok

    def stats(self) -> dict:
        delivered = self.hub.delivered
        return {
            "version": __version__,
            **self.hub.stats(),
            "control_connections": self.control_connections,
            "watchers": self.watcher_count(),
            "refused": dict(self.refusals),
            "delivered": {"messages": delivered.messages, "bytes": delivered.bytes},
            "sends": dict(self.counts.sends),
            "closes": dict(self.counts.closes),
            "webhook_dropped": self.webhook.dropped if self.webhook else 0,
            "pusher_webhooks": [h.stats() for h in self.pusher_webhooks.hooks]
            if self.pusher_webhooks
            else [],
            "gc": self.gc_watch.stats(),
        }

    def webhook_dropped(self) -> int:
        """Events dropped by the webhooks (--webhook, --pusher-webhook) for a full queue."""
        dropped = self.webhook.dropped if self.webhook else 0
        return dropped + (self.pusher_webhooks.totals()["dropped"] if self.pusher_webhooks else 0)

    def watcher_count(self) -> int:
        return sum(isinstance(s, ControlConnection) for s in self.events.sinks)

    # The control socket's connections.

    def control_refusal(self, sock: socket.socket) -> Refusal | None:
        cfg = self.cfg
        if self.control_connections >= cfg.max_control_connections:
            return Refusal(503, TOO_MANY_CONTROL, "control")
        if cfg.control_uids or cfg.control_gids:
            pid, uid, gid = peer_credentials(sock)
            if not peer_allowed(uid, gid, cfg.control_uids, cfg.control_gids):
                told = f"{PERMISSION_DENIED} (pid {pid} uid {uid} gid {gid})"
                return Refusal(403, told, "control")
        return None

    def serve_control(self, sock: socket.socket, address: object) -> None:
        """One control connection, until EOF, abuse or idleness."""
        ctx = ControlConnection(self, sock)
        refusal = self.control_refusal(sock)
        if refusal:
            self.refused(refusal.kind, "control connection: %s", refusal.reason)
            try:
                ctx.write(f"ERROR {refusal.reason.split(' (')[0]}\n".encode())
            except (OSError, WriteTimedOut):
                pass
            sock.close()
            return
        self.controls[ctx] = None
        try:
            ctx.serve()
        except (OSError, WriteTimedOut) as exc:
            log.info("control connection ended: %s", exc or type(exc).__name__)
        finally:
            del self.controls[ctx]
            ctx.unwatch()
            sock.close()

    # Background work.

    def heartbeat_round(self, now: float) -> None:
        """Ping every socket that owes no pong; drop those that left a ping unanswered too long.

        The round is spread evenly over PING_SPREAD of the interval, PING_CHUNK sockets at a
        time, because the pongs come back as fast as the pings went: ten thousand pongs read in
        one go held a SEND that arrived meanwhile for 130-158 ms, and six gunicorn workers
        pinging 100,000 sockets 10 ms apart kept both cores busy for 2 s (SENDs 10-100 ms)."""
        conns = self.hub.local_connections()
        chunks = -(-len(conns) // PING_CHUNK)
        pause = (self.cfg.ping_interval or 1) * PING_SPREAD / max(1, chunks)
        for start in range(0, len(conns), PING_CHUNK):
            if start:
                gevent.sleep(pause)
                now = time.monotonic()
            for conn in conns[start : start + PING_CHUNK]:
                ws = conn.ws
                if ws.pong_due and now - ws.pong_due >= self.cfg.ping_timeout:
                    ws.ended(EndReason.PING_TIMEOUT)
                    ws.abort()
                elif not ws.pong_due and not ws.closed:
                    try:
                        ws.ping(now)
                    except WebSocketError:
                        pass

    def expiry_sweep(self) -> None:
        """Close the sockets whose token ran out (4001), within a second of their exp."""
        while True:
            gevent.sleep(0.5)
            for conn in self.tokens.due(time.time()):
                conn.ws.end(EndReason.TOKEN_EXPIRED, CloseCode.TOKEN_EXPIRED, "token expired")

    @property
    def control_connections(self) -> int:
        return len(self.controls)

    def control_idle_sweep(self) -> None:
        """With --control-idle-timeout: end the control connections that have waited that
        long for a line (within a quarter of it)."""
        timeout = self.cfg.control_idle_timeout
        while True:
            gevent.sleep(max(0.25, timeout / 4))
            now = time.monotonic()
            for ctx in list(self.controls):
                ctx.cut_if_idle(now, timeout)

    def idle_sweep(self) -> None:
        """With --idle-timeout: close sockets that sent nothing for that long. Between
        messages no greenlet waits on a socket's recv, so its timeout cannot say it."""
        timeout = self.cfg.idle_timeout
        while True:
            gevent.sleep(max(0.25, timeout / 4))
            now = time.monotonic()
            for n, conn in enumerate(self.hub.local_connections()):
                ws = conn.ws
                if not ws.closed and now - ws.heard_at >= timeout:
                    ws.end(EndReason.IDLE_TIMEOUT, CloseCode.NORMAL, "idle timeout")
                if n % 512 == 511:
                    gevent.sleep(0)

    def watch_backplane(self, every: float = 0.25) -> None:
        """Forever (--redis-lost-timeout): once the Redis link has been down that long, close
        this process's sockets with 1012 and refuse new ones until it is back."""
        down_since = None
        while True:
            gevent.sleep(every)
            if self.hub.unready_reason() is None:
                if self.backplane_lost:
                    log.info("redis link back: taking sockets again")
                down_since, self.backplane_lost = None, False
                continue
            down_since = down_since or time.monotonic()
            if (
                not self.backplane_lost
                and time.monotonic() - down_since >= self.cfg.redis_lost_timeout
            ):
                self.backplane_lost = True
                conns = self.hub.local_connections()
                log.warning(
                    "redis link down for %.0f s: closing %d sockets with 1012 so they reconnect "
                    "to a linked process",
                    time.monotonic() - down_since,
                    len(conns),
                )
                gevent.spawn(
                    close_spread,
                    conns,
                    EndReason.BACKPLANE_LOST,
                    CloseCode.SERVICE_RESTART,
                    LOST_REASON,
                    self.cfg.drain_window,
                )

    def lost_refusal(self) -> Refusal | None:
        """Why a new socket may not open here now: the backplane is lost (see watch_backplane)."""
        if self.backplane_lost:
            return Refusal(503, LOST_REASON, "backplane")
        return None

    def heartbeat(self) -> None:
        """Forever: a heartbeat round every ping_interval; old inbox entries and keys expired.
        Rounds begin an interval apart, however long the last one took to spread. gunicorn's
        workers start together: each takes a phase of its own, so their rounds do not coincide."""
        period = self.cfg.ping_interval or 60
        due = time.monotonic() - (random.random() * period if self.shares_listener else 0.0)
        while True:
            due = max(due + period, time.monotonic())
            gevent.sleep(due - time.monotonic())
            if self.cfg.ping_interval:
                self.heartbeat_round(time.monotonic())
            self.hub.expire(time.time())

    def freeze_gc(self, every: float = 1.0) -> None:
        """Freeze the collector's objects as the sockets grow (and once more after they
        shrink), so its full passes do not walk every idle socket's objects (107 ms at 10k
        sockets, measured), neither while a burst of connections comes in nor inside a
        broadcast later. freeze_step says when, and how much to collect first."""
        frozen_at = previous = 0
        while True:
            gevent.sleep(every)
            count = self.hub.local_count()
            step = freeze_step(count, previous, frozen_at)
            if step is not None:
                started = time.perf_counter()
                if step == "all":
                    gc.unfreeze()
                gc.collect(2 if step == "all" else 1)
                gc.freeze()
                log.info(
                    "froze the collector's objects at %d sockets (%s, %.0f ms)",
                    count,
                    "collected all" if step == "all" else "collected the young",
                    (time.perf_counter() - started) * 1000,
                )
                frozen_at = count
            previous = count

    def drain(self, timeout: float, window: float) -> None:
        """Close every WebSocket with 1001, spread over window seconds so that they do not all
        reconnect at once; give them timeout seconds more to answer, then drop the rest."""
        conns = self.hub.local_connections()
        close_spread(conns, EndReason.SHUTDOWN, CloseCode.GOING_AWAY, SHUTDOWN_REASON, window)
        deadline = time.monotonic() + timeout
        while self.hub.local_count() and time.monotonic() < deadline:
            gevent.sleep(0.05)
        log.info(
            "closed %d websockets; %d did not answer in time", len(conns), self.hub.local_count()
        )
        for conn in self.hub.local_connections():
            conn.ws.abort()

    # Start-up and shutdown.

    def fit_descriptors(self) -> None:
        """Raise the descriptor limit to what the limits need, or lower the limits to fit."""
        cfg = self.cfg
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        plan = descriptor_plan(soft, hard, cfg.max_connections, cfg.max_control_connections)
        wanted_soft, max_connections, max_control, self.http_headroom = plan
        if wanted_soft > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted_soft, hard))
            except (ValueError, OSError) as exc:
                log.warning("cannot raise the descriptor limit to %d: %s", wanted_soft, exc)
                wanted_soft = soft
                plan = descriptor_plan(soft, soft, cfg.max_connections, cfg.max_control_connections)
                _, max_connections, max_control, self.http_headroom = plan
        if (max_connections, max_control) != (cfg.max_connections, cfg.max_control_connections):
            log.warning(
                "the descriptor limit (ulimit -n %d) holds only %d WebSockets and %d control "
                "connections: limits lowered from %d and %d; raise the limit to keep them",
                wanted_soft,
                max_connections,
                max_control,
                cfg.max_connections,
                cfg.max_control_connections,
            )
            cfg.max_connections, cfg.max_control_connections = max_connections, max_control

    def open_control(self, inherited: int | None = None) -> None:
        """Bind the control socket, or (in a gunicorn worker) accept on the one the master
        bound and handed down as descriptor inherited: one path for every worker."""
        self.control_path = control_socket_path(self.cfg.control)
        listener = None
        if inherited is not None:
            listener = gevent.socket.socket(fileno=os.dup(inherited))
        self.control = ControlServer(self, self.control_path, listener)
        self.control.start()

    def start_metrics(self) -> None:
        """The --metrics-port server, if asked for; a port already taken (another gunicorn
        worker's) is logged, not fatal."""
        cfg = self.cfg
        if not cfg.metrics_port:
            return
        server = WSGIServer(
            (cfg.metrics_host, cfg.metrics_port), MetricsApp(self), log=None, error_log=log
        )
        try:
            server.start()
        except OSError as exc:
            log.warning(
                "cannot serve metrics on %s:%d: %s",
                cfg.metrics_host,
                cfg.metrics_port,
                exc.strerror or exc,
            )
            return
        self.metrics_server = server
        log.info("metrics on http://%s:%d/metrics", format_host(cfg.metrics_host), cfg.metrics_port)

    def start_background(self) -> None:
        if self.gc_watch not in gc.callbacks:
            gc.callbacks.append(self.gc_watch)
        if self.cfg.webhook:
            self.webhook = Webhook(self.cfg.webhook, self.cfg.secret_key, self.cfg.webhook_queue)
            self.events.add(self.webhook)
            self.background.append(self.webhook.greenlet)
        if self.cfg.pusher_webhook:
            self.pusher_webhooks = PusherWebhooks(self.cfg)
            self.events.observers.append(self.pusher_webhooks)
            self.background += self.pusher_webhooks.greenlets
        self.background += [
            gevent.spawn(self.heartbeat),
            gevent.spawn(self.freeze_gc),
            gevent.spawn(self.expiry_sweep),
        ]
        if self.cfg.idle_timeout:
            self.background.append(gevent.spawn(self.idle_sweep))
        if self.cfg.control_idle_timeout:
            self.background.append(gevent.spawn(self.control_idle_sweep))
        if self.cfg.redis and self.cfg.redis_lost_timeout:
            self.background.append(gevent.spawn(self.watch_backplane))
        self.hub.start()

    def shut_down(self, quick: bool = False) -> None:
        """Stop taking control connections, close every WebSocket with 1001 (spread over the
        drain window unless quick), remove the control socket, end the background work."""
        self.draining = True
        if self.control is not None:
            self.control.close()
        if quick:
            self.drain(min(1.0, self.cfg.shutdown_timeout), 0)
        else:
            self.drain(self.cfg.shutdown_timeout, self.cfg.drain_window)
        if self.control is not None:
            self.control.stop()
            self.control = None
        self.hub.stop()
        if self.webhook is not None:
            self.events.remove(self.webhook)
            self.webhook = None
        if self.pusher_webhooks is not None:  # the leaves and vacated channels of the drain
            self.pusher_webhooks.flush(PUSHER_WEBHOOK_TIMEOUT / 2)
            self.events.observers.remove(self.pusher_webhooks)
            self.pusher_webhooks = None
        if self.gc_watch in gc.callbacks:
            gc.callbacks.remove(self.gc_watch)
        gevent.killall(self.background, block=False)
        self.background = []
        if self.metrics_server is not None:
            self.metrics_server.stop(timeout=1)
            self.metrics_server = None

    def run(self) -> int:
        """Serve HTTP, WebSockets and the control socket until SIGTERM or SIGINT (exit 0)."""
        cfg = self.cfg
        configure_logging(cfg.log_level)
        self.fit_descriptors()
        self.http = HTTPServer(
            (cfg.host, cfg.port),
            self,
            spawn=gevent.pool.Pool(cfg.max_connections + self.http_headroom),
            backlog=cfg.backlog,
            handler_class=WebSocketHandler,
            log=access_log,
            error_log=logging.getLogger("wsboard.error"),
        )
        try:
            self.http.init_socket()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, exc.strerror or exc)
            return 1
        backplane = ""
        if cfg.redis:
            where, refusal = redis_at_start(cfg)
            if refusal is not None:
                log.error("cannot use --redis: %s", refusal)
                self.http.close()
                return 2
            backplane = f", redis {where}"
        try:
            self.open_control()
        except (ControlSocketInUse, ConfigError, OSError) as exc:
            log.error("cannot open control socket %s: %s", self.control_path or cfg.control, exc)
            self.http.close()
            return 1
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self.stopping.set)
        self.http.start()
        self.start_background()
        self.start_metrics()
        self.started = True
        log.info(
            "wsboard %s on http://%s:%d, control socket %s%s",
            __version__,
            format_host(cfg.host),
            self.http.server_port,
            self.control_path,
            backplane,
        )
        self.stopping.wait()
        log.info("shutting down")
        self.http.close()
        self.shut_down()
        self.http.stop(timeout=1)
        log.info("stopped")
        return 0

    # gunicorn: gunicorn.conf.py's worker calls these inside the worker process.

    def start_in_worker(self) -> None:
        """Configure from the environment and open the control socket in a gunicorn worker."""
        self.configure(load_config([]))
        self.shares_listener = True
        configure_logging(self.cfg.log_level)
        self.fit_descriptors()
        inherited = os.environ.get(CONTROL_FD_VARIABLE, "")
        self.open_control(int(inherited) if inherited.isdigit() else None)
        self.start_background()
        self.start_metrics()
        self.started = True
        log.info(
            "wsboard %s in gunicorn worker %d, control socket %s",
            __version__,
            os.getpid(),
            self.control_path,
        )

    def stop_in_worker(self, quick: bool = False) -> None:
        """Close WebSockets with 1001 and remove the control socket as a worker stops (once)."""
        if self.control is not None:
            self.shut_down(quick)


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def board_of(application: object) -> Board:
    """The Board a server serves: itself, or (wrapped in middleware) the default one."""
    return application if isinstance(application, Board) else app


app = Board()  # the default board: `python wsboard.py` and gunicorn's `wsboard:app`


###############################################################################
# Command line ################################################################
###############################################################################


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
        raise ConfigError(f"{args.client_id!r} is not a valid client id ({CLIENT_ID_RULE})")
    if not cfg.secret_key:
        raise ConfigError("no secret: give --secret, --secret-file or WSBOARD_SECRET")
    print(signed_query(cfg.secret_key, args.client_id, args.ttl or cfg.token_ttl))
    return 0


def hash_password_command(argv: Sequence[str]) -> int:
    """wsboard hash-password: read a password on stdin, print its hash for --admin-password."""
    argparse.ArgumentParser(
        prog="wsboard hash-password",
        description="Read the admin password from standard input (or a prompt) and print the "
        "PBKDF2 hash to give as --admin-password / WSBOARD_ADMIN_PASSWORD. Put the hash in "
        "single quotes: a shell expands the $ signs inside double quotes.",
    ).parse_args(argv)
    if sys.stdin.isatty():
        password = getpass.getpass("Admin password: ")
        if getpass.getpass("Again: ") != password:
            raise ConfigError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < PASSWORD_MIN:
        raise ConfigError(f"use a password of at least {PASSWORD_MIN} characters")
    print(hash_password(password))
    return 0


def check_config_command(argv: Sequence[str]) -> int:
    """wsboard check-config [OPTIONS]: exit 0 when the settings are good, else say why."""
    if argv[:1] in (["-h"], ["--help"]):
        print(
            "usage: wsboard check-config [OPTIONS]\n\nCheck the settings (flags and WSBOARD_* "
            "variables, as `wsboard` would read them) and exit 0, or print what is wrong and "
            "exit 2; with --redis, also say which Redis (which primary, through the sentinels) "
            "it would use, and refuse a Redis Cluster. gunicorn.conf.py runs it before any "
            "worker starts."
        )
        return 0
    cfg = load_config(argv)
    print(f"wsboard: settings are good; control socket {control_socket_path(cfg.control)}")
    if cfg.redis:
        where, refusal = redis_at_start(cfg)
        if refusal is not None:
            raise ConfigError(f"--redis: {refusal}")
        print(f"wsboard: redis {where}")
    return 0


def gunicorn_conf_command(argv: Sequence[str]) -> int:
    """wsboard gunicorn-conf: print the path of the gunicorn.conf.py installed with wsboard."""
    argparse.ArgumentParser(
        prog="wsboard gunicorn-conf",
        description="Print the path of wsboard's gunicorn.conf.py, for "
        'gunicorn -c "$(wsboard gunicorn-conf)" wsboard:app',
    ).parse_args(argv)
    path = os.path.join(VIEWS, "gunicorn.conf.py")
    if not os.path.isfile(path):
        raise ConfigError(f"no gunicorn.conf.py at {path}")
    print(os.path.realpath(path))
    return 0


CONTROL_FD_VARIABLE = "WSBOARD_CONTROL_LISTENER_FD"  # set by gunicorn.conf.py's master only


def bind_control_command(argv: Sequence[str]) -> int:
    """wsboard bind-control --send-to FD: bind the control socket as the settings say and
    hand the listening descriptor over the UNIX socket FD (gunicorn.conf.py's master asks,
    so that every worker accepts on one path without the master importing wsboard)."""
    parser = argparse.ArgumentParser(
        prog="wsboard bind-control",
        description="Bind the control socket and pass its descriptor over the UNIX socket "
        "--send-to (used by gunicorn.conf.py).",
    )
    parser.add_argument("--send-to", type=int, required=True, metavar="FD")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(rest)
    path = control_socket_path(cfg.control)
    warning = directory_warning(path)
    if warning:
        log.warning(warning)
    try:
        listener = bind_control_socket(path, cfg.control_mode, cfg.control_group)
    except (ControlSocketInUse, OSError) as exc:
        raise ConfigError(f"cannot open control socket {path}: {exc}") from None
    inode = os.lstat(path).st_ino
    with socket.socket(fileno=args.send_to) as channel:
        socket.send_fds(channel, [f"{path}\n{inode}".encode()], [listener.fileno()])
    return 0


# The control client's commands: wsboard send ID TEXT and the rest, on wsboard_client (the
# stdlib-only client). Exit codes a script can test: 0 done, 1 not found (nobody connected,
# nothing reached), 2 usage or refused, 3 no server (or not allowed), 4 not known (Timeout or
# Backplane Unavailable, with --redis).


def _print_json(value: object) -> None:
    sys.stdout.write(compact_json(value) + "\n")


def _client_send(client: object, args: argparse.Namespace) -> int:
    if "\n" in args.text or "\r" in args.text or args.key:
        answer = client.send_many([args.id], args.text, key=args.key)
        return 0 if answer["ok"] else 1
    return 0 if client.send(args.id, args.text) else 1


def _client_list(client: object, args: argparse.Namespace) -> int:
    rows = client.channel(args.channel) if args.channel else client.clients()
    for row in rows:
        if args.json:
            _print_json(row)
        else:
            sys.stdout.write(f"{row['id']} {row['peer']}\n")
    return 0


def _client_watch(client: object, args: argparse.Namespace) -> int:
    try:
        for event in client.watch():
            _print_json(event)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def _call_timeout(text: str) -> float:
    """A client command's --timeout: seconds above 0 and at most a day (no NaN, no inf)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be seconds above 0 and at most {MAX_TIMEOUT:.0f}, not {text!r}"
        )
    return value


def _reached(count: int) -> int:
    sys.stdout.write(f"{count}\n")
    return 0 if count else 1


# name -> (help, [(argument, help)], what it does)
CLIENT_COMMANDS: dict = {
    "send": (
        "send TEXT to every socket of ID (exit 1: ID has no open socket)",
        [("id", "the client id"), ("text", "the message, as one text frame")],
        _client_send,
    ),
    "publish": (
        "send TEXT to every socket in CHANNEL; prints how many took it",
        [("channel", "the channel"), ("text", "the message")],
        lambda client, args: _reached(client.publish(args.channel, args.text)),
    ),
    "broadcast": (
        "send TEXT to every open socket; prints how many took it",
        [("text", "the message")],
        lambda client, args: _reached(client.broadcast(args.text)),
    ),
    "list": (
        "list the open sockets (or a channel's): ID PEER per line, or JSON lines",
        [],
        _client_list,
    ),
    "online": (
        "print which of the IDs have an open socket (exit 1: none)",
        [("ids", "client ids")],
        lambda client, args: _reached_ids(client.online(args.ids)),
    ),
    "count": (
        "print SOCKETS IDS: open sockets and distinct ids, everywhere or in CHANNEL",
        [("channel", "a channel (optional)")],
        lambda client, args: _print_count(client.count(args.channel)),
    ),
    "kick": (
        "close every socket of ID (4000 kicked); prints how many (exit 1: none)",
        [("id", "the client id")],
        lambda client, args: _reached(client.kick(args.id)),
    ),
    "stats": ("print the server's figures as JSON", [], lambda c, a: _print_json(c.stats())),
    "watch": ("print events as JSON lines until Ctrl-C", [], _client_watch),
}


def _reached_ids(ids: list) -> int:
    for client_id in ids:
        sys.stdout.write(client_id + "\n")
    return 0 if ids else 1


def _print_count(counts: tuple) -> int:
    sys.stdout.write(f"{counts[0]} {counts[1]}\n")
    return 0


def client_command(name: str, argv: Sequence[str]) -> int:
    """wsboard send|publish|broadcast|list|online|count|kick|stats|watch ..."""
    import wsboard_client

    description, arguments, action = CLIENT_COMMANDS[name]
    parser = argparse.ArgumentParser(
        prog=f"wsboard {name}",
        description=description + ". Exit codes: 0 done, 1 not found, 2 usage or refused, "
        "3 no server, 4 not known (with --redis: Timeout, Backplane Unavailable).",
    )
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="the control socket (default: $WSBOARD_CONTROL, else where a server on its "
        "defaults puts it)",
    )
    parser.add_argument(
        "--timeout",
        type=_call_timeout,
        default=5.0,
        help=f"seconds the whole call may take (5; above 0, {MAX_TIMEOUT:.0f} at most)",
    )
    for argument, text in arguments:
        if argument == "ids":
            parser.add_argument(argument, nargs="+", help=text)
        elif argument == "channel" and name == "count":
            parser.add_argument(argument, nargs="?", help=text)
        else:
            parser.add_argument(argument, help=text)
    if name == "list":
        parser.add_argument("--json", action="store_true", help="one JSON object per socket")
        parser.add_argument("--channel", help="only the sockets in this channel")
    if name == "send":
        parser.add_argument("--key", help="an idempotency key: a retry is not delivered twice")
    args = parser.parse_args(argv)
    try:
        with wsboard_client.Client(args.control, args.timeout) as client:
            return action(client, args) or 0
    except (wsboard_client.Unreachable, wsboard_client.PermissionDenied) as exc:
        sys.stderr.write(f"wsboard: {exc}\n")
        return 3
    except (wsboard_client.Timeout, wsboard_client.BackplaneUnavailable) as exc:
        sys.stderr.write(f"wsboard: {type(exc).__name__}: {exc}\n")
        return 4
    except (wsboard_client.CommandError, ValueError) as exc:
        sys.stderr.write(f"wsboard: {exc}\n")
        return 2


SUBCOMMANDS = {
    **{name: functools.partial(client_command, name) for name in CLIENT_COMMANDS},
    "bind-control": bind_control_command,
    "token": token_command,
    "hash-password": hash_password_command,
    "check-config": check_config_command,
    "gunicorn-conf": gunicorn_conf_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        cfg = load_config(argv)
    except ConfigError as exc:
        sys.stderr.write(f"wsboard: {exc}\n")
        return 2
    app.configure(cfg)
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
