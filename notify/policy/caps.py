"""Frequency caps: at most N notifications per recipient in a true sliding window, counted in
Redis by the `limits` library's moving-window strategy (one atomic Lua script per check), so
the count holds with any number of workers.

A cap counts one channel's sends: "3 per day" on a category means at most three of that
category by email, three by SMS, and so on. The tenant's cap counts every non-critical
category together, per channel too."""

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from uuid import UUID

import limits
from django.conf import settings
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from apps.catalog.models import Category, OverCap
from apps.deliveries.models import Delivery
from apps.tenants.models import Tenant
from notify.policy.preferences import category_rules
from notify.policy.rules import CRITICAL, DEFERRED, EXPIRED, SEND, SUPPRESSED, Verdict, expiry_verdict


@dataclass(frozen=True)
class CapReached:
    cap: str  # as configured, "3 per day"
    scope: str  # "category 'digest'" or "all categories"
    room_at: datetime  # when the window next has room


def cap_take(
    *, tenant_id: UUID, recipient_id: UUID, channel: str, category_key: str, category_cap: str, tenant_cap: str
) -> CapReached | None:
    """Count one send against the category's cap and then the tenant's; None when both had
    room. A send refused by the tenant's cap keeps the category's count it took: the caps
    are never exceeded, at the price of counting that one send that did not happen."""
    limiter = sliding_window()
    for cap, scope, key in (
        (category_cap, f"category '{category_key}'", category_key),
        (tenant_cap, "all categories", "*"),
    ):
        if not cap:
            continue
        item = _parse(cap)
        identifiers = (str(tenant_id), str(recipient_id), channel, key)
        if not limiter.hit(item, *identifiers):
            reset_time = limiter.get_window_stats(item, *identifiers).reset_time
            return CapReached(cap=cap, scope=scope, room_at=datetime.fromtimestamp(reset_time, tz=UTC))
    return None


def cap_verdict(*, delivery: Delivery, category: Category, tenant: Tenant, created_at: datetime) -> Verdict:
    """Take the delivery's place in its caps, or say what happens to it: suppressed, or
    deferred until the window has room (expired if the category's expiry comes first)."""
    if category.kind == CRITICAL or not (category.frequency_cap or tenant.frequency_cap):
        return SEND
    reached = cap_take(
        tenant_id=tenant.id,
        recipient_id=delivery.notification.recipient_id,
        channel=delivery.channel,
        category_key=category.key,
        category_cap=category.frequency_cap,
        tenant_cap=tenant.frequency_cap,
    )
    if reached is None:
        return SEND
    reason = f"frequency cap of {reached.cap} for {reached.scope} on {delivery.channel} reached"
    if category.over_cap != OverCap.DEFER:
        return Verdict(SUPPRESSED, reason)
    if expiry_verdict(category=category_rules(category=category), created_at=created_at, at=reached.room_at):
        return Verdict(EXPIRED, f"{reason}; the category's expiry comes before the window has room")
    return Verdict(DEFERRED, f"{reason}; deferred until {reached.room_at.isoformat()}", until=reached.room_at)


@lru_cache(maxsize=256)
def _parse(cap: str) -> limits.RateLimitItem:
    return limits.parse(cap)


@lru_cache(maxsize=1)
def sliding_window() -> MovingWindowRateLimiter:
    """The limits library's moving-window limiter on Redis, shared by caps and API limits.
    Made on first use, in the process itself (never before a fork)."""
    return MovingWindowRateLimiter(storage_from_string(settings.NOTIFY_REDIS_URL))
