"""The same job on python-socketio 5 under gevent, in its idiomatic form.

A room per id (clients connect with ?id=), sio.emit(to=room) for a send, sio.emit() for a
broadcast, the websocket transport only, Engine.IO's own 25 s pings; a UNIX control socket
that speaks wsboard's two verbs plus BROADCAST.

    python bench/peers/socketio_peer.py PORT CONTROL_PATH
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402

import socketio  # noqa: E402
from gevent import pywsgi  # noqa: E402
from gevent.server import StreamServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

sio = socketio.Server(async_mode="gevent", transports=["websocket"], ping_interval=25)
members: dict = {}  # room -> number of sockets in it


@sio.event
def connect(sid, environ, auth=None):
    room = parse_qs(environ.get("QUERY_STRING", "")).get("id", [""])[0]
    sio.enter_room(sid, room)
    sio.save_session(sid, {"room": room})
    members[room] = members.get(room, 0) + 1


@sio.event
def disconnect(sid, reason=None):
    room = sio.get_session(sid)["room"]
    members[room] -= 1
    if not members[room]:
        del members[room]


def control(sock, address):
    buffer = b""
    while data := sock.recv(65536):
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        answers = []
        for raw in lines:
            line = raw.decode()
            if line.startswith("BROADCAST "):
                sio.emit("message", line[len("BROADCAST ") :])
                answers.append(f"OK {sum(members.values())}")
            elif line.startswith("SEND MESSAGE "):
                room, _, text = line[len("SEND MESSAGE ") :].partition(" ")
                if room in members:
                    sio.emit("message", text, to=room)
                answers.append("OK" if room in members else "ERROR Client Not Found")
            else:
                answers.append("ERROR Unknown command")
        if answers:
            sock.sendall(("\n".join(answers) + "\n").encode())


def main(port: int, path: str) -> None:
    listener = socket.socket(socket.AF_UNIX)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path)
    listener.listen(128)
    StreamServer(listener, control).start()
    pywsgi.WSGIServer(
        ("127.0.0.1", port),
        socketio.WSGIApp(sio),
        handler_class=WebSocketHandler,
        backlog=1024,
        log=None,
    ).serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
