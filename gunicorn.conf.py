"""gunicorn settings for wsboard: gunicorn -c gunicorn.conf.py wsboard:app

wsboard's own settings come from its WSBOARD_* environment variables (see README).
This file must not import wsboard: the master process would be monkey-patched by gevent.
"""

import os
import socket
import subprocess
import sys

import gevent
from geventwebsocket.gunicorn.workers import GeventWebSocketWorker

_host = os.environ.get("WSBOARD_HOST", "127.0.0.1").strip()
_port = os.environ.get("WSBOARD_PORT", "8080").strip()
bind = f"[{_host}]:{_port}" if ":" in _host else f"{_host}:{_port}"
# One worker by default; more (-w N) need the Redis backplane (WSBOARD_REDIS), which lets
# every worker reach every socket. All of them accept on one control socket.
workers = 1
# A hard cap on open connections per worker (a full pool stops accept()): wsboard's own
# WebSocket limit, which answers 503 past it, plus room for page requests.
_max = os.environ.get("WSBOARD_MAX_CONNECTIONS", "10000").strip()
worker_connections = (int(_max) if _max.isdigit() else 10000) + 1024
# Bottle's request state must be made after gevent patches the worker, never in the master.
preload_app = False
_backlog = os.environ.get("WSBOARD_BACKLOG", "1024").strip()
backlog = int(_backlog) if _backlog.isdigit() else 1024
graceful_timeout = 10


class WSBoardWorker(GeventWebSocketWorker):
    """gevent-websocket's worker with wsboard's handler, control socket and 1001 drain."""

    def load_wsgi(self):
        super().load_wsgi()
        import wsboard

        self.wsgi_handler = wsboard.WebSocketHandler
        guarded = wsboard.guarded(self.server_class)
        self.listeners = []  # this worker's servers, so that a drain can stop their accepts

        def server_class(*args, **kwargs):
            server = guarded(*args, **kwargs)
            self.listeners.append(server)
            return server

        self.server_class = server_class
        self.wsgi.start_in_worker()

    def handle_exit(self, sig, frame):
        # WebSocket sessions run outside the worker's pool, so the worker would not wait for
        # them: stay alive until wsboard has drained them, then let gunicorn finish.
        gevent.spawn(self.drain_then, super().handle_exit, sig, frame, False)

    def handle_quit(self, sig, frame):
        # SIGINT/SIGQUIT: a quick shutdown, but still every socket gets its 1001 and the
        # control socket file goes.
        gevent.spawn(self.drain_then, super().handle_quit, sig, frame, True)

    def drain_then(self, finish, sig, frame, quick):
        try:
            # Accept nothing more first: the clients this drain closes reconnect to the other
            # workers (they share the listening socket), not to this one while it drains.
            for server in self.listeners:
                server.close()
            self.wsgi.stop_in_worker(quick)
        finally:
            finish(sig, frame)


worker_class = WSBoardWorker


_HERE = os.path.dirname(os.path.abspath(__file__))
_CONTROL_FD = "WSBOARD_CONTROL_LISTENER_FD"  # wsboard.CONTROL_FD_VARIABLE
_control = {}  # the control socket the master bound: its path and inode


def _wsboard(*args, **kwargs):
    """Run a wsboard subcommand in a child process (the master must not import wsboard)."""
    code = f"import sys, wsboard; sys.exit(wsboard.main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=_HERE, capture_output=True, text=True, **kwargs
    )


def on_starting(server):
    if server.cfg.workers > 1 and not os.environ.get("WSBOARD_REDIS", "").strip():
        sys.exit(
            f"wsboard: refusing to start {server.cfg.workers} workers without Redis: each would "
            "hold its own sockets, and a SEND would reach only one of them. Run one worker "
            "(-w 1), or set WSBOARD_REDIS=redis://host:port/db so that they share them."
        )
    # A bad WSBOARD_* value: say so in wsboard's one line, before any worker fails to boot.
    check = _wsboard("check-config")
    if check.returncode != 0:
        sys.exit(check.stderr.strip() or f"wsboard: check-config exited {check.returncode}")
    # The master binds the control socket once (through wsboard, which hands the listening
    # descriptor back); every worker, forked from here, accepts on it.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        bound = _wsboard(
            "bind-control", "--send-to", str(theirs.fileno()), pass_fds=[theirs.fileno()]
        )
        if bound.returncode != 0:
            sys.exit(bound.stderr.strip() or f"wsboard: bind-control exited {bound.returncode}")
        message, fds, _, _ = socket.recv_fds(ours, 4096, 1)
    path, inode = message.decode().split("\n")
    _control.update(path=path, inode=int(inode), fd=fds[0])
    os.environ[_CONTROL_FD] = str(fds[0])


def on_exit(server):
    """The master goes: so does the control socket file (unless a newer server took the path)."""
    try:
        if os.lstat(_control["path"]).st_ino == _control["inode"]:
            os.unlink(_control["path"])
    except (KeyError, FileNotFoundError):
        pass
