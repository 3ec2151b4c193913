"""The synthetic canary: a notification on every configured channel, every few minutes, through
the whole pipeline, to a probe recipient in the installation's system tenant.

A channel is configured when its probe address is set (NOTIFY_CANARY_EMAIL, _PHONE,
_PUSH_TOKEN, _WEBPUSH_SUBSCRIPTION, _INAPP). Each run is ingested as a producer's event is
(`events_ingest`), in a critical category, so that no quiet hours, cap or opt-out can hold
it, and is then left to the workers. Every pass reads the open runs' deliveries: their own
timestamps and history say when each was sent and delivered. A run succeeds when it reaches
`delivered` on the channels whose provider reports delivery (NOTIFY_CANARY_DELIVERED_CHANNELS)
and `sent` on the others; it fails when the delivery fails, and is late when neither has
happened within NOTIFY_CANARY_DEADLINE_SECONDS."""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Min

from apps.catalog.models import Category, CategoryKind, Channel, Priority, Template, TemplateVariant, TemplateVersion
from apps.deliveries.models import Delivery, DeliveryEvent, DeliveryStatus, Event
from apps.ops.models import CanaryRun, CanaryState
from apps.recipients.models import Device, DevicePlatform, Recipient, WebPushSubscription
from apps.tenants.models import Tenant
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest

logger = logging.getLogger(__name__)

SYSTEM_TENANT_SLUG = "notify-system"
CANARY_CATEGORY = "canary"
PROBE_RECIPIENT = "canary-probe"
CANARY_VARIANTS = [
    {"channel": Channel.EMAIL, "subject": "Notify canary {{ data.run }}", "body": "Synthetic check {{ data.run }}."},
    {"channel": Channel.SMS, "body": "Notify canary {{ data.run }}"},
    {"channel": Channel.PUSH, "title": "Notify canary", "body": "Synthetic check {{ data.run }}"},
    {"channel": Channel.WEBPUSH, "title": "Notify canary", "body": "Synthetic check {{ data.run }}"},
    {"channel": Channel.INAPP, "title": "Notify canary", "body": "Synthetic check {{ data.run }}"},
]
# A delivery in one of these will never reach sent or delivered.
FAILED_STATUSES = {
    DeliveryStatus.FAILED,
    DeliveryStatus.DEAD,
    DeliveryStatus.BOUNCED,
    DeliveryStatus.COMPLAINED,
    DeliveryStatus.SUPPRESSED,
    DeliveryStatus.EXPIRED,
    DeliveryStatus.CANCELLED,
    DeliveryStatus.SUPERSEDED,
}
DELIVERED_STATUSES = {DeliveryStatus.DELIVERED, DeliveryStatus.OPENED, DeliveryStatus.CLICKED}
# Old runs and their notifications are deleted this many at a time, so that a purge never
# holds many locks or runs long.
PURGE_BATCH = 100


@dataclass(frozen=True)
class CanaryResult:
    """A channel's canary as the metrics and the dashboard show it."""

    channel: str
    state: str  # the latest run's
    started_at: datetime
    success: bool | None  # the latest settled run's outcome; None before any has settled
    settled_state: str | None  # that run's state (sent, delivered, late, failed), and why
    reason: str
    sent_seconds: float | None  # of the latest settled run
    delivered_seconds: float | None
    last_success_at: datetime | None  # when the latest successful run started


def canary_channels() -> list[str]:
    """The channels whose probe address is set, in the channels' order."""
    configured = {
        Channel.EMAIL: bool(settings.NOTIFY_CANARY_EMAIL),
        Channel.SMS: bool(settings.NOTIFY_CANARY_PHONE),
        Channel.PUSH: bool(settings.NOTIFY_CANARY_PUSH_TOKEN),
        Channel.WEBPUSH: bool(settings.NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION),
        Channel.INAPP: settings.NOTIFY_CANARY_INAPP,
    }
    return [channel for channel in Channel.values if configured[Channel(channel)]]


@transaction.atomic
def system_tenant_ensure() -> Tenant:
    """The installation's own tenant, its canary category and probe recipient, created when
    missing; the probe's addresses follow the settings."""
    tenant, _ = Tenant.objects.get_or_create(slug=SYSTEM_TENANT_SLUG, defaults={"name": "Notify (system)"})
    template, created = Template.objects.get_or_create(
        tenant=tenant, key=CANARY_CATEGORY, defaults={"name": "Synthetic canary"}
    )
    if created:
        version = TemplateVersion.objects.create(template=template, number=1, note="canary")
        for variant in CANARY_VARIANTS:
            TemplateVariant.objects.create(version=version, **variant)
    Category.objects.get_or_create(
        tenant=tenant,
        key=CANARY_CATEGORY,
        defaults={
            "kind": CategoryKind.CRITICAL,  # never paused, capped, opted out or held for quiet hours
            "default_priority": Priority.CRITICAL,
            "default_channels": list(Channel.values),
            "template": template,
            "description": "The synthetic canary (NOTIFY_CANARY_*)",
        },
    )
    probe, _ = Recipient.objects.update_or_create(
        tenant=tenant,
        external_id=PROBE_RECIPIENT,
        defaults={"email": settings.NOTIFY_CANARY_EMAIL, "phone": settings.NOTIFY_CANARY_PHONE},
    )
    # A probe address the settings no longer name is not sent to again.
    Device.objects.filter(recipient=probe, active=True).exclude(token=settings.NOTIFY_CANARY_PUSH_TOKEN).update(
        active=False, deactivated_reason="no longer the canary's probe"
    )
    subscription = settings.NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION
    WebPushSubscription.objects.filter(recipient=probe, active=True).exclude(
        endpoint=subscription["endpoint"] if subscription else ""
    ).update(active=False, deactivated_reason="no longer the canary's probe")
    if settings.NOTIFY_CANARY_PUSH_TOKEN:
        Device.objects.update_or_create(
            tenant=tenant,
            token=settings.NOTIFY_CANARY_PUSH_TOKEN,
            defaults={"recipient": probe, "platform": DevicePlatform.ANDROID, "app": "canary", "active": True},
        )
    if subscription:
        WebPushSubscription.objects.update_or_create(
            tenant=tenant,
            endpoint=subscription["endpoint"],
            defaults={
                "recipient": probe,
                "active": True,
                "p256dh": subscription["p256dh"],
                "auth": subscription["auth"],
            },
        )
    return tenant


def canary_start(*, now: datetime) -> list[CanaryRun]:
    """Send one canary notification on each configured channel, as a producer's event; one run each."""
    channels = canary_channels()
    if not channels:
        return []
    tenant = system_tenant_ensure()
    delivered_channels = set(settings.NOTIFY_CANARY_DELIVERED_CHANNELS)
    runs = [
        CanaryRun(
            channel=channel,
            started_at=now,
            success_state=CanaryState.DELIVERED if channel in delivered_channels else CanaryState.SENT,
        )
        for channel in channels
    ]
    with transaction.atomic():
        CanaryRun.objects.bulk_create(runs)
        results = events_ingest(
            tenant=tenant,
            events=[
                EventRequest(
                    category_key=CANARY_CATEGORY,
                    recipients=[RecipientRef(external_id=PROBE_RECIPIENT)],
                    channels=[run.channel],
                    data={"run": run.pk},
                    idempotency_key=f"canary:{run.pk}",
                    body={"canary_run": run.pk},
                )
                for run in runs
            ],
        )
        event_ids = [result.response["event_id"] for result in results]
        deliveries = {
            str(d.notification.event_id): d
            for d in Delivery.objects.filter(notification__event_id__in=event_ids).select_related("notification")
        }
        for run, event_id in zip(runs, event_ids, strict=True):
            delivery = deliveries[event_id]
            run.event_id, run.delivery = delivery.notification.event_id, delivery
        CanaryRun.objects.bulk_update(runs, ["event", "delivery"])
    return runs


def canary_runs_settle(*, now: datetime) -> int:
    """Bring the open runs up to date from their deliveries: sent, delivered, failed, or late
    past the deadline; return how many settled."""
    deadline = timedelta(seconds=settings.NOTIFY_CANARY_DEADLINE_SECONDS)
    runs = list(CanaryRun.objects.filter(settled_at__isnull=True).select_related("delivery").order_by("started_at"))
    delivered_at = dict(
        DeliveryEvent.objects.filter(
            delivery_id__in=[run.delivery_id for run in runs if run.delivery_id], status__in=DELIVERED_STATUSES
        )
        .values("delivery_id")
        .annotate(first=Min("created_at"))
        .values_list("delivery_id", "first")
    )
    settled = 0
    for run in runs:
        first_delivered = delivered_at.get(run.delivery_id) if run.delivery_id else None
        _run_update(run=run, delivered_at=first_delivered, now=now, deadline=deadline)
        if run.settled_at is not None:
            settled += 1
        run.save()
    return settled


def _run_update(*, run: CanaryRun, delivered_at: datetime | None, now: datetime, deadline: timedelta) -> None:
    delivery = run.delivery
    if delivery is not None and delivery.sent_at is not None and run.sent_at is None:
        run.sent_at = delivery.sent_at
        run.sent_seconds = (delivery.sent_at - run.started_at).total_seconds()
    if delivered_at is not None and run.delivered_at is None:
        run.delivered_at = delivered_at
        run.delivered_seconds = (delivered_at - run.started_at).total_seconds()
    if run.delivered_at is not None:
        run.state = CanaryState.DELIVERED
    elif run.sent_at is not None:
        run.state = CanaryState.SENT
    success_at = run.delivered_at if run.success_state == CanaryState.DELIVERED else run.sent_at
    if success_at is not None:
        # A success that came after the deadline is still late.
        run.settled_at = now
        if success_at - run.started_at > deadline:
            run.state, run.reason = CanaryState.LATE, f"reached {run.success_state} after the deadline"
        else:
            run.state = run.success_state
    elif delivery is None:
        run.state, run.reason, run.settled_at = CanaryState.FAILED, "its delivery is gone", now
    elif delivery.status in FAILED_STATUSES:
        run.state, run.settled_at = CanaryState.FAILED, now
        run.reason = f"{delivery.status}: {delivery.status_reason}"[:500]
    elif now - run.started_at > deadline:
        run.state, run.settled_at = CanaryState.LATE, now
        run.reason = f"still {delivery.status} after {deadline.total_seconds():.0f}s: {delivery.status_reason}"[:500]


def canary_purge(*, now: datetime) -> int:
    """Delete runs older than NOTIFY_CANARY_KEEP_DAYS with their events (and so notifications
    and deliveries), one small batch per call; return how many runs went."""
    cutoff = now - timedelta(days=settings.NOTIFY_CANARY_KEEP_DAYS)
    runs = list(CanaryRun.objects.filter(started_at__lt=cutoff).order_by("started_at")[:PURGE_BATCH])
    if not runs:
        return 0
    with transaction.atomic():
        CanaryRun.objects.filter(pk__in=[run.pk for run in runs]).delete()
        Event.objects.filter(pk__in=[run.event_id for run in runs if run.event_id]).delete()
    return len(runs)


def canary_tick(*, now: datetime) -> dict[str, int]:
    """The periodic pass: settle open runs, start new ones, purge old ones."""
    if not settings.NOTIFY_CANARY_INTERVAL_SECONDS:
        # Beat's database keeps a schedule after the setting that made it is removed.
        return {"settled": 0, "started": 0, "purged": 0}
    settled = canary_runs_settle(now=now)
    started = canary_start(now=now)
    purged = canary_purge(now=now)
    return {"settled": settled, "started": len(started), "purged": purged}


def canary_latest() -> list[CanaryResult]:
    """Each channel's canary: its latest run's state and the latest settled outcome and times.
    A few index-backed rows per channel, for the metrics and the dashboard."""
    results = []
    for channel in Channel.values:
        recent = CanaryRun.objects.filter(channel=channel).order_by("-started_at")
        latest = recent.first()
        if latest is None:
            continue
        settled = latest if latest.settled_at is not None else recent.filter(settled_at__isnull=False).first()
        last_success = recent.filter(state=F("success_state")).only("started_at").first()
        results.append(
            CanaryResult(
                channel=channel,
                state=latest.state,
                started_at=latest.started_at,
                success=None if settled is None else settled.succeeded,
                settled_state=None if settled is None else settled.state,
                reason="" if settled is None else settled.reason,
                sent_seconds=None if settled is None else settled.sent_seconds,
                delivered_seconds=None if settled is None else settled.delivered_seconds,
                last_success_at=None if last_success is None else last_success.started_at,
            )
        )
    return results
