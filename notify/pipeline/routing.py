"""Routing after the first send: fallback chains move on, and escalations fire or are cancelled.

A fallback notification has one delivery per channel, in the recipient's order; the first
reachable one is queued and the rest wait in `standby`. The chain moves to the next step when
every started step failed (permanently, or out of retries, or was withheld), or was sent and
not confirmed delivered within the category's `fallback_timeout`. It stops at the first step
that reaches the person: email and SMS when their provider confirms delivery; push, web push
and in-app once sent, since their providers confirm nothing more. Every move is written in the
history with its reason.

A chain is advanced under its notification's row lock, so two outcomes arriving at once (a
worker's record and a provider's webhook) cannot both start the next step."""

from collections.abc import Iterable
from datetime import datetime
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from apps.deliveries.models import Delivery, DeliveryStatus, Notification
from apps.inbox.models import InboxItem
from notify.pipeline.dispatch import deliveries_publish_on_commit
from notify.pipeline.record import history_event, history_insert

# Providers of these channels confirm nothing after accepting: sent is as far as they go.
SENT_IS_REACHED = frozenset({"push", "webpush", "inapp"})
REACHED = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.OPENED, DeliveryStatus.CLICKED})
IN_FLIGHT = frozenset({DeliveryStatus.QUEUED, DeliveryStatus.SENDING, DeliveryStatus.RETRYING, DeliveryStatus.DEFERRED})


def chains_advance(*, notification_ids: Iterable[UUID], now: datetime | None = None) -> int:
    """Move each chained notification on where it should; return how many steps started."""
    now = now or timezone.now()
    started = 0
    for notification_id in sorted(set(notification_ids)):
        with transaction.atomic():
            notification = (
                Notification.objects.select_for_update(of=("self",))
                .select_related("category")
                .filter(id=notification_id, cancelled_at__isnull=True)
                .first()
            )
            if notification is not None:
                steps = list(Delivery.objects.filter(notification=notification, step__isnull=False).order_by("step"))
                started += _chain_advance(notification=notification, steps=steps, now=now)
    return started


def _chain_advance(*, notification: Notification, steps: list[Delivery], now: datetime) -> int:
    standby = [d for d in steps if d.status == DeliveryStatus.STANDBY]
    if not standby:
        return 0
    timeout = notification.category.fallback_timeout
    reached = next((d for d in steps if _reached(delivery=d, confirm_within=timeout is not None)), None)
    if reached is not None:
        reason = f"step {(reached.step or 0) + 1} ({reached.channel}) reached the recipient"
        _standby_cancel(deliveries=standby, reason=reason, now=now)
        return 0
    if any(d.status in IN_FLIGHT for d in steps):
        return 0
    started = [d for d in steps if d.status != DeliveryStatus.STANDBY]
    awaiting = [
        d for d in started if d.status == DeliveryStatus.SENT and d.sent_at and timeout and d.sent_at + timeout > now
    ]
    if awaiting:
        return 0  # sent: its delivery report may still come within the timeout
    last = started[-1] if started else None
    why = (
        f"not confirmed delivered within {timeout}"
        if last is not None and last.status == DeliveryStatus.SENT
        else (last.status_reason or last.status if last is not None else "")
    )
    reason = f"fallback from step {(last.step or 0) + 1} ({last.channel}): {why}" if last is not None else "fallback"
    _standby_activate(deliveries=standby[:1], reason=reason, now=now)
    return 1


def _reached(*, delivery: Delivery, confirm_within: bool) -> bool:
    if delivery.status in REACHED:
        return True
    # Sent counts as reached where nothing more can come, or where nobody waits for more.
    return delivery.status == DeliveryStatus.SENT and (delivery.channel in SENT_IS_REACHED or not confirm_within)


def chains_timed_out(*, now: datetime) -> list[UUID]:
    """Chained notifications with a step sent but not confirmed within the timeout, and a
    step still in standby."""
    return list(
        Delivery.objects.filter(
            step__isnull=False,
            status=DeliveryStatus.SENT,
            notification__category__fallback_timeout__isnull=False,
            sent_at__lte=now - F("notification__category__fallback_timeout"),
            notification__deliveries__status=DeliveryStatus.STANDBY,
        )
        .exclude(channel__in=SENT_IS_REACHED)
        .values_list("notification_id", flat=True)
        .distinct()
    )


# What a chain step ends in when it did not reach the person.
ENDED_UNREACHED = frozenset(
    {
        DeliveryStatus.FAILED,
        DeliveryStatus.DEAD,
        DeliveryStatus.SUPPRESSED,
        DeliveryStatus.EXPIRED,
        DeliveryStatus.BOUNCED,
        DeliveryStatus.COMPLAINED,
    }
)


def chains_stalled() -> list[UUID]:
    """Chains with a step in standby, nothing under way, and a step that ended unreached: a
    worker died between recording a step and moving on, or a lease expired into a dead letter."""
    under_way = [*IN_FLIGHT, DeliveryStatus.SENT, *REACHED]
    return list(
        Delivery.objects.filter(
            step__isnull=False, status__in=ENDED_UNREACHED, notification__deliveries__status=DeliveryStatus.STANDBY
        )
        .exclude(notification__deliveries__status__in=under_way)
        .values_list("notification_id", flat=True)
        .distinct()[: settings.NOTIFY_SWEEP_CHUNK]
    )


def escalations_due(*, now: datetime) -> int:
    """Send the escalations whose time has come, unless their notification was read by
    then; return how many were sent."""
    notification_ids = set(
        Delivery.objects.filter(status=DeliveryStatus.STANDBY, escalation=True, next_attempt_at__lte=now).values_list(
            "notification_id", flat=True
        )
    )
    sent = 0
    for notification_id in sorted(notification_ids):
        with transaction.atomic():
            Notification.objects.select_for_update().filter(id=notification_id).first()
            # Locked, and still in standby once locked: a read's cancel cannot be overwritten.
            due = list(
                Delivery.objects.select_for_update().filter(
                    notification_id=notification_id,
                    status=DeliveryStatus.STANDBY,
                    escalation=True,
                    next_attempt_at__lte=now,
                )
            )
            if _read(notification_id=notification_id):
                _standby_cancel(deliveries=due, reason="read in the in-app inbox in time", now=now)
                continue
            _standby_activate(deliveries=due, reason="escalation: not read in time", now=now)
            sent += len(due)
    return sent


def escalations_cancel(*, notification_ids: Iterable[UUID]) -> int:
    """The person read it: the escalations waiting for it are not needed."""
    now = timezone.now()
    with transaction.atomic():
        waiting = list(
            Delivery.objects.select_for_update().filter(
                notification_id__in=list(notification_ids), status=DeliveryStatus.STANDBY, escalation=True
            )
        )
        _standby_cancel(deliveries=waiting, reason="read in the in-app inbox", now=now)
    return len(waiting)


def _read(*, notification_id: UUID) -> bool:
    return InboxItem.objects.filter(delivery__notification_id=notification_id, read_at__isnull=False).exists()


def _standby_activate(*, deliveries: list[Delivery], reason: str, now: datetime) -> None:
    """Queue standby deliveries now, and publish them when the transaction commits."""
    for delivery in deliveries:
        delivery.status, delivery.status_reason = DeliveryStatus.QUEUED, ""
        delivery.next_attempt_at = delivery.updated_at = now
    deliveries_publish_on_commit(deliveries=deliveries, now=now)
    Delivery.objects.bulk_update(
        deliveries, fields=["status", "status_reason", "next_attempt_at", "published_at", "updated_at"]
    )
    history_insert(
        rows=[history_event(delivery=d, status=DeliveryStatus.QUEUED, reason=reason, at=now) for d in deliveries]
    )


def _standby_cancel(*, deliveries: list[Delivery], reason: str, now: datetime) -> None:
    for delivery in deliveries:
        delivery.status, delivery.status_reason, delivery.updated_at = DeliveryStatus.CANCELLED, reason, now
    Delivery.objects.bulk_update(deliveries, fields=["status", "status_reason", "updated_at"])
    history_insert(
        rows=[history_event(delivery=d, status=DeliveryStatus.CANCELLED, reason=reason, at=now) for d in deliveries]
    )


def routing_sweep(*, now: datetime) -> int:
    """The timed parts: chains whose step went unconfirmed too long, chains left stalled, and
    escalations due."""
    chains = {*chains_timed_out(now=now), *chains_stalled()}
    return chains_advance(notification_ids=chains, now=now) + escalations_due(now=now)
