"""The in-app inbox: a delivery becomes an item in the recipient's inbox, stored in the
database, which is the truth that the inbox API reads. Open connections get the item and
the new counts pushed to them as soon as it is stored."""

import time

from django.utils import timezone

from apps.inbox.live import inbox_items_added
from apps.inbox.models import InboxItem
from apps.inbox.services import inbox_groups_fold, inbox_item_attributes
from apps.recipients.models import Recipient
from notify.channels.base import Channel, OutboundMessage, SendOutcome, timed_outcome

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
        attributes = inbox_item_attributes(delivery_ids=delivery_ids)
        # A re-send after a lost record finds the item there: one item per delivery.
        InboxItem.objects.bulk_create(
            [
                InboxItem(
                    recipient_id=message.address,
                    delivery_id=message.delivery_id,
                    title=message.content.title,
                    body=message.content.body,
                    link=message.content.link,
                    data=message.content.data,
                    sort_at=now,
                    **attributes.get(message.delivery_id, {}),
                )
                for message in messages
            ],
            ignore_conflicts=True,
        )
        outcomes = [timed_outcome(m, started, provider_status="inapp:stored") for m in messages]
        # Read back: with ignore_conflicts the objects above lack the ids of items stored before.
        stored = list(InboxItem.objects.filter(delivery_id__in=delivery_ids))
        inbox_groups_fold(items=stored)
        # A grouped item is pushed as its group's newest item, with the group's count.
        inbox_items_added(items=InboxItem.objects.filter(delivery_id__in=delivery_ids, folded=False))
        return outcomes
