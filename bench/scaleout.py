"""Scale-out on Redis, measured side by side in one run:

1. the cost of --redis on one process against none (handshakes/s, SEND latency, pipelined
   SEND, BROADCAST to every socket), in blocks that take turns;
2. cross-process SEND: a client on one process, the control socket of another, with
   --count sockets held (latency p50/p99, pipelined messages/s);
3. BROADCAST to --spread sockets on each of 4 processes, against one process holding all
   of them (4 x 10,000 needs 40,000 descriptors in the load generator: more than many
   machines' hard limit, hence 4 x 4,500 by default);
4. gunicorn with --workers N (each count in turn) on Redis, --per-process sockets each,
   behind its one control socket, driven by a fleet of load-generator processes: memory,
   idle CPU, handshakes/s, BROADCAST to all, SEND to the worker asked and to another one,
   and what Redis spends per handshake, per socket and per cross-process SEND;
5. the restart storm: --storm WORKERS,SOCKETS, every worker restarted in turn with the
   drain on, the clients coming back as wsboard.js does.

    python3 bench/scaleout.py [--count 10000] [--rounds 7] [--sends 2000] [--pipelined 20000]
    python3 bench/scaleout.py --parts 4 --workers 6 --per-process 16700   # 100,000 sockets
    python3 bench/scaleout.py --parts 5 --storm 7,100000

A real redis-server is started on its own port (Debian's package). wsboard and Redis are
pinned to core 0 and the load generator to core 1, as in bench/bench.py, except in part 3,
where the processes are left free to use both cores (that is the point of more processes).
"""

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from fleet import TENTH, Fleet
from loadgen import Swarm

from bench import MESSAGE, ROOT, Control, Server, fanout, free_port, p99, pipelined, send_latency


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

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:  # taskset execs: this is redis-server
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def used_memory(self) -> int:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"INFO memory\r\n")
            data = b""
            while b"used_memory:" not in data or not data.endswith(b"\r\n"):
                data += sock.recv(65536)
        return int(data.split(b"used_memory:")[1].split(b"\r\n")[0])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Wsboard:
    """python wsboard.py with extra flags, pinned to cores."""

    def __init__(self, cores: str, *flags: str, script: str = "") -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsboard-bench-")
        self.control_path = os.path.join(self.dir, "control.sock")
        command = [
            sys.executable, script or os.path.join(ROOT, "wsboard.py"), "--port", str(self.port),
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
    redis: Redis, count: int, rounds: int, sends: int, piped: int, blocks: int, against: str = ""
) -> None:
    """--redis against none; with against (another checkout's wsboard.py), --redis there
    ("none" in the table) against --redis here."""
    figures: dict = {}
    for block in range(blocks):
        for name in ("none", "redis") if block % 2 == 0 else ("redis", "none"):
            flags = ("--redis", redis.url, "--redis-prefix", f"cost{block}{name}")
            if name == "none" and not against:
                flags = ()
            script = against if name == "none" else ""
            server = Wsboard("0", *flags, script=script)
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
    title = f"--redis here against {against}" if against else "--redis against none"
    print(f"\n## 1. One process, {title} ({count:,} sockets, {blocks} blocks each)\n")
    print("| figure | before | now | ratio |" if against else "| figure | none | --redis | ratio |")
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


class Gunicorn:
    """gunicorn -c gunicorn.conf.py -w N wsboard:app on Redis: N workers, one control socket."""

    def __init__(self, workers: int, redis: Redis, prefix: str, log_level: str = "warning"):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsboard-bench-")
        self.control_path = os.path.join(self.dir, "control.sock")
        env = {
            **os.environ, "WSBOARD_PORT": str(self.port), "WSBOARD_CONTROL": self.control_path,
            "WSBOARD_REDIS": redis.url, "WSBOARD_REDIS_PREFIX": prefix,
            "WSBOARD_LOG_LEVEL": log_level, "WSBOARD_MAX_CONNECTIONS": "19000",
            "WSBOARD_MAX_CONNECTIONS_PER_IP": "50000", "WSBOARD_MAX_HANDSHAKES_PER_IP": "1024",
            # A BROADCAST is answered once every process has written it: 16,700 sockets a
            # process, 6 or 7 processes on 2 cores, take more than the default 1 s.
            "WSBOARD_REDIS_TIMEOUT": "10",
        }  # fmt: skip
        self.proc = subprocess.Popen(
            ["taskset", "-c", f"0-{(os.cpu_count() or 1) - 1}",  # not the bench's own core
             sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-w", str(workers),
             "wsboard:app"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "log"), "wb"),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while self.backplane_processes() < workers or len(self.workers()) < workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start: {self.log()}")
            time.sleep(0.2)

    def ask(self, line: str) -> bytes:
        control = Control(self.control_path)
        try:
            control.sock.sendall(line.encode() + b"\n")
            return control.line()
        finally:
            control.sock.close()

    def backplane_processes(self) -> int:
        try:
            stats = json.loads(self.ask('{"op":"stats"}'))
        except (OSError, EOFError, ValueError):
            return 0
        return stats.get("backplane", {}).get("processes") or 0

    def workers(self) -> list:
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return [int(pid) for pid in f.read().split()]

    def rss_kb(self) -> int:
        total = 0
        for pid in self.workers():
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.workers():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    log = Server.log
    stop = Server.stop


def where(server: Gunicorn) -> dict:
    """Client id -> the number of the process that holds it (connection ids begin with it)."""
    clients = json.loads(server.ask('{"op":"list"}'))["clients"]
    return {c["id"]: c["conn"].split(".")[0] for c in clients}


def fleet_fanout(fleet: Fleet, control: Control, rounds: int) -> tuple:
    """BROADCAST to every open client of the fleet, rounds times after a warm-up round."""
    loops, ends = [], []
    for round_number in range(rounds + 1):
        live = fleet.arm_all(1)
        started = time.perf_counter()
        control.sock.sendall(f"BROADCAST {MESSAGE}\n".encode())
        answer = control.line()
        answered = time.perf_counter()
        assert answer == f"OK {live}".encode(), (answer, live)
        last = fleet.last_receive()
        if round_number:
            loops.append(answered - started)
            ends.append(last - started)
        time.sleep(0.2)
    return loops, ends


def fleet_publish(fleet: Fleet, control: Control, rounds: int) -> list:
    """PUBLISH to TENTH (a tenth of the fleet's clients, on every process): the command
    until the last member's receive, rounds times after a warm-up round."""
    ends = []
    for round_number in range(rounds + 1):
        live = fleet.arm_all(1, tenth=True)
        started = time.perf_counter()
        control.sock.sendall(f"PUBLISH {TENTH} {MESSAGE}\n".encode())
        answer = control.line()
        assert answer == f"OK {live}".encode(), (answer, live)
        last = fleet.last_receive()
        if round_number:
            ends.append(last - started)
        time.sleep(0.2)
    return ends


def fleet_sends(fleet: Fleet, control: Control, targets: list) -> list:
    """SEND latency to each (member, index) target: the command until its receive."""
    latencies = []
    for member, index in targets:
        client_id = fleet.arm_one(member, index, 1)
        started = time.perf_counter()
        control.sock.sendall(f"SEND MESSAGE {client_id} {MESSAGE}\n".encode())
        assert control.line() == b"OK"
        latencies.append(fleet.received_at(member) - started)
    return latencies


def fleet_pipelined(fleet: Fleet, control: Control, member: int, index: int, count: int) -> float:
    client_id = fleet.arm_one(member, index, count, timeout=120)
    batch = f"SEND MESSAGE {client_id} {MESSAGE}\n".encode() * count
    started = time.perf_counter()
    control.sock.sendall(batch)  # 20,000 answers fit in the socket's buffer meanwhile
    for _ in range(count):
        assert control.line() == b"OK"
    answered = time.perf_counter()
    return count / (max(answered, fleet.received_at(member)) - started)


PING_PERIOD = 25.0  # wsboard's default --ping-interval


def processes_on_one_control_socket(
    redis: Redis, per_process: int, layouts: list, rounds: int, sends: int, piped: int
) -> None:
    """gunicorn with N workers on Redis, per_process sockets each, all reached through the one
    control socket the master bound; a load generator process per 10,000 sockets."""
    rows, costs = [], []
    for workers in layouts:
        server = Gunicorn(workers, redis, f"gw{workers}")
        members = workers * max(1, per_process // 10000)
        fleet = Fleet(server.port, members)
        try:
            empty_kb = server.rss_kb()
            total = workers * per_process
            redis_cpu, redis_bytes = redis.cpu_seconds(), redis.used_memory()
            rate = fleet.connect(total // members)
            refused = fleet.info()["refused"]
            redis_handshake = (redis.cpu_seconds() - redis_cpu) / total
            redis_socket = (redis.used_memory() - redis_bytes) / total
            time.sleep(5)
            held = where(server)
            if len(held) != total:  # every client had its 101: say what became of the others
                missing = [i for m in range(members) for i in fleet.ids(m) if i not in held]
                print(f"{workers} workers: {len(missing):,} of {total:,} clients not listed, "
                      f"e.g. {missing[:3]}; fleet {fleet.info()}; log: {server.log()[-1500:]}",
                      flush=True)  # fmt: skip
                raise RuntimeError("clients went missing")
            spread = sorted(collections.Counter(held.values()).values(), reverse=True)
            kb = (server.rss_kb() - empty_kb) / total
            cpu = server.cpu_seconds()
            time.sleep(PING_PERIOD)  # a whole period: each worker's round comes in its own phase
            idle = (server.cpu_seconds() - cpu) / PING_PERIOD * 100
            control = Control(server.control_path)
            control.sock.sendall(b'{"op":"stats"}\n')
            mine = json.loads(control.line())["backplane"]["node"]
            loops, ends = fleet_fanout(fleet, control, rounds)
            channel = fleet_publish(fleet, control, rounds)
            # Targets spread over every member; each is local or not to this connection.
            ids = [fleet.ids(m) for m in range(members)]
            local, remote = [], []
            for i in range(sends):
                member = i % members
                index = (i * 7919) % len(ids[member])
                node = held[ids[member][index]]
                (local if str(node) == str(mine) else remote).append((member, index))
            local_ms = fleet_sends(fleet, control, local) if local else []
            remote_ms = fleet_sends(fleet, control, remote) if remote else []
            piped_local = piped_remote = None
            redis_send = None
            if local:
                piped_local = fleet_pipelined(fleet, control, *local[0], piped)
            if remote:
                redis_cpu = redis.cpu_seconds()
                piped_remote = fleet_pipelined(fleet, control, *remote[0], piped)
                redis_send = (redis.cpu_seconds() - redis_cpu) / piped
            rows.append((workers, total, spread, kb, server.rss_kb(), idle, rate, loops, ends,
                         local_ms, remote_ms, piped_local, piped_remote, channel))  # fmt: skip
            costs.append((workers, redis_handshake, redis_socket, redis_send, refused))
        finally:
            fleet.close()
            server.stop()
    print(f"\n## 4. gunicorn workers on Redis behind one control socket ({per_process:,} each, "
          "--redis-timeout 10)\n")  # fmt: skip
    print("| workers | sockets | per worker | KB/conn | RSS MB | idle CPU % | handshakes/s | "
          "BROADCAST OK ms | BROADCAST e2e ms (p99) | PUBLISH to a tenth e2e ms (p99) | "
          "SEND p50/p99 ms, holder | SEND p50/p99 ms, another worker | pipelined msg/s, "
          "holder | another worker |")  # fmt: skip
    print("|" + "---|" * 14)
    for (workers, total, spread, kb, rss, idle, rate, loops, ends, local_ms, remote_ms,
         piped_local, piped_remote, channel) in rows:  # fmt: skip
        e2e = f"{statistics.median(ends) * 1e3:.1f} ({p99(ends) * 1e3:.1f})"
        tenth = f"{statistics.median(channel) * 1e3:.1f} ({p99(channel) * 1e3:.1f})"
        print(f"| {workers} | {total:,} | {'/'.join(f'{n:,}' for n in spread)} | {kb:.2f} | "
              f"{rss / 1024:.0f} | {idle:.1f} | {rate:,.0f} | "
              f"{statistics.median(loops) * 1e3:.1f} | {e2e} | {tenth} | "
              f"{ms(local_ms) if local_ms else '—'} | {ms(remote_ms) if remote_ms else '—'} | "
              f"{f'{piped_local:,.0f}' if piped_local else '—'} | "
              f"{f'{piped_remote:,.0f}' if piped_remote else '—'} |")  # fmt: skip
    print(f"\nPUBLISH to a tenth: the channel {TENTH!r}, joined from the URL by every client whose "
          "id's CRC-32 is 0 modulo 10, on every worker.")  # fmt: skip
    print("\n| workers | Redis CPU per handshake us | Redis memory per socket bytes | "
          "Redis CPU per cross-process SEND us (pipelined) |")  # fmt: skip
    print("|---|---|---|---|")
    for workers, handshake, memory, send, _ in costs:
        send_us = f"{send * 1e6:.1f}" if send is not None else "—"
        print(f"| {workers} | {handshake * 1e6:.1f} | {memory:,.0f} | {send_us} |")
    for workers, *_, refused in costs:
        if refused:
            print(f"\n{workers} workers: {refused:,} handshakes were refused with 503 (a worker "
                  "at --max-connections) and tried again by the load generator.")  # fmt: skip


def restart_storm(redis: Redis, total: int, workers: int, delay: float) -> None:
    """gunicorn with workers on Redis and total sockets over them; each worker in turn gets
    SIGTERM (wsboard drains: 1001 closes spread over --drain-window) and gunicorn starts its
    replacement once it is gone; the next worker goes when the replacement's link is up.
    The clients come back as wsboard.js does (a random delay in [delay/2, delay), doubled
    after each refusal). Time from the first SIGTERM until every client is open again, and
    the handshake rate: over the whole storm and the busiest second."""
    server = Gunicorn(workers, redis, "storm")
    members = max(workers, -(-total // 15000))  # under 20,000 descriptors each, with room
    fleet = Fleet(server.port, members)
    try:
        fleet.connect(total // members)
        total = total // members * members
        time.sleep(5)
        spread_before = sorted(collections.Counter(where(server).values()).values())
        fleet.storm(delay)
        started = time.perf_counter()
        phases = []  # per worker: seconds until it was gone, until its replacement linked
        for pid in server.workers():
            killed = time.perf_counter()
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 120
            while pid in server.workers():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {pid} did not stop: {server.log()[-800:]}")
                time.sleep(0.05)
            gone = time.perf_counter()
            while len(server.workers()) < workers or server.backplane_processes() < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {pid} was not replaced: {server.log()[-800:]}")
                time.sleep(0.05)
            phases.append((gone - killed, time.perf_counter() - gone))
        restarted = time.perf_counter()
        deadline = time.monotonic() + 600
        while True:
            info = fleet.storm_info()
            if info["open"] >= total and not info["waiting"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the storm did not settle: {info}")
            time.sleep(0.5)
        info = fleet.storm_info(reopens=True)
        reopens = info.pop("reopens")
        spread_after = sorted(collections.Counter(where(server).values()).values())
    finally:
        fleet.close()
        server.stop()
    back = reopens[-1] - started
    per_second = collections.Counter(int(t - started) for t in reopens)
    busiest = max(per_second.values())
    print(f"\n## 5. Restart storm: {workers} gunicorn workers restarted one by one, "
          f"{total:,} sockets\n")  # fmt: skip
    print("| figure | value |")
    print("|---|---|")
    rows = [
        ("sockets per worker before", "/".join(f"{n:,}" for n in spread_before)),
        ("every worker restarted after s", f"{restarted - started:.1f}"),
        (
            "a worker: s until gone (drained), then until its replacement is linked",
            ", ".join(f"{a:.1f} + {b:.1f}" for a, b in phases),
        ),
        ("every client back after s (from the first SIGTERM)", f"{back:.1f}"),
        ("closes seen / reconnects made", f"{info['lost']:,} / {info['reconnected']:,}"),
        ("reconnects refused or cut (tried again)", f"{info['refused']:,}"),
        ("handshakes/s over the storm", f"{len(reopens) / (reopens[-1] - reopens[0]):,.0f}"),
        ("handshakes/s in the busiest second", f"{busiest:,}"),
        ("sockets per worker after", "/".join(f"{n:,}" for n in spread_after)),
    ]
    for label, value in rows:
        print(f"| {label} | {value} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--pipelined", type=int, default=20000)
    parser.add_argument("--parts", default="1,2,3,4", help="of 1,2,3,4,5 (5: the restart storm)")
    parser.add_argument("--workers", default="1,2,4", help="gunicorn worker counts of part 4")
    parser.add_argument("--per-process", type=int, default=10000, help="sockets a worker, part 4")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of part 1, taking turns")
    parser.add_argument(
        "--storm", default="7,100000", metavar="WORKERS,SOCKETS",
        help="part 5: gunicorn workers restarted one by one, and the sockets over them",
    )  # fmt: skip
    parser.add_argument(
        "--against", default="", metavar="PATH",
        help="part 1 as an A/B run: --redis with PATH (another checkout's wsboard.py) "
        "against --redis with this one",
    )  # fmt: skip
    parser.add_argument(
        "--spread", type=int, default=4500,
        help="sockets per process in part 3 (4 of them, all in this process's load generator)",
    )  # fmt: skip
    args = parser.parse_args()
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if "3" in args.parts.split(",") and 4 * args.spread + 500 > hard:
        sys.exit(f"part 3 needs {4 * args.spread + 500} descriptors; the hard limit is {hard}")
    os.sched_setaffinity(0, {1})
    redis = Redis(os.environ.get("REDIS_CORES", "0"))
    try:
        parts = args.parts.split(",")
        if "1" in parts:
            single_process_cost(
                redis, args.count, args.rounds, args.sends, args.pipelined, args.blocks,
                args.against,
            )  # fmt: skip
        if "2" in parts:
            cross_process(redis, args.count, args.sends, args.pipelined)
        if "3" in parts:
            broadcast_over_processes(redis, args.spread, args.rounds)
        if "4" in parts:
            layouts = [int(n) for n in args.workers.split(",")]
            processes_on_one_control_socket(
                redis, args.per_process, layouts, args.rounds, args.sends, args.pipelined
            )
        if "5" in parts:
            workers, total = (int(n) for n in args.storm.split(","))
            restart_storm(redis, total, workers, 0.5)
    finally:
        redis.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
