import hashlib
import hmac

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from uuid6 import uuid7

from apps.tenants.models import Tenant
from notify.pipeline.bulk import LeanLoading
from notify.policy.rules import (
    validate_category_switches,
    validate_channel_order,
    validate_channel_switches,
    validate_quiet_hours,
)
from notify.resilience.outbound import OutboundRefused, outbound_url_check


def validate_timezone(value: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"'{value}' is not an IANA timezone (for example Europe/Paris).")


class Recipient(LeanLoading, models.Model):
    """A person a tenant notifies, known by the tenant's own external id."""

    # Time-ordered, as notifications' are: bulk events create recipients by the thousand.
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
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
    # When the person's data was first erased (apps/recipients/privacy.py); the row stays as a
    # tombstone, so that a second erase answers the same.
    erased_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "external_id"], name="recipient_external_id_unique")]
        # A broadcast walks its audience in id order from a stored cursor: a range of this index.
        indexes = [models.Index(fields=["tenant", "id"], name="recipient_tenant_id")]

    def __str__(self) -> str:
        return self.external_id


class PreferenceSet(LeanLoading, models.Model):
    """What a recipient asked for. A setting left out falls back to the category's or the
    tenant's default; the order of precedence is in notify/policy/rules.py."""

    recipient = models.OneToOneField(Recipient, on_delete=models.CASCADE, primary_key=True, related_name="preferences")
    paused = models.BooleanField(default=False, help_text="Nothing but critical notifications until paused_until.")
    paused_until = models.DateTimeField(null=True, blank=True, help_text="Empty while paused: indefinitely.")
    channels = models.JSONField(
        default=dict, blank=True, validators=[validate_channel_switches], help_text='e.g. {"sms": false}'
    )
    categories = models.JSONField(
        default=dict,
        blank=True,
        validators=[validate_category_switches],
        help_text='Per category and channel, e.g. {"weekly-digest": {"email": false}}',
    )
    channel_order = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_channel_order],
        help_text='The order to try channels in, e.g. ["push", "sms", "email"].',
    )
    quiet_hours = models.JSONField(
        default=dict,
        blank=True,
        validators=[validate_quiet_hours],
        help_text='In the recipient\'s timezone, e.g. {"start": "22:00", "end": "07:00", "days": [0, 1, 2, 3, 4]}',
    )
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"preferences of {self.recipient_id}"


class Consent(models.Model):
    """One grant or withdrawal of consent to marketing on a channel. Append-only: the newest
    row for a channel is the recipient's answer, and the rows before it are the record."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="consents", db_index=False)
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="consents", db_index=False)
    channel = models.CharField(max_length=16)
    granted = models.BooleanField()
    source = models.CharField(max_length=200, help_text="Where it was given: a sign-up form, the preference center…")
    recorded_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["recipient", "channel", "-recorded_at"], name="consent_latest")]

    def __str__(self) -> str:
        return f"{'granted' if self.granted else 'withdrawn'} {self.channel} for {self.recipient_id}"


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


# A suppression whose address was erased holds this prefix and the address's keyed hash.
HASHED_ADDRESS_PREFIX = "hmac-sha256:"


def address_hashed(*, address: str) -> str:
    """The keyed hash an erased suppression keeps of an address (already in canonical form)."""
    key = settings.NOTIFY_ERASURE_HASH_KEY.encode()
    return HASHED_ADDRESS_PREFIX + hmac.new(key, address.encode(), hashlib.sha256).hexdigest()


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

    def clean(self) -> None:
        """The outbound guard's check, for a subscription edited in the admin."""
        try:
            outbound_url_check(url=self.endpoint, allowed_hosts=settings.NOTIFY_WEBPUSH_ALLOWED_HOSTS)
        except OutboundRefused as refused:
            raise ValidationError({"endpoint": f"This endpoint is refused: {refused.reason}."})


class ImportFormat(models.TextChoices):
    NDJSON = "ndjson", "NDJSON (one JSON object a line)"
    CSV = "csv", "CSV (a header line, then one recipient a line)"


class ImportStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"


class RecipientImport(models.Model):
    """A bulk import of recipients from an uploaded file. The upload is copied into
    RecipientImportLine rows; workers validate and upsert them in chunks, and add to the
    counts here in the same transaction as each chunk."""

    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="recipient_imports")
    format = models.CharField(max_length=8, choices=ImportFormat.choices)
    # CSV only: the header's column names, in order.
    columns = models.JSONField(default=list, blank=True)
    source = models.CharField(max_length=200, help_text="Who uploaded it: an API key's prefix, or a staff user.")
    # Every imported recipient is also subscribed to this topic, chunk by chunk.
    topic = models.ForeignKey(
        "audiences.Topic", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_index=False
    )
    status = models.CharField(max_length=16, choices=ImportStatus.choices, default=ImportStatus.QUEUED)
    rows_total = models.PositiveIntegerField(default=0, help_text="Lines with a recipient on them (not blank).")
    rows_processed = models.PositiveIntegerField(default=0)
    created = models.PositiveIntegerField(default=0, help_text="Recipients created.")
    updated = models.PositiveIntegerField(default=0, help_text="Existing recipients changed.")
    unchanged = models.PositiveIntegerField(default=0, help_text="Existing recipients the file did not change.")
    refused = models.PositiveIntegerField(default=0, help_text="Lines refused (the first ones are listed).")
    error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Moved on with each chunk: an import that stops moving is published again by the sweeper.
    heartbeat_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["heartbeat_at"],
                name="recipient_import_unfinished",
                condition=models.Q(status__in=["queued", "running"]),
            )
        ]

    def __str__(self) -> str:
        return f"import {self.id} ({self.status})"

    @property
    def progress(self) -> float:
        """The share of rows processed, from 0 to 1."""
        if self.status == ImportStatus.COMPLETED:
            return 1.0
        return self.rows_processed / self.rows_total if self.rows_total else 0.0


class RecipientImportLine(models.Model):
    """Staging: one line of an uploaded file, as it arrived, until a worker has processed it.
    Written by COPY and deleted chunk by chunk; not a foreign key, so that deleting an import
    never makes Django load its lines."""

    pk = models.CompositePrimaryKey("recipient_import_id", "line_number")
    recipient_import_id = models.UUIDField()
    line_number = models.PositiveIntegerField()
    raw = models.TextField(blank=True, default="")
    # Set when the line could not be stored as text (not UTF-8, a NUL, too long): it is refused.
    problem = models.CharField(max_length=200, blank=True, default="")


class RecipientImportRefusal(models.Model):
    """A line an import refused, with why; the first NOTIFY_IMPORT_REFUSALS_KEPT per import."""

    # Indexed through import_refusal_line.
    recipient_import = models.ForeignKey(
        RecipientImport, on_delete=models.CASCADE, related_name="refusals", db_index=False
    )
    line_number = models.PositiveIntegerField()
    reason = models.CharField(max_length=500)

    class Meta:
        ordering = ["recipient_import", "line_number"]
        indexes = [models.Index(fields=["recipient_import", "line_number"], name="import_refusal_line")]

    def __str__(self) -> str:
        return f"line {self.line_number}: {self.reason}"
