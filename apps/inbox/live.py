"""Live inbox updates: new items, changed items and fresh counts pushed through the channel
layer to every open connection of a recipient (each tab or device joins the recipient's group).

The channel layer delivers at most once, so a push is a courtesy and never the record: the
database is. A push that fails is logged and dropped; a client that missed it catches up from
the database when it reconnects (see InboxConsumer)."""

import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from apps.inbox.models import InboxItem
from apps.inbox.serializers import InboxItemSerializer
from apps.inbox.services import inbox_counts_many

logger = logging.getLogger(__name__)


def inbox_group(*, recipient_id: UUID) -> str:
    return f"inbox.{recipient_id}"


def inbox_item_json(*, item: InboxItem) -> dict[str, Any]:
    return dict(InboxItemSerializer(item).data)


def inbox_items_added(*, items: Iterable[InboxItem]) -> None:
    """Push each new item, then each recipient's counts once."""
    by_recipient: dict[UUID, list[InboxItem]] = defaultdict(list)
    for item in items:
        by_recipient[item.recipient_id].append(item)
    messages = [
        (recipient_id, {"type": "inbox.item", "item": inbox_item_json(item=item)})
        for recipient_id, recipient_items in by_recipient.items()
        for item in recipient_items
    ]
    _broadcast(messages + _counts_messages(recipient_ids=by_recipient))


def inbox_item_changed(*, item: InboxItem) -> None:
    """Another tab marked an item read, seen or archived: show it everywhere."""
    update = (item.recipient_id, {"type": "inbox.item_updated", "item": inbox_item_json(item=item)})
    _broadcast([update, *_counts_messages(recipient_ids=[item.recipient_id])])


def inbox_counts_changed(*, recipient_id: UUID) -> None:
    _broadcast(_counts_messages(recipient_ids=[recipient_id]))


def _counts_messages(*, recipient_ids: Iterable[UUID]) -> list[tuple[UUID, dict[str, Any]]]:
    counts = inbox_counts_many(recipient_ids=recipient_ids)
    return [(recipient_id, {"type": "inbox.counts", "counts": c}) for recipient_id, c in counts.items()]


def _broadcast(messages: list[tuple[UUID, dict[str, Any]]]) -> None:
    layer = get_channel_layer()
    if layer is None or not messages:
        return

    async def send_all() -> None:
        for recipient_id, message in messages:
            await layer.group_send(inbox_group(recipient_id=recipient_id), message)

    try:
        async_to_sync(send_all)()
    except Exception:  # noqa: BLE001 - a lost push must never fail the delivery or the request
        logger.warning("live inbox update not pushed; clients catch up when they reconnect", exc_info=True)
