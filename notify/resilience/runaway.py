"""The runaway-send guard: a producer stuck in a loop must not flood a tenant's recipients.

Each ingest call adds the notifications it accepted to the tenant's count for the window
(NOTIFY_RUNAWAY_WINDOW_SECONDS, 15 minutes), in Redis. Past NOTIFY_RUNAWAY_MULTIPLE times
max(the tenant's recipients, NOTIFY_RUNAWAY_RECIPIENT_FLOOR), the tenant is paused: its
normal and bulk deliveries wait unclaimed (as under a kill switch), critical ones still go,
and operators are alerted (an ERROR log, Sentry when configured, an email to
NOTIFY_OPS_EMAILS). A person resumes it from the admin, which publishes the held work.

The window is 15 one-minute buckets (a fifteenth of the window each): one INCRBY and one
MGET per ingest call, in one round trip. The `limits` library, used for the other windows,
cannot do this: its keys include the limit's amount, and this limit moves with the tenant's
recipient count. The recipient count is read only when the window's count passes the
multiple of the floor (nothing below can trip it), and then from a cache refreshed at most
once a minute. Losing Redis resets the count, which only delays the guard."""

import logging
import math
import time
from uuid import UUID

import redis
import sentry_sdk
from django.conf import settings
from django.core.cache import cache
from django.core.mail import send_mail
from django.utils import timezone
from sentry_sdk.integrations.logging import ignore_logger

from apps.recipients.models import Recipient
from apps.tenants.models import Tenant
from notify.pipeline import dispatch
from notify.policy.caps import redis_client

logger = logging.getLogger(__name__)
# The alert goes to Sentry once, explicitly, with the tenant as a tag; not again as a log record.
alert_logger = logging.getLogger(f"{__name__}.alert")
ignore_logger(alert_logger.name)

BUCKETS = 15
# A recipient count younger than this is trusted when the guard is about to trip.
RECOUNT_AFTER_SECONDS = 60
RECIPIENTS_CACHED_SECONDS = 600


def _bucket_seconds() -> int:
    return max(settings.NOTIFY_RUNAWAY_WINDOW_SECONDS // BUCKETS, 1)


def _bucket_keys(*, tenant_id: UUID, now: float) -> list[str]:
    """The window's bucket keys, the current one first."""
    current = int(now // _bucket_seconds())
    return [f"notify:runaway:{tenant_id}:{current - n}" for n in range(BUCKETS)]


def runaway_window_count(*, tenant_id: UUID) -> int:
    """How many notifications the tenant accepted within the window, as the guard counts them."""
    return sum(int(value or 0) for value in redis_client().mget(_bucket_keys(tenant_id=tenant_id, now=time.time())))


def runaway_limit(*, recipients: int) -> int:
    """The most notifications a tenant with this many recipients may accept in the window."""
    return settings.NOTIFY_RUNAWAY_MULTIPLE * max(recipients, settings.NOTIFY_RUNAWAY_RECIPIENT_FLOOR)


def runaway_count(*, tenant: Tenant, accepted: int) -> None:
    """Count the notifications one ingest call accepted; pause the tenant when it runs away."""
    if not settings.NOTIFY_RUNAWAY_MULTIPLE or not accepted or tenant.runaway_paused_at is not None:
        return
    keys = _bucket_keys(tenant_id=tenant.pk, now=time.time())
    try:
        pipe = redis_client().pipeline(transaction=False)
        pipe.incrby(keys[0], accepted)
        pipe.expire(keys[0], settings.NOTIFY_RUNAWAY_WINDOW_SECONDS + _bucket_seconds())
        pipe.mget(keys)
        *_, counts = pipe.execute()
    except redis.RedisError:
        logger.warning("the runaway-send guard's count is unreadable; not counted", exc_info=True)
        return
    sent = sum(int(value or 0) for value in counts)
    if sent <= runaway_limit(recipients=0):  # within the floor's allowance: nothing to look up
        return
    recipients, counted_at = _recipients_cached(tenant_id=tenant.pk)
    if sent > runaway_limit(recipients=recipients) and time.time() - counted_at > RECOUNT_AFTER_SECONDS:
        # Perhaps the tenant has just gained many recipients (a first broadcast): count again.
        recipients, counted_at = _recipients_cached(tenant_id=tenant.pk, fresh=True)
    if sent > runaway_limit(recipients=recipients):
        runaway_trip(tenant=tenant, sent=sent, recipients=recipients)


def _recipients_cached(*, tenant_id: UUID, fresh: bool = False) -> tuple[int, float]:
    """The tenant's recipient count and when it was counted."""
    key = f"runaway-recipients:{tenant_id}"
    cached = None if fresh else cache.get(key)
    if cached is None:
        cached = (Recipient.objects.filter(tenant_id=tenant_id).count(), time.time())
        cache.set(key, cached, RECIPIENTS_CACHED_SECONDS)
    return cached


def runaway_trip(*, tenant: Tenant, sent: int, recipients: int) -> bool:
    """Pause the tenant's normal and bulk work and alert operators; False when it was paused already."""
    now = timezone.now()
    minutes = math.ceil(settings.NOTIFY_RUNAWAY_WINDOW_SECONDS / 60)
    reason = (
        f"{sent} notifications in {minutes} minutes, over {settings.NOTIFY_RUNAWAY_MULTIPLE} x "
        f"max({recipients} recipients, floor {settings.NOTIFY_RUNAWAY_RECIPIENT_FLOOR})"
    )
    # Once, however many ingest calls see the count pass the limit at the same time.
    paused = Tenant.objects.filter(pk=tenant.pk, runaway_paused_at__isnull=True).update(
        runaway_paused_at=now, runaway_reason=reason[:500]
    )
    tenant.runaway_paused_at, tenant.runaway_reason = now, reason
    if paused:
        _operators_alert(tenant=tenant, reason=reason)
    return bool(paused)


def _operators_alert(*, tenant: Tenant, reason: str) -> None:
    message = (
        f"runaway-send guard paused tenant {tenant.slug} ({tenant.name}): {reason}. Its normal and bulk "
        "deliveries wait; critical ones still go. Find the producer that loops, then resume the tenant "
        "in the admin (Tenants: 'Resume tenants paused by the runaway-send guard')."
    )
    alert_logger.error(message)
    if settings.SENTRY_DSN:
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("tenant", tenant.slug)
            scope.fingerprint = ["runaway-send-guard", str(tenant.pk)]
            sentry_sdk.capture_message(message, level="error")
    if settings.NOTIFY_OPS_EMAILS:
        try:
            send_mail(
                subject=f"[notify] runaway sends: tenant {tenant.slug} paused",
                message=message,
                from_email=None,  # DEFAULT_FROM_EMAIL
                recipient_list=settings.NOTIFY_OPS_EMAILS,
            )
        except Exception:  # noqa: BLE001 - the pause stands; the log and Sentry carry the alert
            logger.exception("could not email the runaway-send alert to NOTIFY_OPS_EMAILS")


def runaway_resume(*, tenant_id: UUID, actor: str) -> int:
    """Lift the guard's pause: the window's count starts afresh, and everything the tenant's
    pause held is published; return how many deliveries were published."""
    updated = Tenant.objects.filter(pk=tenant_id, runaway_paused_at__isnull=False).update(
        runaway_paused_at=None, runaway_reason=""
    )
    if not updated:
        return 0
    logger.warning("tenant %s resumed from the runaway-send guard by %s", tenant_id, actor)
    try:
        redis_client().delete(*_bucket_keys(tenant_id=tenant_id, now=time.time()))
    except redis.RedisError:
        logger.warning("could not reset the runaway-send count of tenant %s", tenant_id, exc_info=True)
    now = timezone.now()
    published = 0
    while count := dispatch.due_publish(now=now, tenant_id=tenant_id, priorities=dispatch.RUNAWAY_HELD_PRIORITIES):
        published += count
        if count < settings.NOTIFY_SWEEP_CHUNK:
            break
    return published
