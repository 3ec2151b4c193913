"""Record: turn send outcomes into delivery states and history, in bulk.

Only the holder of a claim's lease token may record; a worker whose lease expired (and
whose deliveries were re-queued) finds nothing to update."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID

from django.db import connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from apps.deliveries.models import DeadLetter, Delivery, DeliveryEvent, DeliveryStatus, EarlyFeedback
from notify.observability import metrics
from notify.pipeline.bulk import PrimaryKeyPath, copy_pays, rows_copy, uuid_array
from notify.resilience.failures import FailureKind, attempts_exhausted, retry_delay

if TYPE_CHECKING:  # the channels import this module for feedback
    from notify.channels.base import SendOutcome

logger = logging.getLogger(__name__)


class HistoryRow(NamedTuple):
    """One state change of a delivery, for history_insert(): a plain tuple, because a batch
    writes thousands and a model instance for each cost more than the writing."""

    delivery_id: UUID
    status: str
    reason: str
    attempt: int
    detail: dict[str, Any]
    created_at: datetime


_HISTORY_FIELDS = [DeliveryEvent._meta.get_field(name) for name in ("delivery", *HistoryRow._fields[1:])]


def history_event(
    *, delivery: Delivery, status: str, reason: str = "", at: datetime, detail: dict | None = None
) -> HistoryRow:
    """A history row for one state change of a delivery, to insert with history_insert()."""
    return HistoryRow(delivery.id, status, reason[:500], delivery.attempt_count, detail or {}, at)


def history_insert(*, rows: Sequence[HistoryRow], changes: bool = True) -> None:
    """Append history rows: through COPY on PostgreSQL when there are many, else bulk_create();
    with them, in the same transaction, the producers' webhook events for those changes
    (`changes` False: notes that keep the state, which are no events)."""
    if copy_pays(rows=len(rows)):
        rows_copy(model=DeliveryEvent, fields=_HISTORY_FIELDS, rows=rows)
    elif rows:
        DeliveryEvent.objects.bulk_create([DeliveryEvent(**row._asdict()) for row in rows])
    if changes:
        _webhook_events_emit(history=rows)


def outcomes_record(
    *, lease_token: UUID, deliveries: dict[UUID, Delivery], outcomes: list[SendOutcome]
) -> list[HistoryRow]:
    """Apply a chunk of outcomes: sent, retry later, dead-letter, or failed for good; return
    the state changes recorded (one per delivery this lease still held)."""
    now = timezone.now()
    sent = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    history: list[HistoryRow] = []
    with transaction.atomic():
        if sent:
            held = _sent_mark(lease_token=lease_token, outcomes=sent, now=now)
            for outcome in sent:
                if outcome.delivery_id in held:
                    detail = _detail(outcome)
                    delivery = deliveries[outcome.delivery_id]
                    history.append(
                        history_event(
                            delivery=delivery,
                            status=DeliveryStatus.SENT,
                            reason=outcome.reason or "accepted by the provider",
                            at=now,
                            detail=detail,
                        )
                    )
        if failed:
            history.extend(_failures_record(lease_token=lease_token, deliveries=deliveries, outcomes=failed, now=now))
        history_insert(rows=history)
        early_feedback_apply(delivery_ids=[o.delivery_id for o in outcomes])
    if len(history) < len(outcomes):
        logger.warning("lease lost for %d deliveries; another worker owns them now", len(outcomes) - len(history))
    return history


# Delivery states producers can subscribe to (apps/webhooks), by the webhook event type.
WEBHOOK_EVENT_TYPES: dict[str, str] = {
    DeliveryStatus.SENT: "delivery.sent",
    DeliveryStatus.DELIVERED: "delivery.delivered",
    DeliveryStatus.FAILED: "delivery.failed",
    DeliveryStatus.BOUNCED: "delivery.bounced",
    DeliveryStatus.OPENED: "delivery.opened",
    DeliveryStatus.CLICKED: "delivery.clicked",
    DeliveryStatus.DEAD: "notification.dead_lettered",
}


def _webhook_events_emit(*, history: Sequence[HistoryRow]) -> None:
    """The producers' outbox rows for these state changes (one INSERT ... SELECT per type)."""
    from apps.webhooks.services import delivery_events_emit  # the webhooks app reads the deliveries

    by_type: dict[tuple[str, datetime], list[UUID]] = defaultdict(list)
    for row in history:
        if row.status in WEBHOOK_EVENT_TYPES:
            by_type[(WEBHOOK_EVENT_TYPES[row.status], row.created_at)].append(row.delivery_id)
    for (event_type, at), delivery_ids in by_type.items():
        delivery_events_emit(event_type=event_type, delivery_ids=delivery_ids, at=at)


def _detail(outcome: SendOutcome) -> dict[str, Any]:
    detail: dict[str, Any] = {"elapsed_ms": round(outcome.elapsed_ms, 1)}
    for name in ("provider_message_id", "provider_status", "segments"):
        if getattr(outcome, name):
            detail[name] = getattr(outcome, name)
    return detail


def deliveries_held(*, delivery_ids: list[UUID], lease_token: UUID) -> QuerySet[Delivery]:
    """The deliveries among the ids that this lease still holds, found by primary key."""
    return Delivery.objects.alias(current_status=PrimaryKeyPath("status")).filter(
        id__any_of=delivery_ids, lease_token=lease_token, current_status=DeliveryStatus.SENDING
    )


def _sent_mark(*, lease_token: UUID, outcomes: list[SendOutcome], now: datetime) -> set[UUID]:
    """Mark deliveries sent, each with its provider message id, in one statement; return
    the ids this lease still held.

    Written as SQL because bulk_update() builds an ORM expression per row, which at batch
    sizes costs more than the send itself. The values go in as three arrays, so the
    statement's text is the same for every chunk."""
    if connection.vendor != "postgresql":  # the demo's SQLite: a statement a row is plenty
        return {
            o.delivery_id
            for o in outcomes
            if deliveries_held(delivery_ids=[o.delivery_id], lease_token=lease_token).update(
                status=DeliveryStatus.SENT,
                status_reason="",
                sent_at=now,
                updated_at=now,
                lease_token=None,
                lease_expires_at=None,
                in_doubt_since=None,
                provider_message_id=o.provider_message_id[:255],
                segments=o.segments,
            )
        }
    sql = (
        f"UPDATE {Delivery._meta.db_table} AS d SET status = %s, status_reason = '', sent_at = %s, "
        "updated_at = %s, lease_token = NULL, lease_expires_at = NULL, in_doubt_since = NULL, "
        "provider_message_id = v.provider_message_id, segments = v.segments "
        "FROM unnest(%s::uuid[], %s::varchar[], %s::integer[]) AS v(id, provider_message_id, segments) "
        # The status as an expression (see PrimaryKeyPath), so that each row is found by its
        # key from the arrays; the planner, expecting few rows in 'sending', otherwise read the
        # partial index of leased rows (or the whole table) and matched every row to every id.
        "WHERE d.id = v.id AND d.lease_token = %s AND (d.status || '') = %s RETURNING d.id"
    )
    params: list[Any] = [
        DeliveryStatus.SENT,
        now,
        now,
        uuid_array(o.delivery_id for o in outcomes),
        [o.provider_message_id[:255] for o in outcomes],
        [o.segments for o in outcomes],
        lease_token,
        DeliveryStatus.SENDING,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0] for row in cursor.fetchall()}


def failure_apply(
    *, delivery: Delivery, failure: FailureKind | None, reason: str, now: datetime, delays: dict[int, timedelta]
) -> DeadLetter | None:
    """Set the delivery's state after a failed attempt: failed for good, retrying with
    backoff, or dead once its attempts are spent (then return its unsaved dead letter)."""
    attempt = delivery.attempt_count
    dead_letter = None
    if failure is FailureKind.PERMANENT:
        delivery.status = DeliveryStatus.FAILED
        text = f"permanent failure: {reason}"
    elif failure is FailureKind.IN_DOUBT:
        delivery.status = DeliveryStatus.DEAD
        text = reason
        dead_letter = DeadLetter(delivery=delivery, channel=delivery.channel, reason=reason[:500], attempts=attempt)
    elif attempts_exhausted(channel=delivery.channel, attempt=attempt):
        delivery.status = DeliveryStatus.DEAD
        text = f"retries exhausted after {attempt} attempts: {reason}"
        dead_letter = DeadLetter(delivery=delivery, channel=delivery.channel, reason=reason[:500], attempts=attempt)
    else:
        delay = delays.setdefault(attempt, retry_delay(channel=delivery.channel, attempt=attempt))
        delivery.status = DeliveryStatus.RETRYING
        delivery.next_attempt_at = now + delay
        text = f"transient failure: {reason}; retry at {delivery.next_attempt_at.isoformat()}"
    delivery.status_reason = text[:500]
    return dead_letter


def _failures_record(
    *, lease_token: UUID, deliveries: dict[UUID, Delivery], outcomes: list[SendOutcome], now: datetime
) -> list[HistoryRow]:
    from notify.pipeline import dispatch  # dispatch publishes; record is imported by it

    # With the two times the send stage did not load: only a failure needs them.
    held: dict[UUID, Any] = {
        row[0]: row[1:]
        for row in deliveries_held(delivery_ids=[o.delivery_id for o in outcomes], lease_token=lease_token)
        .select_for_update()
        .values_list("id", "next_attempt_at", "published_at")
    }
    for delivery_id, times in held.items():
        deliveries[delivery_id].next_attempt_at, deliveries[delivery_id].published_at = times
    history: list[HistoryRow] = []
    dead_letters: list[DeadLetter] = []
    retries: dict[tuple[str, str], list[Delivery]] = defaultdict(list)
    deferrals: dict[tuple[str, str, datetime], list[Delivery]] = defaultdict(list)
    # One backoff draw per attempt number in a chunk: what failed together retries together.
    delays: dict[int, timedelta] = {}
    for outcome in outcomes:
        if outcome.delivery_id not in held:
            continue
        delivery = deliveries[outcome.delivery_id]
        if outcome.suppress_address:
            from notify.policy.suppression import suppression_add

            suppression_add(
                tenant_id=delivery.notification.tenant_id,
                channel=delivery.channel,
                address=outcome.suppress_address,
                reason=f"opted out ({outcome.provider_status or outcome.reason[:80]})",
                source=outcome.provider_status or delivery.channel,
            )
        if outcome.withheld:
            delivery.status, delivery.status_reason = outcome.withheld, outcome.reason[:500]
            if outcome.until is not None:
                delivery.next_attempt_at = outcome.until
                deferrals[(delivery.channel, delivery.priority, outcome.until)].append(delivery)
        else:
            if outcome.in_doubt and delivery.in_doubt_since is None:
                delivery.in_doubt_since = now
            dead_letter = failure_apply(
                delivery=delivery, failure=outcome.failure, reason=outcome.reason, now=now, delays=delays
            )
            if dead_letter is not None:
                dead_letters.append(dead_letter)
            elif delivery.status == DeliveryStatus.RETRYING:
                retries[(delivery.channel, delivery.priority)].append(delivery)
        detail = {**_detail(outcome), "failure": outcome.failure.value if outcome.failure else ""}
        history.append(
            history_event(
                delivery=delivery, status=delivery.status, reason=delivery.status_reason, at=now, detail=detail
            )
        )

    for group in [*retries.values(), *deferrals.values()]:
        dispatch.retries_schedule(deliveries=group, now=now)
    # Rows that failed alike (an outage fails a whole chunk alike) share one UPDATE.
    changes: dict[tuple, list[UUID]] = defaultdict(list)
    for delivery_id in held:
        delivery = deliveries[delivery_id]
        changes[
            (
                delivery.status,
                delivery.status_reason,
                delivery.next_attempt_at,
                delivery.published_at,
                delivery.in_doubt_since,
            )
        ].append(delivery_id)
    for (status, status_reason, next_attempt_at, published_at, in_doubt_since), ids in changes.items():
        # A deferral was no attempt: give back the one its claim counted.
        attempts = {"attempt_count": F("attempt_count") - 1} if status == DeliveryStatus.DEFERRED else {}
        Delivery.objects.filter(id__in=ids).update(
            status=status,
            status_reason=status_reason,
            next_attempt_at=next_attempt_at,
            published_at=published_at,
            in_doubt_since=in_doubt_since,
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
            **attempts,
        )
    if dead_letters:
        DeadLetter.objects.bulk_create(dead_letters)
        dispatch.dead_letters_announce(dead_letters=dead_letters)
    return history


# Provider feedback, normalised by the channel -> (our new state, the states it moves from).
# Progress only moves forward (delivered -> opened -> clicked). A provider can deliver what
# we recorded as retrying or dead (a timeout after it accepted): its word wins, and the
# pending retry finds nothing left to claim.
_SENT_OR_LATER = (DeliveryStatus.SENT, DeliveryStatus.RETRYING, DeliveryStatus.DEAD)
FEEDBACK_TRANSITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "delivered": (DeliveryStatus.DELIVERED, _SENT_OR_LATER),
    "opened": (DeliveryStatus.OPENED, (*_SENT_OR_LATER, DeliveryStatus.DELIVERED)),
    "clicked": (DeliveryStatus.CLICKED, (*_SENT_OR_LATER, DeliveryStatus.DELIVERED, DeliveryStatus.OPENED)),
    "failed": (DeliveryStatus.FAILED, (DeliveryStatus.SENT,)),
    "bounced": (DeliveryStatus.BOUNCED, (DeliveryStatus.SENT, DeliveryStatus.DELIVERED)),
    "complained": (
        DeliveryStatus.COMPLAINED,
        (DeliveryStatus.SENT, DeliveryStatus.DELIVERED, DeliveryStatus.OPENED, DeliveryStatus.CLICKED),
    ),
    # The recipient opted out at the provider (an SMS STOP): this message failed for good.
    "unsubscribed": (DeliveryStatus.FAILED, (DeliveryStatus.SENT,)),
    # A soft bounce is a transient failure reported late: retried like one.
    "soft_bounced": (DeliveryStatus.RETRYING, (DeliveryStatus.SENT,)),
}
# Feedback that means the address must not be sent to again.
SUPPRESSING_FEEDBACK = {"bounced": "hard bounce", "complained": "spam complaint", "unsubscribed": "opted out"}


@dataclass(frozen=True)
class Feedback:
    """What a provider reported about one delivery, in the shared vocabulary."""

    delivery_id: str
    normalized_status: str
    provider_status: str  # the provider's own word, kept next to ours: "postmark:Bounce/HardBounce"
    resend_round: int = 0  # which send of the delivery it is about (see Delivery.resend_round)
    occurred_at: datetime | None = None
    reason: str = ""
    address: str = ""  # as the provider reports it; suppression stores it in canonical form
    channel: str = ""  # the channel whose webhook reported it: feedback about another's is ignored
    # The provider accounts whose credentials signed the report (Providers' names, "" for the
    # configured default), when the channel verifies a signature per account: the report
    # counts only if one of them sent the delivery (see delivery_sender).
    signers: Sequence[str] | None = None


def feedback_record(*, feedback: Feedback) -> bool:
    """Apply provider feedback to a delivery; return False when there is nothing to apply.
    A hard bounce, a complaint or an opt-out also suppresses the address for the tenant.
    Feedback that arrives while the delivery is still being sent is kept and applied as
    soon as the send is recorded, since providers need not send it again."""
    from notify.policy.suppression import suppression_add

    try:
        UUID(str(feedback.delivery_id))
    except ValueError:
        logger.info("feedback for malformed delivery id %r ignored", feedback.delivery_id)
        return False
    with transaction.atomic():
        delivery = (
            Delivery.objects.select_for_update(of=("self",))
            .select_related("notification__recipient")
            .filter(id=feedback.delivery_id)
            .first()
        )
        if delivery is None:
            logger.info("feedback for unknown delivery %s ignored", feedback.delivery_id)
            return False
        if feedback.channel and feedback.channel != delivery.channel:
            logger.warning("%s feedback for %s delivery %s ignored", feedback.channel, delivery.channel, delivery.id)
            return False
        if feedback.resend_round < delivery.resend_round:
            return False  # about an earlier send that has since been replaced
        if (
            feedback.signers is not None
            and delivery.status != DeliveryStatus.SENDING
            and delivery_sender(delivery_id=delivery.id) not in feedback.signers
        ):
            logger.warning("feedback for delivery %s signed by an account that did not send it ignored", delivery.id)
            return False
        address = (
            _reported_address(delivery=delivery, feedback=feedback)
            if feedback.normalized_status in SUPPRESSING_FEEDBACK
            else ""
        )
        if address:
            suppression_add(
                tenant_id=delivery.notification.tenant_id,
                channel=delivery.channel,
                address=address,
                reason=f"{SUPPRESSING_FEEDBACK[feedback.normalized_status]} ({feedback.provider_status})",
                source=feedback.provider_status,
            )
        if delivery.status == DeliveryStatus.SENDING:
            EarlyFeedback.objects.create(delivery=delivery, payload=_feedback_payload(feedback))
            return True
        status_before = delivery.status
        applied = _feedback_apply(delivery=delivery, feedback=feedback)
    if applied and delivery.status != status_before:
        signers = feedback.signers
        metrics.feedback_count(
            delivery=delivery,
            state=delivery.status,
            provider_name=signers[0] if signers is not None and len(signers) == 1 else None,
            now=timezone.now(),
        )
    if applied and delivery.step is not None:
        from notify.pipeline.routing import chains_advance  # routing records through this module

        chains_advance(notification_ids=[delivery.notification_id])
    return applied


def _reported_address(*, delivery: Delivery, feedback: Feedback) -> str:
    """The delivery's own address when the report is about it, else "": a report names the
    delivery it is about, and may suppress that delivery's address and no other."""
    from notify.channels import channel_get  # the channels import this module
    from notify.policy.suppression import address_canonical

    if not feedback.address:
        return ""
    own = channel_get(name=delivery.channel).address_for(recipient=delivery.notification.recipient)
    canonical = address_canonical(channel=delivery.channel, address=feedback.address)
    if not own or address_canonical(channel=delivery.channel, address=own) != canonical:
        logger.warning("feedback for delivery %s names another address; nothing suppressed", delivery.id)
        return ""
    return own


def delivery_sender(*, delivery_id: UUID) -> str | None:
    """The provider account of the delivery's latest recorded attempt (a send, or a failed
    one whose outcome may still be that the provider took it): a Provider's name, "" for the
    configured default; None when no attempt is recorded yet."""
    from notify.resilience.providers import provider_name_of  # providers import the channels

    attempted = Q(status=DeliveryStatus.SENT) | (Q(detail__has_key="failure") & ~Q(detail__failure=""))
    detail = (
        DeliveryEvent.objects.filter(attempted, delivery_id=delivery_id)
        .order_by("-created_at", "-id")
        .values_list("detail", flat=True)
        .first()
    )
    if detail is None:
        return None
    return provider_name_of(provider_status=str(detail.get("provider_status", "")))


def delivery_tenant_id(*, delivery_id: UUID) -> UUID | None:
    """The tenant a delivery belongs to; None for an unknown delivery."""
    return Delivery.objects.filter(pk=delivery_id).values_list("notification__tenant_id", flat=True).first()


def _feedback_payload(feedback: Feedback) -> dict[str, Any]:
    payload = dict(feedback.__dict__)
    payload["occurred_at"] = feedback.occurred_at.isoformat() if feedback.occurred_at else None
    return payload


def early_feedback_apply(*, delivery_ids: list[UUID]) -> None:
    """Apply feedback that arrived while these deliveries were being sent."""
    # Parked feedback is rare: a parameterless check first keeps the common chunk cheap.
    if not EarlyFeedback.objects.exists():
        return
    parked = list(EarlyFeedback.objects.filter(delivery_id__in=delivery_ids).order_by("id"))
    for row in parked:
        payload = dict(row.payload)
        occurred = payload.pop("occurred_at", None)
        occurred_at = datetime.fromisoformat(occurred) if occurred else None
        feedback_record(feedback=Feedback(**payload, occurred_at=occurred_at))
    if parked:
        EarlyFeedback.objects.filter(id__in=[row.id for row in parked]).delete()


# Feedback kept in the history without changing the state (the provider is still trying).
INFORMATIONAL_FEEDBACK = {"deferred": "the provider deferred it and is still trying"}


def _feedback_apply(*, delivery: Delivery, feedback: Feedback) -> bool:
    from notify.pipeline import dispatch  # dispatch publishes; record is imported by it

    if feedback.normalized_status in INFORMATIONAL_FEEDBACK:
        reason = f"{INFORMATIONAL_FEEDBACK[feedback.normalized_status]}: {feedback.reason}".rstrip(": ")
        row = history_event(
            delivery=delivery,
            status=delivery.status,
            reason=reason,
            at=timezone.now(),
            detail={"provider_status": feedback.provider_status},
        )
        history_insert(rows=[row], changes=False)
        return True
    if feedback.normalized_status not in FEEDBACK_TRANSITIONS:
        return False
    new_status, applies_to = FEEDBACK_TRANSITIONS[feedback.normalized_status]
    if delivery.status not in applies_to:
        return False
    now = timezone.now()
    detail: dict[str, Any] = {"provider_status": feedback.provider_status}
    if feedback.occurred_at is not None:
        detail["occurred_at"] = feedback.occurred_at.isoformat()
    if feedback.normalized_status == "soft_bounced":
        delivery.resend_round += 1  # the provider will not take the same key twice
        dead_letter = failure_apply(
            delivery=delivery,
            failure=FailureKind.TRANSIENT,
            reason=feedback.reason or feedback.provider_status,
            now=now,
            delays={},
        )
        if dead_letter is not None:
            dead_letter.save()
            dispatch.dead_letters_announce(dead_letters=[dead_letter])
        else:
            dispatch.retries_schedule(deliveries=[delivery], now=now)
    else:
        delivery.status = new_status
        delivery.status_reason = feedback.reason
    delivery.save(
        update_fields=["status", "status_reason", "next_attempt_at", "published_at", "resend_round", "updated_at"]
    )
    rows = [
        history_event(
            delivery=delivery,
            status=delivery.status,
            reason=delivery.status_reason or "provider feedback",
            at=now,
            detail=detail,
        )
    ]
    history_insert(rows=rows)
    return True
