"""Churn: connect and disconnect --count clients --rounds times, with and without --redis, and
check that nothing is left behind: RSS after the last round against after the first, and
with --redis, Redis's used_memory against its baseline.

    python3 bench/churn.py [--count 10000] [--rounds 20] [--modes none,redis,channels]

Mode channels is --redis with every client in two channels from its URL: "news", and one
of 100 presence channels (presence-room-0 ... 99), so each round makes and ends 10,000
memberships of 100 presence lists in Redis, their counts and their leaves.

wsboard and Redis are pinned to core 0, the load generator to core 1. After each round the
clients close their sockets and the script waits until the server counts none, then for
--settle seconds before it measures (by default 1, and 7 in mode channels: the 5 s
--presence-grace of the round's leaves has run out, so a round is measured with nothing of
it left, as the last one is). --settle 1 in mode channels shows the other case: each round
starts while the leaves of the one before are still in their grace.
"""

import argparse
import json
import os
import socket
import sys
import time
import zlib

from loadgen import Swarm
from scaleout import Redis, Wsboard

from bench import Control


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def redis_memory(redis: Redis) -> int:
    """used_memory from INFO memory, in bytes."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
        sock.sendall(b"INFO memory\r\n")
        data = b""
        while b"used_memory:" not in data or not data.endswith(b"\r\n"):
            data += sock.recv(65536)
    line = next(x for x in data.split(b"\r\n") if x.startswith(b"used_memory:"))
    return int(line.split(b":")[1])


def wait_empty(control: Control, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        control.sock.sendall(b'{"op":"count"}\n')
        if json.loads(control.line())["sockets"] == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("sockets still open after the clients closed them")


def in_channels(client_id: str) -> str:
    return f"&channel=news&channel=presence-room-{zlib.crc32(client_id.encode()) % 100}"


def churn(mode: str, count: int, rounds: int, redis: Redis | None, settle: float) -> None:
    flags = ("--redis", redis.url, "--redis-prefix", f"churn-{mode}") if redis else ()
    server = Wsboard("0", *flags)
    query = in_channels if mode == "channels" else None
    control = Control(server.control_path)
    redis_before = redis_memory(redis) if redis else 0
    rss, held = [], []  # after each round: RSS, and Redis's used_memory
    try:
        for number in range(rounds):
            swarm = Swarm(server.port, query=query)
            swarm.connect(count, prefix=f"r{number}-")
            for client in list(swarm.clients.values()):
                client.sock.close()
            wait_empty(control)
            time.sleep(settle)
            rss.append(rss_kb(server.proc.pid))
            held.append(redis_memory(redis) if redis else 0)
        time.sleep(6)  # presence grace, inbox and key expiry have run out
        last = rss_kb(server.proc.pid)
        line = (
            f"{mode} (settle {settle:g} s): {rounds} rounds of {count}: "
            f"RSS after round 1 {rss[0] / 1024:.1f} MB, "
            f"after the last {last / 1024:.1f} MB ({last / rss[0]:.3f}x); "
            f"per round {', '.join(f'{r / 1024:.0f}' for r in rss)} MB"
        )
        if redis:
            after = redis_memory(redis)
            line += (
                f"; Redis used_memory {redis_before / 1024:.0f} KB before, "
                f"{held[0] / 1024:.0f} KB after round 1, {after / 1024:.0f} KB after the last "
                f"({after / held[0]:.3f}x); per round "
                f"{', '.join(f'{h / 1024:.0f}' for h in held)} KB"
            )
        print(line, flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--modes", default="none,redis,channels")
    parser.add_argument(
        "--settle",
        type=float,
        help="seconds after each round before measuring (default 1; 7 in mode channels)",
    )
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    for mode in args.modes.split(","):
        redis = Redis("0") if mode in ("redis", "channels") else None
        try:
            settle = args.settle if args.settle is not None else 7 if mode == "channels" else 1
            churn(mode, args.count, args.rounds, redis, settle)
        finally:
            if redis:
                redis.stop()


if __name__ == "__main__":
    sys.exit(main())
