"""Digests: a category with a digest window collects each recipient's events instead of
notifying at once, then sends them as one notification, rendered from the category's template
with `data.events` (each event's data, oldest first) and `data.count`.

A digest is sent when its window has passed since its first event (the sweeper), or as soon
as it holds the category's `digest_max` events. Never twice, and with nothing lost, however
events and flushes interleave:
- an event joins a digest only while it holds the digest's row lock, and only if the digest
  is still open; otherwise it opens the next one;
- a flush takes the same lock, reads the entries and closes the digest in one transaction,
  so an event arriving during a flush waits for it, then finds the digest closed;
- the digest's own event has the idempotency key digest:<id>: even a repeated flush cannot
  make a second notification."""

import hashlib
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from apps.catalog.models import Category
from apps.deliveries.models import Digest, DigestEntry, Event, Notification
from apps.recipients.models import Recipient
from apps.tenants.encryption import content_seal
from notify.observability.tracing import event_origin
from notify.pipeline.plan import notifications_plan, plan_save

# A flush may find the open digest flushed under it; it then opens the next one. Twice is
# the most that can happen (the new digest is invisible to flushes until this commits).
JOIN_ATTEMPTS = 3


@dataclass
class Collected:
    digest_ids: list[UUID]
    notifications: list[Notification]  # of the digests that filled up and were sent now


def digest_collect(*, event: Event, category: Category, recipients: list[Recipient], now: datetime) -> Collected:
    """Add the event to each recipient's open digest of the category (opening one where
    there is none), inside the caller's transaction."""
    assert category.digest_window is not None
    waiting = {recipient.id for recipient in recipients}
    joined: list[Digest] = []
    for _ in range(JOIN_ATTEMPTS):
        if not waiting:
            break
        # Open a digest wherever none is open; the partial unique index keeps it to one.
        Digest.objects.bulk_create(
            [
                Digest(
                    tenant_id=event.tenant_id, recipient_id=rid, category=category, due_at=now + category.digest_window
                )
                for rid in sorted(waiting)
            ],
            ignore_conflicts=True,
        )
        # Locked in one order, so that concurrent events cannot deadlock on them.
        open_digests = list(
            Digest.objects.select_for_update()
            .filter(recipient_id__in=waiting, category=category, flushed_at__isnull=True)
            .order_by("recipient_id")
        )
        joined.extend(open_digests)
        waiting -= {digest.recipient_id for digest in open_digests}
    if waiting:
        raise RuntimeError(f"could not open a digest for {len(waiting)} recipients")
    DigestEntry.objects.bulk_create([DigestEntry(digest=digest, event=event) for digest in joined])
    notifications: list[Notification] = []
    if category.digest_max:
        sizes = dict(
            DigestEntry.objects.filter(digest__in=joined)
            .values("digest")
            .annotate(n=Count("id"))
            .values_list("digest", "n")
        )
        for digest in joined:
            if sizes[digest.id] >= category.digest_max:
                notifications.extend(_flush_locked(digest=digest, now=now))
    return Collected(digest_ids=[digest.id for digest in joined], notifications=notifications)


def digest_flush(*, digest_id: UUID) -> list[Notification]:
    """Send the digest if it is still open; a digest already sent is left alone."""
    with transaction.atomic():
        recipient_ids = list(Digest.objects.filter(id=digest_id).values_list("recipient_id", flat=True))
        # The recipient's row first, then the digest's: the order an event takes them in (an
        # inline recipient is upserted before its digest is joined), or the two could deadlock.
        list(Recipient.objects.select_for_update(no_key=True).filter(id__in=recipient_ids).values_list("id"))
        digest = (
            Digest.objects.select_for_update()
            .select_related("category__template", "recipient", "tenant")
            .filter(id=digest_id, flushed_at__isnull=True)
            .first()
        )
        return [] if digest is None else _flush_locked(digest=digest, now=timezone.now())


def digests_flush_due(*, now: datetime) -> int:
    """Send every open digest whose window had passed at `now`; return how many were sent."""
    due = list(
        Digest.objects.filter(flushed_at__isnull=True, due_at__lte=now).values_list("id", flat=True)[
            : settings.NOTIFY_SWEEP_CHUNK
        ]
    )
    return sum(1 for digest_id in due if digest_flush(digest_id=digest_id))


def _flush_locked(*, digest: Digest, now: datetime) -> list[Notification]:
    entries = list(digest.entries.select_related("event").order_by("created_at", "id"))
    events = [entry.event for entry in entries]
    key = f"digest:{digest.id}"
    event = Event.objects.create(
        tenant_id=digest.tenant_id,
        api_key_id=events[-1].api_key_id,
        category=digest.category,
        idempotency_key=key,
        request_digest=hashlib.sha256(key.encode()).hexdigest(),
        data=content_seal(
            encrypt=digest.tenant.encrypt_content, value={"events": [e.data for e in events], "count": len(events)}
        ),
        # The flush's own: the request that filled the digest, or the sweep that found it due.
        **event_origin(),
    )
    plan = notifications_plan(
        event=event,
        category=digest.category,
        recipients=[digest.recipient],
        priority_override=None,
        channels_override=None,
        send_at=None,
        now=now,
    )
    plan_save(plan=plan, now=now)
    event.response = {"event_id": str(event.id), "notification_ids": [str(n.id) for n in plan.notifications]}
    event.save(update_fields=["response"])
    Digest.objects.filter(id=digest.id).update(flushed_at=now, event=event)
    return plan.notifications
