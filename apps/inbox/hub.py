"""This web process's live inbox: one Redis subscription, whatever the number of sockets, and
the open sockets by recipient, to which each published batch is dispatched locally.

Workers and views publish one message a batch of items (apps.inbox.live); every web process
receives it on its one subscription and hands each recipient's frames to the sockets it
holds for that recipient, if any. A slow client delays its own socket only: each socket has
its own outbox, drained by a task of its own.

Redis is a transport, never the record. The reader pings Redis on its subscription; when
Redis fails or stops answering for STALL_SECONDS, the reader drops the connection and
subscribes again with backoff, and the sockets stay open. Once it is subscribed again,
every socket catches up from the database on what was stored since the last moment the
subscription was known to be healthy (its sockets may have missed pushes in between).

The reads of a socket that opens (its counts, and what it missed since the item it holds)
are batched across the sockets that open meanwhile, so a reconnect storm costs PostgreSQL a
query per few hundred sockets (BatchedRead)."""

import asyncio
import json
import logging
import random
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import redis
import redis.asyncio
from channels.db import database_sync_to_async
from django.conf import settings
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from apps.inbox.serializers import inbox_items_json
from apps.inbox.services import CatchUpFound, inbox_counts_many, inbox_items_after_many, inbox_items_since_many

logger = logging.getLogger(__name__)
PING_SECONDS = 1.0
# No answer to a ping for this long: the subscription is taken for lost (pushes may be missed).
STALL_SECONDS = 3.0
# A connection waits this long for a subscription being made before it reads the database.
READY_SECONDS = 0.5
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.5, 10.0
CATCH_UP_LIMIT = 100  # items sent on a reconnect; past it, `more` has the client reload its list
K = TypeVar("K")
V = TypeVar("V")


def live_channel(*, url: str) -> str:
    """The Redis pub/sub channel of the live inbox. Pub/sub ignores the database number, so
    the name carries it: deployments sharing one Redis on separate databases stay apart."""
    database = urlsplit(url).path.strip("/") or "0"
    return f"notify:inbox:live:{database}"


class LiveSocket(Protocol):
    """What the hub needs of an open inbox socket (InboxConsumer)."""

    def push(self, *, frames: list[str]) -> None: ...

    def catch_up_since(self, *, since: float) -> None: ...


class InboxHub:
    """The sockets of one event loop (a web process), by recipient, fed by one subscription."""

    def __init__(self) -> None:
        self.sockets: dict[str, set[LiveSocket]] = {}
        # The reads of sockets that open: each batched across the sockets opening meanwhile.
        self.counts: BatchedRead[UUID, dict[str, Any]] = BatchedRead(read_many=_counts_read)
        self.catch_ups: BatchedRead[tuple[UUID, UUID], CatchUp] = BatchedRead(read_many=_catch_ups_read)
        self.catch_ups_since: BatchedRead[tuple[UUID, datetime], CatchUp] = BatchedRead(read_many=_catch_ups_since_read)
        self.subscribed = asyncio.Event()
        # Since when (a Unix time) a socket here may have missed pushes: set while the
        # subscription is lost, or while a socket that joined waits for the first one.
        self.lost_since: float | None = None
        self.heard_at = 0.0  # when Redis last answered on the subscription (a Unix time)
        self.reader: asyncio.Task[None] | None = None

    async def join(self, *, recipient_id: UUID, socket: LiveSocket) -> None:
        """Take the socket's pushes from now on; waits (briefly) for the subscription, so that
        what the socket reads from the database next cannot miss an item stored meanwhile."""
        joined_at = time.time()
        self.sockets.setdefault(str(recipient_id), set()).add(socket)
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read(), name="inbox hub reader")
        try:
            async with asyncio.timeout(READY_SECONDS):
                await self.subscribed.wait()
        except TimeoutError:
            # Redis is slow or away: the socket catches up once the hub subscribes.
            self.lost_since = min(self.lost_since or joined_at, joined_at)

    def leave(self, *, recipient_id: UUID, socket: LiveSocket) -> None:
        sockets = self.sockets.get(str(recipient_id))
        if sockets is not None:
            sockets.discard(socket)
            if not sockets:
                del self.sockets[str(recipient_id)]

    def dispatch(self, *, data: bytes) -> None:
        """One published batch: [[recipient id, [frame, ...]], ...]; each to its sockets here."""
        for recipient_id, frames in json.loads(data):
            for socket in self.sockets.get(recipient_id, ()):
                socket.push(frames=frames)

    async def _read(self) -> None:
        url = settings.NOTIFY_INBOX_LIVE_URL
        channel = live_channel(url=url)
        delay = RETRY_FIRST_SECONDS
        while True:
            client = redis.asyncio.Redis.from_url(
                url, socket_connect_timeout=STALL_SECONDS, socket_timeout=STALL_SECONDS, retry=Retry(NoBackoff(), 0)
            )
            pubsub = client.pubsub()
            try:
                async with asyncio.timeout(STALL_SECONDS):
                    await pubsub.subscribe(channel)
                    while (await pubsub.get_message(timeout=STALL_SECONDS)) is None:
                        pass  # the subscription's confirmation
                self.heard_at = time.time()
                self._subscribed()
                delay = RETRY_FIRST_SECONDS
                await self._listen(pubsub=pubsub)
            except Exception as error:  # noqa: BLE001 - the reader outlives any one failure
                if self.subscribed.is_set():
                    self.subscribed.clear()
                    self.lost_since = min(self.lost_since or self.heard_at, self.heard_at)
                    logger.warning(
                        "live inbox subscription lost (%s); sockets stay open and catch up when it is back", error
                    )
            finally:
                await _close_quietly(pubsub=pubsub, client=client)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _listen(self, *, pubsub: Any) -> None:
        """Dispatch messages until Redis fails or leaves a ping unanswered for STALL_SECONDS.
        Only an unanswered ping counts: a process too busy to read for a while (a reconnect
        storm) finds its answers waiting, and takes no silence of its own for Redis's."""
        pinged = time.monotonic()
        unanswered_since: float | None = None  # when the ping not yet answered was sent
        while True:
            message = await pubsub.get_message(timeout=PING_SECONDS)
            now = time.monotonic()
            if message is not None:
                unanswered_since, self.heard_at = None, time.time()
                if message["type"] == "message":
                    self.dispatch(data=message["data"])
            elif unanswered_since is not None and now - unanswered_since > STALL_SECONDS:
                raise TimeoutError(f"no answer from Redis for {STALL_SECONDS:g} s")
            if unanswered_since is None and now - pinged >= PING_SECONDS:
                await pubsub.ping()  # answered on the subscription, as a message
                pinged = unanswered_since = now

    def _subscribed(self) -> None:
        since, self.lost_since = self.lost_since, None
        self.subscribed.set()
        if since is not None:
            for socket in _all(self.sockets.values()):
                socket.catch_up_since(since=since)


def _all(groups: Iterable[set[LiveSocket]]) -> list[LiveSocket]:
    return [socket for group in groups for socket in group]


class BatchedRead(Generic[K, V]):
    """A database read that sockets ask for one key at a time, made for every key asked for
    meanwhile in one call of `read_many` on the database thread, one call at a time: when
    thousands of clients reconnect at once, one query serves hundreds of them, and a web
    process never runs more than one such query at once."""

    def __init__(self, *, read_many: Callable[[list[K]], dict[K, V]]) -> None:
        self.read_many = read_many
        self.wanted: dict[K, list[asyncio.Future[V]]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V:
        wanted: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self.wanted.setdefault(key, []).append(wanted)
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read())
        return await wanted

    async def _read(self) -> None:
        while self.wanted:
            batch, self.wanted = self.wanted, {}
            try:
                values = await database_sync_to_async(self.read_many)(list(batch))
            except Exception as error:  # noqa: BLE001 - each waiting socket gets the failure
                for waiting in (future for futures in batch.values() for future in futures):
                    if not waiting.done():
                        waiting.set_exception(error)
                continue
            for key, futures in batch.items():
                for waiting in futures:
                    if not waiting.done():
                        waiting.set_result(values[key])


# Items (as JSON) and whether there were more; `more` alone, with no items, when the client's
# item is not in its inbox: either way the client reloads its list from the API.
CatchUp = tuple[list[dict[str, Any]], bool]


def _counts_read(recipient_ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
    return inbox_counts_many(recipient_ids=recipient_ids)


def _catch_ups_read(cursors: list[tuple[UUID, UUID]]) -> dict[tuple[UUID, UUID], CatchUp]:
    return _as_json(inbox_items_after_many(cursors=cursors, limit=CATCH_UP_LIMIT))


def _catch_ups_since_read(cursors: list[tuple[UUID, datetime]]) -> dict[tuple[UUID, datetime], CatchUp]:
    return _as_json(inbox_items_since_many(cursors=cursors, limit=CATCH_UP_LIMIT))


def _as_json(found: Mapping[K, CatchUpFound]) -> dict[K, CatchUp]:
    """Each client's items as JSON, all serialized at once."""
    items = [item for result in found.values() if result for item in result[0]]
    json_of = dict(zip((item.id for item in items), inbox_items_json(items=items), strict=True))
    return {
        cursor: ([json_of[item.id] for item in result[0]], result[1]) if result else ([], True)
        for cursor, result in found.items()
    }


async def _close_quietly(*, pubsub: Any, client: redis.asyncio.Redis) -> None:
    # Closing does not wait for a stalled server, but is bounded all the same.
    try:
        async with asyncio.timeout(1):
            await pubsub.aclose()
            await client.aclose()
    except (redis.RedisError, OSError, TimeoutError):
        pass


_hubs: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, InboxHub]" = weakref.WeakKeyDictionary()


def inbox_hub() -> InboxHub:
    """This event loop's hub (uvicorn runs one loop a process)."""
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        _hubs[loop] = InboxHub()
    return _hubs[loop]
