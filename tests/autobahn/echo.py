"""A WebSocket echo built from wsboard's own handler, for Autobahn|Testsuite only.

It upgrades through wsboard.WebSocketHandler (same handshake checks, BoardSocket framing,
size limit and close logic) and echoes each message back as it came: text as text,
binary as binary. A normal wsboard start never serves it.

    python tests/autobahn/echo.py PORT [MAX_MESSAGE]
"""

import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.exceptions import WebSocketError  # noqa: E402

import wsboard  # noqa: E402  (patches with gevent first)


class EchoProtocol(wsboard.WebSocketProtocol):
    """/websocket, whose sockets echo what they receive instead of reporting it (their
    reads are the server's own: the read watcher, the short reading greenlet, the close)."""

    def receive(self, board: wsboard.Board, conn: wsboard.Connection, message: object) -> None:
        try:
            conn.ws.send(message, binary=not isinstance(message, str))
        except WebSocketError:
            pass


class EchoBoard(wsboard.Board):
    """A board whose one kind of socket is the echo."""

    def configure(self, cfg: wsboard.Config) -> None:
        super().configure(cfg)
        self.protocols = [EchoProtocol()]


def main() -> None:
    port = int(sys.argv[1])
    max_message = int(sys.argv[2]) if len(sys.argv) > 2 else 64 * 1024 * 1024
    # Group 9 echoes messages of up to 16 MiB: the send queue must hold one whole.
    board = EchoBoard(
        wsboard.Config(
            max_message=max_message,
            queue_bytes=max_message,
            max_client_rate=0,
            log_level="warning",
            compression=True,  # groups 12 and 13: permessage-deflate
            compression_min=0,
        )
    )
    server = WSGIServer(
        ("127.0.0.1", port),
        board,
        handler_class=wsboard.WebSocketHandler,
        log=None,
        error_log=logging.getLogger("echo.error"),
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
