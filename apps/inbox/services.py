"""Inbox reads and state changes for the recipient-facing inbox API."""

from collections.abc import Iterable
from datetime import timedelta
from uuid import UUID

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from apps.inbox.models import InboxItem
from notify.pipeline.routing import escalations_cancel

MARKS = {"read": "read_at", "seen": "seen_at", "archive": "archived_at"}
# Longer than any one batch takes to store: see inbox_items_after.
CATCH_UP_LOOK_BACK = timedelta(seconds=60)


def inbox_items(*, recipient_id: UUID, archived: bool = False) -> QuerySet[InboxItem]:
    return InboxItem.objects.filter(recipient_id=recipient_id, archived_at__isnull=not archived)


def inbox_counts(*, recipient_id: UUID) -> dict[str, int]:
    """Unread and unseen items, archived ones left out."""
    return inbox_counts_many(recipient_ids=[recipient_id])[recipient_id]


def inbox_counts_many(*, recipient_ids: Iterable[UUID]) -> dict[UUID, dict[str, int]]:
    """Each recipient's counts, in one query."""
    counts = {recipient_id: {"unread": 0, "unseen": 0} for recipient_id in recipient_ids}
    rows = (
        InboxItem.objects.filter(recipient_id__in=counts, archived_at__isnull=True)
        .values("recipient_id")
        .annotate(
            unread=Count("id", filter=Q(read_at__isnull=True)), unseen=Count("id", filter=Q(seen_at__isnull=True))
        )
    )
    for row in rows:
        counts[row["recipient_id"]] = {"unread": row["unread"], "unseen": row["unseen"]}
    return counts


def inbox_items_after(*, recipient_id: UUID, item_id: UUID, limit: int) -> tuple[list[InboxItem], bool]:
    """What a reconnecting client may have missed since the newest item it holds, oldest first,
    and whether there is more than `limit`.

    Items are stamped when a worker stores them, so two workers can commit a recipient's items
    slightly out of order. The look-back re-sends the items stamped shortly before the cursor
    as well; the client keeps items by id, so a repeat costs nothing and a gap cannot happen."""
    cursor = InboxItem.objects.filter(recipient_id=recipient_id, id=item_id).values_list("created_at", flat=True)
    since = cursor.first()
    if since is None:
        raise InboxItem.DoesNotExist
    items = list(
        inbox_items(recipient_id=recipient_id)
        .filter(created_at__gte=since - CATCH_UP_LOOK_BACK)
        .exclude(id=item_id)
        .order_by("created_at", "id")[: limit + 1]
    )
    return items[:limit], len(items) > limit


def inbox_item_mark(*, recipient_id: UUID, item_id: UUID, mark: str) -> InboxItem:
    """Mark one item read, seen or archived (reading also sees it); idempotent.
    Raises InboxItem.DoesNotExist for another recipient's item."""
    item = InboxItem.objects.select_related("delivery").get(recipient_id=recipient_id, id=item_id)
    now = timezone.now()
    fields = [MARKS[mark]] + (["seen_at"] if mark == "read" else [])
    for field in fields:
        if getattr(item, field) is None:
            setattr(item, field, now)
    item.save(update_fields=fields)
    if mark == "read":  # read: its escalations to other channels are not needed
        escalations_cancel(notification_ids=[item.delivery.notification_id])
    return item


def inbox_mark_all_read(*, recipient_id: UUID) -> int:
    now = timezone.now()
    unread = InboxItem.objects.filter(recipient_id=recipient_id, read_at__isnull=True)
    notification_ids = list(unread.values_list("delivery__notification_id", flat=True))
    unread.filter(seen_at__isnull=True).update(seen_at=now)
    updated = unread.update(read_at=now)
    escalations_cancel(notification_ids=notification_ids)
    return updated
