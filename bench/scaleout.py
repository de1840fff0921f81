"""Scale-out on Redis, measured side by side in one run:

1. the cost of --redis on one process against none (handshakes/s, SEND latency, pipelined
   SEND, BROADCAST to every socket), in blocks that take turns;
2. cross-process SEND: a client on one process, the control socket of another, with
   --count sockets held (latency p50/p99, pipelined messages/s);
3. BROADCAST to --spread sockets on each of 4 processes, against one process holding all
   of them (4 x 10,000 needs 40,000 descriptors in the load generator: more than many
   machines' hard limit, hence 4 x 4,500 by default).

    python3 bench/scaleout.py [--count 10000] [--rounds 7] [--sends 2000] [--pipelined 20000]

A real redis-server is started on its own port (Debian's package). wsboard and Redis are
pinned to core 0 and the load generator to core 1, as in bench/bench.py, except in part 3,
where the processes are left free to use both cores (that is the point of more processes).
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from loadgen import Swarm

from bench import ROOT, Control, Server, fanout, free_port, p99, pipelined, send_latency


class Redis:
    def __init__(self, cores: str) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsboard-redis-")
        self.proc = subprocess.Popen(
            ["taskset", "-c", cores, "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Wsboard:
    """python wsboard.py with extra flags, pinned to cores."""

    def __init__(self, cores: str, *flags: str) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsboard-bench-")
        self.control_path = os.path.join(self.dir, "control.sock")
        command = [
            sys.executable, os.path.join(ROOT, "wsboard.py"), "--port", str(self.port),
            "--control", self.control_path, "--log-level", "warning",
            "--max-connections", "50000", "--max-connections-per-ip", "50000",
            "--max-handshakes-per-ip", "1024", *flags,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            ["taskset", "-c", cores, *command],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "log"), "wb"),
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                control = Control(self.control_path)
                control.sock.sendall(b'{"op":"stats"}\n')
                state = control.line()
                if b'"backplane":{"state":"off"' in state or b'"state":"up"' in state:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"wsboard did not start: {self.log()}")
            time.sleep(0.05)

    log = Server.log  # the same files and the same stop as bench.py's servers
    stop = Server.stop


def ms(values: list) -> str:
    return f"{statistics.median(values) * 1000:.2f} / {p99(values) * 1000:.2f}"


def single_process_cost(
    redis: Redis, count: int, rounds: int, sends: int, piped: int, blocks: int
) -> None:
    figures: dict = {}
    for block in range(blocks):
        for name in ("none", "redis") if block % 2 == 0 else ("redis", "none"):
            flags = (
                ("--redis", redis.url, "--redis-prefix", f"cost{block}") if name == "redis" else ()
            )
            server = Wsboard("0", *flags)
            swarm = Swarm(server.port)
            try:
                rate = swarm.connect(count)
                time.sleep(3)
                control = Control(server.control_path)
                latency = send_latency(swarm, control, sends)
                throughput = pipelined(swarm, control, piped)
                _, ends, _ = fanout(swarm, control, count, rounds)
                entry = figures.setdefault(
                    name, {"accept": [], "send": [], "piped": [], "bcast": []}
                )
                entry["accept"].append(rate)
                entry["send"] += latency
                entry["piped"].append(throughput)
                entry["bcast"] += ends
            finally:
                swarm.close()
                server.stop()
    print(f"\n## 1. One process, --redis against none ({count:,} sockets, {blocks} blocks each)\n")
    print("| figure | none | --redis | ratio |")
    print("|---|---|---|---|")
    none, red = figures["none"], figures["redis"]
    median = statistics.median
    rows = [
        ("handshakes/s", median(none["accept"]), median(red["accept"]), ""),
        ("SEND latency median ms", median(none["send"]) * 1e3, median(red["send"]) * 1e3, "lower"),
        ("SEND latency p99 ms", p99(none["send"]) * 1e3, p99(red["send"]) * 1e3, "lower"),
        ("pipelined SEND msg/s", median(none["piped"]), median(red["piped"]), ""),
        (f"BROADCAST to {count:,} e2e median ms", median(none["bcast"]) * 1e3,
         median(red["bcast"]) * 1e3, "lower"),
    ]  # fmt: skip
    for label, a, b, lower in rows:
        note = " (lower is better)" if lower else ""
        print(f"| {label} | {a:,.2f} | {b:,.2f} | {b / a:.2f}x{note} |")


def cross_process(redis: Redis, count: int, sends: int, piped: int) -> None:
    holder = Wsboard("0", "--redis", redis.url, "--redis-prefix", "cross")
    asker = Wsboard("0", "--redis", redis.url, "--redis-prefix", "cross")
    swarm = Swarm(holder.port)
    try:
        swarm.connect(count)
        time.sleep(3)
        local = send_latency(swarm, Control(holder.control_path), sends)
        remote = send_latency(swarm, Control(asker.control_path), sends)
        local_rate = pipelined(swarm, Control(holder.control_path), piped)
        remote_rate = pipelined(swarm, Control(asker.control_path), piped)
    finally:
        swarm.close()
        holder.stop()
        asker.stop()
    print(f"\n## 2. Cross-process SEND ({count:,} sockets on the holder, {sends:,} sends)\n")
    print("| control socket of | SEND latency p50 / p99 ms | pipelined SEND msg/s |")
    print("|---|---|---|")
    print(f"| the holder itself | {ms(local)} | {local_rate:,.0f} |")
    print(f"| another process | {ms(remote)} | {remote_rate:,.0f} |")


def broadcast_over_processes(redis: Redis, count: int, rounds: int) -> None:
    results = {}
    layouts = (("1 process", 1), ("4 processes", 4))
    for label, processes in layouts:
        servers = [
            Wsboard("0,1", "--redis", redis.url, "--redis-prefix", f"spread{processes}")
            for _ in range(processes)
        ]
        swarm = Swarm(servers[0].port)
        try:
            for n, server in enumerate(servers):
                swarm.port = server.port
                swarm.connect(count * 4 // processes, prefix=f"p{n}c")
            time.sleep(5)
            _, ends, _ = fanout(swarm, Control(servers[0].control_path), count * 4, rounds)
            results[label] = ends
        finally:
            swarm.close()
            for server in servers:
                server.stop()
    print(f"\n## 3. BROADCAST to {count * 4:,} sockets ({rounds} rounds, nothing pinned)\n")
    print("| layout | e2e median ms | p99 ms |")
    print("|---|---|---|")
    for label, ends in results.items():
        print(f"| {label} | {statistics.median(ends) * 1000:.1f} | {p99(ends) * 1000:.1f} |")
    one, four = (statistics.median(results[label]) for label, _ in layouts)
    print(f"\n4 processes / 1 process: {four / one:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--pipelined", type=int, default=20000)
    parser.add_argument("--parts", default="1,2,3")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of part 1, taking turns")
    parser.add_argument(
        "--spread", type=int, default=4500,
        help="sockets per process in part 3 (4 of them, all in this process's load generator)",
    )  # fmt: skip
    args = parser.parse_args()
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if 4 * args.spread + 500 > hard:
        sys.exit(f"part 3 needs {4 * args.spread + 500} descriptors; the hard limit is {hard}")
    os.sched_setaffinity(0, {1})
    redis = Redis(os.environ.get("REDIS_CORES", "0"))
    try:
        parts = args.parts.split(",")
        if "1" in parts:
            single_process_cost(
                redis, args.count, args.rounds, args.sends, args.pipelined, args.blocks
            )
        if "2" in parts:
            cross_process(redis, args.count, args.sends, args.pipelined)
        if "3" in parts:
            broadcast_over_processes(redis, args.spread, args.rounds)
    finally:
        redis.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
