"""The in-app inbox: a delivery becomes an item in the recipient's inbox, stored in the
database, which is the truth that the inbox API reads. Open connections get the item and
the new counts pushed to them as soon as it is stored.

An event with a replace key updates the recipient's item for that key in place (the item
moves to the newest delivery) instead of adding a second one."""

import time
from datetime import datetime
from uuid import UUID

from django.utils import timezone

from apps.deliveries.models import DeliveryStatus
from apps.inbox.live import inbox_items_added
from apps.inbox.models import InboxItem
from apps.inbox.services import inbox_groups_fold, inbox_item_attributes, inbox_item_replace
from apps.recipients.models import Recipient
from notify.channels.base import Channel, OutboundMessage, SendOutcome, timed_outcome
from notify.pipeline.bulk import rows_insert_new

# Items written in one statement.
IN_APP_BATCH = 250


class InAppChannel(Channel):
    name = "inapp"
    repeats_collapse = True  # one item per delivery

    def messages_per_request(self) -> int:
        return IN_APP_BATCH  # no provider: one bulk write

    def address_for(self, *, recipient: Recipient) -> str:
        return str(recipient.id)  # every recipient has an inbox

    def address_sql(self, *, recipient: str) -> str | None:
        return f"{recipient}.id::text"

    def send_batch(self, *, messages: list[OutboundMessage]) -> list[SendOutcome]:
        started = time.perf_counter()
        now = timezone.now()
        delivery_ids = [message.delivery_id for message in messages]
        attributes = inbox_item_attributes(event_ids={m.event_id for m in messages})
        items = {m.delivery_id: _item(message=m, now=now, attributes=attributes.get(m.event_id, {})) for m in messages}
        # A re-send after a lost record finds the item there: one item per delivery.
        fresh = [items[m.delivery_id] for m in messages if not m.replaces]
        inserted = rows_insert_new(objects=fresh)
        stale = set()
        # Oldest first, so that of one key's deliveries in this batch the newest ends up shown.
        for message in sorted((m for m in messages if m.replaces), key=lambda m: m.delivery_id):
            if inbox_item_replace(item=items[message.delivery_id], replace_key=message.collapse_key) is None:
                stale.add(message.delivery_id)
        outcomes = [
            timed_outcome(
                m,
                started,
                withheld=DeliveryStatus.SUPERSEDED,
                reason="the in-app item already shows a later event with this replace key",
            )
            if m.delivery_id in stale
            else timed_outcome(m, started, provider_status="inapp:stored")
            for m in messages
        ]
        if inserted == len(messages) and not any(item.group_key for item in fresh):
            # The usual batch (a broadcast's): every item new, none replacing or grouped, so
            # what was stored is what is in hand, and pushing it needs no read.
            inbox_items_added(items=fresh)
            return outcomes
        # Read back: with ignore_conflicts the objects above lack the ids of items stored
        # before; an item replaced by key now belongs to its newest delivery, so is read too.
        stored = list(InboxItem.objects.filter(delivery_id__in=delivery_ids))
        inbox_groups_fold(items=stored)
        # A grouped item is pushed as its group's newest item, with the group's count; an
        # item replaced by key is pushed again with its id, which clients keep items by.
        inbox_items_added(items=InboxItem.objects.filter(delivery_id__in=delivery_ids, folded=False))
        return outcomes


def _item(*, message: OutboundMessage, now: datetime, attributes: dict) -> InboxItem:
    return InboxItem.new(
        recipient_id=UUID(message.address),  # as read from the database: the push keys counts by it
        delivery_id=message.delivery_id,
        title=message.content.title,
        body=message.content.body,
        link=message.content.link,
        data=message.content.data,
        sort_at=now,
        **attributes,
    )
