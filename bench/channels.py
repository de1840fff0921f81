"""Channel fan-out beside broadcast: PUBLISH to a channel every client is in, against
BROADCAST to the same clients, on one wsboard, in blocks that take turns.

    python3 bench/channels.py [--count 10000] [--blocks 4] [--rounds 7]

wsboard runs pinned to core 0 as in bench/bench.py; the clients (bench/loadgen.py) join the
channel in their URL. It prints the medians of command -> last receive and their ratio.
"""

import argparse
import statistics
import sys
import time

from loadgen import Swarm

from bench import MESSAGE, Control, Server, fanout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--settle", type=float, default=12.0)
    args = parser.parse_args()
    server = Server("wsboard")
    swarm = Swarm(server.port, path="/websocket?channel=everyone&id=")
    try:
        swarm.connect(args.count)
        time.sleep(args.settle)  # past the burst's GC freeze, as bench.py does
        control = Control(server.control_path)
        results: dict = {"BROADCAST": [], "PUBLISH everyone": []}
        for block in range(args.blocks):
            order = list(results) if block % 2 == 0 else list(reversed(results))
            for verb in order:
                _, ends, _ = fanout(swarm, control, args.count, args.rounds, f"{verb} {MESSAGE}")
                results[verb] += ends
        medians = {verb: statistics.median(ends) * 1000 for verb, ends in results.items()}
        for verb, median in medians.items():
            print(f"{verb.split()[0]:9} to {args.count:,}: e2e median {median:.1f} ms")
        ratio = medians["PUBLISH everyone"] / medians["BROADCAST"]
        print(f"PUBLISH / BROADCAST: {ratio:.2f}x ({args.blocks} blocks of {args.rounds} rounds)")
    finally:
        swarm.close()
        server.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
