"""A person's data rights: a copy of everything held about them, and its erasure.

Erasure keeps the rows that counts are made from (notifications, deliveries and their history,
which broadcast counts and the metrics group), with every personal field blanked, and deletes
what is personal through and through (devices, subscriptions, preferences, consents, topic
memberships, inbox items, open digests). The recipient row stays as a tombstone with its
external id, the tenant's own pseudonymous key, so that a second erase answers the same.
Suppressed addresses are replaced by a keyed hash (HMAC-SHA256 with NOTIFY_ERASURE_HASH_KEY):
the address is gone, yet an event that brings it back is still suppressed. A person who had
unsubscribed on a channel (withdrawn consent, the channel or any category switched off) has
their address on it suppressed first: their preferences are erased with them, and a person who
asked for less must not get more once nobody remembers the asking."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Prefetch, Q, QuerySet
from django.utils import timezone

from apps.recipients.models import (
    Consent,
    Device,
    PreferenceSet,
    Recipient,
    Suppression,
    WebPushSubscription,
    address_hashed,
)

RECIPIENT_CHANNELS = {"email": "email", "sms": "phone"}


@dataclass(frozen=True)
class RecipientExport:
    recipient: Recipient
    devices: QuerySet
    webpush_subscriptions: QuerySet
    preferences: PreferenceSet | None
    consents: QuerySet
    topics: list[str]
    notifications: list[Any]
    notifications_truncated: bool
    inbox_items: QuerySet
    suppressions: QuerySet


def recipient_export(*, recipient: Recipient, categories: list[str] | None = None) -> RecipientExport:
    """Everything held about a person; notifications newest first, at most
    NOTIFY_EXPORT_MAX_NOTIFICATIONS (with `categories`, a limited key's, only theirs)."""
    from apps.deliveries.models import Delivery, Notification
    from apps.inbox.models import InboxItem

    limit = settings.NOTIFY_EXPORT_MAX_NOTIFICATIONS
    notifications = (
        Notification.objects.filter(recipient=recipient)
        .select_related("recipient", "category", "template_version")
        .prefetch_related(Prefetch("deliveries", queryset=Delivery.objects.prefetch_related("events")))
        .order_by("-created_at", "-id")
    )
    if categories:
        notifications = notifications.filter(category__key__in=categories)
    page = list(notifications[: limit + 1])
    return RecipientExport(
        recipient=recipient,
        devices=Device.objects.filter(recipient=recipient).select_related("recipient").order_by("created_at"),
        webpush_subscriptions=WebPushSubscription.objects.filter(recipient=recipient)
        .select_related("recipient")
        .order_by("created_at"),
        preferences=PreferenceSet.objects.filter(recipient=recipient).first(),
        consents=Consent.objects.filter(recipient=recipient).order_by("recorded_at", "id"),
        topics=sorted(recipient.topic_memberships.values_list("topic__key", flat=True)),
        notifications=page[:limit],
        notifications_truncated=len(page) > limit,
        inbox_items=InboxItem.objects.filter(recipient=recipient).order_by("-created_at"),
        suppressions=Suppression.objects.filter(tenant_id=recipient.tenant_id, address__in=_addresses(recipient))
        .exclude(address="")
        .order_by("created_at"),
    )


def _addresses(recipient: Recipient) -> list[str]:
    from notify.policy.suppression import address_canonical

    return [
        address_canonical(channel=channel, address=getattr(recipient, field))
        for channel, field in RECIPIENT_CHANNELS.items()
        if getattr(recipient, field)
    ]


@dataclass(frozen=True)
class Erasure:
    recipient: Recipient
    erased_at: datetime
    # What this call changed, by kind; all zero when there was nothing left to erase.
    counts: dict[str, int]


def recipient_erase(*, recipient: Recipient) -> Erasure:
    """Erase a person's data (see the module's docstring); a second call changes nothing."""
    from apps.audiences.models import TopicMembership
    from apps.deliveries.models import (
        DeliveryEvent,
        Digest,
        EarlyFeedback,
        Event,
        Notification,
    )
    from apps.inbox.models import InboxItem

    with transaction.atomic():
        # The row lock orders an erase after an event that is upserting this recipient.
        recipient = Recipient.objects.select_for_update().get(pk=recipient.pk)
        counts: dict[str, int] = {}
        counts["unsubscribes_kept"] = _unsubscribes_suppress(recipient=recipient)
        suppressions = Suppression.objects.filter(tenant_id=recipient.tenant_id, address__in=_addresses(recipient))
        hashed = 0
        for suppression in suppressions:
            suppression.address = address_hashed(address=suppression.address)
            suppression.save(update_fields=["address"])
            hashed += 1
        counts["suppressions_hashed"] = hashed
        profile_changed = bool(recipient.email or recipient.phone or recipient.attributes or recipient.locale)
        if profile_changed or recipient.timezone != "UTC":
            Recipient.objects.filter(pk=recipient.pk).update(
                email="",
                phone="",
                attributes={},
                locale="",
                timezone="UTC",
                updated_at=timezone.now(),
            )
        counts["profile"] = int(profile_changed)
        counts["devices"] = Device.objects.filter(recipient=recipient).delete()[0]
        counts["webpush_subscriptions"] = WebPushSubscription.objects.filter(recipient=recipient).delete()[0]
        counts["preferences"] = PreferenceSet.objects.filter(recipient=recipient).delete()[0]
        counts["consents"] = Consent.objects.filter(recipient=recipient).delete()[0]
        counts["topic_memberships"] = TopicMembership.objects.filter(recipient=recipient).delete()[0]
        counts["digests"] = Digest.objects.filter(recipient=recipient).delete()[0]
        counts["inbox_items"] = InboxItem.objects.filter(recipient=recipient).delete()[0]
        notifications = Notification.objects.filter(recipient=recipient)
        counts["early_feedback"] = EarlyFeedback.objects.filter(delivery__notification__in=notifications).delete()[0]
        counts["history_details"] = (
            DeliveryEvent.objects.filter(delivery__notification__in=notifications).exclude(detail={}).update(detail={})
        )
        # An event's data is this person's alone when all its notifications are theirs; a
        # broadcast's or a multi-recipient event's data is the producer's, shared by all.
        own_events = (
            Event.objects.filter(notifications__recipient=recipient)
            .annotate(others=Count("notifications", filter=~Q(notifications__recipient=recipient)))
            .filter(others=0)
            .exclude(data={})
            .values("pk")
        )
        counts["event_data"] = Event.objects.filter(pk__in=own_events).update(data={})
        erased_at = recipient.erased_at or timezone.now()
        if recipient.erased_at is None:
            Recipient.objects.filter(pk=recipient.pk).update(erased_at=erased_at)
        recipient.refresh_from_db()
        if any(counts.values()):
            _audit_erasure(recipient=recipient, counts=counts)
    return Erasure(recipient=recipient, erased_at=erased_at, counts=counts)


def _unsubscribes_suppress(*, recipient: Recipient) -> int:
    """Suppress the person's address on each channel they unsubscribed from; how many were new."""
    from apps.recipients.services import consents_current
    from notify.policy.suppression import suppression_add

    preferences = PreferenceSet.objects.filter(recipient=recipient).first()
    unsubscribed = {
        channel for channel, consent in consents_current(recipient=recipient).items() if not consent.granted
    }
    if preferences is not None:
        unsubscribed |= {channel for channel, on in preferences.channels.items() if on is False}
        for switches in preferences.categories.values():
            unsubscribed |= {channel for channel, on in switches.items() if on is False}
    added = 0
    for channel, field in RECIPIENT_CHANNELS.items():
        address = getattr(recipient, field)
        if channel in unsubscribed and address:
            added += suppression_add(
                tenant_id=recipient.tenant_id,
                channel=channel,
                address=address,
                reason="unsubscribed, then erased",
                source="erasure",
            )
    return added


def _audit_erasure(*, recipient: Recipient, counts: dict[str, int]) -> None:
    from apps.ops.audit import Actor, actor_current, audit_record

    actor = actor_current() or Actor(type="system", id="", label="system")
    audit_record(
        actor=actor,
        tenant_id=recipient.tenant_id,
        action="erase",
        object_type="recipients.Recipient",
        object_id=recipient.external_id,
        changes={kind: [count, 0] for kind, count in counts.items() if count},
    )
