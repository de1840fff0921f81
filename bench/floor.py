"""The kernel floor: N loopback TCP writes of the same ~100 bytes to N sockets, no framing.

Measured the way the servers are: this process writes from core 0 and holds N sockets, while
a child process on core 1 holds the N other ends and reads them on a spinning epoll as they
arrive, as the load generator does. After one warm-up round, prints the seconds each round's
N writes took, once every byte has been seen to arrive.

    python bench/floor.py N [ROUNDS]
"""

import os
import select
import socket
import sys
import time

from loadgen import client_socket

PAYLOAD = b"\x81\x64" + b"x" * 100  # the size of a 100-byte text frame


def read_everything(port: int, n: int, expected: int, report: int) -> None:
    """The child: open n clients, read until expected bytes came (60 s at most), report them."""
    os.sched_setaffinity(0, {1})
    poller = select.epoll()
    clients = {}
    for i in range(n):
        sock = client_socket(i)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        clients[sock.fileno()] = sock
        poller.register(sock.fileno(), select.EPOLLIN)
    got = 0
    deadline = time.monotonic() + 60
    while got < expected and time.monotonic() < deadline:
        for fd, _ in poller.poll(0):  # spin: no wake-ups charged to the writer
            try:
                got += len(clients[fd].recv(65536))
            except BlockingIOError:
                pass
    os.write(report, str(got).encode())
    os._exit(0)


def main() -> None:
    n, rounds = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 7
    listener = socket.create_server(("127.0.0.1", 0), backlog=min(n, 4096))
    port = listener.getsockname()[1]
    report_r, report_w = os.pipe()
    child = os.fork()
    if child == 0:
        read_everything(port, n, n * (rounds + 1) * len(PAYLOAD), report_w)
    os.sched_setaffinity(0, {0})  # the core the servers run on
    writers = [listener.accept()[0] for _ in range(n)]
    time.sleep(0.5)
    times = []
    for _ in range(rounds + 1):
        started = time.perf_counter()
        for writer in writers:
            writer.send(PAYLOAD)
        times.append(time.perf_counter() - started)
        time.sleep(0.2)  # the reader drains
    del times[0]  # the warm-up
    got = int(os.read(report_r, 64) or b"0")
    os.waitpid(child, 0)
    expected = n * (rounds + 1) * len(PAYLOAD)
    if got != expected:
        sys.exit(f"the reader got {got} of {expected} bytes")
    print(" ".join(f"{t:.6f}" for t in times))


if __name__ == "__main__":
    main()
