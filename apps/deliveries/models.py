import uuid
from email.utils import parseaddr
from typing import Any

import phonenumbers
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from uuid6 import uuid7

from apps.catalog.models import Category, Channel, Priority, TemplateVersion
from apps.recipients.models import Recipient, validate_timezone
from apps.tenants.encryption import EncryptedJSONField, SealedJSONField
from apps.tenants.models import ApiKey, Tenant
from notify.pipeline.bulk import LeanLoading
from notify.resilience.outbound import OutboundRefused, outbound_url_check

REPLACE_KEY_MAX_LENGTH = 200


class Event(models.Model):
    """What a producer sent, once. The idempotency key is enforced by a unique constraint."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Indexed through the (tenant, idempotency_key) constraint. Every index on these tables
    # is paid for on each of the thousands of rows an ingest writes, so each one must earn it.
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="events", db_index=False)
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True)
    category = models.ForeignKey(Category, on_delete=models.PROTECT, related_name="events")
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    # A digest of the request body, so a reused key with a different body is recognised.
    request_digest = models.CharField(max_length=64)
    # Encrypted for tenants with encrypt_content (apps/tenants/encryption.py).
    data = SealedJSONField(default=dict, blank=True)
    # The response first given for this event, returned again on an idempotent retry.
    response = models.JSONField(default=dict, blank=True)
    # The X-Request-ID of the request (or the id of the task) that made the event. Kept here
    # only, once per request: its notifications and deliveries reach it through the event.
    correlation_id = models.CharField(max_length=128, null=True, blank=True, db_index=True)
    # The W3C traceparent of that request's span, for the send batches' trace links.
    traceparent = models.CharField(max_length=55, null=True, blank=True)
    # A newer event with the same key replaces this one for its recipients (docs/api.md,
    # "Replace by key"): what is not yet sent is superseded, the in-app item is updated.
    replace_key = models.CharField(max_length=REPLACE_KEY_MAX_LENGTH, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "idempotency_key"], name="event_idempotency_key_unique")
        ]
        indexes = [
            # Finds a key's older events when a newer one is planned; only keyed events pay for it.
            models.Index(
                fields=["tenant", "replace_key"],
                condition=models.Q(replace_key__isnull=False),
                name="event_replace_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.category.key} {self.id}"


class ChannelSwitch(models.Model):
    """Ops' kill switch for a channel, for the whole installation (no tenant) or for one
    tenant. While it is paused, the deliveries it covers wait in the database, unclaimed and
    unchanged; resuming publishes them all again."""

    tenant = models.ForeignKey(
        Tenant,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="channel_switches",
        db_index=False,  # indexed through the (tenant, channel) constraint
        help_text="Empty: the whole installation.",
    )
    channel = models.CharField(max_length=16, choices=Channel.choices)
    paused = models.BooleanField(default=False)
    reason = models.CharField(max_length=300, blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "channel"], name="channel_switch_tenant_unique"),
            models.UniqueConstraint(
                fields=["channel"], condition=models.Q(tenant__isnull=True), name="channel_switch_installation_unique"
            ),
        ]
        permissions = [("pause_channelswitch", "Can pause and resume a channel")]

    def __str__(self) -> str:
        scope = f"{self.tenant} " if self.tenant_id else ""
        return f"{scope}{self.channel} ({'paused' if self.paused else 'running'})"


class Provider(models.Model):
    """One account at a provider for a channel (email, SMS and mobile push), belonging to a
    tenant or, without one, to the installation. A tenant's deliveries use the tenant's own
    providers for the channel if it has any, else the installation's, else the provider the
    settings configure. A channel with several tries them in `position` order (sharing
    traffic by `weight` within a position), fails over when one errors or its circuit is
    open, and keeps each within its rate."""

    tenant = models.ForeignKey(
        Tenant,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="providers",
        db_index=False,  # indexed through the (tenant, name) constraint
        help_text="Empty: the installation's default for tenants without providers of their own.",
    )
    name = models.SlugField(max_length=50, help_text="Unique within its tenant (or the installation).")
    channel = models.CharField(max_length=16, choices=[("email", "Email"), ("sms", "SMS"), ("push", "Mobile push")])
    position = models.PositiveSmallIntegerField(default=0, help_text="Lower is tried first.")
    weight = models.PositiveSmallIntegerField(default=1, help_text="Share of traffic among providers at one position.")
    enabled = models.BooleanField(default=True, help_text="Off: its work goes to the others, or waits.")
    # Credentials: stored only as ciphertext, never shown again by the admin.
    config = EncryptedJSONField(
        default=dict,
        blank=True,
        help_text='Email (Postmark): {"api_url": ..., "server_token": ..., "from_email": ...}. SMS (Twilio): '
        '{"api_base": ..., "account_sid": ..., "auth_token": ..., "from_number": ...}. Push (FCM): '
        '{"project_id": ..., "credentials": {service account key}}. Unset keys come from settings.',
    )
    rate_per_second = models.PositiveIntegerField(
        null=True, blank=True, help_text="Messages a second; empty: no limit."
    )
    burst = models.PositiveIntegerField(
        null=True, blank=True, help_text="Messages allowed at once; in any second at most rate + burst go out."
    )
    failure_threshold = models.PositiveSmallIntegerField(
        default=5, help_text="Failed sends in a row that open the circuit."
    )
    cooldown_seconds = models.PositiveIntegerField(default=30, help_text="How long an open circuit waits to try again.")

    # The config key that names the provider's API address, per channel: its channel sends
    # there through the outbound guard (NOTIFY_PROVIDER_ALLOWED_HOSTS), and it is checked here.
    URL_KEYS = {"email": "api_url", "sms": "api_base"}
    # The config keys that hold credentials: the admin takes them but never shows them again.
    SECRET_KEYS = ("server_token", "auth_token", "credentials")

    class Meta:
        ordering = ["channel", "position", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="provider_name_unique_in_tenant"),
            models.UniqueConstraint(
                fields=["name"], condition=models.Q(tenant__isnull=True), name="provider_name_unique_in_installation"
            ),
        ]
        permissions = [
            ("pause_provider", "Can pause and resume a provider"),
            ("reset_circuit_provider", "Can close a provider's circuit"),
        ]

    def __str__(self) -> str:
        scope = f"{self.tenant}: " if self.tenant_id else ""
        return f"{scope}{self.name} ({self.channel})"

    def config_public(self) -> dict[str, Any]:
        """The config without its credentials, safe to show."""
        return {key: value for key, value in (self.config or {}).items() if key not in self.SECRET_KEYS}

    def config_secrets(self) -> dict[str, Any]:
        """Only the config's credentials."""
        return {key: value for key, value in (self.config or {}).items() if key in self.SECRET_KEYS}

    def clean(self) -> None:
        """Refuse a sender identity that every send would fail on, or an API address the
        outbound guard refuses, naming the key."""
        super().clean()
        if not isinstance(self.config, dict):
            raise ValidationError({"config": 'Give a JSON object, e.g. {"server_token": "..."}.'})
        if error := _sender_error(channel=self.channel, config=self.config):
            raise ValidationError({"config": error})
        key = self.URL_KEYS.get(self.channel, "")
        url = self.config.get(key)
        if url is None:
            return
        try:
            outbound_url_check(url=str(url), allowed_hosts=settings.NOTIFY_PROVIDER_ALLOWED_HOSTS)
        except OutboundRefused as refused:
            raise ValidationError(
                {"config": f"{key} is refused: {refused.reason}. Give the provider's public https address."}
            )


def provider_name_of(*, provider_status: str) -> str:
    """The Provider that made a send, from the status its outcome was recorded with
    ("<name>/<channel's status>", see notify.resilience.providers); "" for the configured
    default provider. Here, beside the model, so the ledger reads it without the senders."""
    name, slash, _ = provider_status.partition("/")
    # A Provider's name is a slug; a channel's own status ("postmark:Bounce/HardBounce") may
    # hold a slash too, but always after its "<provider>:".
    return name if slash and ":" not in name else ""


def _sender_error(*, channel: str, config: dict) -> str:
    if channel == "email" and "from_email" in config:
        _, address = parseaddr(str(config["from_email"]))
        if "@" not in address:
            return f"from_email '{config['from_email']}' is not an address; give e.g. \"Acme <hello@acme.example>\"."
    if channel == "sms" and "from_number" in config:
        try:
            valid = phonenumbers.is_valid_number(phonenumbers.parse(str(config["from_number"]), None))
        except phonenumbers.NumberParseException:
            valid = False
        if not valid:
            return f"from_number '{config['from_number']}' is not an E.164 number; give e.g. \"+14155550123\"."
    if channel == "push":
        if "project_id" in config and not (isinstance(config["project_id"], str) and config["project_id"]):
            return 'project_id is the Firebase project\'s id, e.g. "acme-app".'
        credentials = config.get("credentials")
        if credentials is not None and not (
            isinstance(credentials, dict) and credentials.get("type") == "service_account"
        ):
            return 'credentials is a Firebase service account key: the JSON object with "type": "service_account".'
    return ""


def validate_cron(value: str) -> None:
    """Five fields, as cron writes them: minute hour day-of-month month day-of-week."""
    from celery.schedules import crontab

    fields = value.split()
    if len(fields) != 5:
        raise ValidationError("Give five fields: minute hour day-of-month month day-of-week, e.g. '0 9 * * 1'.")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        crontab(
            minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year, day_of_week=day_of_week
        )
    except (ValueError, KeyError) as error:
        raise ValidationError(f"'{value}' is not a cron schedule: {error}")


class RecurringSend(models.Model):
    """An event the service triggers itself on a cron schedule (django-celery-beat runs it),
    such as a summary every Monday at 09:00."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="recurring_sends", db_index=False)
    name = models.SlugField(max_length=100)
    category = models.ForeignKey(Category, on_delete=models.PROTECT, related_name="recurring_sends")
    recipients = models.JSONField(help_text="External ids of the recipients.")
    data = models.JSONField(default=dict, blank=True)
    cron = models.CharField(max_length=100, validators=[validate_cron], help_text="e.g. '0 9 * * 1': Mondays at 09:00")
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    enabled = models.BooleanField(default=True)
    # Kept in step by notify.pipeline.recurring; beat reads its schedule from there.
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask", on_delete=models.SET_NULL, null=True, blank=True, editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="recurring_send_name_unique")]

    def __str__(self) -> str:
        return self.name


class Digest(models.Model):
    """A recipient's collection of one digest category's events, open until it is flushed as
    one notification (notify/pipeline/digest.py). At most one is open per recipient and
    category."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+", db_index=False)
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="digests", db_index=False)
    category = models.ForeignKey(Category, on_delete=models.PROTECT, related_name="digests", db_index=False)
    opened_at = models.DateTimeField(auto_now_add=True)
    due_at = models.DateTimeField()
    flushed_at = models.DateTimeField(null=True, blank=True)
    # The event the flush made, whose notification carries the digest.
    event = models.OneToOneField("Event", on_delete=models.SET_NULL, null=True, blank=True, related_name="digest")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["recipient", "category"], condition=models.Q(flushed_at__isnull=True), name="digest_one_open"
            )
        ]
        indexes = [models.Index(fields=["due_at"], condition=models.Q(flushed_at__isnull=True), name="digest_open_due")]

    def __str__(self) -> str:
        return f"{self.category.key} digest for {self.recipient.external_id}"


class DigestEntry(models.Model):
    digest = models.ForeignKey(Digest, on_delete=models.CASCADE, related_name="entries")
    event = models.ForeignKey("Event", on_delete=models.CASCADE, related_name="+", db_index=False)
    created_at = models.DateTimeField(auto_now_add=True)


class Notification(LeanLoading, models.Model):
    """One event for one recipient."""

    # Notifications and deliveries are written by the thousand: ids that grow with time
    # (UUIDv7) go in at the end of the primary key's index, where random ones land on a
    # different page for nearly every row (and, after each checkpoint, the first change to a
    # page writes the whole page to the WAL).
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    # tenant and recipient are indexed through the composite indexes below. The tenant, the
    # category and the template version are the event's (or its broadcast's), whose own keys
    # PostgreSQL checks, so it does not check them again here: a broadcast's fan-out paid
    # those checks for every recipient (migration deliveries.0026).
    tenant = models.ForeignKey(
        Tenant, on_delete=models.CASCADE, related_name="notifications", db_index=False, db_constraint=False
    )
    event = models.ForeignKey(Event, on_delete=models.CASCADE, related_name="notifications")
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="notifications", db_index=False)
    category = models.ForeignKey(Category, on_delete=models.PROTECT, related_name="notifications", db_constraint=False)
    # The exact content this notification is rendered with, chosen when it was planned.
    # Not indexed: versions are never deleted, and nothing looks notifications up by version.
    template_version = models.ForeignKey(
        TemplateVersion, on_delete=models.PROTECT, related_name="+", db_index=False, db_constraint=False
    )
    locale = models.CharField(max_length=35, blank=True, default="")
    priority = models.CharField(max_length=16, choices=Priority.choices)
    send_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        permissions = [("cancel_notification", "Can cancel a notification's unsent deliveries")]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="notification_tenant_recent"),
            models.Index(fields=["recipient", "-created_at"], name="notification_recipient_recent"),
        ]

    def __str__(self) -> str:
        return f"{self.category.key} → {self.recipient.external_id}"


class DeliveryStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"
    DELIVERED = "delivered", "Delivered"
    OPENED = "opened", "Opened"
    CLICKED = "clicked", "Clicked"
    BOUNCED = "bounced", "Bounced (hard bounce; the address is suppressed)"
    COMPLAINED = "complained", "Complained (marked as spam; the address is suppressed)"
    RETRYING = "retrying", "Retrying (transient failure, next attempt scheduled)"
    FAILED = "failed", "Failed (permanent, not retried)"
    DEAD = "dead", "Dead (retries exhausted, in the dead-letter queue)"
    SUPPRESSED = "suppressed", "Suppressed"
    DEFERRED = "deferred", "Deferred (quiet hours or a frequency cap; sent when they allow)"
    STANDBY = "standby", "Standby (a later fallback step or an escalation; sent only if needed)"
    EXPIRED = "expired", "Expired (not sent within the category's expiry)"
    CANCELLED = "cancelled", "Cancelled"
    SUPERSEDED = "superseded", "Superseded (a newer event with the same replace key came before it was sent)"


# Not yet being sent: what a sender may claim, and what a cancel may still stop.
CLAIMABLE_STATUSES = (DeliveryStatus.QUEUED, DeliveryStatus.RETRYING, DeliveryStatus.DEFERRED)


class Delivery(LeanLoading, models.Model):
    """One notification on one channel, with its own state and retry bookkeeping."""

    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    # No key into a partitioned table is checked by the database: such a check costs 30-55 µs
    # a row, and this code writes both rows (docs/architecture.md, "Partitioned tables").
    notification = models.ForeignKey(
        Notification, on_delete=models.CASCADE, related_name="deliveries", db_constraint=False
    )
    channel = models.CharField(max_length=16, choices=Channel.choices)
    priority = models.CharField(max_length=16, choices=Priority.choices)
    status = models.CharField(max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.QUEUED)
    status_reason = models.CharField(max_length=500, blank=True, default="")
    attempt_count = models.PositiveIntegerField(default=0)
    # When the next attempt may start; the claim ignores deliveries that are not due yet.
    next_attempt_at = models.DateTimeField()
    # When a task for this delivery was last handed to the broker (None: not yet).
    published_at = models.DateTimeField(null=True, blank=True)
    # Fencing for the claim: only the holder of the current token may record an outcome.
    lease_token = models.UUIDField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    provider_message_id = models.CharField(max_length=255, blank=True, default="")
    # Set when an attempt's fate is unknown (the worker died, or the provider did not answer
    # in time) to when that attempt may have reached the provider: before sending again, the
    # provider is asked whether it has the message (notify/pipeline/reconcile.py).
    in_doubt_since = models.DateTimeField(null=True, blank=True)
    # Bumped when a provider reports that a message it accepted failed later (a soft bounce):
    # the re-send is a new message, which its feedback tells apart by this round.
    resend_round = models.PositiveSmallIntegerField(default=0)
    # SMS: how many segments the provider bills for the rendered text.
    segments = models.PositiveSmallIntegerField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Fallback routing: this delivery's place in the notification's chain (None: not chained).
    step = models.PositiveSmallIntegerField(null=True, blank=True)
    # Sent only if the notification is not read in time (notify/pipeline/routing.py).
    escalation = models.BooleanField(default=False)
    # The A/B variant its content was rendered from (TemplateVariant.key), noted when it is
    # sent; empty when its template version tests none. The database default serves the
    # plans written in SQL.
    variant = models.CharField(max_length=20, blank=True, default="", db_default="")

    class Meta:
        verbose_name_plural = "deliveries"
        indexes = [
            # The sweeper's scans: due or stale queued work, and expired leases.
            models.Index(
                fields=["next_attempt_at"],
                name="delivery_claimable_due",
                condition=models.Q(status__in=["queued", "retrying", "deferred"]),
            ),
            # The routing sweep's scan: standby steps and escalations coming due.
            models.Index(fields=["next_attempt_at"], name="delivery_standby", condition=models.Q(status="standby")),
            models.Index(
                fields=["lease_expires_at"],
                name="delivery_leased",
                condition=models.Q(status="sending"),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.id} ({self.status})"


class DeliveryEvent(models.Model):
    """Append-only history: every state change of a delivery, with its time and reason."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="events", db_constraint=False)
    status = models.CharField(max_length=16, choices=DeliveryStatus.choices)
    reason = models.CharField(max_length=500, blank=True, default="")
    attempt = models.PositiveIntegerField(default=0)
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.status} at {self.created_at:%Y-%m-%d %H:%M:%S}"


class EarlyFeedback(models.Model):
    """Provider feedback that arrived while its delivery was still being sent; applied (and
    deleted) as soon as the send is recorded."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="+", db_constraint=False)
    payload = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)


class DeadLetter(models.Model):
    """A delivery whose retries ran out. Ops inspect it and replay it from the admin."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="dead_letters", db_constraint=False)
    channel = models.CharField(max_length=16, choices=Channel.choices)
    reason = models.CharField(max_length=500)
    attempts = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    replayed_at = models.DateTimeField(null=True, blank=True)
    replayed_by = models.CharField(max_length=150, blank=True, default="")

    class Meta:
        permissions = [("replay_deadletter", "Can replay a dead letter")]

    def __str__(self) -> str:
        return f"{self.channel} {self.delivery_id}"
