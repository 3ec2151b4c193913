from typing import Any

from django.db import transaction

from apps.recipients.models import Device, Recipient, WebPushSubscription
from apps.tenants.models import Tenant


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
    """Save a browser's subscription, or refresh the one with this endpoint."""
    with transaction.atomic():
        return WebPushSubscription.objects.update_or_create(
            tenant=tenant,
            endpoint=endpoint,
            defaults={"recipient": recipient, "p256dh": p256dh, "auth": auth, "active": True, "deactivated_reason": ""},
        )
