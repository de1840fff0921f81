"""SEND latency across heartbeat rounds: does a SEND that meets a ping round wait for it?

One wsboard process holds --count clients that answer pings (wsboard on core 0, the load
generator on core 1, as in bench.py). After the collector settles, a SEND goes to one of
them every few milliseconds for --seconds (long enough for a ping round or two at the
default 25 s interval), each timed from the command to that client's receive. Prints p50,
p99 and the slowest, the slow SENDs (over 2 ms) with when they were sent, and by when each
ping round had been answered.

    python3 bench/pinground.py [--count 10000] [--seconds 40] [--server wsboard]

--server takes bench.py's names (wsboard, node-ws, ..., or wsboard@/path/to/wsboard.py).
"""

import argparse
import os
import statistics
import sys
import time

from loadgen import Swarm

from bench import MESSAGE, Control, Server, path_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--server", default="wsboard")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    server = Server(args.server)
    swarm = Swarm(server.port, path_of(args.server.split("@")[0]))
    try:
        swarm.connect(args.count)
        swarm.idle(12)  # wsboard freezes its collector's objects once the sockets settle
        control = Control(server.control_path)
        rows = []  # (seconds since start, latency ms, pings answered so far)
        started_all = time.perf_counter()
        n = 0
        while time.perf_counter() - started_all < args.seconds:
            client = swarm.client((n * 7919) % len(swarm.clients))
            n += 1
            before = client.received
            started = time.perf_counter()
            control.sock.sendall(f"SEND MESSAGE {client.client_id} {MESSAGE}\n".encode())
            swarm.pump(lambda c=client, b=before: c.received > b, timeout=10)
            rows.append((started - started_all, (client.last_at - started) * 1000, swarm.pings))
            control.line()
            swarm.idle(0.003)  # a moment between SENDs, answering pings
    finally:
        swarm.close()
        server.stop()
    latencies = sorted(row[1] for row in rows)
    p99 = latencies[int(len(latencies) * 0.99)]
    print(f"{args.server}, {args.count:,} sockets: {len(rows)} SENDs over {args.seconds:.0f} s, "
          f"p50 {statistics.median(latencies):.3f} ms, p99 {p99:.3f} ms, "
          f"slowest {latencies[-1]:.1f} ms")  # fmt: skip
    print("SENDs over 2 ms (sent at s: ms):")
    for at, ms, _ in rows:
        if ms > 2:
            print(f"  {at:7.3f}: {ms:7.2f}")
    answered: dict = {}  # rounds answered whole -> when the first SEND after that was sent
    for at, _, pings in rows:
        answered.setdefault(pings // args.count, at)
    print("ping rounds answered by (s):", [round(at, 2) for k, at in answered.items() if k])


if __name__ == "__main__":
    sys.exit(main())
