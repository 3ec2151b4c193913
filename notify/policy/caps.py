"""Frequency caps and spend budgets.

Frequency caps: at most N notifications per recipient in a true sliding window, counted in
Redis by the `limits` library's moving-window strategy (one atomic Lua script per check), so
the count holds with any number of workers.

A cap counts one channel's sends: "3 per day" on a category means at most three of that
category by email, three by SMS, and so on. The tenant's cap counts every non-critical
category together, per channel too.

Redis alone holds these counts, so a Redis that loses them (a flush, a restart without its
data) must not let a limit be passed: a day's spend is rebuilt from the database before any
more is allowed, and a cap window is seeded from the database with the sends it lost. See
"After a Redis loss" in docs/resilience.md."""

import time as clock
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any
from uuid import UUID

import limits
import redis
from django.conf import settings
from django.db.models import Q, Sum
from django.utils import timezone
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from apps.catalog.models import Category, OverBudget, OverCap
from apps.deliveries.models import Delivery, DeliveryStatus
from apps.tenants.models import Tenant
from notify.policy.preferences import category_rules
from notify.policy.rules import CRITICAL, DEFERRED, EXPIRED, SEND, SUPPRESSED, Verdict, expiry_verdict


@dataclass(frozen=True)
class CapReached:
    cap: str  # as configured, "3 per day"
    scope: str  # "category 'digest'" or "all categories"
    room_at: datetime  # when the window next has room


class CountersRebuilding(Exception):
    """Another worker is seeding this cap window from the database after a Redis loss."""


def cap_take(
    *,
    tenant_id: UUID,
    recipient_id: UUID,
    channel: str,
    category_key: str,
    category_cap: str,
    tenant_cap: str,
    delivery_id: UUID,
) -> CapReached | None:
    """Count one send against the category's cap and then the tenant's; None when both had
    room. A send refused by the tenant's cap keeps the category's count it took: the caps
    are never exceeded, at the price of counting that one send that did not happen."""
    limiter = sliding_window()
    kept_since = _counters_since()
    for cap, scope, key in (
        (category_cap, f"category '{category_key}'", category_key),
        (tenant_cap, "all categories", "*"),
    ):
        if not cap:
            continue
        item = _parse(cap)
        identifiers = (str(tenant_id), str(recipient_id), channel, key)
        if clock.time() - item.get_expiry() < kept_since:
            # Redis has kept counts for less than this window: it may have lost some sends.
            _window_seed(item=item, identifiers=identifiers, delivery_id=delivery_id)
        if not limiter.hit(item, *identifiers):
            reset_time = limiter.get_window_stats(item, *identifiers).reset_time
            return CapReached(cap=cap, scope=scope, room_at=datetime.fromtimestamp(reset_time, tz=UTC))
    return None


_SINCE_KEY = "notify:counters:since"


def _counters_since() -> float:
    """Since when this Redis has kept the counters: set on first use, and again after a loss
    (a flush or an empty restart takes the key with the counts)."""
    pipe = redis_client().pipeline(transaction=False)
    pipe.set(_SINCE_KEY, clock.time(), nx=True)
    pipe.get(_SINCE_KEY)
    return float(pipe.execute()[1])


def _window_seed(*, item: limits.RateLimitItem, identifiers: tuple[str, ...], delivery_id: UUID) -> None:
    """Once per window after a loss, count in it the sends the database holds for that window
    (sent in it, or being sent now). They are counted as of now, so the window is stricter
    than the lost one until it has slid past them: never looser. Others wait meanwhile, since
    a send counted while the seed is read could pass the cap."""
    window = item.get_expiry()
    marker = "notify:caps:seeded:" + ":".join(identifiers)
    client = redis_client()
    if not client.set(marker, "pending", nx=True, ex=60):
        if client.get(marker) == b"pending":
            raise CountersRebuilding
        return
    try:
        room = _window_lost(item=item, identifiers=identifiers, delivery_id=delivery_id)
    except BaseException:
        client.delete(marker)  # the next check seeds it, rather than all waiting a minute
        raise
    if room:
        sliding_window().hit(item, *identifiers, cost=room)
    client.set(marker, "done", ex=window)


def _window_lost(*, item: limits.RateLimitItem, identifiers: tuple[str, ...], delivery_id: UUID) -> int:
    """How many of the window's sends the database holds that the window can still take."""
    tenant_id, recipient_id, channel, key = identifiers
    sent = Delivery.objects.filter(
        notification__tenant_id=tenant_id, notification__recipient_id=recipient_id, channel=channel
    ).exclude(id=delivery_id)
    sent = (
        sent.filter(notification__category__key=key)
        if key != "*"
        else sent.exclude(notification__category__kind=CRITICAL)
    )
    since = timezone.now() - timedelta(seconds=item.get_expiry())
    lost = sent.filter(Q(sent_at__gte=since) | Q(status=DeliveryStatus.SENDING)).count()
    return min(lost, sliding_window().get_window_stats(item, *identifiers).remaining)


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
            delivery_id=delivery.id,
        )
        if reached is None:
            _count(what="cap", delivery_id=delivery.id)
            return SEND
    except redis.RedisError:
        return _store_unreachable(what="frequency caps")
    except CountersRebuilding:
        until = timezone.now() + timedelta(seconds=5)
        return Verdict(
            DEFERRED, "frequency caps are being rebuilt after a Redis loss; trying again shortly", until=until
        )
    reason = f"frequency cap of {reached.cap} for {reached.scope} on {delivery.channel} reached"
    if category.over_cap != OverCap.DEFER:
        return Verdict(SUPPRESSED, reason)
    if expiry_verdict(category=category_rules(category=category), created_at=created_at, at=reached.room_at):
        return Verdict(EXPIRED, f"{reason}; the category's expiry comes before the window has room")
    return Verdict(DEFERRED, f"{reason}; deferred until {reached.room_at.isoformat()}", until=reached.room_at)


# KEYS[1]: the tenant's spend today. ARGV: the cost, the budget, and (when the key was
# missing) the day's spend rebuilt from the database. Adds the cost unless that would pass the
# budget; returns 1 when added, 0 when not, -1 when the key is missing and no rebuilt spend was
# given. Atomic, so concurrent sends cannot overspend, and of two workers rebuilding at once
# only the first one's total is kept (the key is set only while missing).
_SPEND = """
local spent = redis.call('GET', KEYS[1])
if not spent then
  if not ARGV[3] then return -1 end
  spent = ARGV[3]
  redis.call('SET', KEYS[1], spent)
end
if tonumber(spent) + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], 172800)
  return 0
end
redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], 172800)
return 1
"""


def budget_verdict(
    *, tenant: Tenant, category: Category, channel: str, cost: Decimal | None, delivery_id: UUID
) -> Verdict:
    """Count the send against the tenant's daily budget for the channel (SMS), or say what
    happens to it past the budget: held until the next day, or skipped so that a fallback
    chain moves on to a cheaper channel, as the category chooses. The cost counts once
    reserved, whatever the send's outcome: the budget is never overspent."""
    if cost is None or tenant.sms_daily_budget is None or category.kind == CRITICAL:
        return SEND
    today = timezone.now().astimezone(UTC).date()
    key = f"notify:spend:{channel}:{tenant.id}:{today.isoformat()}"
    noted = Delivery.objects.filter(id=delivery_id, status=DeliveryStatus.SENDING)
    try:
        if _counted(what="spend", delivery_id=delivery_id):
            return SEND
        # Noted in the database before it is counted in Redis, so that a rebuild never misses
        # a send in flight (at worst it counts one twice).
        noted.update(segments=_segments(cost=cost))
        args = [str(cost), str(tenant.sms_daily_budget)]
        reserved = int(_spend_script()(keys=[key], args=args))
        if reserved == -1:  # a new day, or a Redis that lost the day's count
            spent = spend_rebuild(tenant=tenant, channel=channel, day=today, delivery_id=delivery_id)
            reserved = int(_spend_script()(keys=[key], args=[*args, str(spent)]))
        if reserved == 1:
            _count(what="spend", delivery_id=delivery_id)
            return SEND
        decision = _over_budget(tenant=tenant, category=category, channel=channel, today=today)
    except redis.RedisError:
        decision = _store_unreachable(what="the spend budget")
    noted.update(segments=None)  # not counted: a rebuild must not count it while it waits
    return decision


def _over_budget(*, tenant: Tenant, category: Category, channel: str, today: date) -> Verdict:
    reason = f"the daily {channel} budget of {tenant.sms_daily_budget} is spent"
    if category.over_budget == OverBudget.FALLBACK:
        return Verdict(SUPPRESSED, reason)
    tomorrow = datetime.combine(today + timedelta(days=1), time(), tzinfo=UTC)
    return Verdict(DEFERRED, f"{reason}; held until {tomorrow.isoformat()}", until=tomorrow)


def spend_rebuild(*, tenant: Tenant, channel: str, day: date, delivery_id: UUID) -> Decimal:
    """What the tenant's non-critical sends on the channel cost on the day (UTC), from the
    database: the texts sent that day, by their billed segments, and those being sent now
    (noted before they were counted). The delivery being counted is left out."""
    midnight = datetime.combine(day, time(), tzinfo=UTC)
    segments = (
        Delivery.objects.filter(notification__tenant_id=tenant.id, channel=channel)
        .exclude(notification__category__kind=CRITICAL)
        .exclude(id=delivery_id)
        .filter(Q(sent_at__gte=midnight) | Q(status=DeliveryStatus.SENDING, segments__isnull=False))
        .aggregate(total=Sum("segments"))["total"]
    )
    return (segments or 0) * _segment_price()


def _segments(*, cost: Decimal) -> int:
    return int((cost / _segment_price()).to_integral_value())


def _segment_price() -> Decimal:
    return Decimal(settings.NOTIFY_SMS_SEGMENT_PRICE)


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
