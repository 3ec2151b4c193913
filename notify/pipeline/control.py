"""Operator controls: cancel what has not been sent, replay what died, pause and resume a channel
(for the installation or for one tenant)."""

from functools import partial

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.deliveries.models import (
    CLAIMABLE_STATUSES,
    ChannelSwitch,
    DeadLetter,
    Delivery,
    DeliveryStatus,
    Notification,
)
from apps.tenants.models import Tenant
from notify.pipeline import dispatch
from notify.pipeline.dispatch import deliveries_publish_on_commit
from notify.pipeline.ordering import ordered_category_ids, scopes_advance
from notify.pipeline.record import history_event, history_insert


class NotCancellable(Exception):
    pass


def notification_cancel(*, notification: Notification, reason: str = "cancelled by the producer") -> int:
    """Cancel every delivery of the notification that has not started sending."""
    now = timezone.now()
    with transaction.atomic():
        # The notification first, then its deliveries: the order routing takes them in.
        Notification.objects.select_for_update().filter(pk=notification.pk).first()
        deliveries = list(
            Delivery.objects.select_for_update().filter(
                notification=notification, status__in=[*CLAIMABLE_STATUSES, DeliveryStatus.STANDBY]
            )
        )
        if not deliveries:
            raise NotCancellable("Nothing left to cancel: every delivery has been sent or has finished.")
        for delivery in deliveries:
            delivery.status = DeliveryStatus.CANCELLED
            delivery.status_reason = reason
            delivery.updated_at = now
        Delivery.objects.bulk_update(deliveries, fields=["status", "status_reason", "updated_at"])
        history_insert(
            rows=[history_event(delivery=d, status=DeliveryStatus.CANCELLED, reason=reason, at=now) for d in deliveries]
        )
        Notification.objects.filter(pk=notification.pk).update(cancelled_at=now)
        if notification.category_id in ordered_category_ids():
            # What this notification held back in its ordered scopes may go now.
            scopes = {(notification.recipient_id, notification.category_id, d.channel) for d in deliveries}
            transaction.on_commit(partial(scopes_advance, scopes=scopes))
    return len(deliveries)


def dead_letters_replay(*, dead_letter_ids: list[int], actor: str) -> int:
    """Queue the dead deliveries again with a fresh retry budget; history shows the replay."""
    now = timezone.now()
    with transaction.atomic():
        dead_letters = list(
            DeadLetter.objects.select_for_update()
            .filter(id__in=dead_letter_ids, replayed_at__isnull=True, delivery__status=DeliveryStatus.DEAD)
            .select_related("delivery")
        )
        deliveries = [dl.delivery for dl in dead_letters]
        reason = f"replayed from the dead-letter queue by {actor}"
        for delivery in deliveries:
            delivery.status = DeliveryStatus.QUEUED
            delivery.status_reason = reason
            delivery.attempt_count = 0
            delivery.next_attempt_at = now
            delivery.updated_at = now
        deliveries_publish_on_commit(deliveries=deliveries, now=now)
        Delivery.objects.bulk_update(
            deliveries,
            fields=["status", "status_reason", "attempt_count", "next_attempt_at", "published_at", "updated_at"],
        )
        history_insert(
            rows=[history_event(delivery=d, status=DeliveryStatus.QUEUED, reason=reason, at=now) for d in deliveries]
        )
        DeadLetter.objects.filter(id__in=[dl.id for dl in dead_letters]).update(replayed_at=now, replayed_by=actor)
    return len(dead_letters)


def channel_pause(*, channel: str, reason: str, tenant: Tenant | None = None) -> ChannelSwitch:
    """Stop claiming the channel's deliveries, the whole installation's or one tenant's: they
    wait, unchanged, until it resumes. A batch already claimed finishes."""
    switch, _ = ChannelSwitch.objects.update_or_create(
        tenant=tenant, channel=channel, defaults={"paused": True, "reason": reason[:300]}
    )
    return switch


def channel_resume(*, channel: str, tenant: Tenant | None = None) -> int:
    """Claim the channel's deliveries (the installation's, or one tenant's) again, and publish
    everything it held back at once; return how many deliveries were published. Work another
    switch still holds stays held."""
    ChannelSwitch.objects.update_or_create(tenant=tenant, channel=channel, defaults={"paused": False, "reason": ""})
    now = timezone.now()
    published = 0
    tenant_id = tenant.pk if tenant is not None else None
    while count := dispatch.due_publish(now=now, channel=channel, tenant_id=tenant_id):
        published += count
        if count < settings.NOTIFY_SWEEP_CHUNK:
            break
    return published
