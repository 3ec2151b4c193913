"""Audiences (topics, segments) and broadcasts: one call that notifies a whole audience."""

from django.db import models
from uuid6 import uuid7

from apps.catalog.models import Category
from apps.deliveries.models import Event
from apps.recipients.models import Recipient
from apps.tenants.models import ApiKey, Tenant


class Topic(models.Model):
    """A named list of recipients, such as the subscribers to breaking news."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="topics", db_index=False)
    key = models.SlugField(max_length=100)
    name = models.CharField(max_length=200, blank=True, default="")
    description = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "key"], name="topic_key_unique")]

    def __str__(self) -> str:
        return self.key


class TopicMembership(models.Model):
    """A recipient's subscription to a topic."""

    # Indexed through the (topic, recipient) constraint; the audience join walks it.
    topic = models.ForeignKey(Topic, on_delete=models.CASCADE, related_name="memberships", db_index=False)
    # Indexed: a recipient's topics (the admin, the export) and a deleted recipient's cascade.
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="topic_memberships")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["topic", "recipient"], name="topic_membership_unique")]

    def __str__(self) -> str:
        return f"{self.recipient_id} in {self.topic_id}"


class Segment(models.Model):
    """A saved filter over a tenant's recipients, evaluated in the database when a broadcast
    starts (the grammar is in notify/pipeline/audience.py)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="segments", db_index=False)
    key = models.SlugField(max_length=100)
    name = models.CharField(max_length=200, blank=True, default="")
    filter = models.JSONField(help_text='e.g. {"all": [{"field": "locale", "prefix": "es"}, {"topic": "news"}]}')
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "key"], name="segment_key_unique")]

    def __str__(self) -> str:
        return self.key


class BroadcastState(models.TextChoices):
    SCHEDULED = "scheduled", "Scheduled"
    FANNING_OUT = "fanning_out", "Fanning out"
    SENDING = "sending", "Sending"
    PAUSED = "paused", "Paused"
    COMPLETED = "completed", "Completed"
    CANCELLED = "cancelled", "Cancelled"


class Broadcast(models.Model):
    """One event for a whole audience. Fan-out (notify/pipeline/broadcast.py) turns the
    audience into the event's notifications and deliveries in chunks: `cursor` is the last
    recipient id claimed as a chunk (BroadcastChunk), and each chunk is planned on its own,
    several at a time; from there the ordinary pipeline sends them."""

    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="broadcasts", db_index=False)
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # The notifications hang off this event, so history, cancel and the admin work unchanged.
    event = models.OneToOneField(Event, on_delete=models.CASCADE, related_name="broadcast")
    category = models.ForeignKey(Category, on_delete=models.PROTECT, related_name="broadcasts")
    # Pinned when the broadcast is accepted: every chunk renders the same content.
    template_version = models.ForeignKey(
        "catalog.TemplateVersion", on_delete=models.PROTECT, related_name="+", db_index=False
    )
    audience = models.JSONField(help_text='{"topic": key}, {"segment": key} or {"all": true}, with "exclude"')
    data = models.JSONField(default=dict, blank=True)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    request_digest = models.CharField(max_length=64)
    send_at = models.DateTimeField(null=True, blank=True)
    send_at_local = models.CharField(max_length=32, blank=True, default="")
    max_per_second = models.PositiveIntegerField(null=True, blank=True)
    spread_over_seconds = models.PositiveIntegerField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=BroadcastState.choices, default=BroadcastState.SCHEDULED)
    # Fan-out progress: the last recipient id claimed as a chunk (None: not started), and how
    # many of the audience were claimed, which places a paced chunk's recipients in time.
    cursor = models.UUIDField(null=True, blank=True)
    claimed_count = models.PositiveIntegerField(default=0)
    fanout_lease_expires_at = models.DateTimeField(null=True, blank=True)
    fanned_out_at = models.DateTimeField(null=True, blank=True)
    audience_count = models.PositiveIntegerField(null=True, blank=True)
    planned_count = models.PositiveIntegerField(default=0)
    # The rollup of the deliveries' states, refreshed by the sweeper (broadcasts_roll_up).
    counts = models.JSONField(default=dict, blank=True)
    counts_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    paused_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    # Cancel stops the unsent deliveries in chunks; set when none is left.
    cancel_finished_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Why the service stopped the broadcast itself (its audience can no longer be read).
    note = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "idempotency_key"], name="broadcast_idempotency_key_unique")
        ]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="broadcast_tenant_recent"),
            # The sweeper's and the claim's small scans: broadcasts still moving or held.
            models.Index(
                fields=["state"],
                name="broadcast_active",
                condition=~models.Q(state__in=["completed", "cancelled"]) | models.Q(cancel_finished_at__isnull=True),
            ),
        ]
        permissions = [("control_broadcast", "Can pause, resume and cancel a broadcast")]

    def __str__(self) -> str:
        return f"{self.category.key} broadcast {self.id}"


class BroadcastRecipient(models.Model):
    """Who a broadcast has reached: the unique (broadcast, recipient) pair makes a retried or
    resumed fan-out chunk, or a recipient in two topics, harmless."""

    id = models.BigAutoField(primary_key=True)
    # Not checked by PostgreSQL (audiences.0003): a fan-out chunk writes these rows while it
    # holds the broadcast's row, and the check cost about 7 µs a row at the chunk's commit.
    broadcast = models.ForeignKey(
        Broadcast, on_delete=models.CASCADE, related_name="+", db_index=False, db_constraint=False
    )
    # No index and no cascade from a recipient: deleting one would scan this table, and a
    # row left behind names nobody.
    recipient = models.ForeignKey(
        Recipient, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+", db_index=False
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["broadcast", "recipient"], name="broadcast_recipient_unique")]


class BroadcastChunk(models.Model):
    """A range of a broadcast's audience claimed for fan-out: the recipients whose ids lie in
    (after, until], planned in one transaction by whichever fan-out task holds its lease.
    Claiming is quick and one at a time; planning, the long part, runs for several chunks at
    once. A chunk whose task died is claimed again once its lease has run out; a planned
    chunk notes how many it reached until the next claim adds them to the broadcast's count
    and deletes it."""

    id = models.BigAutoField(primary_key=True)
    broadcast = models.ForeignKey(Broadcast, on_delete=models.CASCADE, related_name="chunks")
    after = models.UUIDField(null=True, blank=True)
    until = models.UUIDField()
    # Audience members claimed before this chunk: where a paced broadcast's chunk starts.
    position = models.PositiveIntegerField()
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    planned_at = models.DateTimeField(null=True, blank=True)
    planned = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"chunk {self.id} of broadcast {self.broadcast_id}"
