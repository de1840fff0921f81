"""wsboard's benchmark: wsboard and its peers, side by side in one run, on this machine.

    bench/run [--quick]

For each server (wsboard, the `websockets` library, Node.js `ws`, python-socketio) and each
connection count, it starts the server pinned to core 0 and holds N idle clients from this
process pinned to core 1 (bench/loadgen.py). Then it measures:

1. RSS per idle connection (VmRSS over the empty server's, divided by N) and idle CPU with
   heartbeats on;
2. broadcast fan-out of a 100-byte message: command -> the server's OK (its send loop) and
   command -> last receive (end to end), against the kernel floor (bench/floor.py);
3. targeted SEND latency, command -> receive, p50 and p99, with the N clients open;
4. pipelined SEND throughput to one socket over one control connection, after a warm-up
   run that is not counted (Node's JIT and every server's caches come up to speed);
   2, 3 and 4 in blocks that take turns between the servers (and the floor);
5. the handshake (accept) rate while the N clients connect;
6. 2 and 3 again with one client present that never reads.

It writes bench/results/<date>.md and .png. Every loop is bounded in count and time, and
only loopback addresses are used.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from loadgen import EIO_CONNECT, Swarm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MESSAGE = "m" * 100
HANDSHAKE = (
    "GET {path}stuck HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)


def server_commands(port: int, control: str) -> dict:
    python = sys.executable
    return {
        "wsboard": [
            python,
            os.path.join(ROOT, "wsboard.py"),
            "--port",
            str(port),
            "--control",
            control,
            "--log-level",
            "warning",
            "--max-connections-per-ip",
            "20000",
            "--max-connections",
            "20000",
        ],
        "websockets": [
            python,
            os.path.join(HERE, "peers", "websockets_peer.py"),
            str(port),
            control,
        ],
        "node-ws": [
            "node",
            os.path.join(HERE, "peers", "node_ws", "server.js"),
            str(port),
            control,
        ],
        "socketio": [python, os.path.join(HERE, "peers", "socketio_peer.py"), str(port), control],
    }


SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket&id="


def path_of(name: str) -> str:
    return SOCKETIO_PATH if name == "socketio" else "/websocket?id="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Control:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.buffer = b""

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("control socket closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


class Server:
    def __init__(self, name: str, extra: Sequence[str] = (), env: dict | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsboard-bench-")
        self.control_path = os.path.join(self.dir, "control.sock")
        commands = server_commands(self.port, self.control_path)
        if name.startswith("wsboard@"):  # another checkout's wsboard.py, for an A/B run
            command = [*commands["wsboard"]]
            command[1] = name.split("@", 1)[1]
        else:
            command = commands[name]
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", *command, *extra],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "log"), "wb"),
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.control_path) or not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self.log()}")
            time.sleep(0.05)
        time.sleep(0.5)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        with open(os.path.join(self.dir, "log"), errors="replace") as f:
            return f.read()[-2000:]

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def p99(values: list) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


def fanout(
    swarm: Swarm, control: Control, n: int, rounds: int, command: str = f"BROADCAST {MESSAGE}"
) -> tuple:
    """Seconds of each round of a broadcast to n, as three lists: the server's send loop
    (command -> OK), end to end (command -> last receive), and the load generator's own time
    spent reading.

    The answer and the clients are read in one loop while the server still sends, as a fleet
    of browsers would receive; waiting for the OK first would add the whole drain to "end to
    end". The clients spin rather than sleep meanwhile (see Swarm.pump). One warm-up round,
    not counted, goes first: the first broadcast after an idle spell finds cold caches."""
    loops, ends, own = [], [], []
    control.sock.setblocking(False)
    swarm.poller.register(control.sock.fileno(), select.EPOLLIN)
    try:
        for round_number in range(rounds + 1):
            before = swarm.received()
            answered: list = []

            def done(b: int = before, answered: list = answered) -> bool:
                if not answered:
                    try:
                        control.buffer += control.sock.recv(1 << 16)
                    except BlockingIOError:
                        pass
                    if b"\n" in control.buffer:
                        answered.append(time.perf_counter())
                return bool(answered) and swarm.received() >= b + n

            busy = swarm.busy
            started = time.perf_counter()
            control.sock.sendall(f"{command}\n".encode())
            swarm.pump(done, timeout=60, spin=True)
            answer = control.line()
            assert answer.startswith(b"OK"), answer
            if round_number:
                loops.append(answered[0] - started)
                ends.append(swarm.last_receive() - started)
                own.append(swarm.busy - busy)
            time.sleep(0.1)
    finally:
        swarm.poller.unregister(control.sock.fileno())
        control.sock.settimeout(60)
    return loops, ends, own


def send_latency(swarm: Swarm, control: Control, count: int) -> list:
    latencies = []
    size = len(swarm.clients)
    for i in range(count):
        client = swarm.client((i * 7919) % size)
        before = client.received
        started = time.perf_counter()
        control.sock.sendall(f"SEND MESSAGE {client.client_id} {MESSAGE}\n".encode())
        swarm.pump(lambda c=client, b=before: c.received > b, timeout=10)
        latencies.append(client.last_at - started)
        control.line()
    return latencies


def pipelined(
    swarm: Swarm, control: Control, count: int, line: str = "", targets: int = 1
) -> float:
    """Messages/s: count SENDs to one socket (or count of line, which reaches that socket
    once) written at once, until every answer is read and every message received. Answers
    and messages are read as they come, in one loop, so the measurement is not the load
    generator's own reading order. targets > 1: the SENDs go round-robin to that many
    sockets (each a different id), so no two in a row share a route."""
    clients = [swarm.client(n) for n in range(targets)]
    before = sum(client.received for client in clients)
    if targets > 1:
        lines = [f"SEND MESSAGE {c.client_id} {MESSAGE}\n".encode() for c in clients]
        batch = b"".join(lines[n % targets] for n in range(count))
    else:
        line = line or f"SEND MESSAGE {clients[0].client_id} {MESSAGE}"
        batch = f"{line}\n".encode() * count
    answers = control.buffer.count(b"\n")
    control.sock.setblocking(False)
    swarm.poller.register(control.sock.fileno(), select.EPOLLIN)

    def done() -> bool:
        nonlocal answers
        try:
            data = control.sock.recv(1 << 20)
            assert b"ERROR" not in data, data[:80]
            answers += data.count(b"\n")
        except BlockingIOError:
            pass
        return answers >= count and sum(c.received for c in clients) >= before + count

    writable = select.poll()  # not select(): descriptors here go far past 1024
    writable.register(control.sock.fileno(), select.POLLOUT)
    try:
        started = time.perf_counter()
        view = memoryview(batch)
        while view:  # non-blocking: write what fits, read what came, repeat
            try:
                view = view[control.sock.send(view) :]
            except BlockingIOError:
                writable.poll(1000)
                done()
        swarm.pump(done, timeout=120)
        return count / (time.perf_counter() - started)
    finally:
        swarm.poller.unregister(control.sock.fileno())
        control.sock.settimeout(60)
        control.buffer = b""


def gc_stats(control: Control, name: str) -> dict | None:
    """wsboard's own count and longest time of full collections; the peers have none."""
    if not name.startswith("wsboard"):
        return None
    control.sock.sendall(b'{"op":"stats"}\n')
    return json.loads(control.line())["gc"]


def kernel_floor(n: int, rounds: int) -> list:
    """Seconds of each round of n raw writes, read as they arrive by another process."""
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "floor.py"), str(n), str(rounds)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    return [float(x) for x in out.split()]


# Long enough for every server's housekeeping after a burst of connections (wsboard freezes
# its collector's objects within a second of them), short enough that a block ends before
# the first ping round.
SETTLE = 12.0


def interleaved_blocks(
    names: list, n: int, blocks: int, rounds: int, settle: float, sends: int, piped: int
) -> dict:
    """Fan-out rounds, SEND latency and pipelined SEND per server (and the kernel floor's
    fan-out), taken in blocks that take turns.

    This machine is shared: a server measured a few minutes after another can meet a slower
    machine, and one measurement of a few hundred milliseconds can meet a busy moment. So
    each server runs `blocks` times, in turns with the others (and in reverse order every
    other block), each time on fresh connections, all before its first ping round: `rounds`
    fan-out rounds, `sends` targeted SENDs, a warm-up pipelined run of piped / 4 lines and
    three of piped. Returns {name: {"loops", "ends", "latencies", "rates"}}, every round,
    send and run of every block."""
    results: dict = {
        name: {"loops": [], "ends": [], "latencies": [], "rates": [], "blocks": []}
        for name in [*names, "floor"]
    }
    for block in range(blocks):
        order = [*names, "floor"] if block % 2 == 0 else ["floor", *reversed(names)]
        for name in order:
            print(f"  block {block + 1}/{blocks}: {name}", flush=True)
            if name == "floor":
                loops = kernel_floor(n, rounds)
                results[name]["loops"].extend(loops)
                results[name]["blocks"].append({"loop": statistics.median(loops)})
                continue
            server = Server(name)
            swarm = Swarm(server.port, path_of(name), socketio=name == "socketio")
            try:
                swarm.connect(n)
                swarm.idle(settle)
                control = Control(server.control_path)
                loops, ends, _ = fanout(swarm, control, n, rounds)
                latencies = send_latency(swarm, control, sends)
                pipelined(swarm, control, max(1, piped // 4))  # warm-up, not counted
                rates = [pipelined(swarm, control, piped) for _ in range(3)]
                for key, values in (
                    ("loops", loops),
                    ("ends", ends),
                    ("latencies", latencies),
                    ("rates", rates),
                ):
                    results[name][key].extend(values)
                results[name]["blocks"].append(
                    {
                        "loop": statistics.median(loops),
                        "e2e": statistics.median(ends),
                        "p50": statistics.median(latencies),
                        "rate": statistics.median(rates),
                    }
                )
            finally:
                swarm.close()
                server.stop()
    return results


def measure(name: str, n: int, rounds: int, latency_count: int, quick: bool = False) -> dict:
    """The figures taken on one server alone: memory, idle CPU, accepts, and fan-out and SEND
    with a client that never reads (interleaved_blocks takes the others)."""
    server = Server(name)
    swarm = Swarm(server.port, path_of(name), socketio=name == "socketio")
    stuck = None
    try:
        empty = server.rss_kb()
        accept_rate = swarm.connect(n)
        # Every server pings each socket every 25 s, and answering 10k pings takes the load
        # generator ~100 ms: wait for a round to end.
        # --quick, a smoke run, waits for no ping round and takes idle CPU over 3 s.
        if quick:
            swarm.idle(1)
        else:
            swarm.pump(lambda: swarm.pings >= n, timeout=60)
            time.sleep(0.5)
        per_conn = (server.rss_kb() - empty) * 1024 / n / 1000
        # Idle CPU over one whole heartbeat period, one ping round and all its pongs
        # included: from a second after one round's last ping came to a second after the
        # next's, since a server that pings everyone at once reads the pongs after its last
        # ping. Then measure in the quiet that follows (the scenarios take about 13 s of 25).
        if not quick:
            swarm.idle(0.5)
        cpu_before, wall = server.cpu_seconds(), time.perf_counter()
        if quick:
            swarm.idle(3)
        else:
            swarm.pump(lambda target=swarm.pings + n: swarm.pings >= target, timeout=60)
            swarm.idle(1.0)
        idle_cpu = 100 * (server.cpu_seconds() - cpu_before) / (time.perf_counter() - wall)
        control = Control(server.control_path)
        gc_before = gc_stats(control, name)
        _, ends, reads = fanout(swarm, control, n, rounds)
        gc_after = gc_stats(control, name)
        stuck = socket.create_connection(("127.0.0.1", server.port))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(HANDSHAKE.format(path=path_of(name)).encode())
        if name == "socketio":
            time.sleep(0.2)
            stuck.sendall(EIO_CONNECT)
        time.sleep(0.5)
        for _ in range(20):  # fill its buffers: it never reads
            control.sock.sendall(f"SEND MESSAGE stuck {'s' * 60000}\n".encode())
            control.line()
        _, slow_ends, _ = fanout(swarm, control, n, rounds)
        slow_latencies = send_latency(swarm, control, latency_count)
        return {
            "server": name,
            "n": n,
            "kb_per_conn": per_conn,
            "idle_cpu": idle_cpu,
            "accept_rate": accept_rate,
            "loadgen_ms": statistics.median(reads) * 1000,
            "before_stuck_ms": statistics.median(ends) * 1000,
            "slow_fanout_ms": statistics.median(slow_ends) * 1000,
            "gc_max_ms": gc_after["max_ms"] if gc_after else None,
            "gc_in_fanout": gc_after["full"] - gc_before["full"] if gc_after else None,
            "slow_send_p99_ms": p99(slow_latencies) * 1000,
        }
    finally:
        if stuck is not None:
            stuck.close()
        swarm.close()
        server.stop()


COLUMNS = [
    ("server", "server", "{}"),
    ("n", "conns", "{:,}"),
    ("kb_per_conn", "KB/conn", "{:.1f}"),
    ("idle_cpu", "idle CPU %", "{:.1f}"),
    ("accept_rate", "accepts/s", "{:,.0f}"),
    ("loop_ms", "fan-out loop ms", "{:.1f}"),
    ("fanout_ms", "fan-out e2e ms", "{:.1f}"),
    ("fanout_p99_ms", "e2e p99 ms", "{:.1f}"),
    ("loadgen_ms", "load generator read ms", "{:.1f}"),
    ("send_p50_ms", "SEND p50 ms", "{:.3f}"),
    ("send_p99_ms", "SEND p99 ms", "{:.3f}"),
    ("pipelined", "pipelined msg/s", "{:,.0f}"),
    ("before_stuck_ms", "e2e before the stuck client ms", "{:.1f}"),
    ("slow_fanout_ms", "e2e with a stuck client ms", "{:.1f}"),
    ("slow_send_p99_ms", "SEND p99 with a stuck client ms", "{:.3f}"),
    ("gc_max_ms", "longest full GC ms", "{:.1f}"),
    ("gc_in_fanout", "full GCs in fan-out rounds", "{}"),
]


def block_lines(spread: dict) -> str:
    """Each block's medians, server by server: how far this run's figures moved from one
    block to the next (the table's are over all blocks)."""
    figures = [("loop", "loop", 1000, "{:.1f}"), ("e2e", "e2e", 1000, "{:.1f}")]
    figures += [("p50", "p50", 1e6, "{:.0f}"), ("rate", "pipelined", 1, "{:,.0f}")]
    lines = ["Each block's medians, in the order taken (loop and e2e ms, SEND p50 µs, msg/s):", ""]
    for n, taken in spread.items():
        for name, blocks in taken.items():
            parts = [
                title + " " + " ".join(fmt.format(block[key] * scale) for block in blocks)
                for key, title, scale, fmt in figures
                if blocks and key in blocks[0]
            ]
            lines.append(f"- {n:,} conns, {name}: " + "; ".join(parts))
    return "\n".join(lines)


def table(rows: list, floors: dict) -> str:
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                "—" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS
            )
            + " |"
        )
    lines.append("")
    lines.append(
        "Kernel floor (the same N raw 102-byte loopback writes, no framing, read as they "
        "arrive by a process on core 1, in the same turns as the fan-out): "
        + ", ".join(
            f"{n:,} conns {statistics.median(times) * 1000:.1f} ms (p99 {p99(times) * 1000:.1f} ms)"
            for n, times in floors.items()
        )
    )
    lines.append("")
    lines.append(
        "Ratios, wsboard / peer, same connection count (lower is better, except accepts and msg/s):"
    )
    lines.append("")
    for n in sorted({r["n"] for r in rows}):
        ours = next((r for r in rows if r["server"] == "wsboard" and r["n"] == n), None)
        if ours is None:  # a run without wsboard has no ratios
            continue
        for peer in (r for r in rows if r["server"] != "wsboard" and r["n"] == n):
            ratios = ", ".join(
                f"{title} {ours[key] / peer[key]:.2f}"
                for key, title, _ in COLUMNS[2:]
                if peer[key] and key != "loadgen_ms"
            )
            lines.append(f"- {n:,} conns, vs {peer['server']}: {ratios}")
    return "\n".join(lines)


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name]
        counts = [r["n"] for r in mine]
        left.plot(counts, [r["fanout_ms"] for r in mine], marker="o", label=name)
        right.plot(counts, [r["send_p99_ms"] for r in mine], marker="o", label=name)
    left.set(title="Broadcast fan-out, end to end (median)", xlabel="connections", ylabel="ms")
    right.set(title="Targeted SEND latency (p99)", xlabel="connections", ylabel="ms")
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a one-minute smoke run: 1,000 connections, no waits"
    )
    parser.add_argument(
        "--servers",
        default="wsboard,websockets,node-ws,socketio",
        help="comma-separated; wsboard@PATH runs the wsboard.py at PATH (another checkout, "
        "for an A/B run against the code before)",
    )
    parser.add_argument("--counts", help="connection counts, e.g. 1000,10000")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    gc.disable()  # the load generator's own pauses would land in the servers' figures
    counts = [1000] if args.quick else [1000, 10000]
    if args.counts:
        counts = [int(c) for c in args.counts.split(",")]
    # Five blocks of 2,000 SENDs: with three of 300 (30 ms of SENDs each), one
    # busy moment of this shared machine moved a server's SEND p50 by a fifth.
    rounds, latency_count, pipeline_count = (3, 100, 5000) if args.quick else (7, 2000, 20000)
    blocks, settle = (1, 3.0) if args.quick else (5, SETTLE)
    names = args.servers.split(",")
    rows, floors, spread = [], {}, {}
    for n in counts:
        print(f"{n:,} connections, {blocks} blocks in turns…", flush=True)
        taken = interleaved_blocks(names, n, blocks, rounds, settle, latency_count, pipeline_count)
        floors[n] = taken["floor"]["loops"]
        spread[n] = {name: taken[name]["blocks"] for name in [*names, "floor"]}
        for name in names:
            print(f"{name} with {n:,} connections…", flush=True)
            row = measure(name, n, rounds, latency_count, args.quick)
            block = taken[name]
            row["loop_ms"] = statistics.median(block["loops"]) * 1000
            row["fanout_ms"] = statistics.median(block["ends"]) * 1000
            row["fanout_p99_ms"] = p99(block["ends"]) * 1000
            row["send_p50_ms"] = statistics.median(block["latencies"]) * 1000
            row["send_p99_ms"] = p99(block["latencies"]) * 1000
            row["pipelined"] = statistics.median(block["rates"])
            rows.append(row)
            print(
                "  "
                + ", ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                ),
                flush=True,
            )
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    base = os.path.join(HERE, "results", stamp + ("-quick" if args.quick else ""))
    body = table(rows, floors)
    with open(base + ".md", "w") as f:
        f.write(
            f"# wsboard benchmark, {stamp}\n\n`bench/run{' --quick' if args.quick else ''}` on "
            f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"server on core 0, load generator on core 1. Fan-out, SEND latency and pipelined "
            f"SEND: {blocks} blocks per server, the servers taking turns, each {rounds} fan-out "
            f"rounds, {latency_count} SENDs and 3 pipelined runs of {pipeline_count:,} after a "
            f"warm-up; medians and p99 over every block.\n\n{body}\n\n{block_lines(spread)}\n"
        )
    plot(rows, base + ".png")
    print(body)
    print(f"\nwrote {base}.md and {base}.png")


if __name__ == "__main__":
    main()
