"""The kernel floor: N loopback TCP writes of the same ~100 bytes to N sockets, no framing.

Prints the median seconds per write over several rounds. One process holds both ends of each
connection (2 descriptors a pair, under the 20,000 open-files limit), so the caller measures
at most 5,000 pairs and scales to larger N.

    python bench/floor.py PAIRS [ROUNDS]
"""

import os
import socket
import statistics
import sys
import time

PAYLOAD = b"\x81\x64" + b"x" * 100  # the size of a 100-byte text frame


def main() -> None:
    pairs, rounds = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 7
    os.sched_setaffinity(0, {0})  # the core the servers run on
    listener = socket.create_server(("127.0.0.1", 0), backlog=pairs)
    port = listener.getsockname()[1]
    readers, writers = [], []
    for i in range(pairs):
        reader = socket.socket()
        reader.bind((f"127.0.0.{2 + i % 4}", 0))
        reader.connect(("127.0.0.1", port))
        writer, _ = listener.accept()
        readers.append(reader)
        writers.append(writer)
    per_write = []
    for _ in range(rounds):
        started = time.perf_counter()
        for writer in writers:
            writer.send(PAYLOAD)
        per_write.append((time.perf_counter() - started) / pairs)
        for reader in readers:
            reader.recv(4096)
    print(statistics.median(per_write))


if __name__ == "__main__":
    main()
