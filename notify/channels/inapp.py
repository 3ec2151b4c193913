"""The in-app inbox: a delivery becomes an item in the recipient's inbox, stored in the
database, which is the truth that the inbox API reads. Open connections get the item and
the new counts pushed to them as soon as it is stored."""

import time

from apps.inbox.live import inbox_items_added
from apps.inbox.models import InboxItem
from apps.recipients.models import Recipient
from notify.channels.base import Channel, OutboundMessage, SendOutcome, timed_outcome


class InAppChannel(Channel):
    name = "inapp"

    def address_for(self, *, recipient: Recipient) -> str:
        return str(recipient.id)  # every recipient has an inbox

    def send_batch(self, *, messages: list[OutboundMessage]) -> list[SendOutcome]:
        started = time.perf_counter()
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
                )
                for message in messages
            ],
            ignore_conflicts=True,
        )
        outcomes = [timed_outcome(m, started, provider_status="inapp:stored") for m in messages]
        # Read back: with ignore_conflicts the objects above lack the ids of items stored before.
        inbox_items_added(items=InboxItem.objects.filter(delivery_id__in=[m.delivery_id for m in messages]))
        return outcomes
