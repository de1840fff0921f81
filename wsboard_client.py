"""wsboard_client: talk to a wsboard server's control socket from any Python program.

Standard library only, and importing it patches nothing (unlike ``import wsboard``, which
runs gevent's monkey-patching for the server): a Django, Flask or plain script can use it.

    from wsboard_client import Client
    with Client() as board:                 # --control path: WSBOARD_CONTROL, else the default
        board.send("alice", "hello")        # True: a socket took it; False: not connected
        board.publish("news", "extra!")     # sockets reached
        for event in board.watch():         # connects, disconnects, messages, until closed
            print(event)

Every call, its connect, write and reads together, takes at most ``timeout`` seconds (above
0, a day at most), however slowly an answer trickles in. Failures are exceptions:
``Unreachable`` (no server at the path), ``PermissionDenied``, ``Timeout`` (no answer in time,
or with --redis a process that did not confirm), ``BackplaneUnavailable`` (with --redis, Redis
cannot be reached) and ``CommandError`` (the server refused the command); "no such client" is
a result (False, 0, or an empty list), except where a method promises delivery
(``send_to_connection``, ``kick_connection``) and raises ``ClientNotFound``.

Tokens for signed ids (``--secret``) are minted here too: ``signed_query``, ``mint_token``.
"""

import hashlib
import hmac
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from urllib.parse import urlencode

__all__ = [
    "BackplaneUnavailable",
    "Client",
    "ClientNotFound",
    "CommandError",
    "PermissionDenied",
    "Timeout",
    "Unreachable",
    "WsboardError",
    "default_control_path",
    "mint_token",
    "private_channels",
    "signed_query",
    "signed_string",
]

PRIVATE_PREFIXES = ("private-", "presence-")  # channels a token must name (as the server's)
CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # as the server's: a space would split it


class WsboardError(Exception):
    """Anything that went wrong talking to wsboard."""


class Unreachable(WsboardError):
    """No wsboard answers at the control socket path."""


class PermissionDenied(WsboardError):
    """The control socket refused this user (file mode, --control-uids/--control-gids)."""


class Timeout(WsboardError):
    """No answer in time, or (with --redis) a process holding the target did not confirm."""


class BackplaneUnavailable(WsboardError):
    """With --redis: Redis cannot be reached, so the answer cannot be known."""


class CommandError(WsboardError):
    """The server refused the command; the message says why."""


class ClientNotFound(WsboardError):
    """A method that promises delivery found no such client (or connection)."""


def default_control_path(environ: dict | None = None) -> str:
    """The control socket: $WSBOARD_CONTROL, else the first socket found where a server on
    its defaults puts it (/run/wsboard, $XDG_RUNTIME_DIR, /tmp/wsboard-UID)."""
    environ = os.environ if environ is None else environ
    setting = environ.get("WSBOARD_CONTROL", "").strip()
    if setting and setting != "auto":
        return setting
    candidates = ["/run/wsboard/wsboard.sock"]
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        candidates.append(os.path.join(runtime, "wsboard.sock"))
    candidates.append(f"/tmp/wsboard-{os.getuid()}/wsboard.sock")
    return next((path for path in candidates if os.path.exists(path)), candidates[-1])


# Signed client ids: token = hex(HMAC-SHA256(secret, "<id>.<exp>")), exp a Unix time. A
# socket that asks for private- or presence- channels signs them too, in the order its URL
# names them, each after a "|" (which neither ids nor channel names may hold):
# "<id>.<exp>|<channel>|<channel>". In PHP:
# hash_hmac('sha256', "$id.$exp" . implode('', array_map(fn($c) => "|$c", $private)), $secret)
# This is the one home of these helpers: the server imports them from here.


def signed_string(client_id: str, exp: int, private: Sequence[str] = ()) -> str:
    return f"{client_id}.{exp}" + "".join("|" + channel for channel in private)


def mint_token(secret: bytes | str, client_id: str, exp: int, private: Sequence[str] = ()) -> str:
    """HMAC-SHA256(secret, "ID.EXP" + "|channel" for each private or presence channel)."""
    key = secret.encode() if isinstance(secret, str) else secret
    message = signed_string(client_id, exp, private).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def private_channels(channels: Iterable[str]) -> list:
    """The channels of a list that a token must sign: private- and presence- ones."""
    return [channel for channel in channels if channel.startswith(PRIVATE_PREFIXES)]


def signed_query(
    secret: bytes | str,
    client_id: str,
    ttl: int = 3600,
    channels: Sequence[str] = (),
    now: float | None = None,
) -> str:
    """The query string a browser needs to connect as client_id (in channels) for ttl s:
    ws://HOST:PORT/websocket?<this>."""
    exp = int(time.time() if now is None else now) + ttl
    token = mint_token(secret, client_id, exp, private_channels(channels))
    fields = [("id", client_id), *(("channel", c) for c in channels), ("exp", exp)]
    return urlencode([*fields, ("token", token)])


REFUSALS = {  # the answer's error text -> the exception it is
    "Timeout": Timeout,
    "Backplane Unavailable": BackplaneUnavailable,
    "Permission denied": PermissionDenied,
}


MAX_TIMEOUT = 86400.0  # a day: a longer wait is a mistake (a NaN or an infinity never ends)


class Client:
    """One connection to the control socket, opened on first use and reused; if the server
    restarted meanwhile, a call reconnects once (a call whose line may have been carried out
    already is never sent twice)."""

    def __init__(self, path: str | None = None, timeout: float = 5.0) -> None:
        if not (isinstance(timeout, (int, float)) and 0 < timeout <= MAX_TIMEOUT):
            raise ValueError(f"timeout must be a number of seconds above 0, {MAX_TIMEOUT} at most")
        self.path = path or default_control_path()
        self.timeout = float(timeout)
        self.sock: socket.socket | None = None
        self.buffer = b""

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.buffer = b""

    # The wire.

    def _remaining(self, deadline: float) -> float:
        """Seconds left of a call that must end at deadline; Timeout once none are."""
        left = deadline - time.monotonic()
        if left <= 0:
            self.close()  # an answer may still come: this connection is out of step
            raise Timeout(f"no answer from {self.path} within {self.timeout} s")
        return left

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._remaining(deadline))
        try:
            sock.connect(self.path)
        except PermissionError:
            sock.close()
            raise PermissionDenied(f"not allowed to use the control socket {self.path}") from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise Unreachable(f"no wsboard at {self.path}: {exc.strerror}") from None
        except OSError as exc:
            sock.close()
            raise Unreachable(f"cannot reach {self.path}: {exc}") from None
        return sock

    def _line(self, deadline: float | None) -> str:
        """The next answer line; a call's lines share one deadline (None: wait for ever),
        so a server that trickles its answer cannot stretch a call past its timeout."""
        while b"\n" not in self.buffer:
            try:
                self.sock.settimeout(None if deadline is None else self._remaining(deadline))
                chunk = self.sock.recv(65536)
            except TimeoutError:
                self.close()  # an answer may still come: this connection is out of step
                raise Timeout(f"no answer from {self.path} within {self.timeout} s") from None
            except OSError as exc:
                self.close()
                raise Unreachable(f"lost the control socket {self.path}: {exc}") from None
            if not chunk:
                rest, self.buffer = self.buffer, b""
                self.close()
                if rest.startswith(b"ERROR"):
                    raise _refusal(rest.decode("utf-8", "replace")[6:])
                raise Unreachable(f"{self.path} closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def lines(self, commands: Iterable[str], answers_each: int = 1) -> list:
        """Send commands in one write (pipelined) and read one answer line for each."""
        data = "".join(command + "\n" for command in commands).encode("utf-8")
        count = data.count(b"\n")
        deadline = time.monotonic() + self.timeout  # for the whole call, not for each read
        if self.sock is None:
            self.sock = self._connect(deadline)
        try:
            self.sock.settimeout(self._remaining(deadline))
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # the server restarted: once more
            self.close()
            self.sock = self._connect(deadline)
            try:
                self.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):  # refused: it said why, then closed
                return [self._line(deadline)]
        except TimeoutError:
            self.close()
            raise Timeout(f"{self.path} did not take the command within {self.timeout} s") from None
        return [self._line(deadline) for _ in range(count * answers_each)]

    def line(self, command: str) -> str:
        if "\n" in command or "\r" in command:
            raise ValueError("a command is one line: no CR or LF in it")
        return self.lines([command])[0]

    def request(self, op: str, **fields: object) -> dict:
        """One JSON command; its answer, or the exception its error is."""
        line = self.line(json.dumps({"op": op, **fields}, separators=(",", ":")))
        if line.startswith("ERROR "):  # refused before any command (e.g. Permission denied)
            raise _refusal(line[6:])
        answer = json.loads(line)
        if not answer.get("ok"):
            error = answer.get("error", "")
            if error != "Client Not Found":
                raise _refusal(error)
        return answer

    # Sending.

    def send(self, client_id: str, text: str) -> bool:
        """Send text to every socket of client_id: True when one took it, False when none is
        connected (SEND MESSAGE, the seed's own command)."""
        return self._sent(self.line(f"SEND MESSAGE {_client_id(client_id)} {_one_line(text)}"))

    def send_lines(self, messages: Iterable[tuple]) -> list:
        """Many (client_id, text) sends in one write; a True/False for each, in order."""
        commands = [f"SEND MESSAGE {_client_id(cid)} {_one_line(text)}" for cid, text in messages]
        return [self._sent(answer) for answer in self.lines(commands)]

    def send_many(self, ids: Sequence[str], text: str, key: str | None = None) -> dict:
        """Send text to several ids (any text: newlines too). With key, a retry within the
        server's --idempotency-window is not delivered again. The answer: sockets, queued,
        missing ids, seq (with --inbox), duplicate."""
        fields: dict = {"to": list(ids), "data": text}
        if key is not None:
            fields["key"] = key
        return self.request("send", **fields)

    def send_to_connection(self, conn: str, text: str) -> None:
        """Send text to one socket by its connection id; ClientNotFound when it is gone."""
        if not self.request("send", conn=conn, data=text)["ok"]:
            raise ClientNotFound(f"no connection {conn}")

    def broadcast(self, text: str) -> int:
        return self.request("broadcast", data=text)["sockets"]

    def publish(
        self, channels: str | Sequence[str], text: str, except_conn: str | None = None
    ) -> int:
        """Send text to every socket in the channel(s), once each, but except_conn."""
        names = [channels] if isinstance(channels, str) else list(channels)
        fields: dict = {"channel": names, "data": text}
        if except_conn is not None:
            fields["except"] = except_conn
        return self.request("publish", **fields)["sockets"]

    # Channels and presence.

    def join(self, channel: str, client_id: str | None = None, conn: str | None = None) -> int:
        """Put the id's sockets (or one connection) in channel: how many; 0 when none."""
        answer = self.request("join", channel=channel, **_target(client_id, conn))
        return answer.get("sockets", 0)

    def leave(self, channel: str, client_id: str | None = None, conn: str | None = None) -> int:
        answer = self.request("leave", channel=channel, **_target(client_id, conn))
        return answer.get("sockets", 0)

    def presence(self, channel: str) -> list:
        """The members of a presence- channel: [{"id", "meta"}]."""
        return self.request("presence", channel=channel)["members"]

    def set_meta(self, client_id: str, meta: dict | None) -> bool:
        """Attach metadata to an id while it is connected (None takes it off)."""
        return self.request("meta", id=client_id, meta=meta)["ok"]

    # What there is.

    def clients(self) -> list:
        """Every open socket: [{"id", "conn", "peer", "since", "origin", "protocol", ...}]."""
        return self.request("list")["clients"]

    def online(self, ids: Sequence[str]) -> list:
        """The ids asked, in order, that have an open socket."""
        return self.request("online", ids=list(ids))["online"]

    def count(self, channel: str | None = None) -> tuple:
        """(sockets, distinct ids), everywhere or in channel."""
        answer = self.request("count", **({} if channel is None else {"channel": channel}))
        return answer["sockets"], answer["ids"]

    def channel(self, channel: str) -> list:
        return self.request("channel", channel=channel)["members"]

    def channels(self) -> dict:
        return self.request("channels")["channels"]

    def position(self, channel: str) -> tuple:
        """(epoch, offset) of channel's history (wsboard --history): render
        f"{channel}:{epoch}:{offset}" into the page as its since= and it gets everything
        published after the render."""
        answer = self.request("position", channel=channel)
        return answer["epoch"], answer["offset"]

    def history(self, channel: str, since: tuple | None = None, limit: int | None = None) -> dict:
        """channel's kept publications: after since (epoch, offset), at most limit of them;
        without since, the last limit. {"epoch", "offset", "publications", "gap"}."""
        fields: dict = {"channel": channel}
        if since is not None:
            fields["since"] = {"epoch": since[0], "offset": since[1]}
        if limit is not None:
            fields["limit"] = limit
        answer = self.request("history", **fields)
        answer.pop("ok", None)
        return answer

    def stats(self) -> dict:
        answer = self.request("stats")
        answer.pop("ok", None)
        return answer

    def ping(self) -> bool:
        return self.line("PING") == "PONG"

    def kick(self, client_id: str, code: int = 4000, reason: str = "kicked") -> int:
        """Close every socket of client_id with code: how many (0 when none)."""
        return self.request("kick", id=client_id, code=code, reason=reason).get("sockets", 0)

    def kick_connection(self, conn: str, code: int = 4000, reason: str = "kicked") -> None:
        if not self.request("kick", conn=conn, code=code, reason=reason)["ok"]:
            raise ClientNotFound(f"no connection {conn}")

    # Events.

    def watch(self) -> Iterator[dict]:
        """Events as they happen (connect, disconnect, message, join, leave), until the
        generator is closed; the watch is on when this returns, and this connection is the
        watch's from then on."""
        self.request("watch")  # now, not at the first next(): the watch is on when this returns
        return self._events()

    def _events(self) -> Iterator[dict]:
        try:
            while True:  # a quiet board is no failure: no deadline between events
                yield json.loads(self._line(None))
        finally:
            self.close()

    @staticmethod
    def _sent(answer: str) -> bool:
        if answer == "OK":
            return True
        if answer == "ERROR Client Not Found":
            return False
        raise _refusal(answer[6:] if answer.startswith("ERROR ") else answer)


def _client_id(value: str) -> str:
    if not (isinstance(value, str) and CLIENT_ID.fullmatch(value)):
        raise ValueError(f"not a client id (1-128 of A-Z a-z 0-9 _ - . :): {value!r}")
    return value


def _one_line(text: str) -> str:
    if "\n" in text or "\r" in text:
        raise ValueError("SEND MESSAGE takes one line; use send_many() for text with newlines")
    return text


def _target(client_id: str | None, conn: str | None) -> dict:
    if (client_id is None) == (conn is None):
        raise ValueError("give a client_id or a conn, not both")
    return {"id": client_id} if conn is None else {"conn": conn}


def _refusal(error: str) -> WsboardError:
    for text, kind in REFUSALS.items():
        if error.startswith(text):
            return kind(error)
    return CommandError(error or "refused")
