"""Open inbox sockets per recipient, counted in Redis across every web process, so that one
recipient, or one leaked token, cannot hold an unbounded number of connections.

Each socket holds a slot: a member of the recipient's sorted set, scored with the end of its
lease. A socket renews its lease with each keep-alive ping and gives its slot back when it
closes; the slots of a process that died without closing its sockets lapse with their lease.
The cap protects the servers' resources, not anyone's data, so when Redis is down or slow it
is not enforced (it fails open) rather than refusing every socket."""

import asyncio
import logging
import weakref
from uuid import UUID

import redis
import redis.asyncio
from django.conf import settings
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

logger = logging.getLogger(__name__)
# A slow Redis delays a new connection by at most this; the socket is then let in uncounted.
REDIS_TIMEOUT_SECONDS = 0.5
REDIS_CONNECTIONS = 32  # a web process's, for the slots
# Pings that may be missed before a socket's slot lapses (a killed process renews nothing).
LEASE_PINGS = 3

# Written here: no maintained library keeps a counting semaphore with leases in Redis (limits
# counts rates, redis-py's Lock is a single holder). KEYS[1]: the recipient's slots. ARGV: the
# socket, the lease in ms, the cap (0: renew, whatever the count). Redis's clock, so that the
# web servers' clocks need not agree. Returns 1 when the socket holds a slot.
_TAKE_OR_RENEW = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local cap = tonumber(ARGV[3])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false and redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, redis.asyncio.Redis]]" = (
    weakref.WeakKeyDictionary()
)


async def socket_slot_take(*, recipient_id: UUID, socket_id: str) -> bool:
    """Take one of the recipient's NOTIFY_INBOX_MAX_SOCKETS_PER_RECIPIENT slots for the socket;
    False when every one is held. True, uncounted, when the cap is off or Redis cannot say."""
    cap = settings.NOTIFY_INBOX_MAX_SOCKETS_PER_RECIPIENT
    if not cap:
        return True
    try:
        return await _take_or_renew(recipient_id=recipient_id, socket_id=socket_id, cap=cap)
    except (redis.RedisError, OSError, TimeoutError):
        logger.warning("open inbox sockets not counted (Redis unreachable): the cap is not enforced", exc_info=True)
        return True


async def socket_slot_renew(*, recipient_id: UUID, socket_id: str) -> None:
    """Extend the socket's lease on its slot (taking it again if Redis lost it)."""
    if not settings.NOTIFY_INBOX_MAX_SOCKETS_PER_RECIPIENT:
        return
    try:
        await _take_or_renew(recipient_id=recipient_id, socket_id=socket_id, cap=0)
    except (redis.RedisError, OSError, TimeoutError):
        logger.info("inbox socket lease not renewed (Redis unreachable)", exc_info=True)


async def socket_slot_release(*, recipient_id: UUID, socket_id: str) -> None:
    """Give the socket's slot back; one not given back lapses with its lease."""
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
            await _client().zrem(_slots_key(recipient_id=recipient_id), socket_id)
    except (redis.RedisError, OSError, TimeoutError):
        logger.info("inbox socket slot not released (Redis unreachable); it lapses with its lease", exc_info=True)


async def _take_or_renew(*, recipient_id: UUID, socket_id: str, cap: int) -> bool:
    lease_ms = int(LEASE_PINGS * settings.NOTIFY_INBOX_PING_SECONDS * 1000)
    async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
        taken = await _client().eval(_TAKE_OR_RENEW, 1, _slots_key(recipient_id=recipient_id), socket_id, lease_ms, cap)
    return bool(taken)


def _slots_key(*, recipient_id: UUID) -> str:
    return f"notify:inbox:sockets:{recipient_id}"


def _client() -> redis.asyncio.Redis:
    # An asyncio connection belongs to the event loop that opened it: one client per loop.
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    url = settings.NOTIFY_REDIS_URL
    if url not in clients:
        # A reconnect storm opens thousands of sockets at once: their calls wait their turn for
        # a connection (within the timeout) rather than failing open, or opening thousands.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),  # the timeout above bounds the whole call: no retries in it
        )
        clients[url] = redis.asyncio.Redis(connection_pool=pool)
    return clients[url]
