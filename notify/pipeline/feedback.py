"""Provider feedback, from a channel's webhook to its consequences: recorded through the
ledger, then acted on. Here rather than in the channels or the ledger, so that neither
imports the stages that publish and route."""

from django.db import transaction

from notify.pipeline.dispatch import recorded_publish
from notify.pipeline.record import AddressReader, Feedback, feedback_record
from notify.pipeline.routing import chains_advance


def feedback_receive(*, feedback: Feedback, address_for: AddressReader | None) -> bool:
    """Record what a provider reported about a delivery and act on what follows: a soft
    bounce's retry or dead letter is published with the record, then the delivery's fallback
    chain moves on. `address_for` is the reporting channel's (see feedback_record). Return
    False when there was nothing to apply."""
    with transaction.atomic():
        recorded = feedback_record(feedback=feedback, address_for=address_for)
        if recorded is not None:
            recorded_publish(recorded=recorded)
    if recorded is None:
        return False
    if recorded.chains:
        chains_advance(notification_ids=recorded.chains)
    return True
