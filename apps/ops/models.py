"""What operators watch: the synthetic canary's runs (notify/observability/canary.py)."""

from django.db import models

from apps.catalog.models import Channel


class CanaryState(models.TextChoices):
    PENDING = "pending", "Pending (accepted, not sent yet)"
    SENT = "sent", "Sent (the provider accepted it)"
    DELIVERED = "delivered", "Delivered (the provider reported it delivered)"
    LATE = "late", "Late (no success within the deadline)"
    FAILED = "failed", "Failed (the delivery failed, bounced or was withheld)"


class CanaryRun(models.Model):
    """One canary notification on one channel: how long the pipeline took to send it and, where
    the provider reports it, to deliver it."""

    channel = models.CharField(max_length=16, choices=Channel.choices)
    state = models.CharField(max_length=16, choices=CanaryState.choices, default=CanaryState.PENDING)
    # The state that counts as success: `delivered` where the provider reports delivery
    # (NOTIFY_CANARY_DELIVERED_CHANNELS), else `sent`.
    success_state = models.CharField(max_length=16, choices=CanaryState.choices)
    started_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    # When the run reached its success state, failed, or was found late; empty while open.
    settled_at = models.DateTimeField(null=True, blank=True)
    sent_seconds = models.FloatField(null=True, blank=True, help_text="From the canary's start to sent.")
    delivered_seconds = models.FloatField(null=True, blank=True, help_text="From the canary's start to delivered.")
    reason = models.CharField(max_length=500, blank=True, default="")
    # The canary's own rows in the system tenant; purged with the run.
    event = models.ForeignKey(
        "deliveries.Event", on_delete=models.SET_NULL, null=True, blank=True, related_name="+", db_index=False
    )
    delivery = models.ForeignKey(
        "deliveries.Delivery", on_delete=models.SET_NULL, null=True, blank=True, related_name="+", db_index=False
    )

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            # The latest runs of a channel (the selector, the admin), and the purge's oldest.
            models.Index(fields=["channel", "-started_at"], name="canary_channel_recent"),
            models.Index(fields=["started_at"], name="canary_started"),
            # The open runs each pass looks at.
            models.Index(fields=["started_at"], name="canary_open", condition=models.Q(settled_at__isnull=True)),
        ]

    def __str__(self) -> str:
        return f"{self.channel} canary at {self.started_at:%Y-%m-%d %H:%M:%S} ({self.state})"

    @property
    def succeeded(self) -> bool:
        return self.state == self.success_state
