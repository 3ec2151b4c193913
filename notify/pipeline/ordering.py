"""Ordering per recipient, for categories marked `ordered` (chat-like events).

Scope: one recipient, one channel, one category. Within a scope, deliveries leave in the order
their events were accepted (the event's created_at, then its id). The claim leaves a delivery
alone while an earlier delivery of its scope is unfinished (queued, retrying, deferred or being
sent); other recipients, channels and categories are never held. When a delivery finishes
(sent, failed, dead, suppressed...), the send stage publishes the next one of its scope at
once, as cancelling does once committed; anything held whose task was spent on a refused claim is published again by the
sweeper, like any due work the broker does not hold."""

import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db.models import Exists, OuterRef, Q
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from apps.catalog.models import Category
from apps.deliveries.models import CLAIMABLE_STATUSES, Delivery, DeliveryStatus, Notification
from notify.pipeline.dispatch import publish

# What still holds back the later deliveries of its scope. A standby step or escalation may
# never be sent, so it holds nothing back.
UNFINISHED_STATUSES = (*CLAIMABLE_STATUSES, DeliveryStatus.SENDING)

# How long a process trusts its list of ordered categories: the claim reads it on every batch,
# and nearly always it is empty. A change to a category's flag applies within this long.
ORDERED_CATEGORIES_TTL_SECONDS = 10.0

_ordered_cache: tuple[float, frozenset[int]] | None = None


def ordered_category_ids() -> frozenset[int]:
    """The ids of every ordered category, read at most once per TTL in each process."""
    global _ordered_cache
    now = time.monotonic()
    if _ordered_cache is None or now - _ordered_cache[0] > ORDERED_CATEGORIES_TTL_SECONDS:
        ids = frozenset(Category.objects.filter(ordered=True).values_list("id", flat=True))
        _ordered_cache = (now, ids)
    return _ordered_cache[1]


def _ordered_categories_forget(**kwargs: Any) -> None:
    # A change made in this process applies at once; other processes see it within the TTL.
    global _ordered_cache
    _ordered_cache = None


post_save.connect(_ordered_categories_forget, sender=Category, dispatch_uid="ordered_categories_forget_save")
post_delete.connect(_ordered_categories_forget, sender=Category, dispatch_uid="ordered_categories_forget_delete")


def held_behind_earlier(*, category_ids: Iterable[int], now: datetime) -> Exists:
    """A filter on deliveries: those of the given (ordered) categories that an earlier,
    unfinished delivery of their scope holds back. Correlated subqueries rather than joins,
    so that the claim's UPDATE touches the deliveries' rows only. A notification scheduled
    for later (send_at) holds nothing back until it is due: its event is, in effect,
    accepted then."""
    earlier = (
        Delivery.objects.filter(
            channel=OuterRef(OuterRef("channel")),
            status__in=UNFINISHED_STATUSES,
            notification__recipient_id=OuterRef("recipient_id"),
            notification__category_id=OuterRef("category_id"),
        )
        .filter(
            Q(notification__event__created_at__lt=OuterRef("event__created_at"))
            | Q(
                notification__event__created_at=OuterRef("event__created_at"),
                notification__event_id__lt=OuterRef("event_id"),
            )
        )
        .exclude(notification__send_at__gt=now)
    )
    return Exists(
        Notification.objects.filter(pk=OuterRef("notification_id"), category_id__in=sorted(category_ids)).filter(
            Exists(earlier)
        )
    )


def successors_publish(*, deliveries: list[Delivery], ordered_category_ids: Iterable[int]) -> int:
    """After a chunk of deliveries is recorded: publish the next of each ordered scope among
    them (see scopes_advance). Returns how many were published."""
    ordered = set(ordered_category_ids)
    return scopes_advance(
        scopes={
            (d.notification.recipient_id, d.notification.category_id, d.channel)
            for d in deliveries
            if d.notification.category_id in ordered
        }
    )


def scopes_advance(*, scopes: set[tuple[UUID, int, str]]) -> int:
    """Publish, for each (recipient, category, channel) scope, its first unfinished delivery if it
    is due and claimable; one that is retrying, deferred or being sent stays first, and its scope
    waits. Returns how many were published."""
    if not scopes:
        return 0
    now = timezone.now()
    rows = (
        Delivery.objects.filter(
            channel__in={channel for _, _, channel in scopes},
            status__in=UNFINISHED_STATUSES,
            notification__recipient_id__in={recipient_id for recipient_id, _, _ in scopes},
            notification__category_id__in={category_id for _, category_id, _ in scopes},
        )
        .exclude(notification__send_at__gt=now)
        .order_by("notification__event__created_at", "notification__event_id")
        .values_list(
            "id",
            "status",
            "next_attempt_at",
            "channel",
            "priority",
            "notification__recipient_id",
            "notification__category_id",
            "notification__event_id",
        )
    )
    # The first event of each scope; its deliveries in the scope (usually one) go together.
    heads: dict[tuple[UUID, int, str], UUID] = {}
    ready: dict[tuple[str, str], list[UUID]] = defaultdict(list)
    for delivery_id, status, next_attempt_at, channel, priority, recipient_id, category_id, event_id in rows:
        scope = (recipient_id, category_id, channel)
        if scope not in scopes or heads.setdefault(scope, event_id) != event_id:
            continue
        if status in CLAIMABLE_STATUSES and next_attempt_at <= now:
            ready[(channel, priority)].append(delivery_id)
    for (channel, priority), ids in ready.items():
        # Marked as published, so that the sweeper does not publish them again right away.
        Delivery.objects.filter(id__in=ids).update(published_at=now)
        publish(channel=channel, priority=priority, delivery_ids=[str(i) for i in ids])
    return sum(len(ids) for ids in ready.values())
