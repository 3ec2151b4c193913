import uuid

from django.core.exceptions import ValidationError
from django.db import models

from apps.tenants.models import Tenant


def validate_timezone(value: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"'{value}' is not an IANA timezone (for example Europe/Paris).")


class Recipient(models.Model):
    """A person a tenant notifies, known by the tenant's own external id."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Indexed through the (tenant, external_id) constraint.
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="recipients", db_index=False)
    external_id = models.CharField(max_length=255)
    email = models.EmailField(blank=True, default="")
    phone = models.CharField(max_length=32, blank=True, default="")
    locale = models.CharField(max_length=35, blank=True, default="")
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    attributes = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "external_id"], name="recipient_external_id_unique")]

    def __str__(self) -> str:
        return self.external_id


class Suppression(models.Model):
    """An address that must not be sent to again on a channel: it hard-bounced, its owner
    complained, or ops added it. Honoured when planning and again just before sending."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="suppressions", db_index=False)
    channel = models.CharField(max_length=16)
    address = models.CharField(max_length=320, help_text="Email address or E.164 number, as sent to.")
    reason = models.CharField(max_length=500)
    source = models.CharField(max_length=100, help_text="What added it: provider:event, or admin.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "channel", "address"], name="suppression_address_unique")
        ]

    def __str__(self) -> str:
        return f"{self.channel}:{self.address}"


class DevicePlatform(models.TextChoices):
    ANDROID = "android", "Android"
    IOS = "ios", "iOS"
    WEB = "web", "Web"


class Device(models.Model):
    """A recipient's app install that can receive mobile push. Registering the same token
    again updates this row (and moves it, if the device changed hands)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="devices", db_index=False)
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="devices")
    platform = models.CharField(max_length=16, choices=DevicePlatform.choices)
    token = models.CharField(max_length=1024)
    app = models.CharField(max_length=100, blank=True, default="")
    active = models.BooleanField(default=True)
    deactivated_reason = models.CharField(max_length=300, blank=True, default="")
    last_seen_at = models.DateTimeField(auto_now=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "token"], name="device_token_unique")]

    def __str__(self) -> str:
        return f"{self.platform} {self.token[:12]}…"


class WebPushSubscription(models.Model):
    """A browser's push subscription (its PushSubscription JSON), for web push with VAPID."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="webpush_subscriptions", db_index=False)
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="webpush_subscriptions")
    endpoint = models.URLField(max_length=1024)
    p256dh = models.CharField(max_length=200, help_text="keys.p256dh from the subscription")
    auth = models.CharField(max_length=100, help_text="keys.auth from the subscription")
    active = models.BooleanField(default=True)
    deactivated_reason = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "endpoint"], name="webpush_endpoint_unique")]

    def __str__(self) -> str:
        return self.endpoint[:60]
