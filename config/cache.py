"""Django's Redis cache with one connection pool a process.

Django makes a cache object per thread and per async context, and each object opens its own
connection pool. Under ASGI every request is a context of its own, so every request that
touched the cache (API throttling, the runaway guard) opened a Redis connection and dropped it
afterwards: a dozen new connections a second under a steady load. Sharing the client, whose
redis-py pool is thread-safe and starts afresh after a fork, keeps the connections open."""

from functools import cache, cached_property
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient


@cache
def _shared_client(servers: tuple[str, ...], options: tuple[tuple[str, Any], ...]) -> RedisCacheClient:
    return RedisCacheClient(list(servers), **dict(options))


class SharedPoolRedisCache(RedisCache):
    @cached_property
    def _cache(self) -> RedisCacheClient:
        # Django's own attributes, as its RedisCache makes its client from them (not in the stubs).
        servers, options = self._servers, self._options  # type: ignore[attr-defined]
        return _shared_client(tuple(servers), tuple(sorted(options.items())))
