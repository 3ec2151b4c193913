"""Inbox reads and state changes for the recipient-facing inbox API."""

from uuid import UUID

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from apps.inbox.models import InboxItem

MARKS = {"read": "read_at", "seen": "seen_at", "archive": "archived_at"}


def inbox_items(*, recipient_id: UUID, archived: bool = False) -> QuerySet[InboxItem]:
    return InboxItem.objects.filter(recipient_id=recipient_id, archived_at__isnull=not archived)


def inbox_counts(*, recipient_id: UUID) -> dict[str, int]:
    """Unread and unseen items, archived ones left out."""
    return InboxItem.objects.filter(recipient_id=recipient_id, archived_at__isnull=True).aggregate(
        unread=Count("id", filter=Q(read_at__isnull=True)), unseen=Count("id", filter=Q(seen_at__isnull=True))
    )


def inbox_item_mark(*, recipient_id: UUID, item_id: UUID, mark: str) -> InboxItem:
    """Mark one item read, seen or archived (reading also sees it); idempotent.
    Raises InboxItem.DoesNotExist for another recipient's item."""
    item = InboxItem.objects.get(recipient_id=recipient_id, id=item_id)
    now = timezone.now()
    fields = [MARKS[mark]] + (["seen_at"] if mark == "read" else [])
    for field in fields:
        if getattr(item, field) is None:
            setattr(item, field, now)
    item.save(update_fields=fields)
    return item


def inbox_mark_all_read(*, recipient_id: UUID) -> int:
    now = timezone.now()
    unread = InboxItem.objects.filter(recipient_id=recipient_id, read_at__isnull=True)
    unread.filter(seen_at__isnull=True).update(seen_at=now)
    return unread.update(read_at=now)
