"""Reconcile: before a delivery whose last attempt is in doubt is sent again, ask the provider
whether it already has the message.

An attempt is in doubt when its worker died, or the provider did not answer, between handing
the message over and recording the answer. Found at the provider, the delivery is recorded as
sent and not resent. Not found, it is sent. When the provider cannot be asked, a repeat the
person would not see (push, web push and in-app replace the one shown) is sent; otherwise the
category decides between resending (at least once) and holding it for an operator (at most
once)."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from django.conf import settings

from apps.catalog.models import Category, CategoryKind, WhenInDoubt
from apps.deliveries.models import DeliveryStatus, Provider
from notify.channels.base import Channel, OutboundMessage, SendOutcome
from notify.resilience.failures import FailureKind
from notify.resilience.providers import providers_reconcile


@dataclass(frozen=True)
class Reconciled:
    outcomes: list[SendOutcome]  # found, held, or to ask again later
    to_send: list[OutboundMessage]


def in_doubt_policy(*, category: Category) -> str:
    """What the category does with a message the provider cannot be asked about."""
    if category.when_in_doubt:
        return category.when_in_doubt
    return WhenInDoubt.RESEND if category.kind == CategoryKind.CRITICAL else WhenInDoubt.HOLD


def in_doubt_reconcile(
    *,
    channel: Channel,
    messages: list[OutboundMessage],
    providers: list[Provider],
    channel_for: Callable[[Provider], Channel],
    categories: dict[UUID, Category],
    now: datetime,
) -> Reconciled:
    """Split in-doubt messages into those to send and the outcomes of the rest.
    `categories` holds each message's category by its delivery id."""
    if channel.repeats_collapse:
        return Reconciled(outcomes=[], to_send=messages)
    answers = providers_reconcile(channel=channel, messages=messages, providers=providers, channel_for=channel_for)
    # A real provider's search shows a message a little after it took it.
    settle = timedelta(seconds=settings.NOTIFY_RECONCILE_AFTER_SECONDS)
    outcomes: list[SendOutcome] = []
    to_send: list[OutboundMessage] = []
    for message in messages:
        delivery_id = message.delivery_id
        if delivery_id in answers.found:
            outcomes.append(
                SendOutcome(
                    delivery_id=delivery_id,
                    provider_message_id=answers.found[delivery_id],
                    provider_status=f"{channel.name}:found at the provider",
                    reason="found at the provider, which took it before the attempt was recorded: not sent again",
                )
            )
        elif delivery_id in answers.unanswered:
            reason = f"in doubt, and the provider could not say whether it has it ({answers.unanswered[delivery_id]})"
            outcomes.append(
                SendOutcome(delivery_id=delivery_id, failure=FailureKind.TRANSIENT, reason=reason, in_doubt=True)
            )
        elif not answers.askable:
            if in_doubt_policy(category=categories[delivery_id]) == WhenInDoubt.RESEND:
                to_send.append(message)
            else:
                reason = "in doubt, and the provider cannot be asked whether it has it: held for an operator"
                outcomes.append(SendOutcome(delivery_id=delivery_id, failure=FailureKind.IN_DOUBT, reason=reason))
        elif message.in_doubt_since is not None and now < message.in_doubt_since + settle:
            outcomes.append(
                SendOutcome(
                    delivery_id=delivery_id,
                    withheld=DeliveryStatus.DEFERRED,
                    reason="in doubt: waiting for the provider's search to catch up before asking it",
                    until=message.in_doubt_since + settle,
                )
            )
        else:
            to_send.append(message)
    return Reconciled(outcomes=outcomes, to_send=to_send)
