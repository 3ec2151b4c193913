"""What operators watch: the synthetic canary's runs and the alerts (notify/observability)."""

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
    # The canary's own rows in the system tenant; purged with the run. Indexed, as deleting
    # any event or delivery (a tenant's, too) looks here for runs to unlink.
    event = models.ForeignKey("deliveries.Event", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    delivery = models.ForeignKey(
        "deliveries.Delivery", on_delete=models.SET_NULL, null=True, blank=True, related_name="+", db_constraint=False
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


class AlertKind(models.TextChoices):
    FAILURE_RATE = "failure_rate", "Failure rate per channel (or provider) over the window"
    DEAD_LETTERS = "dead_letters", "New dead letters in the window"
    QUEUE_AGE = "queue_age", "Age of the oldest due delivery still waiting to be sent"
    CIRCUIT_OPEN = "circuit_open", "A provider's circuit is open"
    CANARY_FAILING = "canary_failing", "The canary's latest run failed or was late"
    RUNAWAY_GUARD = "runaway_guard", "The runaway-send guard paused a tenant"


class AlertRule(models.Model):
    """A condition that alerts operators (notify/observability/alerts.py): through Sentry, the
    operator webhook and the ops email list, again at most once per window while it lasts."""

    name = models.SlugField(max_length=100, unique=True)
    kind = models.CharField(max_length=32, choices=AlertKind.choices)
    enabled = models.BooleanField(default=True)
    channel = models.CharField(
        max_length=16, choices=Channel.choices, blank=True, default="", help_text="Empty: every channel."
    )
    per_provider = models.BooleanField(
        default=False, help_text="Failure rate: per provider account rather than per channel."
    )
    window_seconds = models.PositiveIntegerField(
        default=300,
        help_text="The span a failure rate or the dead letters are counted over, and the least time between "
        "two notices of one alert.",
    )
    threshold = models.FloatField(
        default=0,
        help_text="Failure rate: the failed share of attempts (0.2 is 20%) it must pass. Dead letters: the "
        "count it must pass. Queue age: seconds. Unused by the other kinds.",
    )
    min_attempts = models.PositiveIntegerField(
        default=20, help_text="Failure rate: fewer attempts than this in the window never fire."
    )
    notify_resolved = models.BooleanField(default=True, help_text="Announce once when the condition clears.")
    description = models.CharField(max_length=300, blank=True, default="")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class AlertFiring(models.Model):
    """One alert of a rule for one subject (a channel, a provider, a tenant), from when it first
    fired until it resolved."""

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="firings")
    subject = models.CharField(max_length=200, help_text="What it is about: channel:email, provider:7, tenant:acme.")
    message = models.CharField(max_length=1000)
    value = models.FloatField(help_text="The measured figure when it was last evaluated.")
    first_fired_at = models.DateTimeField()
    last_notified_at = models.DateTimeField()
    notices = models.PositiveIntegerField(default=1, help_text="How many times operators were told.")
    # What the last notice's outlets answered ("webhook: 200; email: sent"), for the admin.
    outlets = models.CharField(max_length=500, blank=True, default="")
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-first_fired_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["rule", "subject"], condition=models.Q(resolved_at__isnull=True), name="alert_firing_one_open"
            )
        ]
        indexes = [models.Index(fields=["-first_fired_at"], name="alert_firing_recent")]

    def __str__(self) -> str:
        return f"{self.rule.name} {self.subject}"


# The chain key of changes that belong to no tenant (installation providers, kill switches).
INSTALLATION_CHAIN = "installation"
# prev_hash of a chain's first entry.
GENESIS_HASH = "0" * 64


class AuditEntry(models.Model):
    """One change made through the admin or the API (apps/ops/audit.py). Entries are chained
    by hash per tenant: `hash` is sha256(prev_hash + the entry's canonical JSON), so editing
    or deleting a row breaks the chain at that point (`manage.py audit_verify`)."""

    # The tenant's id, or INSTALLATION_CHAIN.
    chain = models.CharField(max_length=64)
    # Not a constraint: the log outlives a deleted tenant, and must never be cascaded away.
    tenant = models.ForeignKey(
        "tenants.Tenant",
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
        db_index=False,  # indexed through audit_chain_order and audit_tenant_recent
    )
    created_at = models.DateTimeField()
    actor_type = models.CharField(max_length=16, help_text="staff or api_key.")
    actor_id = models.CharField(max_length=64)
    actor_label = models.CharField(max_length=200)
    action = models.CharField(
        max_length=100,
        help_text="create, update, delete, erase, or an admin action's name.",
    )
    object_type = models.CharField(max_length=100)
    object_id = models.CharField(max_length=100)
    changes = models.JSONField(default=dict, blank=True, help_text="Field: [before, after]; secrets redacted.")
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64)

    class Meta:
        verbose_name_plural = "audit entries"
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["chain", "id"], name="audit_chain_order"),
            models.Index(fields=["tenant", "-id"], name="audit_tenant_recent"),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.object_type} {self.object_id} by {self.actor_label}"


class AuditChainHead(models.Model):
    """The newest hash and length of one chain. Appends lock this row (SELECT ... FOR UPDATE),
    which serialises them per chain; verifying against it detects deleted trailing entries."""

    chain = models.CharField(max_length=64, primary_key=True)
    head_hash = models.CharField(max_length=64, default=GENESIS_HASH)
    entries = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.chain}: {self.entries} entries"


class RetentionPolicy(models.Model):
    """How long a tenant's events, notifications, deliveries, history and inbox items are kept
    (apps/ops/retention.py). A tenant without one keeps them NOTIFY_RETENTION_DAYS."""

    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.CASCADE, related_name="retention_policy")
    retention_days = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Purge what is older than this many days; empty: keep forever.",
    )

    class Meta:
        verbose_name_plural = "retention policies"

    def __str__(self) -> str:
        return f"{self.retention_days or 'forever'} days"


class DeliveryRollup(models.Model):
    """Delivery history counted per bucket of time (notify/observability/rollups.py): what the
    dashboard and the analytics read, so that no page scans the history.

    A row counts the history rows of one outcome in one bucket for one combination of the
    labels. `sent` rows are split further by `latency_bucket`, the histogram bucket their
    accept-to-sent time falls in (LATENCY_BOUNDS_MS), so that percentiles can be estimated."""

    bucket = models.DateTimeField()
    # No foreign key constraints: the rollups are derived figures, rebuilt from the history,
    # and must not slow the deletion of a tenant or hold a template version alive.
    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.DO_NOTHING, db_constraint=False, db_index=False, related_name="+"
    )
    category = models.ForeignKey(
        "catalog.Category", on_delete=models.DO_NOTHING, db_constraint=False, db_index=False, related_name="+"
    )
    template_version = models.ForeignKey(
        "catalog.TemplateVersion", on_delete=models.DO_NOTHING, db_constraint=False, db_index=False, related_name="+"
    )
    channel = models.CharField(max_length=16, choices=Channel.choices)
    # The database default serves rows written in SQL without it (benchmarks' seeds).
    variant = models.CharField(
        max_length=20, blank=True, default="", db_default="", help_text="The A/B variant; empty: none."
    )
    provider = models.CharField(max_length=50, blank=True, default="", help_text="Empty: the configured default.")
    priority = models.CharField(max_length=16)
    outcome = models.CharField(max_length=16, help_text="The delivery state, or `unsubscribed` for an opt-out.")
    latency_bucket = models.SmallIntegerField(default=-1, help_text="Sent only: the accept-to-sent bucket.")
    count = models.BigIntegerField(default=0)
    latency_ms_sum = models.BigIntegerField(default=0)

    class Meta:
        abstract = True


ROLLUP_KEY = (
    "bucket",
    "tenant",
    "category",
    "template_version",
    "channel",
    "variant",
    "provider",
    "priority",
    "outcome",
    "latency_bucket",
)


class DeliveryRollupMinute(DeliveryRollup):
    """Delivery history per minute: the hour and day views, and the source of the hours."""

    class Meta:
        constraints = [models.UniqueConstraint(fields=ROLLUP_KEY, name="rollup_minute_key")]
        indexes = [models.Index(fields=["tenant", "bucket"], name="rollup_minute_tenant")]


class DeliveryRollupHour(DeliveryRollup):
    """Delivery history per hour, summed from the minutes: the week view."""

    class Meta:
        constraints = [models.UniqueConstraint(fields=ROLLUP_KEY, name="rollup_hour_key")]
        indexes = [models.Index(fields=["tenant", "bucket"], name="rollup_hour_tenant")]


class RollupCursor(models.Model):
    """How far the rollups have counted the history: every minute before `counted_until` is
    final, except the trailing window each run counts again (notify/observability/rollups.py)."""

    name = models.SlugField(max_length=50, unique=True)
    counted_until = models.DateTimeField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name} until {self.counted_until:%Y-%m-%d %H:%M}"
