"""Record: turn send outcomes into delivery states and history, in bulk.

Only the holder of a claim's lease token may record; a worker whose lease expired (and
whose deliveries were re-queued) finds nothing to update."""
from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from apps.deliveries.models import DeadLetter, Delivery, DeliveryEvent, DeliveryStatus
from notify.resilience.failures import FailureKind, attempts_exhausted, retry_delay

if TYPE_CHECKING:  # the channels import this module for feedback
    from notify.channels.base import SendOutcome

logger = logging.getLogger(__name__)


def history_event(
    *, delivery: Delivery, status: str, reason: str = "", at: datetime, detail: dict | None = None
) -> DeliveryEvent:
    """An unsaved history row for one state change of a delivery."""
    return DeliveryEvent(
        delivery=delivery,
        status=status,
        reason=reason[:500],
        attempt=delivery.attempt_count,
        detail=detail or {},
        created_at=at,
    )


def outcomes_record(*, lease_token: UUID, deliveries: dict[UUID, Delivery], outcomes: list[SendOutcome]) -> None:
    """Apply a chunk of outcomes: sent, retry later, dead-letter, or failed for good."""
    from notify.pipeline import dispatch  # dispatch publishes; record is imported by it

    now = timezone.now()
    with transaction.atomic():
        held = set(
            Delivery.objects.select_for_update()
            .filter(id__in=[o.delivery_id for o in outcomes], lease_token=lease_token, status=DeliveryStatus.SENDING)
            .values_list("id", flat=True)
        )
        lost = len(outcomes) - len(held)
        if lost:
            logger.warning("lease lost for %d deliveries; another worker owns them now", lost)

        changed: list[Delivery] = []
        history: list[DeliveryEvent] = []
        dead_letters: list[DeadLetter] = []
        retries: dict[tuple[str, str], list[Delivery]] = defaultdict(list)
        for outcome in outcomes:
            if outcome.delivery_id not in held:
                continue
            delivery = deliveries[outcome.delivery_id]
            delivery.lease_token = None
            delivery.lease_expires_at = None
            delivery.updated_at = now  # bulk_update skips auto_now
            detail = {"elapsed_ms": round(outcome.elapsed_ms, 1)}
            if outcome.ok:
                delivery.status = DeliveryStatus.SENT
                delivery.status_reason = ""
                delivery.sent_at = now
                delivery.provider_message_id = outcome.provider_message_id
                detail["provider_message_id"] = outcome.provider_message_id
                reason = "accepted by the provider"
            elif outcome.failure is FailureKind.PERMANENT:
                delivery.status = DeliveryStatus.FAILED
                delivery.status_reason = reason = f"permanent failure: {outcome.reason}"
            elif attempts_exhausted(channel=delivery.channel, attempt=delivery.attempt_count):
                delivery.status = DeliveryStatus.DEAD
                delivery.status_reason = reason = (
                    f"retries exhausted after {delivery.attempt_count} attempts: {outcome.reason}"
                )
                dead_letters.append(
                    DeadLetter(
                        delivery=delivery,
                        channel=delivery.channel,
                        reason=outcome.reason[:500],
                        attempts=delivery.attempt_count,
                    )
                )
            else:
                delay = retry_delay(channel=delivery.channel, attempt=delivery.attempt_count)
                delivery.status = DeliveryStatus.RETRYING
                delivery.next_attempt_at = now + delay
                delivery.status_reason = reason = (
                    f"transient failure: {outcome.reason}; retry at {delivery.next_attempt_at.isoformat()}"
                )
                retries[(delivery.channel, delivery.priority)].append(delivery)
            changed.append(delivery)
            history.append(history_event(delivery=delivery, status=delivery.status, reason=reason, at=now, detail=detail))

        for group in retries.values():
            dispatch.retries_schedule(deliveries=group, now=now)
        Delivery.objects.bulk_update(
            changed,
            fields=[
                "status",
                "status_reason",
                "sent_at",
                "provider_message_id",
                "next_attempt_at",
                "published_at",
                "lease_token",
                "lease_expires_at",
                "updated_at",
            ],
        )
        DeliveryEvent.objects.bulk_create(history)
        if dead_letters:
            DeadLetter.objects.bulk_create(dead_letters)
            dispatch.dead_letters_announce(dead_letters=dead_letters)


# Provider feedback (normalised by the channel) -> our delivery state. Feedback of other
# kinds is kept in the history without changing the state.
FEEDBACK_STATUSES = {"delivered": DeliveryStatus.DELIVERED}


class FeedbackNotReady(Exception):
    """Feedback arrived before the send was recorded; the provider should retry it."""


def feedback_record(
    *, delivery_id: str, provider_status: str, normalized_status: str, occurred_at: datetime | None
) -> bool:
    """Apply provider feedback to a delivery; return False when there is nothing to apply."""
    now = timezone.now()
    with transaction.atomic():
        delivery = Delivery.objects.select_for_update().filter(id=delivery_id).first()
        if delivery is None:
            logger.info("feedback for unknown delivery %s ignored", delivery_id)
            return False
        if delivery.status == DeliveryStatus.SENDING:
            raise FeedbackNotReady(f"delivery {delivery_id} is still being sent")
        new_status = FEEDBACK_STATUSES.get(normalized_status)
        if new_status is None or delivery.status != DeliveryStatus.SENT:
            return False
        delivery.status = new_status
        delivery.status_reason = ""
        delivery.save(update_fields=["status", "status_reason", "updated_at"])
        detail = {"provider_status": provider_status}
        if occurred_at is not None:
            detail["occurred_at"] = occurred_at.isoformat()
        history_event(delivery=delivery, status=new_status, reason="provider feedback", at=now, detail=detail).save()
    return True
