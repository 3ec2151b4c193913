"""Producers' webhook endpoints, the outbox of events for them, and every delivery attempt.

A WebhookMessage is written in the same transaction as the state change it reports (the
transactional outbox), one per subscribed endpoint, and delivered at least once by the
webhooks worker (apps/webhooks/services.py); docs/webhooks.md describes what receivers get."""

import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from apps.catalog.models import Category
from apps.tenants.encryption import EncryptedJSONField
from apps.tenants.models import Tenant
from notify.resilience.outbound import OutboundRefused, outbound_url_check


class EventType(models.TextChoices):
    DELIVERY_SENT = "delivery.sent", "A delivery was accepted by its provider"
    DELIVERY_DELIVERED = "delivery.delivered", "The provider reports it delivered"
    DELIVERY_FAILED = "delivery.failed", "A delivery failed for good"
    DELIVERY_BOUNCED = "delivery.bounced", "The address bounced"
    DELIVERY_OPENED = "delivery.opened", "The recipient opened it"
    DELIVERY_CLICKED = "delivery.clicked", "The recipient clicked a link in it"
    NOTIFICATION_DEAD_LETTERED = "notification.dead_lettered", "A delivery's retries were exhausted"
    RECIPIENT_UNSUBSCRIBED = "recipient.unsubscribed", "A recipient unsubscribed"
    RECIPIENT_CONSENT_CHANGED = "recipient.consent_changed", "A recipient's consent changed"
    BROADCAST_COMPLETED = "broadcast.completed", "A broadcast finished fanning out"


EVENT_TYPES = [choice.value for choice in EventType]


def validate_event_types(value: object) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise ValidationError("Give the event types as a non-empty list of names.")
    unknown = [item for item in value if item not in EVENT_TYPES]
    if unknown:
        raise ValidationError(f"Unknown event type '{unknown[0]}'. Valid types: {', '.join(EVENT_TYPES)}.")


def validate_webhook_url(value: str) -> None:
    """The outbound guard's check: https to public addresses, unless the host is allow-listed."""
    try:
        outbound_url_check(url=value, allowed_hosts=settings.NOTIFY_WEBHOOK_ALLOWED_HOSTS)
    except OutboundRefused as refused:
        raise ValidationError(f"This URL is refused: {refused.reason}.")


class WebhookEndpoint(models.Model):
    """A producer's URL that receives signed events of the types it chose."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="webhook_endpoints")
    url = models.URLField(max_length=2000, validators=[validate_webhook_url])
    event_types = models.JSONField(validators=[validate_event_types], help_text='e.g. ["delivery.sent"]')
    category = models.ForeignKey(
        Category,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="+",
        help_text="Only events about this category's notifications; empty: all.",
    )
    description = models.CharField(max_length=200, blank=True, default="")
    alert_email = models.EmailField(blank=True, default="", help_text="Told when the endpoint is disabled.")
    # A Standard Webhooks secret ("whsec_" + base64), encrypted at rest like providers' credentials.
    secret = EncryptedJSONField(editable=False)
    enabled = models.BooleanField(default=True)
    disabled_reason = models.CharField(max_length=500, blank=True, default="")
    last_success_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "-created_at"], name="webhook_endpoint_tenant")]

    def __str__(self) -> str:
        return self.url[:80]


class MessageStatus(models.TextChoices):
    PENDING = "pending", "Pending (due at next_attempt_at)"
    SENDING = "sending", "Being sent"
    DELIVERED = "delivered", "Delivered (the endpoint answered 2xx)"
    FAILED = "failed", "Failed (retries exhausted)"


class WebhookMessage(models.Model):
    """One event for one endpoint: the outbox row, delivered at least once."""

    id = models.BigAutoField(primary_key=True)
    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="messages")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+", db_index=False)
    event_type = models.CharField(max_length=40, choices=EventType.choices)
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=MessageStatus.choices, default=MessageStatus.PENDING)
    attempt_count = models.IntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField()

    class Meta:
        permissions = [("replay_webhookmessage", "Can replay webhook messages")]
        indexes = [
            models.Index(fields=["endpoint", "-id"], name="webhook_message_endpoint"),
            models.Index(
                fields=["next_attempt_at"],
                name="webhook_message_due",
                condition=models.Q(status__in=["pending", "sending"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} #{self.pk}"


class WebhookAttempt(models.Model):
    """One POST that carried the message (alone or in a batch), with the endpoint's answer."""

    id = models.BigAutoField(primary_key=True)
    message = models.ForeignKey(WebhookMessage, on_delete=models.CASCADE, related_name="attempts")
    webhook_id = models.CharField(max_length=80)
    status_code = models.IntegerField(null=True, blank=True)
    response_excerpt = models.CharField(max_length=500, blank=True, default="")
    error = models.CharField(max_length=500, blank=True, default="")
    duration_ms = models.FloatField(default=0)
    created_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.webhook_id}: {self.status_code or self.error[:40]}"
