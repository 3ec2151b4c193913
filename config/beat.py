"""Beat's scheduler, with a heartbeat that a container probe reads (`manage.py beat_health`)."""

import logging
import time

import redis
from django_celery_beat.schedulers import DatabaseScheduler

from notify.policy.caps import redis_client

BEAT_HEARTBEAT_KEY = "notify:beat:heartbeat"
logger = logging.getLogger(__name__)


def beat_heartbeat_age_seconds() -> float | None:
    """Seconds since beat last ticked, or None when it never has (or its heartbeat expired)."""
    stamp = redis_client().get(BEAT_HEARTBEAT_KEY)
    return None if stamp is None else max(0.0, time.time() - float(stamp))


class HeartbeatScheduler(DatabaseScheduler):
    """django-celery-beat's DatabaseScheduler, stamping Redis on every tick: a beat process that
    is up but stuck stops stamping, which a mere process check would not notice."""

    def tick(self, *args: object, **kwargs: object) -> float:
        interval = super().tick(*args, **kwargs)
        try:
            # Expires by itself, so a stopped beat leaves no heartbeat behind for long.
            redis_client().set(BEAT_HEARTBEAT_KEY, time.time(), ex=3600)
        except redis.RedisError:
            logger.warning("beat could not write its heartbeat to Redis", exc_info=True)
        return interval
