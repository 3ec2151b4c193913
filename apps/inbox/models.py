import json
import uuid
from typing import Any

from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.db import models
from django.db.models import Lookup, Q
from django.utils import timezone

from apps.catalog.models import Severity
from apps.deliveries.models import Delivery, Event
from apps.recipients.models import Recipient
from apps.tenants.encryption import SealedJSONField, SealedTextField
from notify.pipeline.bulk import LeanLoading

# Stored as a rank so that "the highest unread severity" is one ordered index read.
SEVERITY_RANK = {Severity.LOW: 1, Severity.MEDIUM: 2, Severity.HIGH: 3}
SEVERITY_OF_RANK = {rank: severity for severity, rank in SEVERITY_RANK.items()}
UNREAD = Q(read_at__isnull=True, archived_at__isnull=True, folded=False)
UNSEEN = Q(seen_at__isnull=True, archived_at__isnull=True, folded=False)


class StringList(ArrayField):
    """A list of strings: a PostgreSQL array (GIN-indexed where asked), and JSON text on the
    demo's SQLite, which has no arrays. Filter by one element with `field__has=value`."""

    def db_type(self, connection: Any) -> str | None:
        return super().db_type(connection) if connection.vendor == "postgresql" else "text"

    def cast_db_type(self, connection: Any) -> str:
        return super().cast_db_type(connection) if connection.vendor == "postgresql" else "text"

    def get_placeholder(self, value: Any, compiler: Any, connection: Any) -> str:
        # ArrayField's own placeholder casts the value to the array type, which SQLite lacks.
        return f"%s::{self.db_type(connection)}" if connection.vendor == "postgresql" else "%s"

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> Any:
        if connection.vendor == "postgresql" or value is None:
            return super().get_db_prep_value(value, connection, prepared)
        return json.dumps(list(value))

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value


@StringList.register_lookup
class StringListHas(Lookup):
    """The list holds the value: the array's containment (served by a GIN index) on
    PostgreSQL, a search of the JSON on SQLite."""

    lookup_name = "has"

    def get_db_prep_lookup(self, value: Any, connection: Any) -> Any:
        return ("%s", [value])

    def as_sql(self, compiler: Any, connection: Any) -> Any:
        column, column_params = self.process_lhs(compiler, connection)
        return f"EXISTS (SELECT 1 FROM json_each({column}) WHERE value = %s)", (*column_params, self.rhs)

    def as_postgresql(self, compiler: Any, connection: Any) -> Any:
        column, column_params = self.process_lhs(compiler, connection)
        return f"{column} @> ARRAY[%s]::varchar[]", (*column_params, self.rhs)


class InboxItem(LeanLoading, models.Model):
    """One in-app notification in a recipient's inbox, with its read, seen and archived state.
    A broadcast's in-app batch builds them by the thousand (LeanLoading)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="inbox_items", db_index=False)
    delivery = models.OneToOneField(Delivery, on_delete=models.CASCADE, related_name="inbox_item", db_constraint=False)
    # Encrypted for tenants with encrypt_content (apps/tenants/encryption.py); the title is a
    # text column because its ciphertext is longer than the 500 characters it may hold.
    title = SealedTextField(max_length=500, blank=True, default="")
    body = SealedTextField(blank=True, default="")
    link = models.CharField(max_length=2000, blank=True, default="")
    data = SealedJSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Where the item stands in the list: when it was stored, or when its snooze ends. An item
    # whose place is in the future is snoozed and not shown until then.
    sort_at = models.DateTimeField(default=timezone.now)
    snoozed_until = models.DateTimeField(null=True, blank=True)
    seen_at = models.DateTimeField(null=True, blank=True)
    read_at = models.DateTimeField(null=True, blank=True)
    archived_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    category = models.CharField(max_length=100, blank=True, default="")
    tags = StringList(models.CharField(max_length=64), default=list, blank=True)
    severity = models.PositiveSmallIntegerField(default=SEVERITY_RANK[Severity.MEDIUM])
    # Events with one group key form one item: the newest shows the group, with its count and
    # latest actors, and the older ones are folded into it.
    group_key = models.CharField(max_length=200, blank=True, default="")
    group_count = models.PositiveIntegerField(default=1)
    actors = StringList(models.CharField(max_length=200), default=list, blank=True)
    folded = models.BooleanField(default=False)

    class Meta:
        indexes = [
            models.Index(fields=["recipient", "-sort_at", "-id"], name="inbox_recipient_recent"),
            models.Index(fields=["recipient", "category", "-sort_at"], name="inbox_recipient_category"),
            # PostgreSQL only: its migration creates it there alone.
            GinIndex(fields=["tags"], name="inbox_tags"),
            # Serves the bounded unread count and the highest unread severity (the badge).
            models.Index(fields=["recipient", "-severity"], condition=UNREAD, name="inbox_unread"),
            models.Index(fields=["recipient"], condition=UNSEEN, name="inbox_unseen"),
            models.Index(fields=["recipient", "group_key"], condition=~Q(group_key=""), name="inbox_group"),
            models.Index(fields=["snoozed_until"], condition=Q(snoozed_until__isnull=False), name="inbox_snoozed"),
            models.Index(fields=["expires_at"], condition=Q(expires_at__isnull=False), name="inbox_expiring"),
        ]

    def __str__(self) -> str:
        return self.title or str(self.id)


class InboxEventOptions(models.Model):
    """What a producer said about an event's in-app items: tags, severity, group, expiry."""

    event = models.OneToOneField(Event, on_delete=models.CASCADE, primary_key=True, related_name="inbox_options")
    tags = StringList(models.CharField(max_length=64), default=list, blank=True)
    severity = models.CharField(max_length=8, choices=Severity.choices, blank=True, default="")
    group_key = models.CharField(max_length=200, blank=True, default="")
    actor = models.CharField(max_length=200, blank=True, default="")
    expires_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"inbox options of {self.event_id}"
