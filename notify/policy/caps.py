"""Frequency caps and spend budgets.

Frequency caps: at most N notifications per recipient in a true sliding window, counted in
Redis by the `limits` library's moving-window strategy (one atomic Lua script per check), so
the count holds with any number of workers.

A cap counts one channel's sends: "3 per day" on a category means at most three of that
category by email, three by SMS, and so on. The tenant's cap counts every non-critical
category together, per channel too."""

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any
from uuid import UUID

import limits
import redis
from django.conf import settings
from django.utils import timezone
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from apps.catalog.models import Category, OverBudget, OverCap
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
    try:
        if _counted(what="cap", delivery_id=delivery.id):
            return SEND  # its place was taken on an earlier claim (before a deferral or a retry)
        reached = cap_take(
            tenant_id=tenant.id,
            recipient_id=delivery.notification.recipient_id,
            channel=delivery.channel,
            category_key=category.key,
            category_cap=category.frequency_cap,
            tenant_cap=tenant.frequency_cap,
        )
        if reached is None:
            _count(what="cap", delivery_id=delivery.id)
            return SEND
    except redis.RedisError:
        return _store_unreachable(what="frequency caps")
    reason = f"frequency cap of {reached.cap} for {reached.scope} on {delivery.channel} reached"
    if category.over_cap != OverCap.DEFER:
        return Verdict(SUPPRESSED, reason)
    if expiry_verdict(category=category_rules(category=category), created_at=created_at, at=reached.room_at):
        return Verdict(EXPIRED, f"{reason}; the category's expiry comes before the window has room")
    return Verdict(DEFERRED, f"{reason}; deferred until {reached.room_at.isoformat()}", until=reached.room_at)


# KEYS[1]: the tenant's spend today. ARGV: the cost, the budget. Adds the cost unless that
# would pass the budget; returns 1 when added. Atomic, so concurrent sends cannot overspend.
_SPEND = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
if spent + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], 172800)
return 1
"""


def budget_verdict(
    *, tenant: Tenant, category: Category, channel: str, cost: Decimal | None, delivery_id: object
) -> Verdict:
    """Count the send against the tenant's daily budget for the channel (SMS), or say what
    happens to it past the budget: held until the next day, or skipped so that a fallback
    chain moves on to a cheaper channel, as the category chooses. The cost counts once
    reserved, whatever the send's outcome: the budget is never overspent."""
    if cost is None or tenant.sms_daily_budget is None or category.kind == CRITICAL:
        return SEND
    today = timezone.now().astimezone(UTC).date()
    key = f"notify:spend:{channel}:{tenant.id}:{today.isoformat()}"
    try:
        if _counted(what="spend", delivery_id=delivery_id):
            return SEND
        if int(_spend_script()(keys=[key], args=[str(cost), str(tenant.sms_daily_budget)])):
            _count(what="spend", delivery_id=delivery_id)
            return SEND
    except redis.RedisError:
        return _store_unreachable(what="the spend budget")
    reason = f"the daily {channel} budget of {tenant.sms_daily_budget} is spent"
    if category.over_budget == OverBudget.FALLBACK:
        return Verdict(SUPPRESSED, reason)
    tomorrow = datetime.combine(today + timedelta(days=1), time(), tzinfo=UTC)
    return Verdict(DEFERRED, f"{reason}; held until {tomorrow.isoformat()}", until=tomorrow)


def _counted(*, what: str, delivery_id: object) -> bool:
    """Whether the delivery was counted already: a re-claimed one (after a deferral or a
    transient failure) keeps its place instead of taking a second."""
    return bool(redis_client().exists(f"notify:counted:{what}:{delivery_id}"))


def _count(*, what: str, delivery_id: object) -> None:
    redis_client().set(f"notify:counted:{what}:{delivery_id}", 1, ex=7 * 86400)


def _store_unreachable(*, what: str) -> Verdict:
    # Without its counters, a limit cannot be honoured: wait rather than overspend.
    until = timezone.now() + timedelta(seconds=30)
    return Verdict(DEFERRED, f"{what} cannot be checked (Redis unreachable); trying again shortly", until=until)


@lru_cache(maxsize=1)
def _spend_script() -> Any:
    return redis_client().register_script(_SPEND)


@lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    """NOTIFY_REDIS_URL's Redis, for the counters that scripts keep (budgets, rate buckets,
    circuit states)."""
    return redis.Redis.from_url(settings.NOTIFY_REDIS_URL)


@lru_cache(maxsize=256)
def _parse(cap: str) -> limits.RateLimitItem:
    return limits.parse(cap)


@lru_cache(maxsize=1)
def sliding_window() -> MovingWindowRateLimiter:
    """The limits library's moving-window limiter on Redis, shared by caps and API limits.
    Made on first use, in the process itself (never before a fork)."""
    return MovingWindowRateLimiter(storage_from_string(settings.NOTIFY_REDIS_URL))
