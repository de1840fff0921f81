"""A lean WebSocket load generator for the benchmark: many clients in one process, on epoll.

No gevent, no asyncio: non-blocking sockets, one epoll, and a frame parser just big enough
for what the servers send (unmasked text, ping, close). It answers pings, so heartbeats do
not reap its sockets. Sockets are spread over several loopback source addresses so that 10k
connections never run out of ephemeral ports. Every loop is bounded in count and time.
"""

import base64
import os
import select
import socket
import time

SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


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
        self, port: int, path: str = "/websocket?id=", socketio: bool = False, extensions: str = ""
    ) -> None:
        self.port = port
        self.path = path
        self.socketio = socketio
        self.extensions = extensions  # a Sec-WebSocket-Extensions offer (permessage-deflate)
        self.wire = 0  # bytes read from the server after the handshakes
        self.clients: dict[int, Client] = {}
        self.poller = select.epoll()
        self.total = 0  # messages received by all clients, kept rather than summed
        self.pings = 0  # pings answered, so a measurement can start right after a round
        self.busy = 0.0  # seconds spent reading what arrived, polling not counted
        self.lost = 0  # clients the server closed

    def connect(self, count: int, prefix: str = "c", timeout: float = 120.0) -> float:
        """Open count more clients, at most 256 handshakes in flight; return handshakes/s."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        pending: dict[int, Client] = {}
        opened, first = 0, len(self.clients)
        while opened < count or pending:
            while opened < count and len(pending) < 256:
                sock = socket.socket()
                sock.bind((SOURCES[opened % len(SOURCES)], 0))
                sock.connect(("127.0.0.1", self.port))
                sock.setblocking(False)
                client_id = f"{prefix}{first + opened}"
                key = base64.b64encode(os.urandom(16)).decode()
                offer = self.extensions and f"Sec-WebSocket-Extensions: {self.extensions}\r\n"
                sock.send(
                    f"GET {self.path}{client_id} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                    f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    f"Sec-WebSocket-Version: 13\r\n{offer}\r\n".encode()
                )
                client = Client(sock, client_id)
                pending[sock.fileno()] = client
                self.poller.register(sock.fileno(), select.EPOLLIN)
                opened += 1
            for fd, _ in self.poller.poll(1.0):
                client = pending.get(fd)
                if client is None:
                    self._read(self.clients[fd], time.perf_counter())
                    continue
                client.buffer += client.sock.recv(65536)
                head, sep, rest = client.buffer.partition(b"\r\n\r\n")
                if sep:
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
        if not data:
            self.poller.unregister(client.sock.fileno())
            client.open = False
            self.lost += 1
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
            elif self.socketio and opcode == 0x1 and buffer[start : start + 2] != b"42":
                if buffer[start : start + 1] == b"2":
                    client.sock.send(EIO_PONG)
                    self.pings += 1
            elif opcode in (0x1, 0x2):
                client.received += 1
                client.last_at = now
                self.total += 1
        client.buffer = buffer[pos:]

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
            events = self.poller.poll(wait)
            if not events:
                continue
            now = time.perf_counter()
            for fd, _ in events:
                client = self.clients.get(fd)
                if client is not None:
                    self._read(client, now)
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
