"""Load generators in several processes, for more sockets than one process may open.

One process may hold about 20,000 descriptors on this machine (its hard limit), so 40,000
clients need a fleet: each member is a forked child running one Swarm (loadgen.py), driven
over a pipe. Times are time.perf_counter() values, which on Linux read CLOCK_MONOTONIC, one
clock for every process of the machine: a child's receive time and the parent's send time
subtract. Members never spin while they wait (several spinning readers on two cores would
starve the servers), so a fan-out's end-to-end time here includes the loopback wake-ups.
"""

import multiprocessing
import os
import time
import zlib

from loadgen import Swarm

TENTH = "tenth"  # the channel a tenth of the fleet's clients join from their URL


def in_tenth(client_id: str) -> bool:
    return zlib.crc32(client_id.encode()) % 10 == 0


def tenth_query(client_id: str) -> str:
    return f"&channel={TENTH}" if in_tenth(client_id) else ""


def _member(conn, port: int) -> None:
    """A child's loop: answer the parent's commands; between them, keep the sockets served."""
    os.sched_setaffinity(0, range(os.cpu_count() or 1))  # the parent may be pinned: not us
    swarm = Swarm(port, query=tenth_query)
    while True:
        swarm.pump(conn.poll, timeout=24 * 3600)  # pings answered while no command waits
        command, *args = conn.recv()
        if command == "connect":
            count, prefix = args
            conn.send(swarm.connect(count, prefix=prefix, timeout=600, retry_503=True))
        elif command == "expect":  # n more for each open client, then the last receive time
            n, timeout = args
            live = sum(c.open for c in swarm.clients.values())
            target = swarm.received() + n * live
            conn.send(("armed", live))
            try:
                swarm.pump(lambda t=target: swarm.received() >= t, timeout=timeout)
                conn.send(swarm.last_receive())
            except TimeoutError:
                conn.send(None)
        elif command == "expect_tenth":  # n more for each open client in TENTH
            n, timeout = args
            members = [c for c in swarm.clients.values() if c.open and in_tenth(c.client_id)]
            target = sum(c.received for c in members) + n * len(members)
            conn.send(("armed", len(members)))
            try:
                swarm.pump(
                    lambda m=members, t=target: sum(c.received for c in m) >= t, timeout=timeout
                )
                conn.send(max((c.last_at for c in members), default=0.0))
            except TimeoutError:
                conn.send(None)
        elif command == "expect_one":  # client index gets n more, report when the last came
            index, n, timeout = args
            client = swarm.client(index)
            target = client.received + n
            conn.send(("armed", client.client_id))
            try:
                swarm.pump(lambda c=client, t=target: c.received >= t, timeout=timeout)
                conn.send(client.last_at)
            except TimeoutError:
                conn.send(None)
        elif command == "storm":  # from now on, clients the server closes come back
            swarm.keep_reconnecting(*args)
            conn.send("storming")
        elif command == "storm_info":
            conn.send({
                "open": swarm.open_count(), "lost": swarm.lost,
                "reconnected": swarm.reconnected, "refused": swarm.refused,
                "waiting": len(swarm.due) + len(swarm.handshaking),
                "reopens": swarm.reopens if args and args[0] else [],
            })  # fmt: skip
        elif command == "info":
            conn.send({"clients": len(swarm.clients), "lost": swarm.lost, "pings": swarm.pings,
                       "refused": swarm.refused})  # fmt: skip
        elif command == "ids":
            conn.send([c.client_id for c in swarm.clients.values()])
        elif command == "close":
            swarm.close()
            conn.send("closed")
            return


class Fleet:
    """size load-generator processes, all clients of one port."""

    def __init__(self, port: int, size: int) -> None:
        context = multiprocessing.get_context("fork")
        self.pipes, self.processes = [], []
        for _ in range(size):
            parent, child = context.Pipe()
            process = context.Process(target=_member, args=(child, port), daemon=True)
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def connect(self, per_member: int, prefix: str = "f") -> float:
        """Every member opens per_member clients at once; return handshakes/s over all."""
        started = time.perf_counter()
        for n, pipe in enumerate(self.pipes):
            pipe.send(("connect", per_member, f"{prefix}{n}x"))
        for pipe in self.pipes:
            pipe.recv()
        return per_member * len(self.pipes) / (time.perf_counter() - started)

    def arm_all(self, n_each: int, timeout: float = 60, tenth: bool = False) -> int:
        """Every open client (in TENTH only, with tenth) must get n_each more messages;
        returns how many clients that is."""
        for pipe in self.pipes:
            pipe.send(("expect_tenth" if tenth else "expect", n_each, timeout))
        live = 0
        for pipe in self.pipes:
            armed, count = pipe.recv()
            assert armed == "armed"
            live += count
        return live

    def last_receive(self) -> float:
        """After arm_all: the latest receive time of every member (None if one timed out)."""
        times = [pipe.recv() for pipe in self.pipes]
        if None in times:
            raise TimeoutError("a fleet member did not receive what it waited for")
        return max(times)

    def arm_one(self, member: int, index: int, n: int, timeout: float = 60) -> str:
        """Member's client number index must get n more messages; returns its id."""
        pipe = self.pipes[member]
        pipe.send(("expect_one", index, n, timeout))
        armed, client_id = pipe.recv()
        assert armed == "armed"
        return client_id

    def received_at(self, member: int) -> float:
        at = self.pipes[member].recv()
        if at is None:
            raise TimeoutError("a fleet client did not receive what it waited for")
        return at

    def info(self) -> dict:
        """Clients opened, closed by the server and pings answered, over every member."""
        for pipe in self.pipes:
            pipe.send(("info",))
        answers = [pipe.recv() for pipe in self.pipes]
        return {key: sum(a[key] for a in answers) for key in answers[0]}

    def storm(self, delay: float = 0.5) -> None:
        """Every member's clients reconnect, as wsboard.js does, whenever the server closes
        them (a restart storm)."""
        for pipe in self.pipes:
            pipe.send(("storm", delay))
        for pipe in self.pipes:
            assert pipe.recv() == "storming"

    def storm_info(self, reopens: bool = False) -> dict:
        """Open clients, closes, reconnects made and refused, reconnects still to make, over
        every member; reopens: every reconnect's time (perf_counter), sorted."""
        for pipe in self.pipes:
            pipe.send(("storm_info", reopens))
        answers = [pipe.recv() for pipe in self.pipes]
        total = {key: sum(a[key] for a in answers) for key in answers[0] if key != "reopens"}
        total["reopens"] = sorted(t for a in answers for t in a["reopens"])
        return total

    def ids(self, member: int) -> list:
        self.pipes[member].send(("ids",))
        return self.pipes[member].recv()

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("close",))
                pipe.recv()
            except (OSError, EOFError):
                pass
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
