"""Backpressure: when a channel's bulk queue holds more than NOTIFY_BULK_BACKLOG_LIMIT task
messages, new bulk events for it are shed, refused with a Retry-After (NOTIFY_BACKPRESSURE
= "reject") or accepted to be sent later (= "defer"). Critical and normal events are always
accepted at once: shedding bulk is what keeps room for them."""

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings

from notify.pipeline.dispatch import queue_depths

# Reading the depths costs a broker round trip per queue: read them at most once a second.
_DEPTHS_MAX_AGE = 1.0
_depths_read: tuple[float, dict[tuple[str, str], int]] = (0.0, {})


class Overloaded(Exception):
    def __init__(self, *, channels: list[str], retry_after: int) -> None:
        super().__init__(
            f"The {', '.join(channels)} bulk queue is over its backlog limit; bulk events are refused "
            f"for now. Retry after {retry_after} seconds, or send critical and normal events, which "
            "are accepted at once."
        )
        self.retry_after = retry_after


@dataclass(frozen=True)
class Admission:
    """How an event is accepted: at once, or held back until `send_after`."""

    send_after: datetime | None = None


ADMIT = Admission()


def bulk_admission(*, channels: list[str], now: datetime) -> Admission:
    """Whether a bulk event for these channels is accepted now; raises Overloaded when it is
    refused."""
    limit = settings.NOTIFY_BULK_BACKLOG_LIMIT
    depths = _depths()
    over = [channel for channel in channels if depths.get((channel, "bulk"), 0) > limit]
    if not over:
        return ADMIT
    delay = settings.NOTIFY_BACKPRESSURE_RETRY_SECONDS
    if settings.NOTIFY_BACKPRESSURE == "defer":
        return Admission(send_after=now + timedelta(seconds=delay))
    raise Overloaded(channels=over, retry_after=delay)


def _depths() -> dict[tuple[str, str], int]:
    global _depths_read
    read_at, depths = _depths_read
    if time.monotonic() - read_at > _DEPTHS_MAX_AGE:
        depths = queue_depths()
        _depths_read = (time.monotonic(), depths)
    return depths
