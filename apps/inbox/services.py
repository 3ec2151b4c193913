"""Inbox reads and state changes for the recipient-facing inbox API, and the store of new
items (grouping) for the in-app channel.

Every read is served by an index of apps.inbox.models, and counts are bounded: a count stops
at NOTIFY_INBOX_COUNT_LIMIT + 1 rows, which the widget shows as "99+", so a recipient with
100,000 items costs what one with a hundred does."""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from apps.catalog.models import Severity
from apps.deliveries.models import Event
from apps.inbox.models import SEVERITY_OF_RANK, SEVERITY_RANK, UNREAD, UNSEEN, InboxEventOptions, InboxItem
from apps.recipients.models import Recipient
from apps.recipients.tokens import PREFERENCES, recipient_link
from notify.pipeline.record import engagement_record
from notify.pipeline.routing import escalations_cancel

MARKS = {"read": "read_at", "seen": "seen_at", "archive": "archived_at"}
# Longer than any one batch takes to store: see inbox_items_after.
CATCH_UP_LOOK_BACK = timedelta(seconds=60)
GROUP_ACTORS_SHOWN = 3
WAKE_BATCH = 1000
PURGE_BATCH = 5000


@dataclass(frozen=True)
class InboxFilter:
    """A tab of the inbox: what the list, its counts and its bulk actions cover."""

    archived: bool = False
    read: bool | None = None
    category: str = ""
    tag: str = ""


def _visible(*, now: datetime) -> Q:
    """Shown now: not folded into a newer item of its group, not snoozed, not expired."""
    return Q(folded=False, sort_at__lte=now) & (Q(expires_at__isnull=True) | Q(expires_at__gt=now))


def _filtered(*, recipient_id: UUID, tab: InboxFilter, now: datetime) -> QuerySet[InboxItem]:
    items = InboxItem.objects.filter(_visible(now=now), recipient_id=recipient_id)
    items = items.filter(archived_at__isnull=not tab.archived)
    if tab.read is not None:
        items = items.filter(read_at__isnull=not tab.read)
    if tab.category:
        items = items.filter(category=tab.category)
    if tab.tag:
        items = items.filter(tags__has=tab.tag)
    return items


def inbox_items(*, recipient_id: UUID, tab: InboxFilter = InboxFilter()) -> QuerySet[InboxItem]:
    """The items of one tab of the inbox, as shown now."""
    return _filtered(recipient_id=recipient_id, tab=tab, now=timezone.now())


def inbox_counts(*, recipient_id: UUID, tab: InboxFilter = InboxFilter()) -> dict[str, Any]:
    """A tab's unread and unseen counts, each bounded (a count above `limit` means more than
    `limit`), and its highest unread severity, archived items left out."""
    if tab == InboxFilter() and connection.vendor == "postgresql":
        return inbox_counts_many(recipient_ids=[recipient_id])[recipient_id]
    limit = settings.NOTIFY_INBOX_COUNT_LIMIT
    items = _filtered(
        recipient_id=recipient_id, tab=InboxFilter(category=tab.category, tag=tab.tag), now=timezone.now()
    )
    rank = items.filter(UNREAD).order_by("-severity").values_list("severity", flat=True).first()
    return {
        "unread": items.filter(UNREAD)[: limit + 1].count(),
        "unseen": items.filter(UNSEEN)[: limit + 1].count(),
        "limit": limit,
        "severity": SEVERITY_OF_RANK.get(rank or 0),
    }


# Each count reads at most limit + 1 entries of a partial index (inbox_unread, inbox_unseen);
# the severity is the first entry of inbox_unread. Raw SQL because the ORM cannot count a
# LIMITed subquery per row of a list of recipients, which the push of a bulk batch needs.
_SHOWN = "AND NOT i.folded AND i.sort_at <= %(now)s AND (i.expires_at IS NULL OR i.expires_at > %(now)s)"
_COUNTS_MANY = f"""
SELECT r.id,
  (SELECT count(*) FROM (SELECT 1 FROM inbox_inboxitem i WHERE i.recipient_id = r.id
     AND i.read_at IS NULL AND i.archived_at IS NULL {_SHOWN} LIMIT %(cap)s) AS unread),
  (SELECT count(*) FROM (SELECT 1 FROM inbox_inboxitem i WHERE i.recipient_id = r.id
     AND i.seen_at IS NULL AND i.archived_at IS NULL {_SHOWN} LIMIT %(cap)s) AS unseen),
  (SELECT i.severity FROM inbox_inboxitem i WHERE i.recipient_id = r.id
     AND i.read_at IS NULL AND i.archived_at IS NULL {_SHOWN} ORDER BY i.severity DESC LIMIT 1)
FROM unnest(%(ids)s::uuid[]) AS r(id)
"""


def inbox_counts_many(*, recipient_ids: Iterable[UUID]) -> dict[UUID, dict[str, Any]]:
    """Each recipient's whole-inbox counts, bounded, in one query."""
    ids = list(set(recipient_ids))
    if connection.vendor != "postgresql":  # the demo's SQLite: a few recipients, one by one
        return {recipient_id: inbox_counts(recipient_id=recipient_id) for recipient_id in ids}
    limit = settings.NOTIFY_INBOX_COUNT_LIMIT
    with connection.cursor() as cursor:
        cursor.execute(_COUNTS_MANY, {"ids": ids, "cap": limit + 1, "now": timezone.now()})
        rows = cursor.fetchall()
    return {
        recipient_id: {"unread": unread, "unseen": unseen, "limit": limit, "severity": SEVERITY_OF_RANK.get(rank)}
        for recipient_id, unread, unseen, rank in rows
    }


def inbox_items_after(*, recipient_id: UUID, item_id: UUID, limit: int) -> tuple[list[InboxItem], bool]:
    """What a reconnecting client may have missed since the newest item it holds, oldest first,
    and whether there is more than `limit`. Raises InboxItem.DoesNotExist when the item is not
    in this inbox."""
    cursor = InboxItem.objects.filter(recipient_id=recipient_id, id=item_id).values_list("sort_at", flat=True)
    since = cursor.first()
    if since is None:
        raise InboxItem.DoesNotExist
    return inbox_items_since(recipient_id=recipient_id, since=since, limit=limit, held_id=item_id)


def inbox_items_since(
    *, recipient_id: UUID, since: datetime, limit: int, held_id: UUID | None = None
) -> tuple[list[InboxItem], bool]:
    """The items placed since `since`, oldest first (but the one the client holds), and
    whether there is more than `limit`: one range read of the inbox_recipient_recent index.

    Items are placed when a worker stores them (or when their snooze ends), so two workers can
    commit a recipient's items slightly out of order. The look-back re-sends the items placed
    shortly before `since` as well; the client keeps items by id, so a repeat costs nothing
    and a gap cannot happen."""
    items = inbox_items(recipient_id=recipient_id).filter(sort_at__gte=since - CATCH_UP_LOOK_BACK)
    if held_id is not None:
        items = items.exclude(id=held_id)
    found = list(items.order_by("sort_at", "id")[: limit + 1])
    return found[:limit], len(found) > limit


# inbox_items_since's read for many clients at once: each client's range of the
# inbox_recipient_recent index, from the place of the item it holds (or from a time), less the
# look-back, oldest first. A client whose item is not in its inbox has no row; one with nothing
# newer, one row of NULL.
_SINCE_MANY = f"""
SELECT c.n, i.id
FROM unnest(%(recipients)s::uuid[], %(held)s::uuid[], %(since)s::timestamptz[])
  WITH ORDINALITY AS c(recipient_id, held_id, since, n)
LEFT JOIN inbox_inboxitem held ON held.id = c.held_id AND held.recipient_id = c.recipient_id
LEFT JOIN LATERAL (
  SELECT i.id, i.sort_at FROM inbox_inboxitem i
  WHERE i.recipient_id = c.recipient_id AND i.archived_at IS NULL {_SHOWN}
    AND i.sort_at >= coalesce(held.sort_at, c.since) - make_interval(secs => %(look_back)s)
    AND i.id IS DISTINCT FROM c.held_id
  ORDER BY i.sort_at, i.id LIMIT %(cap)s
) i ON true
WHERE c.held_id IS NULL OR held.id IS NOT NULL
ORDER BY c.n, i.sort_at, i.id
"""
CatchUpFound = tuple[list[InboxItem], bool] | None


def inbox_items_after_many(*, cursors: list[tuple[UUID, UUID]], limit: int) -> dict[tuple[UUID, UUID], CatchUpFound]:
    """inbox_items_after for many (recipient, held item) pairs in one query: what the clients
    of a restarted server missed. None for a pair whose item is not in that inbox."""
    if connection.vendor != "postgresql":  # the demo's SQLite: a few clients, one by one
        found: dict[tuple[UUID, UUID], CatchUpFound] = {}
        for recipient_id, item_id in cursors:
            try:
                found[(recipient_id, item_id)] = inbox_items_after(
                    recipient_id=recipient_id, item_id=item_id, limit=limit
                )
            except InboxItem.DoesNotExist:
                found[(recipient_id, item_id)] = None
        return found
    starts: list[tuple[UUID, UUID | None, datetime | None]] = [(r, item_id, None) for r, item_id in cursors]
    return dict(zip(cursors, _items_since_many(starts=starts, limit=limit), strict=True))


def inbox_items_since_many(
    *, cursors: list[tuple[UUID, datetime]], limit: int
) -> dict[tuple[UUID, datetime], tuple[list[InboxItem], bool]]:
    """inbox_items_since for many (recipient, time) pairs in one query: what the sockets of a
    web process may have missed while its subscription was lost."""
    if connection.vendor != "postgresql":
        return {(r, since): inbox_items_since(recipient_id=r, since=since, limit=limit) for r, since in cursors}
    starts: list[tuple[UUID, UUID | None, datetime | None]] = [(r, None, since) for r, since in cursors]
    found = _items_since_many(starts=starts, limit=limit)
    return {cursor: result or ([], False) for cursor, result in zip(cursors, found, strict=True)}


def _items_since_many(*, starts: list[tuple[UUID, UUID | None, datetime | None]], limit: int) -> list[CatchUpFound]:
    with connection.cursor() as cursor:
        cursor.execute(
            _SINCE_MANY,
            {
                "recipients": [recipient_id for recipient_id, _, _ in starts],
                "held": [item_id for _, item_id, _ in starts],
                "since": [since for _, _, since in starts],
                "now": timezone.now(),
                "look_back": CATCH_UP_LOOK_BACK.total_seconds(),
                "cap": limit + 1,
            },
        )
        rows = cursor.fetchall()
    ids_of: dict[int, list[UUID]] = {}
    for n, item_id in rows:
        ids_of.setdefault(n, [])
        if item_id is not None:
            ids_of[n].append(item_id)
    items = InboxItem.objects.in_bulk([item_id for ids in ids_of.values() for item_id in ids])
    return [
        ([items[i] for i in ids_of[n][:limit]], len(ids_of[n]) > limit) if n in ids_of else None
        for n in range(1, len(starts) + 1)
    ]


def inbox_item_mark(*, recipient_id: UUID, item_id: UUID, mark: str) -> InboxItem:
    """Mark one item read, seen or archived (reading also sees it), with the items of its
    group folded into it; idempotent. Raises InboxItem.DoesNotExist for another recipient's item."""
    item = InboxItem.objects.select_related("delivery").get(recipient_id=recipient_id, id=item_id)
    now = timezone.now()
    fields = [MARKS[mark]] + (["seen_at"] if mark == "read" else [])
    for field in fields:
        if getattr(item, field) is None:
            setattr(item, field, now)
    newly_read = mark == "read" and item.read_at == now
    item.save(update_fields=fields)
    notification_ids = [item.delivery.notification_id]
    read_delivery_ids = [item.delivery_id] if newly_read else []
    if item.group_key and not item.folded:
        folded = InboxItem.objects.filter(recipient_id=recipient_id, group_key=item.group_key, folded=True)
        for field in fields:
            changed = folded.filter(**{f"{field}__isnull": True})
            if field == "read_at":
                for notification_id, delivery_id in changed.values_list("delivery__notification_id", "delivery_id"):
                    notification_ids.append(notification_id)
                    read_delivery_ids.append(delivery_id)
            changed.update(**{field: now})
    if mark == "read":  # read: its escalations to other channels are not needed
        escalations_cancel(notification_ids=notification_ids)
        _reads_record(delivery_ids=read_delivery_ids)
    return item


def _reads_record(*, delivery_ids: list[UUID]) -> None:
    """A read in-app item is its delivery opened: the in-app channel's engagement, as an
    email's open is a provider's report."""
    engagement_record(delivery_ids=delivery_ids, normalized_status="opened", provider_status="inapp:read")


def inbox_item_snooze(*, recipient_id: UUID, item_id: UUID, until: datetime) -> InboxItem:
    """Hide an item until a time, when it comes back at the top of the list (and is pushed)."""
    item = InboxItem.objects.get(recipient_id=recipient_id, id=item_id)
    item.snoozed_until = item.sort_at = until
    item.save(update_fields=["snoozed_until", "sort_at"])
    return item


def inbox_snoozes_wake(*, now: datetime) -> list[InboxItem]:
    """The snoozed items whose time has come, each once: they are in the list again from that
    time whether or not this runs; this only lets open connections know."""
    with transaction.atomic():
        due = InboxItem.objects.filter(snoozed_until__lte=now).select_for_update(skip_locked=True)
        ids = list(due.values_list("id", flat=True)[:WAKE_BATCH])
        InboxItem.objects.filter(id__in=ids).update(snoozed_until=None)
    return list(
        InboxItem.objects.filter(_visible(now=now), id__in=ids, archived_at__isnull=True).order_by("sort_at", "id")
    )


def inbox_expired_purge(*, now: datetime) -> int:
    """Delete a batch of the items that expired more than NOTIFY_INBOX_EXPIRED_KEEP_SECONDS ago
    (they have not been shown since they expired)."""
    cutoff = now - timedelta(seconds=settings.NOTIFY_INBOX_EXPIRED_KEEP_SECONDS)
    batch = InboxItem.objects.filter(expires_at__lt=cutoff).values_list("id", flat=True)[:PURGE_BATCH]
    deleted, _ = InboxItem.objects.filter(id__in=list(batch)).delete()
    return deleted


def inbox_mark_all_read(*, recipient_id: UUID, tab: InboxFilter = InboxFilter()) -> int:
    """Mark every unread item of a tab read, with the items folded into them."""
    now = timezone.now()
    unread = _tab_with_folded(recipient_id=recipient_id, tab=tab, now=now).filter(read_at__isnull=True)
    notification_ids, delivery_ids = [], []
    for notification_id, delivery_id in unread.values_list("delivery__notification_id", "delivery_id"):
        notification_ids.append(notification_id)
        delivery_ids.append(delivery_id)
    unread.filter(seen_at__isnull=True).update(seen_at=now)
    updated = unread.update(read_at=now)
    escalations_cancel(notification_ids=notification_ids)
    _reads_record(delivery_ids=delivery_ids)
    return updated


def inbox_archive_read(*, recipient_id: UUID, tab: InboxFilter = InboxFilter()) -> int:
    """Archive every read item of a tab."""
    items = _tab_with_folded(recipient_id=recipient_id, tab=tab, now=timezone.now())
    return items.filter(read_at__isnull=False, archived_at__isnull=True).update(archived_at=timezone.now())


def _tab_with_folded(*, recipient_id: UUID, tab: InboxFilter, now: datetime) -> QuerySet[InboxItem]:
    """A tab's items for a bulk change, archived ones and the folded members of its groups
    included, expired and snoozed ones left as they are."""
    items = InboxItem.objects.filter(recipient_id=recipient_id, sort_at__lte=now)
    items = items.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
    if tab.category:
        items = items.filter(category=tab.category)
    if tab.tag:
        items = items.filter(tags__has=tab.tag)
    return items


def inbox_event_options_save(
    *,
    event_id: UUID,
    tags: list[str],
    severity: str,
    group_key: str,
    actor: str,
    expires_at: datetime | None,
) -> None:
    """Keep what the producer said about an event's in-app items, when it said anything."""
    if tags or severity or group_key or actor or expires_at:
        InboxEventOptions.objects.create(
            event_id=event_id, tags=tags, severity=severity, group_key=group_key, actor=actor, expires_at=expires_at
        )


def inbox_item_attributes(*, event_ids: Iterable[UUID | None]) -> dict[UUID | None, dict[str, Any]]:
    """The attributes of each event's items, from its category and inbox options, in one
    query. By event, not by delivery: a batch holds one event's items or a few, and joining
    each delivery through its notification (partitioned tables) cost more than storing the
    items."""
    rows = Event.objects.filter(id__in={event_id for event_id in event_ids if event_id is not None}).values(
        "id",
        "category__key",
        "category__severity",
        "inbox_options__tags",
        "inbox_options__severity",
        "inbox_options__group_key",
        "inbox_options__actor",
        "inbox_options__expires_at",
    )
    attributes: dict[UUID | None, dict[str, Any]] = {}
    for row in rows:
        severity = row["inbox_options__severity"] or row["category__severity"] or Severity.MEDIUM
        actor = row["inbox_options__actor"] or ""
        attributes[row["id"]] = {
            "category": row["category__key"],
            "severity": SEVERITY_RANK[Severity(severity)],
            "tags": row["inbox_options__tags"] or [],
            "group_key": row["inbox_options__group_key"] or "",
            "actors": [actor] if actor else [],
            "expires_at": row["inbox_options__expires_at"],
        }
    return attributes


def inbox_groups_fold(*, items: Iterable[InboxItem]) -> None:
    """Fold each open group the items joined into its newest item, which then carries the
    group's count and latest actors. A group is open until it is read or archived."""
    for recipient_id, group_key in sorted({(i.recipient_id, i.group_key) for i in items if i.group_key}):
        with transaction.atomic():
            # Two workers storing items of one group at once would each see the other's item
            # missing; the lock serialises them per group.
            _transaction_lock(name=f"{recipient_id}:{group_key}")
            group = InboxItem.objects.filter(
                recipient_id=recipient_id, group_key=group_key, read_at__isnull=True, archived_at__isnull=True
            )
            members = list(group.order_by("-created_at", "-id").values("id", "actors")[:50])
            if not members:
                continue
            actors: list[str] = []
            for member in members:
                actors += [actor for actor in member["actors"] if actor not in actors]
            head = members[0]["id"]
            group.filter(id=head).update(folded=False, group_count=group.count(), actors=actors[:GROUP_ACTORS_SHOWN])
            group.exclude(id=head).filter(folded=False).update(folded=True)


# What an event replacing an earlier one by key gives the recipient's item: its content and
# attributes, and its delivery (items stay one per delivery: the item moves to the newest).
REPLACED_FIELDS = (
    "delivery",
    "title",
    "body",
    "link",
    "data",
    "sort_at",
    "category",
    "severity",
    "tags",
    "group_key",
    "actors",
    "expires_at",
)


def inbox_item_replace(*, item: InboxItem, replace_key: str) -> InboxItem | None:
    """Store `item` (unsaved, for its delivery) as the recipient's one item for the replace
    key: the latest item of the key's earlier events takes its content and its delivery and
    is unread again (as a new item would be: unseen, not archived, not snoozed); with none,
    `item` is inserted. None when the item already shows a later event's delivery, which
    makes this one stale."""
    with transaction.atomic():
        # Two workers sending the same key's deliveries at once would both find no item.
        _transaction_lock(name=f"replace:{item.recipient_id}:{replace_key}")
        current = (
            InboxItem.objects.filter(
                recipient_id=item.recipient_id, delivery__notification__event__replace_key=replace_key
            )
            .order_by("-delivery_id")  # delivery ids grow with time: the newest event's
            .first()
        )
        if current is None:
            item.save(force_insert=True)
            return item
        if current.delivery_id > item.delivery_id:
            return None
        for name in REPLACED_FIELDS:
            setattr(current, name, getattr(item, name))
        current.read_at = current.seen_at = current.archived_at = current.snoozed_until = None
        current.folded = False
        current.save(update_fields=[*REPLACED_FIELDS, "read_at", "seen_at", "archived_at", "snoozed_until", "folded"])
        return current


def _transaction_lock(*, name: str) -> None:
    """Hold a lock on the name until the transaction ends (PostgreSQL; SQLite runs one write
    at a time anyway)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [name])


def inbox_profile(*, recipient_id: UUID) -> dict[str, str]:
    """What the widget needs to know of its recipient: the locale for its strings, and a link
    to their preference center."""
    locale = Recipient.objects.filter(id=recipient_id).values_list("locale", flat=True).first() or ""
    return {"locale": locale, "preferences_url": recipient_link(purpose=PREFERENCES, recipient_id=recipient_id)}
