"""A lean WebSocket load generator for the benchmark: many clients in one process, on epoll.

No gevent, no asyncio: non-blocking sockets, one epoll, and a frame parser just big enough
for what the servers send (unmasked text, ping, close). It answers pings, so heartbeats do
not reap its sockets. Sockets are spread over 16 loopback source addresses, their ports
picked at connect(), so that 100k connections never run out of ports. Every loop is
bounded in count and time.
"""

import base64
import heapq
import os
import random
import select
import socket
import time

SOURCES = tuple(f"127.0.0.{n}" for n in range(2, 18))  # 16 source addresses
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+


def client_socket(source: int) -> socket.socket:
    """A TCP socket bound to one of SOURCES, its port picked at connect() rather than at
    bind(): a port then only has to be free towards this destination, and 100,000 sockets
    do not make the kernel search a nearly full range of ports on every bind."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((SOURCES[source % len(SOURCES)], 0))
    return sock


def masked_text(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client's frame (payload < 126 bytes), masked with zeros as the RFC allows."""
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload


EIO_CONNECT = masked_text(b"40")  # Socket.IO: join the default namespace
EIO_PONG = masked_text(b"3")  # Engine.IO's answer to its "2" ping


class Client:
    __slots__ = ("sock", "buffer", "received", "last_at", "upgraded", "client_id", "open")

    def __init__(self, sock: socket.socket, client_id: str) -> None:
        self.sock = sock
        self.buffer = b""
        self.received = 0
        self.last_at = 0.0
        self.upgraded = False
        self.client_id = client_id
        self.open = True  # until the server closes it


class Swarm:
    """N clients of one server; each connects as <path><prefix><i>.

    With socketio=True they speak Socket.IO over its websocket transport: join the default
    namespace, answer Engine.IO pings, and count only event packets ("42…") as messages.
    """

    def __init__(
        self,
        port: int,
        path: str = "/websocket?id=",
        socketio: bool = False,
        extensions: str = "",
        query=None,
    ) -> None:
        self.port = port
        self.path = path
        self.query = query  # client id -> more of its URL's query ("&channel=news"), or None
        self.socketio = socketio
        self.extensions = extensions  # a Sec-WebSocket-Extensions offer (permessage-deflate)
        self.wire = 0  # bytes read from the server after the handshakes
        self.clients: dict[int, Client] = {}
        self.poller = select.epoll()
        self.total = 0  # messages received by all clients, kept rather than summed
        self.pings = 0  # pings answered, so a measurement can start right after a round
        self.busy = 0.0  # seconds spent reading what arrived, polling not counted
        self.lost = 0  # clients the server closed
        self.reconnect_delay: float | None = None  # set: a closed client comes back (storm)
        self.attempts: dict[str, int] = {}  # client id -> reconnects tried since its last 101
        self.due: list = []  # (when, client id) of the reconnects to make
        self.handshaking: dict[int, Client] = {}  # reconnects waiting for their 101
        self.reconnected = 0  # reconnects that got their 101
        self.refused = 0  # reconnects that got no 101 (tried again after a jitter)
        self.reopened_at = 0.0  # perf_counter of the last reconnect's 101
        self.reopens: list = []  # perf_counter of every reconnect's 101 (the storm's rate)

    def _handshake(self, client_id: str, source: int) -> Client:
        """A new socket with its upgrade request sent, registered for its answer."""
        sock = client_socket(source)
        sock.connect(("127.0.0.1", self.port))
        sock.setblocking(False)
        key = base64.b64encode(os.urandom(16)).decode()
        offer = self.extensions and f"Sec-WebSocket-Extensions: {self.extensions}\r\n"
        sock.send(
            f"GET {self.path}{client_id}{self.query(client_id) if self.query else ''} "
            f"HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{offer}\r\n".encode()
        )
        self.poller.register(sock.fileno(), select.EPOLLIN)
        return Client(sock, client_id)

    def connect(
        self, count: int, prefix: str = "c", timeout: float = 120.0, retry_503: bool = False
    ) -> float:
        """Open count more clients, at most 256 handshakes in flight; return handshakes/s.
        retry_503: a handshake refused with 503 (a worker at --max-connections; another may
        take it) is tried again, and counted in refused, instead of failing the run."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        pending: dict[int, Client] = {}
        again: list = []  # ids refused with 503, to try again
        opened, first = 0, len(self.clients)
        while opened < count or pending or again:
            while (opened < count or again) and len(pending) < 256:
                if again:
                    client = self._handshake(again.pop(), opened + len(again))
                else:
                    client = self._handshake(f"{prefix}{first + opened}", opened)
                    opened += 1
                pending[client.sock.fileno()] = client
            for fd, _ in self.poller.poll(1.0):
                client = pending.get(fd)
                if client is None:
                    self._read(self.clients[fd], time.perf_counter())
                    continue
                client.buffer += client.sock.recv(65536)
                head, sep, rest = client.buffer.partition(b"\r\n\r\n")
                if sep:
                    if retry_503 and head.startswith(b"HTTP/1.1 503"):
                        self.poller.unregister(fd)
                        pending.pop(fd).sock.close()
                        self.refused += 1
                        again.append(client.client_id)
                        continue
                    if not head.startswith(b"HTTP/1.1 101"):
                        raise RuntimeError(f"handshake refused: {head[:80]!r}")
                    client.buffer, client.upgraded = b"", True
                    self.clients[fd] = pending.pop(fd)
                    if rest:  # a ping sent right after the 101 came with it: answer it now
                        self._frames(client, rest, time.perf_counter())
                    if self.socketio:
                        client.sock.send(EIO_CONNECT)
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.clients)} of {count} connected")
        return count / (time.perf_counter() - started)

    def _read(self, client: Client, now: float) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self.poller.unregister(client.sock.fileno())
            client.open = False
            self.lost += 1
            if self.reconnect_delay is not None:  # as a browser's client would: come back
                self.clients.pop(client.sock.fileno(), None)
                client.sock.close()
                self._again(client.client_id)
            return
        self.wire += len(data)
        self._frames(client, data, now)

    def _frames(self, client: Client, data: bytes, now: float) -> None:
        """Take the whole frames of what arrived; keep a partial one for the next read."""
        buffer = client.buffer + data if client.buffer else data
        pos, size = 0, len(buffer)
        while size - pos >= 2:  # walk an index: slicing per frame would be quadratic
            opcode, length = buffer[pos] & 0x0F, buffer[pos + 1] & 0x7F
            offset = 2
            if length == 126:
                if size - pos < 4:
                    break
                length, offset = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, offset = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10
            if size - pos < offset + length:
                break
            start, pos = pos + offset, pos + offset + length
            if opcode == 0x9:  # the pong carries the ping's data: websockets matches on it
                client.sock.send(masked_text(buffer[start:pos], 0xA))
                self.pings += 1
            elif opcode == 0x8:  # answer a close as a browser does; the server then hangs up
                try:
                    client.sock.send(masked_text(buffer[start : start + 2], 0x8))
                except OSError:
                    pass
            elif self.socketio and opcode == 0x1 and buffer[start : start + 2] != b"42":
                if buffer[start : start + 1] == b"2":
                    client.sock.send(EIO_PONG)
                    self.pings += 1
            elif opcode in (0x1, 0x2):
                client.received += 1
                client.last_at = now
                self.total += 1
        client.buffer = buffer[pos:]

    # The restart storm: clients the server closes come back, after a random delay.

    def keep_reconnecting(self, delay: float = 0.5) -> None:
        """From now on a client the server closes reconnects (the same id) as wsboard.js
        does: after a random delay in [c/2, c), c = delay doubled at each failed try (30 s
        at most)."""
        self.reconnect_delay = delay

    def _again(self, client_id: str) -> None:
        attempt = self.attempts.get(client_id, 0)
        self.attempts[client_id] = attempt + 1
        ceiling = min(30.0, self.reconnect_delay * 2**attempt)
        when = time.monotonic() + ceiling / 2 + random.random() * ceiling / 2
        heapq.heappush(self.due, (when, client_id))

    def _reconnect_due(self) -> None:
        """Start the reconnects whose time has come, 256 handshakes in flight at most."""
        now = time.monotonic()
        while self.due and self.due[0][0] <= now and len(self.handshaking) < 256:
            _, client_id = heapq.heappop(self.due)
            try:
                client = self._handshake(client_id, self.reconnected + len(self.handshaking))
            except OSError:
                self.refused += 1
                self._again(client_id)
                continue
            self.handshaking[client.sock.fileno()] = client

    def _handshake_answer(self, client: Client, now: float) -> None:
        fd = client.sock.fileno()
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        client.buffer += data
        head, sep, rest = client.buffer.partition(b"\r\n\r\n")
        if data and not sep:
            return
        del self.handshaking[fd]
        if not data or not head.startswith(b"HTTP/1.1 101"):  # refused or cut: try again
            self.poller.unregister(fd)
            client.sock.close()
            self.refused += 1
            self._again(client.client_id)
            return
        client.buffer, client.upgraded = b"", True
        self.clients[fd] = client
        self.attempts.pop(client.client_id, None)
        self.reconnected += 1
        self.reopened_at = now
        self.reopens.append(now)
        if rest:
            self._frames(client, rest, now)

    def open_count(self) -> int:
        return sum(1 for c in self.clients.values() if c.open)

    def pump(self, until, timeout: float, spin: bool = False) -> None:
        """Read whatever arrives until until() is true or timeout seconds pass.

        spin: poll without sleeping. On loopback, waking a sleeping reader costs the sending
        core an IPI per wake-up, a cost remote browsers never put on a server; a spinning
        reader on its own core receives as they would, with no wake-ups to pay."""
        deadline = time.monotonic() + timeout
        wait = 0.0 if spin else 0.05
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError("the swarm did not receive what it waited for")
            if self.due:
                self._reconnect_due()
            events = self.poller.poll(0.005 if self.due and not spin else wait)
            if not events:
                continue
            now = time.perf_counter()
            for fd, _ in events:
                client = self.clients.get(fd)
                if client is not None:
                    self._read(client, now)
                elif fd in self.handshaking:
                    self._handshake_answer(self.handshaking[fd], now)
            self.busy += time.perf_counter() - now

    def idle(self, seconds: float) -> None:
        """Answer what arrives (pings, a namespace's welcome) for seconds, as idle clients do."""
        deadline = time.monotonic() + seconds
        self.pump(lambda: time.monotonic() >= deadline, timeout=seconds + 1)

    def received(self) -> int:
        return self.total

    def last_receive(self) -> float:
        return max(c.last_at for c in self.clients.values())

    def client(self, index: int) -> Client:
        return list(self.clients.values())[index]

    def close(self) -> None:
        for client in self.clients.values():
            client.sock.close()
        self.clients.clear()
        self.poller.close()
