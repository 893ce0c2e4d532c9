"""A WebSocket echo server (the `websockets` package) on /echo: every message comes back
prefixed with the pod name. Stops by itself after --lifetime seconds."""

import argparse
import asyncio
import os

from websockets.asyncio.server import ServerConnection, serve


async def echo(ws: ServerConnection) -> None:
    if ws.request is None or ws.request.path != "/echo":
        await ws.close(code=1008, reason="use /echo")
        return
    async for message in ws:
        await ws.send(f"{os.environ.get('POD_NAME', '?')}: {message!s}")


async def main(port: int, lifetime: float) -> None:
    async with serve(echo, None, port):  # None: every address of both families (asyncio makes "::" v6-only)
        await asyncio.sleep(lifetime)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--lifetime", type=float, default=3600.0)
    args = ap.parse_args()
    asyncio.run(main(args.port, args.lifetime))
