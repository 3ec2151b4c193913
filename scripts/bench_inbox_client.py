"""One client process of the inbox benchmark (scripts/bench_inbox.py): holds a share of the
inbox WebSockets, as that many widgets would, and reports what they received.

It reads its job from the first line of stdin, {"url": ..., "tokens": [...]}, then opens one
socket a token (at most `--open-concurrency` handshakes at a time), sends the token as the
first message, answers pings, and keeps each item it receives by its body, with the time.
A socket that closes comes back as the widget does: after 1 s, doubling to 30 s, each delay
jittered to 50-100%, with `after=` the newest item it holds, so that the server catches it up.
No Django here: the client could run on another machine.

It prints one JSON line a second with its progress, and, when the line `report` arrives on
stdin, one line with every socket's times. The line `stop` ends it."""

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from collections import Counter
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

FIRST_RETRY_SECONDS = 1.0  # as apps/inbox/static/notify/inbox.js
MAX_RETRY_SECONDS = 30.0


class Sockets:
    def __init__(self, *, url: str, tokens: list[str], open_concurrency: int) -> None:
        self.url, self.tokens = url, tokens
        count = len(tokens)
        self.first_hello: list[float | None] = [None] * count  # the first open
        self.last_hello: list[float | None] = [None] * count  # the latest (re)open
        self.newest: list[str | None] = [None] * count
        self.received: dict[str, dict[int, float]] = {}  # item body -> socket -> first arrival
        self.closes: Counter[str] = Counter()  # close code (or the failure) -> how many
        self.connected = 0
        self.opening = asyncio.Semaphore(open_concurrency)

    def keep(self, *, index: int, item: dict[str, Any], now: float) -> None:
        self.received.setdefault(item["body"], {}).setdefault(index, now)
        self.newest[index] = item["id"]

    async def hold(self, index: int) -> None:
        delay = FIRST_RETRY_SECONDS
        while True:
            after, hello_before = self.newest[index], self.last_hello[index]
            try:
                async with self.opening:
                    socket = await connect(
                        f"{self.url}?after={after}" if after else self.url,
                        open_timeout=120,
                        ping_interval=None,  # a browser sends no pings of its own
                        max_size=None,
                    )
                code = await self.listen(index=index, socket=socket)
                if self.last_hello[index] != hello_before:  # it opened: back off from the start
                    delay = FIRST_RETRY_SECONDS
            except (OSError, TimeoutError, InvalidHandshake) as error:
                code = f"open failed: {type(error).__name__}"
            self.closes[str(code)] += 1
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def listen(self, *, index: int, socket: ClientConnection) -> int | str:
        self.connected += 1
        try:
            await socket.send(json.dumps({"type": "auth", "token": self.tokens[index]}))
            async for raw in socket:
                message = json.loads(raw)
                now = time.time()
                kind = message["type"]
                if kind == "hello":
                    self.first_hello[index] = self.first_hello[index] or now
                    self.last_hello[index] = now
                elif kind == "item":
                    self.keep(index=index, item=message["item"], now=now)
                elif kind == "catch_up":
                    for item in message["items"]:
                        self.keep(index=index, item=item, now=now)
                elif kind == "ping":
                    await socket.send('{"type": "pong"}')
            return socket.close_code or 1005
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else 1006
        finally:
            self.connected -= 1

    def progress(self) -> dict[str, Any]:
        return {
            "opened": sum(1 for t in self.first_hello if t),
            "connected": self.connected,
            "received": {body: len(times) for body, times in self.received.items()},
            "closes": dict(self.closes),
        }

    def report(self) -> dict[str, Any]:
        return {"first_hello": self.first_hello, "last_hello": self.last_hello, "received": self.received}


def emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--open-concurrency", type=int, default=100, help="handshakes in flight (default 100)")
    args = parser.parse_args()
    # One file a socket: as many as this process may hold.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    job = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    sockets = Sockets(url=job["url"], tokens=job["tokens"], open_concurrency=args.open_concurrency)
    holders = [asyncio.create_task(sockets.hold(index)) for index in range(len(job["tokens"]))]

    async def tell_progress() -> None:
        while True:
            emit({"progress": sockets.progress()})
            await asyncio.sleep(1)

    reporter = asyncio.create_task(tell_progress())
    while (command := (await loop.run_in_executor(None, sys.stdin.readline)).strip()) not in ("stop", ""):
        if command == "report":
            emit({"report": sockets.report()})
    reporter.cancel()
    for holder in holders:
        holder.cancel()


if __name__ == "__main__":
    asyncio.run(main())
