"""Hosts apart: wsboard processes and Redis each in a network namespace of their own (ip
netns, veth pairs on a bridge), and the network between them broken for real: a host cut
off (its veth down) and healed, and a link to Redis made slow and lossy by a TCP proxy of
the test's own (this kernel has no tc netem). Needs root; skipped, saying why, without."""

import os
import random
import select
import socket
import subprocess
import threading
import time

import pytest
import websocket
from conftest import Control, Server, ask_json, new_prefix, wait_until


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Hosts:
    """Network namespaces on one bridge: host n is 10.<net>.0.n; the test (the root
    namespace) is 10.<net>.0.254 and reaches every host through the bridge."""

    def __init__(self, names: list) -> None:
        self.tag = f"{os.getpid() % 1000}{random.randrange(100)}"
        self.net = f"10.{200 + random.randrange(50)}.{random.randrange(250)}"
        self.bridge = f"wbr{self.tag}"
        self.made: list = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.net}.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        self.address, self.namespace, self.outside = {}, {}, {}
        for n, name in enumerate(names, 1):
            namespace, outside, inside = (
                f"wsb{self.tag}{name}",
                f"w{self.tag}{n}o",
                f"w{self.tag}{n}i",
            )
            ip("netns", "add", namespace)
            self.made.append(namespace)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", namespace)
            ip("link", "set", outside, "master", self.bridge)
            ip("link", "set", outside, "up")
            run = ("netns", "exec", namespace, "ip")
            ip(*run, "addr", "add", f"{self.net}.{n}/24", "dev", inside)
            ip(*run, "link", "set", inside, "up")
            ip(*run, "link", "set", "lo", "up")
            self.address[name], self.namespace[name] = f"{self.net}.{n}", namespace
            self.outside[name] = outside

    def run_in(self, name: str) -> list:
        return ["ip", "netns", "exec", self.namespace[name]]

    def cut(self, name: str) -> None:
        """The host loses the network: no packet in or out, no reset either."""
        ip("link", "set", self.outside[name], "down")

    def heal(self, name: str) -> None:
        ip("link", "set", self.outside[name], "up")

    def close(self) -> None:
        for namespace in self.made:
            ip("netns", "del", namespace, check=False)
        ip("link", "del", self.bridge, check=False)


def netns_refusal() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    probe = f"wsbprobe{os.getpid()}"
    try:
        made = ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "needs iproute2's ip"
    if made.returncode != 0:
        return f"ip netns add is not permitted here: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def hosts():
    why = netns_refusal()
    if why:
        pytest.skip(why)
    made = []

    def make(names: list) -> Hosts:
        made.append(Hosts(names))
        return made[-1]

    yield make
    for one in made:
        one.close()


@pytest.fixture
def redis_host():
    """redis-server started on a host of its own."""
    procs = []

    def start(hosts: Hosts, name: str, directory) -> str:
        os.makedirs(directory, exist_ok=True)
        proc = subprocess.Popen(
            [*hosts.run_in(name), "redis-server", "--bind", hosts.address[name], "--port", "6379",
             "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir",
             str(directory), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proc)
        address = hosts.address[name]
        wait_until(lambda: _answers(address, 6379), what="redis-server on its host")
        return f"redis://{address}:6379/0"

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def wsboard_on(hosts: Hosts, name: str, server_factory, tmp_path, *args: str) -> Server:
    """wsboard on host name, made by server_factory so that it is stopped after the test
    (before the hosts go: a process left in a namespace outlives it)."""
    server = server_factory("--control", str(tmp_path / f"{name}.sock"), *args, start=False)
    server.host = hosts.address[name]
    server.args += ["--host", server.host]
    server.wrapper = hosts.run_in(name)
    return server.start().wait_linked()


def answer(server: Server, line: str) -> str:
    control = Control(server.control_path)
    try:
        return control.ask(line)
    finally:
        control.close()


def test_a_host_cut_off_from_redis_answers_truthfully_and_heals_without_a_restart(
    hosts, redis_host, server_factory, tmp_path
):
    net = hosts(["redis", "a", "b"])
    url = redis_host(net, "redis", tmp_path / "redis")
    common = ("--redis", url, "--redis-prefix", new_prefix(), "--node-timeout", "2")
    a = wsboard_on(net, "a", server_factory, tmp_path, *common)
    b = wsboard_on(net, "b", server_factory, tmp_path, *common)
    on_a = websocket.create_connection(a.ws_url("on-a"), timeout=20)
    on_b = websocket.create_connection(b.ws_url("on-b"), timeout=20)
    assert answer(b, "SEND MESSAGE on-a before") == "OK"
    assert on_a.recv() == "before"

    net.cut("a")  # host a is alone: no Redis, no b, no test traffic through the bridge
    # a's answers about what needs Redis say so, never OK; about its own socket, they are true
    unknown = ("ERROR Backplane Unavailable", "ERROR Timeout")
    wait_until(lambda: answer(a, "SEND MESSAGE on-b x") in unknown, what="a to notice")
    assert answer(a, "SEND MESSAGE on-a during") == "OK"  # its kernel holds it for the socket
    # b's answers about its own socket stay true; about a's: Timeout until a is reaped
    assert answer(b, "SEND MESSAGE on-b still here") == "OK"
    assert on_b.recv() == "still here"
    told = []
    gone = "ERROR Client Not Found"
    wait_until(
        lambda: told.append(answer(b, "SEND MESSAGE on-a y")) or told[-1] == gone,
        timeout=20,
        what="a reaped after --node-timeout",
    )
    assert set(told) <= {"ERROR Timeout", "ERROR Client Not Found"}, told  # never a false OK

    net.heal("a")  # everything comes back by itself
    wait_until(lambda: answer(b, "SEND MESSAGE on-a after") == "OK", timeout=30, what="the heal")
    # the same TCP connection; a send answered Timeout may have been carried out after all
    assert [m for m in received_until(on_a, "after") if m != "y"] == ["during", "after"]
    assert answer(a, "SEND MESSAGE on-b back") == "OK"
    assert [m for m in received_until(on_b, "back") if m != "x"] == ["back"]
    on_a.close()
    on_b.close()


def received_until(ws, last: str) -> list:
    got = [ws.recv()]
    while got[-1] != last:
        got.append(ws.recv())
    return got


class SlowLossyProxy:
    """A TCP proxy between a host and Redis: every chunk waits `delay` seconds, and one in
    `loss` waits 0.3 s more (as a lost segment waits for its retransmission); order kept."""

    def __init__(self, listen: tuple, target: tuple, delay: float, loss: int) -> None:
        self.target, self.delay, self.loss = target, delay, loss
        self.listener = socket.create_server(listen)
        self.address = self.listener.getsockname()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        release = 0.0
        try:
            while not self.closed:
                ready, _, _ = select.select([source], [], [], 0.5)
                if not ready:
                    continue
                chunk = source.recv(65536)
                if not chunk:
                    break
                extra = 0.3 if self.loss and random.randrange(self.loss) == 0 else 0.0
                release = max(release, time.monotonic() + self.delay + extra)
                time.sleep(max(0.0, release - time.monotonic()))
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for one in (source, sink):
                try:
                    one.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def test_latency_and_loss_on_a_hosts_link_to_redis_keep_answers_right(
    hosts, redis_host, server_factory, tmp_path
):
    """Host b reaches Redis through a proxy that adds 40 ms each way and, one chunk in ten,
    300 ms more: every answer is still right within --redis-timeout 2; with 2.5 s each way
    (past the timeout) answers say Timeout or Backplane Unavailable, and an OK is never
    given for a message that did not arrive."""
    net = hosts(["redis", "a", "b"])
    url = redis_host(net, "redis", tmp_path / "redis")
    redis_address = (net.address["redis"], 6379)
    proxy = SlowLossyProxy((f"{net.net}.254", 0), redis_address, delay=0.04, loss=10)
    try:
        prefix = new_prefix()
        common = ("--redis-prefix", prefix, "--redis-timeout", "2", "--node-timeout", "10")
        a = wsboard_on(net, "a", server_factory, tmp_path, "--redis", url, *common)
        slow_url = f"redis://{proxy.address[0]}:{proxy.address[1]}/0"
        b = wsboard_on(net, "b", server_factory, tmp_path, "--redis", slow_url, *common)
        on_a = websocket.create_connection(a.ws_url("on-a"), timeout=20)
        on_b = websocket.create_connection(b.ws_url("on-b"), timeout=20)
        for n in range(30):
            assert answer(a, f"SEND MESSAGE on-b to b {n}") == "OK"
            assert answer(b, f"SEND MESSAGE on-a to a {n}") == "OK"
        assert [on_b.recv() for _ in range(30)] == [f"to b {n}" for n in range(30)]
        assert [on_a.recv() for _ in range(30)] == [f"to a {n}" for n in range(30)]
        assert answer(b, "COUNT") == "OK 2 2"
        proxy.delay = 2.5  # past --redis-timeout
        told = [answer(b, f"SEND MESSAGE on-a late {n}") for n in range(3)]
        assert set(told) <= {"OK", "ERROR Timeout", "ERROR Backplane Unavailable"}, told
        assert "ERROR Timeout" in told or "ERROR Backplane Unavailable" in told
        proxy.delay = 0.04
        oks = [f"late {n}" for n, said in enumerate(told) if said == "OK"]
        wait_until(
            lambda: answer(b, "SEND MESSAGE on-a healed") == "OK", timeout=30, what="the heal"
        )
        on_a.settimeout(10)
        seen = []
        while "healed" not in seen:
            seen.append(on_a.recv())
        assert set(oks) <= set(seen)  # every OK was delivered
        on_a.close()
        on_b.close()
        assert ask_json(Control(b.control_path), {"op": "stats"})["backplane"]["state"] == "up"
    finally:
        proxy.close()
