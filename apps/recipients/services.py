from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.catalog.models import CategoryKind
from apps.recipients.models import Consent, Device, PreferenceSet, Recipient, WebPushSubscription
from apps.tenants.models import Tenant
from apps.webhooks.models import EventType
from apps.webhooks.services import event_emit


def recipient_upsert(*, tenant: Tenant, external_id: str, fields: dict[str, Any]) -> tuple[Recipient, bool]:
    """Create the recipient, or update only the given fields of the existing one."""
    with transaction.atomic():
        return Recipient.objects.update_or_create(tenant=tenant, external_id=external_id, defaults=fields)


def device_register(
    *, tenant: Tenant, recipient: Recipient, token: str, platform: str, app: str
) -> tuple[Device, bool]:
    """Register a device, or update the one with this token: re-registering reactivates it
    and moves it to this recipient if it changed hands."""
    with transaction.atomic():
        return Device.objects.update_or_create(
            tenant=tenant,
            token=token,
            defaults={
                "recipient": recipient,
                "platform": platform,
                "app": app,
                "active": True,
                "deactivated_reason": "",
            },
        )


def webpush_subscribe(
    *, tenant: Tenant, recipient: Recipient, endpoint: str, p256dh: str, auth: str
) -> tuple[WebPushSubscription, bool]:
    """Save a browser's subscription, or refresh the one with this endpoint. Raises
    ValidationError for an endpoint the server must not send to. A recipient keeps at most
    NOTIFY_WEBPUSH_MAX_SUBSCRIPTIONS_PER_RECIPIENT active ones: past it, the one refreshed
    longest ago is deactivated, as browsers drop old subscriptions without telling anyone."""
    # The outbound guard's check (https on public addresses, or a host on
    # NOTIFY_WEBPUSH_ALLOWED_HOSTS): a ValidationError on `endpoint`.
    WebPushSubscription(endpoint=endpoint).clean()
    with transaction.atomic():
        # One subscriber at a time per recipient, so that the cap holds under concurrent saves.
        Recipient.objects.select_for_update().filter(pk=recipient.pk).values_list("pk").get()
        subscription, created = WebPushSubscription.objects.update_or_create(
            tenant=tenant,
            endpoint=endpoint,
            defaults={"recipient": recipient, "p256dh": p256dh, "auth": auth, "active": True, "deactivated_reason": ""},
        )
        limit = settings.NOTIFY_WEBPUSH_MAX_SUBSCRIPTIONS_PER_RECIPIENT
        over = WebPushSubscription.objects.filter(recipient=recipient, active=True).order_by("-updated_at", "-id")[
            limit:
        ]
        WebPushSubscription.objects.filter(pk__in=list(over.values_list("pk", flat=True))).update(
            active=False, deactivated_reason=f"replaced by a newer subscription (at most {limit} per recipient)"
        )
    return subscription, created


PREFERENCE_FIELDS = ("paused", "paused_until", "channels", "categories", "channel_order", "quiet_hours")
# Settings that a partial update merges key by key instead of replacing whole.
MERGED_PREFERENCES = ("channels", "categories")


def preferences_get(*, recipient: Recipient) -> PreferenceSet:
    """The recipient's preferences; an unsaved, empty set (all defaults) when there are none."""
    return PreferenceSet.objects.filter(recipient=recipient).first() or PreferenceSet(recipient=recipient)


def preferences_update(*, recipient: Recipient, fields: dict[str, Any], merge: bool) -> PreferenceSet:
    """Save validated preference fields. With `merge`, `channels` and `categories` change only
    the keys given, a null removing a key (back to the default), and other fields given are
    replaced; without it, whatever is left out goes back to its default. The next send reads
    them from the database (notify.policy.preferences)."""
    if not merge:
        defaults = PreferenceSet(recipient=recipient)
        fields = {name: fields.get(name, getattr(defaults, name)) for name in PREFERENCE_FIELDS}
    with transaction.atomic():
        preferences, _ = PreferenceSet.objects.select_for_update().get_or_create(recipient=recipient)
        for name, value in fields.items():
            if merge and name in MERGED_PREFERENCES:
                value = _merged(getattr(preferences, name), value, nested=name == "categories")
            setattr(preferences, name, value)
        preferences.save()
    return preferences


def _merged(current: dict[str, Any], changes: dict[str, Any], *, nested: bool) -> dict[str, Any]:
    merged = dict(current)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        elif nested:
            merged[key] = _merged(merged.get(key, {}), value, nested=False)
            if not merged[key]:  # nothing of its own left: the category follows the defaults
                del merged[key]
        else:
            merged[key] = value
    return merged


@transaction.atomic
def unsubscribe(*, recipient: Recipient, category_key: str, channel: str) -> None:
    """Turn the category off on the channel for the recipient (and for a marketing category,
    withdraw their consent on the channel too). Takes effect with the next notification."""
    preferences_update(recipient=recipient, fields={"categories": {category_key: {channel: False}}}, merge=True)
    category = recipient.tenant.categories.filter(key=category_key).first()
    event_emit(
        tenant_id=recipient.tenant_id,
        event_type=EventType.RECIPIENT_UNSUBSCRIBED,
        data={"recipient": recipient.external_id, "category": category_key, "channel": channel},
        category_id=category.pk if category is not None else None,
        at=timezone.now(),
    )
    if category is not None and category.kind == CategoryKind.MARKETING:
        consent_record(recipient=recipient, channel=channel, granted=False, source="unsubscribe link")


def consent_record(*, recipient: Recipient, channel: str, granted: bool, source: str) -> Consent:
    """Record a grant or a withdrawal; the newest one for the channel is the answer."""
    with transaction.atomic():
        consent = Consent.objects.create(
            tenant_id=recipient.tenant_id, recipient=recipient, channel=channel, granted=granted, source=source
        )
        event_emit(
            tenant_id=recipient.tenant_id,
            event_type=EventType.RECIPIENT_CONSENT_CHANGED,
            data={"recipient": recipient.external_id, "channel": channel, "granted": granted, "source": source},
            at=consent.recorded_at,
        )
    return consent


def consents_current(*, recipient: Recipient) -> dict[str, Consent]:
    """The standing answer per channel."""
    return consents_standing(recipient_ids=[recipient.id]).get(recipient.id, {})


def consents_standing(*, recipient_ids: list[UUID]) -> dict[UUID, dict[str, Consent]]:
    """Each recipient's standing answer per channel: the newest record for it."""
    standing: dict[UUID, dict[str, Consent]] = {}
    # Oldest first, so that the newest answer per channel is the one left standing.
    for consent in Consent.objects.filter(recipient_id__in=recipient_ids).order_by("recorded_at", "id"):
        standing.setdefault(consent.recipient_id, {})[consent.channel] = consent
    return standing
