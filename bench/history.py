"""Channel history's price, measured side by side in one run (issue #28):

1. PUBLISH fan-out to --count sockets in one channel, end to end (command -> last receive),
   with --history 100 against without, on one process and with --redis;
2. pipelined PUBLISH throughput (--publishes lines written at once to a channel with one
   member, until every answer is read), the same four ways;
3. Redis memory per kept publication: --kept publications of 100 bytes over 100 channels,
   used_memory before and after, with --history 100 against without;
4. a flood on one process (--history 100, --history-bytes 64 MiB): --flood publications of
   1,000 bytes over 100,000 channels; what the history holds and the process's RSS.

    python3 bench/history.py [--count 1000] [--rounds 7] [--blocks 3] [--publishes 5000]

The configurations take turns in --blocks blocks, so slow drift on a shared machine falls on
all of them alike; medians over every round of every block. wsboard and Redis are pinned to
core 0, the load generator to core 1, as in bench/bench.py.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from loadgen import Swarm
from scaleout import Redis

from bench import MESSAGE, ROOT, Control, fanout, free_port, pipelined

CONFIGS = [
    ("one process", False, 0),
    ("one process, --history 100", False, 100),
    ("--redis", True, 0),
    ("--redis, --history 100", True, 100),
]


class Wsboard:
    def __init__(self, redis_url: str, history: int) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsboard-history-")
        self.control_path = os.path.join(self.dir, "control.sock")
        args = ["--port", str(self.port), "--control", self.control_path,
                "--max-connections-per-ip", "100000", "--log-level", "warning",
                "--history", str(history)]  # fmt: skip
        if redis_url:
            args += ["--redis", redis_url, "--redis-prefix", f"b{time.monotonic_ns()}"]
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, os.path.join(ROOT, "wsboard.py"), *args],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "log"), "wb"),
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.control_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(open(os.path.join(self.dir, "log")).read()[-2000:])
            time.sleep(0.05)
        time.sleep(1.0)  # the Redis link up

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def one_block(redis: Redis, args: argparse.Namespace, results: dict) -> None:
    for name, on_redis, history in CONFIGS:
        server = Wsboard(redis.url if on_redis else "", history)
        try:
            news = Swarm(server.port, "/websocket?channel=news&id=")
            news.connect(args.count)
            solo = Swarm(server.port, "/websocket?channel=solo&id=")
            solo.connect(1, prefix="s")
            control = Control(server.control_path)
            _, ends, _ = fanout(news, control, args.count, args.rounds, f"PUBLISH news {MESSAGE}")
            results[name]["e2e"] += ends
            rate = pipelined(solo, control, args.publishes, f"PUBLISH solo {MESSAGE}")
            results[name]["rate"].append(rate)
        finally:
            server.stop()


def redis_memory(redis: Redis, history: int, kept: int) -> float:
    """Bytes of Redis memory per publication: kept publications over 100 channels."""
    server = Wsboard(redis.url, history)
    try:
        control = Control(server.control_path)
        before = redis.used_memory()
        for start in range(0, kept, 1000):
            lines = "".join(f"PUBLISH ch{n % 100} {MESSAGE}\n" for n in range(start, start + 1000))
            control.sock.sendall(lines.encode())
            for _ in range(1000):
                assert control.line().startswith(b"OK"), "publish refused"
        time.sleep(0.5)
        return (redis.used_memory() - before) / kept
    finally:
        server.stop()


def flood(count: int) -> dict:
    """One process with the default --history-bytes under count publications of 1,000 bytes
    to 100,000 channels: the history's own count of bytes and channels, and RSS in MB."""
    server = Wsboard("", 100)
    try:
        control = Control(server.control_path)
        text = "f" * 1000
        for start in range(0, count, 1000):
            lines = "".join(f"PUBLISH fl{n % 100_000} {text}\n" for n in range(start, start + 1000))
            control.sock.sendall(lines.encode())
            for _ in range(1000):
                assert control.line().startswith(b"OK"), "publish refused"
        control.sock.sendall(b'{"op":"stats"}\n')
        stats = json.loads(control.line())
        with open(f"/proc/{server.proc.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        return {"bytes": stats["history_bytes"], "channels": stats["history_channels"], "rss": rss}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="sockets in the channel")
    parser.add_argument("--rounds", type=int, default=7, help="fan-out rounds a block")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--publishes", type=int, default=5000, help="pipelined PUBLISH lines")
    parser.add_argument("--kept", type=int, default=10000, help="publications for the memory")
    parser.add_argument("--flood", type=int, default=300000, help="publications of the flood")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    redis = Redis("0")
    results = {name: {"e2e": [], "rate": []} for name, _, _ in CONFIGS}
    try:
        for _ in range(args.blocks):
            one_block(redis, args, results)
        memory = {h: redis_memory(redis, h, args.kept) for h in (0, 100)}
        flooded = flood(args.flood)
    finally:
        redis.stop()
    base = {False: "one process", True: "--redis"}
    print(f"# Channel history, {args.count} sockets, {args.blocks} blocks\n")
    print("| configuration | fan-out e2e ms (median) | vs off | PUBLISH/s pipelined | vs off |")
    print("|---|---|---|---|---|")
    for name, on_redis, _ in CONFIGS:
        e2e = statistics.median(results[name]["e2e"]) * 1000
        rate = statistics.median(results[name]["rate"])
        off = results[base[on_redis]]
        e2e_ratio = e2e / (statistics.median(off["e2e"]) * 1000)
        rate_ratio = rate / statistics.median(off["rate"])
        print(f"| {name} | {e2e:.2f} | {e2e_ratio:.2f}x | {rate:,.0f} | {rate_ratio:.2f}x |")
    print(
        f"\nRedis memory per publication ({args.kept:,} of 100 bytes over 100 channels): "
        f"{memory[100]:.0f} bytes with --history 100, {memory[0]:.0f} without."
    )
    print(
        f"\nA flood of {args.flood:,} publications of 1,000 bytes over 100,000 channels, one "
        f"process, --history 100 and the default --history-bytes (64 MiB): the history holds "
        f"{flooded['bytes'] / 2**20:.1f} MiB in {flooded['channels']:,} channels; RSS "
        f"{flooded['rss']:.0f} MB."
    )


if __name__ == "__main__":
    main()
