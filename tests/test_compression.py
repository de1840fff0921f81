"""permessage-deflate (RFC 7692): what is agreed to, frames deflated once per broadcast,
deflated messages from clients inflated within the limits, and nothing when it is off.
Autobahn's groups 12 and 13 run in tests/test_autobahn.py."""

import base64
import json
import os
import socket
import struct
import zlib

import pytest
import websockets.sync.client
from conftest import Control, RecordingSocket, handshake, wait_until

import wsboard

OFFER = "permessage-deflate; client_max_window_bits"
AGREED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.mark.parametrize(
    "header, bits",
    [
        (OFFER, 15),
        ("permessage-deflate", 15),
        ("permessage-deflate; server_max_window_bits=10", 10),
        ('permessage-deflate; server_max_window_bits="12"', 12),
        ("permessage-deflate; server_no_context_takeover; client_max_window_bits=9", 15),
        ("permessage-deflate; server_max_window_bits=8, permessage-deflate", 15),  # 2nd offer
        ("permessage-deflate; server_max_window_bits=8", 0),  # zlib cannot keep to 8
        ("permessage-deflate; server_max_window_bits=16", 0),
        ("permessage-deflate; server_max_window_bits", 0),
        ("permessage-deflate; server_no_context_takeover=1", 0),
        ("permessage-deflate; client_max_window_bits=7", 0),
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", 0),
        ("permessage-deflate; mystery", 0),
        ("x-webkit-deflate-frame", 0),
        ("", 0),
    ],
)
def test_an_offer_is_taken_only_as_rfc_7692_allows(header, bits):
    assert wsboard.deflate_offer(header) == bits


def test_what_is_deflated_inflates_and_a_bomb_stops_at_the_limit():
    text = json.dumps([{"id": n, "name": "x" * 20} for n in range(60)]).encode()
    assert wsboard.inflated(wsboard.deflated(text, 15), 10_000) == text
    assert wsboard.inflated(wsboard.deflated(text, 9), 10_000) == text
    bomb = wsboard.deflated(b"\0" * 10_000_000, 15)  # 10 MB in about 10 KB
    assert len(bomb) < 20_000
    with pytest.raises(wsboard.MessageTooBig):
        wsboard.inflated(bomb, 1_000_000)
    with pytest.raises(wsboard.ProtocolError):
        wsboard.inflated(b"not deflate at all", 1_000_000)


def test_a_frame_under_the_minimum_goes_as_it_is():
    small = wsboard.text_frame("short")
    assert wsboard.compressed_frame(small, 15, 512) == small
    large = wsboard.text_frame("a longer message " * 100)
    deflated = wsboard.compressed_frame(large, 15, 512)
    assert deflated[0] == 0x80 | 0x40 | 0x1  # FIN, RSV1, text
    assert len(deflated) < len(large) / 10


def test_a_broadcast_is_deflated_once_and_the_same_bytes_go_to_every_socket():
    hub = wsboard.LocalHub(wsboard.Config(compression=True))
    framing = wsboard.deflating(wsboard.FRAMINGS[""], 15, 512)
    assert wsboard.deflating(wsboard.FRAMINGS[""], 15, 512) is framing  # one for them all
    conns = []
    for n in range(3):
        ws = RecordingSocket()
        conn = wsboard.Connection(f"c{n}", f"1.{n}", "peer", "10.0.0.1", ws, framing)
        hub.attach(conn, handshake(f"c{n}"))
        conns.append(conn)
    plain = RecordingSocket()
    hub.attach(
        wsboard.Connection("p", "1.9", "peer", "10.0.0.1", plain, wsboard.FRAMINGS[""]),
        handshake("p"),
    )
    message = json.dumps({"news": "x" * 2000})
    assert hub.broadcast(message) == 4
    frames = [conn.ws.frames[-1] for conn in conns]
    assert frames[0] is frames[1] is frames[2]  # deflated once, written three times
    assert frames[0][0] & 0x40 and len(frames[0]) < 200
    assert plain.texts() == [message]


# Real sockets: our own handshake, so the frames can be read as they are on the wire.


def raw_upgrade(port: int, client_id: str, extensions: str = OFFER) -> tuple:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /websocket?id={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {extensions}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    return sock, head.decode()


def read_frame(sock: socket.socket) -> tuple:
    """(first byte, payload) of the next server frame."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    first, second = exactly(2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", exactly(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", exactly(8))[0]
    return first, exactly(length)


def client_frame(payload: bytes, rsv1: bool, opcode: int = 1) -> bytes:
    """A masked client frame."""
    mask = os.urandom(4)
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    if len(payload) < 126:
        head = bytes([first, 0x80 | len(payload)])
    else:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_browser_that_offers_it_gets_deflated_messages_and_may_send_them(server_factory):
    server = server_factory("--compression", "yes", "--compression-min", "256")
    sock, head = raw_upgrade(server.port, "alice")
    assert f"Sec-WebSocket-Extensions: {AGREED}" in head
    control = Control(server.control_path)
    big = json.dumps({"rows": [{"n": n, "text": "lorem ipsum dolor"} for n in range(100)]})
    assert control.ask(f"SEND MESSAGE alice {big}") == "OK"
    first, payload = read_frame(sock)
    assert first == 0xC1 and len(payload) < len(big) / 5
    assert zlib.decompressobj(-15).decompress(payload + wsboard.DEFLATE_TAIL).decode() == big
    assert control.ask("SEND MESSAGE alice small") == "OK"
    assert read_frame(sock) == (0x81, b"small")  # under --compression-min: as it is
    watcher = Control(server.control_path)
    assert json.loads(watcher.ask('{"op":"watch"}'))["watching"] is True
    said = "from the browser, deflated " * 20
    sock.sendall(client_frame(wsboard.deflated(said.encode(), 15), rsv1=True))
    event = json.loads(watcher.line())
    assert event["event"] == "message" and event["data"] == said
    sock.sendall(client_frame(wsboard.deflated(b"x" * 2_000_000, 15), rsv1=True))
    first, payload = read_frame(sock)  # over --max-message once inflated: a bomb stops there
    assert first == 0x88 and struct.unpack("!H", payload[:2])[0] == 1009
    sock.close()
    watcher.close()
    control.close()


def test_the_python_websockets_client_agrees_and_reads_deflated_broadcasts(server_factory):
    server = server_factory("--compression", "yes")
    with websockets.sync.client.connect(
        server.ws_url("py") + "&channel=news", compression="deflate"
    ) as client:
        agreed = client.response.headers["Sec-WebSocket-Extensions"]
        assert agreed.startswith("permessage-deflate")
        control = Control(server.control_path)
        wait_until(lambda: len(control.list()) == 1, what="listed")
        text = json.dumps({"story": "words " * 500})
        assert control.ask(f"PUBLISH news {text}") == "OK 1"
        assert client.recv(timeout=10) == text
        client.send("deflated by the client " * 50)
        control.close()


def test_off_by_default_an_offer_is_declined_and_rsv1_refused(server_factory):
    server = server_factory()
    sock, head = raw_upgrade(server.port, "bob")
    assert "101" in head and "Sec-WebSocket-Extensions" not in head
    control = Control(server.control_path)
    big = "y" * 5000
    assert control.ask(f"SEND MESSAGE bob {big}") == "OK"
    assert read_frame(sock) == (0x81, big.encode())
    sock.sendall(client_frame(wsboard.deflated(b"hello", 15), rsv1=True))
    first, payload = read_frame(sock)
    assert first == 0x88 and struct.unpack("!H", payload[:2])[0] == 1002
    sock.close()
    control.close()
