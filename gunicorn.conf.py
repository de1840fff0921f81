"""gunicorn settings for wsboard: gunicorn -c gunicorn.conf.py wsboard:app

wsboard's own settings come from its WSBOARD_* environment variables (see README).
This file must not import wsboard: the master process would be monkey-patched by gevent.
"""

import os
import sys

import gevent
from geventwebsocket.gunicorn.workers import GeventWebSocketWorker

bind = f"{os.environ.get('WSBOARD_HOST', '127.0.0.1')}:{os.environ.get('WSBOARD_PORT', '8080')}"
# One worker holds every socket; more need the Redis backplane (not built yet).
workers = 1
# A hard cap on open connections per worker (a full pool stops accept()): wsboard's own
# WebSocket limit, which answers 503 past it, plus room for page requests.
worker_connections = int(os.environ.get("WSBOARD_MAX_CONNECTIONS", "10000")) + 1024
# Bottle's request state must be made after gevent patches the worker, never in the master.
preload_app = False
backlog = int(os.environ.get("WSBOARD_BACKLOG", "1024"))
graceful_timeout = 10


class WSBoardWorker(GeventWebSocketWorker):
    """gevent-websocket's worker with wsboard's handler, control socket and 1001 drain."""

    def load_wsgi(self):
        super().load_wsgi()
        import wsboard

        self.wsgi_handler = wsboard.WebSocketHandler
        wsboard.start_in_worker()

    def handle_exit(self, sig, frame):
        # WebSocket sessions run outside the worker's pool, so the worker would not wait for
        # them: stay alive until wsboard has drained them, then let gunicorn finish.
        gevent.spawn(self.drain_then_exit, sig, frame)

    def drain_then_exit(self, sig, frame):
        import wsboard

        wsboard.stop_in_worker()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig, frame):
        import wsboard

        gevent.spawn(wsboard.stop_in_worker)
        super().handle_quit(sig, frame)


worker_class = WSBoardWorker


def on_starting(server):
    if server.cfg.workers > 1:
        sys.exit(
            f"wsboard: refusing to start {server.cfg.workers} workers: each would hold its own "
            "sockets and its own control socket, and a SEND would reach only one of them. "
            "Run one worker (-w 1)."
        )
