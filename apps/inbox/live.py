"""Live inbox updates: new items, changed items and fresh counts pushed to every open
connection of a recipient (each tab or device), whichever web process holds it.

One Redis PUBLISH a batch carries every recipient's frames, ready to send as they are; each
web process's hub (apps.inbox.hub) receives it on its one subscription and hands the frames to
the sockets it holds. Pub/sub delivers at most once, so a push is a courtesy and never the
record: the database is. A push that fails is logged and dropped; the sockets catch up from the
database when the hub's subscription comes back, and clients when they reconnect."""

import json
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

from apps.inbox.hub import live_channel
from apps.inbox.models import InboxItem
from apps.inbox.serializers import inbox_item_json, inbox_items_json
from apps.inbox.services import inbox_counts_many, inbox_snoozes_wake

logger = logging.getLogger(__name__)
# A slow Redis delays the worker's batch (or the request) by at most this; the push is dropped.
PUBLISH_TIMEOUT_SECONDS = 0.5
_publishers: dict[str, redis.Redis] = {}


def inbox_items_added(*, items: Iterable[InboxItem]) -> None:
    """Push each new item with its recipient's counts after the whole batch."""
    items = list(items)
    if not items:
        return
    counts = inbox_counts_many(recipient_ids={item.recipient_id for item in items})
    _publish(
        [
            (
                item.recipient_id,
                [_frame(type="item", item=item_json), _counts_frame(counts=counts, recipient_id=item.recipient_id)],
            )
            for item, item_json in zip(items, inbox_items_json(items=items), strict=True)
        ]
    )


def inbox_item_changed(*, item: InboxItem) -> None:
    """Another tab marked an item read, seen or archived: show it everywhere."""
    counts = inbox_counts_many(recipient_ids=[item.recipient_id])
    _publish(
        [
            (
                item.recipient_id,
                [
                    _frame(type="item_updated", item=inbox_item_json(item=item)),
                    _counts_frame(counts=counts, recipient_id=item.recipient_id),
                ],
            )
        ]
    )


def inbox_snoozes_return(*, now: datetime) -> int:
    """Push the snoozed items whose time has come to their recipients' connections, as new."""
    items = inbox_snoozes_wake(now=now)
    inbox_items_added(items=items)
    return len(items)


def inbox_counts_changed(*, recipient_id: UUID) -> None:
    counts = inbox_counts_many(recipient_ids=[recipient_id])[recipient_id]
    _publish([(recipient_id, [_frame(type="counts", counts=counts)])])


def _frame(**message: Any) -> str:
    # As the consumer's send_json encodes a message: the web process sends it unchanged.
    return json.dumps(message)


def _counts_frame(*, counts: dict[UUID, dict[str, Any]], recipient_id: UUID) -> str:
    return _frame(type="counts", counts=counts[recipient_id])


def _publish(frames: list[tuple[UUID, list[str]]]) -> None:
    """One message for the whole batch, to every web process's hub."""
    url = settings.NOTIFY_INBOX_LIVE_URL
    if url not in _publishers:
        _publishers[url] = redis.Redis.from_url(
            url,
            socket_connect_timeout=PUBLISH_TIMEOUT_SECONDS,
            socket_timeout=PUBLISH_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        )
    message = json.dumps([[str(recipient_id), recipient_frames] for recipient_id, recipient_frames in frames])
    try:
        _publishers[url].publish(live_channel(url=url), message)
    except (redis.RedisError, OSError):  # a lost push must never fail the delivery or the request
        logger.warning("live inbox update not pushed; clients catch up from the database", exc_info=True)
