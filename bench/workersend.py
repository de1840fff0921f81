"""SEND latency over time on gunicorn workers on Redis, through their ping rounds.

gunicorn with --workers workers on one redis-server, --per-process sockets each held by a
fleet of load-generator processes; for --seconds (two or more ping rounds at 25 s), a SEND
every 10 ms, in turns to a socket of the worker that holds the control connection and to one
of another worker, timed to that client's receive. Prints, for each, p50, p99, p99.9 and the
slowest, and when the SENDs over 10 ms came.

    python3 bench/workersend.py [--workers 6] [--per-process 16700] [--seconds 60]
"""

import argparse
import json
import time

from fleet import Fleet
from scaleout import Gunicorn, Redis, fleet_sends, where

from bench import Control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--per-process", type=int, default=16700)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    redis = Redis("0")
    server = Gunicorn(args.workers, redis, "ws")
    members = args.workers * max(1, args.per_process // 10000)
    fleet = Fleet(server.port, members)
    try:
        fleet.connect(args.workers * args.per_process // members)
        time.sleep(5)
        held = where(server)
        control = Control(server.control_path)
        control.sock.sendall(b'{"op":"stats"}\n')
        mine = str(json.loads(control.line())["backplane"]["node"])
        targets: dict = {"the worker asked": [], "another worker": []}
        for member in range(members):
            for index, client_id in enumerate(fleet.ids(member)):
                if index % 7 == 0:
                    mine_too = str(held[client_id]) == mine
                    targets["the worker asked" if mine_too else "another worker"].append(
                        (member, index)
                    )
        samples: dict = {kind: [] for kind in targets}
        started = time.perf_counter()
        turn = 0
        while (now := time.perf_counter() - started) < args.seconds:
            kind = list(targets)[turn % 2]
            target = targets[kind][turn // 2 % len(targets[kind])]
            samples[kind].append((now, fleet_sends(fleet, control, [target])[0]))
            turn += 1
            time.sleep(0.01)
    finally:
        fleet.close()
        server.stop()
        redis.stop()
    print(f"{args.workers} workers x {args.per_process:,} sockets, {args.seconds:.0f} s:")
    for kind, taken in samples.items():
        report(kind, taken)


def report(kind: str, samples: list) -> None:
    ordered = sorted(latency for _, latency in samples)

    def ms(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    slow = [(at, latency) for at, latency in samples if latency > 0.01]
    print(
        f"  {len(ordered)} SENDs to {kind}: p50 {ms(0.5):.2f} p99 {ms(0.99):.2f} "
        f"p99.9 {ms(0.999):.2f} slowest {ordered[-1] * 1e3:.1f} ms; over 10 ms: {len(slow)}"
    )
    print("  over 10 ms (s into the run: ms):", " ".join(f"{a:.1f}:{x * 1e3:.0f}" for a, x in slow))


if __name__ == "__main__":
    main()
