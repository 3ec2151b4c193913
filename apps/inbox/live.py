"""Live inbox updates: new items, changed items and fresh counts pushed through the channel
layer to every open connection of a recipient (each tab or device joins the recipient's group).

The channel layer delivers at most once, so a push is a courtesy and never the record: the
database is. A push that fails is logged and dropped; a client that missed it catches up from
the database when it reconnects (see InboxConsumer)."""

import asyncio
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from apps.inbox.models import InboxItem
from apps.inbox.serializers import InboxItemSerializer
from apps.inbox.services import inbox_counts_many, inbox_snoozes_wake

logger = logging.getLogger(__name__)
BROADCAST_CONCURRENCY = 16


def inbox_group(*, recipient_id: UUID) -> str:
    return f"inbox.{recipient_id}"


def inbox_item_json(*, item: InboxItem) -> dict[str, Any]:
    return dict(InboxItemSerializer(item).data)


def inbox_items_added(*, items: Iterable[InboxItem]) -> None:
    """Push each new item with its recipient's counts after the whole batch."""
    items = list(items)
    if not items:
        return
    counts = inbox_counts_many(recipient_ids={item.recipient_id for item in items})
    _broadcast(
        [
            (
                item.recipient_id,
                {"type": "inbox.item", "item": inbox_item_json(item=item), "counts": counts[item.recipient_id]},
            )
            for item in items
        ]
    )


def inbox_item_changed(*, item: InboxItem) -> None:
    """Another tab marked an item read, seen or archived: show it everywhere."""
    counts = inbox_counts_many(recipient_ids=[item.recipient_id])[item.recipient_id]
    _broadcast(
        [(item.recipient_id, {"type": "inbox.item_updated", "item": inbox_item_json(item=item), "counts": counts})]
    )


def inbox_snoozes_return(*, now: datetime) -> int:
    """Push the snoozed items whose time has come to their recipients' connections, as new."""
    items = inbox_snoozes_wake(now=now)
    inbox_items_added(items=items)
    return len(items)


def inbox_counts_changed(*, recipient_id: UUID) -> None:
    counts = inbox_counts_many(recipient_ids=[recipient_id])[recipient_id]
    _broadcast([(recipient_id, {"type": "inbox.counts", "counts": counts})])


def _broadcast(messages: list[tuple[UUID, dict[str, Any]]]) -> None:
    layer = get_channel_layer()
    if layer is None or not messages:
        return

    async def send_all() -> None:
        # Several at once, as each is a Redis round trip and a bulk batch holds hundreds; but
        # bounded, as each concurrent send may open its own connection.
        for start in range(0, len(messages), BROADCAST_CONCURRENCY):
            await asyncio.gather(
                *(
                    layer.group_send(inbox_group(recipient_id=recipient_id), message)
                    for recipient_id, message in messages[start : start + BROADCAST_CONCURRENCY]
                )
            )

    try:
        async_to_sync(send_all)()
    except Exception:  # noqa: BLE001 - a lost push must never fail the delivery or the request
        logger.warning("live inbox update not pushed; clients catch up when they reconnect", exc_info=True)
