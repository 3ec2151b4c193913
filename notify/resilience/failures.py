"""How a failure is classified, and how long to wait before the next attempt."""

import random
from datetime import timedelta
from enum import Enum

from django.conf import settings


class FailureKind(str, Enum):
    TRANSIENT = "transient"  # worth retrying: timeouts, 429, 5xx
    PERMANENT = "permanent"  # retrying cannot help: bad address, rejected content
    # The provider may have it and cannot be asked: sending again risks a duplicate, so an
    # operator decides (the category chose at most once).
    IN_DOUBT = "in_doubt"


# 401/403 mean our credentials or account are at fault (a rotated key, an unpaid bill):
# not the message's fault, so retry and finally dead-letter, where ops replay once fixed.
TRANSIENT_STATUSES = frozenset({401, 403, 408, 409, 425, 429})


def failure_from_status(status_code: int | None) -> FailureKind:
    """No status (the request never completed), auth/account errors, 408/429-style and 5xx
    are transient; every other 4xx means the message itself is wrong, so retrying cannot help."""
    if status_code is None or status_code >= 500 or status_code in TRANSIENT_STATUSES:
        return FailureKind.TRANSIENT
    return FailureKind.PERMANENT


def retry_policy(*, channel: str) -> dict[str, float]:
    return settings.NOTIFY_RETRY_POLICY[channel]


def retry_delay(*, channel: str, attempt: int) -> timedelta:
    """Exponential backoff with "equal jitter": half the step is fixed, half is random.

    Written here rather than taken from a retry library because our retry loop lives in
    the database across processes, so only the delay formula is needed."""
    policy = retry_policy(channel=channel)
    return backoff_delay(base_seconds=policy["base_seconds"], cap_seconds=policy["cap_seconds"], attempt=attempt)


def backoff_delay(*, base_seconds: float, cap_seconds: float, attempt: int) -> timedelta:
    """The delay before the next try after `attempt` tries: base doubled each time up to the
    cap, half of it fixed and half random."""
    step = min(cap_seconds, base_seconds * 2 ** max(attempt - 1, 0))
    return timedelta(seconds=step / 2 + random.uniform(0, step / 2))


def attempts_exhausted(*, channel: str, attempt: int) -> bool:
    return attempt >= retry_policy(channel=channel)["max_attempts"]
