"""What the API refuses to protect the service and the people it notifies.

Backpressure: when a channel's bulk queue holds more than NOTIFY_BULK_BACKLOG_LIMIT task
messages, new bulk events for it are shed, refused with a Retry-After (NOTIFY_BACKPRESSURE
= "reject") or accepted to be sent later (= "defer"). Critical and normal events are always
accepted at once: shedding bulk is what keeps room for them.

Per-recipient limit: at most NOTIFY_RECIPIENT_RATE_LIMIT events for one recipient (a sliding
window in Redis), against floods and abuse such as sign-in code pumping."""

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import limits
from django.conf import settings

from notify.pipeline.dispatch import queue_depths
from notify.policy.caps import sliding_window

# Reading the depths costs a broker round trip per queue: read them at most once a second.
_DEPTHS_MAX_AGE = 1.0
_depths_read: tuple[float, dict[tuple[str, str], int]] = (0.0, {})


class Refused(Exception):
    """A request to come back later: the API answers 429 with Retry-After."""

    code = "refused"
    field = ""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(Refused):
    code = "overloaded"

    def __init__(self, *, channels: list[str], retry_after: int) -> None:
        super().__init__(
            f"The {', '.join(channels)} bulk queue is over its backlog limit; bulk events are refused "
            f"for now. Retry after {retry_after} seconds, or send critical and normal events, which "
            "are accepted at once.",
            retry_after=retry_after,
        )


class RecipientOverLimit(Refused):
    code = "rate_limited"
    field = "recipients"


def recipients_admission(*, tenant_id: object, external_ids: list[str]) -> None:
    """Count an event for each recipient; raises RecipientOverLimit for the first one over."""
    rate = settings.NOTIFY_RECIPIENT_RATE_LIMIT
    if not rate:
        return
    item, limiter = limits.parse(rate), sliding_window()
    for external_id in external_ids:
        if not limiter.hit(item, "recipient", str(tenant_id), external_id):
            reset_time = limiter.get_window_stats(item, "recipient", str(tenant_id), external_id).reset_time
            raise RecipientOverLimit(
                f"Recipient '{external_id}' has had {rate} events; retry later.",
                retry_after=max(int(reset_time - time.time()) + 1, 1),
            )


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
