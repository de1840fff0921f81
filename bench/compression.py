"""permessage-deflate's gain and its price, side by side in one run (issue #32): a
broadcast of a 2 KB JSON message to --count sockets that all offered permessage-deflate,
as browsers do.

    python3 bench/compression.py [--count 10000] [--rounds 15] [--blocks 3]

Four servers take turns in --blocks blocks (reversed every other block): wsboard without
and with --compression, Node.js `ws` without and with perMessageDeflate (no context
takeover, the same 512-byte threshold). Per broadcast, medians over every round: the bytes
the clients read (frames and their headers), the server's CPU (user + system, from
/proc/PID/stat, over the rounds), the send loop (command -> OK) and end to end (command ->
last receive); and the server's RSS per connection once they are all open. Servers are
pinned to core 0, the load generator to core 1, as in bench/bench.py.
"""

import argparse
import json
import os
import statistics
import sys
import time

from loadgen import Swarm

from bench import Control, Server, fanout

OFFER = "permessage-deflate; client_max_window_bits"
MESSAGE = json.dumps(
    {
        "event": "order.updated",
        "orders": [
            {"id": 1000 + n, "status": "shipped", "customer": f"customer {n}", "total": n * 7.5,
             "items": [{"sku": f"SKU-{n}-{k}", "qty": k + 1} for k in range(2)]}
            for n in range(14)
        ],
    },
    separators=(",", ":"),
)  # fmt: skip
SERVERS = [
    ("wsboard", "wsboard", [], None),
    ("wsboard --compression", "wsboard", ["--compression", "yes"], None),
    ("node-ws", "node-ws", [], None),
    ("node-ws perMessageDeflate", "node-ws", [], {"DEFLATE": "1"}),
]


def block(label: str, name: str, extra: list, env: dict | None, count: int, rounds: int) -> dict:
    server = Server(name, extra, env)
    try:
        empty = server.rss_kb()
        swarm = Swarm(server.port, extensions=OFFER)
        swarm.connect(count)
        swarm.idle(3)
        rss = (server.rss_kb() - empty) / count
        control = Control(server.control_path)
        wire, cpu = swarm.wire, server.cpu_seconds()
        loops, ends, _ = fanout(swarm, control, count, rounds, f"BROADCAST {MESSAGE}")
        wire, cpu = swarm.wire - wire, server.cpu_seconds() - cpu
        swarm.close()
        return {
            "label": label,
            "wire": wire / (rounds + 1),  # the warm-up round is on the wire too
            "cpu": cpu / (rounds + 1),
            "loops": loops,
            "ends": ends,
            "rss": rss,
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--blocks", type=int, default=3)
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    results: dict = {label: [] for label, *_ in SERVERS}
    for n in range(args.blocks):
        order = SERVERS if n % 2 == 0 else SERVERS[::-1]
        for label, name, extra, env in order:
            results[label].append(block(label, name, extra, env, args.count, args.rounds))
            time.sleep(1)
    print(f"broadcast of {len(MESSAGE)} bytes of JSON to {args.count:,} sockets that offered "
          f"permessage-deflate; {args.blocks} blocks of {args.rounds} rounds, medians")  # fmt: skip
    print()
    print("| server | bytes on the wire per socket | server CPU ms per broadcast | send loop ms "
          "| e2e ms | KB per connection |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for label, *_ in SERVERS:
        runs = results[label]
        wire = statistics.median(r["wire"] for r in runs) / args.count
        cpu = statistics.median(r["cpu"] for r in runs) * 1000
        loop = statistics.median(x for r in runs for x in r["loops"]) * 1000
        end = statistics.median(x for r in runs for x in r["ends"]) * 1000
        rss = statistics.median(r["rss"] for r in runs)
        print(f"| {label} | {wire:,.0f} | {cpu:.1f} | {loop:.1f} | {end:.1f} | {rss:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
