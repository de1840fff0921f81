"""The same job on the `websockets` library (asyncio), in its idiomatic fast form.

A set of connections per id, websockets.broadcast() for fan-out, compression off, pings every
25 s like wsboard; a UNIX control socket that speaks wsboard's two verbs plus BROADCAST.

    python bench/peers/websockets_peer.py PORT CONTROL_PATH
"""

import asyncio
import sys
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import broadcast, serve

by_id: dict = {}


async def handler(ws):
    client_id = parse_qs(urlsplit(ws.request.path).query).get("id", [""])[0]
    by_id.setdefault(client_id, set()).add(ws)
    try:
        await ws.wait_closed()
    finally:
        by_id[client_id].discard(ws)
        if not by_id[client_id]:
            del by_id[client_id]


async def control(reader, writer):
    while line := await reader.readline():
        line = line.rstrip(b"\n").decode()
        if line.startswith("BROADCAST "):
            sockets = [ws for group in by_id.values() for ws in group]
            broadcast(sockets, line[len("BROADCAST ") :])
            writer.write(f"OK {len(sockets)}\n".encode())
        elif line.startswith("SEND MESSAGE "):
            client_id, _, text = line[len("SEND MESSAGE ") :].partition(" ")
            sockets = by_id.get(client_id)
            if sockets:
                broadcast(sockets, text)
            writer.write(b"OK\n" if sockets else b"ERROR Client Not Found\n")
        else:
            writer.write(b"ERROR Unknown command\n")
        if writer.transport.get_write_buffer_size() > 65536:
            await writer.drain()
    writer.close()


async def main(port: int, path: str) -> None:
    # The same listen backlog as wsboard's default (asyncio's own is 100).
    async with serve(handler, "127.0.0.1", port, compression=None, ping_interval=25, backlog=1024):
        await asyncio.start_unix_server(control, path)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
