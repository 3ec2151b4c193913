"""Record: turn send outcomes and provider feedback into delivery states and history, in bulk.

The ledger at the centre of the pipeline: it writes what happened (states, history, the
producers' webhook outbox rows, suppressions) and returns what follows from it (retries to
publish, dead letters to announce, fallback chains to move on) for the send stage and the
feedback handler to act on. It imports none of them, so nothing it imports imports it back.

Only the holder of a claim's lease token may record; a worker whose lease expired (and
whose deliveries were re-queued) finds nothing to update."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from uuid import UUID

from django.db import connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from apps.deliveries.models import (
    DeadLetter,
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    EarlyFeedback,
    provider_name_of,
)
from apps.recipients.models import Recipient
from notify.observability import metrics
from notify.pipeline.bulk import PrimaryKeyPath, copy_pays, rows_copy, uuid_array
from notify.policy.suppression import address_canonical, suppression_add
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


@dataclass
class Recorded:
    """What a recording wrote, and what follows from it for its caller to act on: publish
    the retries (in the recording's transaction, since publishing sets when each was
    published), announce the dead letters, then advance the fallback chains."""

    at: datetime
    history: list[HistoryRow] = field(default_factory=list)  # the state changes written
    # Batches to publish together, once the last is due (each delivery's next_attempt_at).
    retries: list[list[Delivery]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)  # written, to announce
    chains: set[UUID] = field(default_factory=set)  # notifications whose chain may move on

    def follow_ups_add(self, *, other: Recorded) -> None:
        """Take on what follows from a recording made within this one (its history is its own)."""
        self.retries.extend(other.retries)
        self.dead_letters.extend(other.dead_letters)
        self.chains.update(other.chains)


def outcomes_record(*, lease_token: UUID, deliveries: dict[UUID, Delivery], outcomes: list[SendOutcome]) -> Recorded:
    """Apply a chunk of outcomes: sent, retry later, dead-letter, or failed for good; return
    the state changes recorded (one per delivery this lease still held) and what follows."""
    now = timezone.now()
    sent = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    recorded = Recorded(at=now)
    history = recorded.history
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
            _failures_record(lease_token=lease_token, deliveries=deliveries, outcomes=failed, recorded=recorded)
        history_insert(rows=history)
        recorded.follow_ups_add(other=early_feedback_apply(delivery_ids=[o.delivery_id for o in outcomes]))
    if len(history) < len(outcomes):
        logger.warning("lease lost for %d deliveries; another worker owns them now", len(outcomes) - len(history))
    # A fallback chain moves on (or stops) with its step's outcome.
    steps = [deliveries[o.delivery_id] for o in outcomes]
    recorded.chains.update(d.notification_id for d in steps if d.step is not None)
    return recorded


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
    *, lease_token: UUID, deliveries: dict[UUID, Delivery], outcomes: list[SendOutcome], recorded: Recorded
) -> None:
    now = recorded.at
    # With the time the send stage did not load: only a failure needs it.
    held: dict[UUID, datetime] = dict(
        deliveries_held(delivery_ids=[o.delivery_id for o in outcomes], lease_token=lease_token)
        .select_for_update()
        .values_list("id", "next_attempt_at")
    )
    for delivery_id, next_attempt_at in held.items():
        deliveries[delivery_id].next_attempt_at = next_attempt_at
    history = recorded.history
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

    recorded.retries.extend([*retries.values(), *deferrals.values()])
    # Rows that failed alike (an outage fails a whole chunk alike) share one UPDATE.
    changes: dict[tuple, list[UUID]] = defaultdict(list)
    for delivery_id in held:
        delivery = deliveries[delivery_id]
        changes[
            (
                delivery.status,
                delivery.status_reason,
                delivery.next_attempt_at,
                delivery.in_doubt_since,
            )
        ].append(delivery_id)
    for (status, status_reason, next_attempt_at, in_doubt_since), ids in changes.items():
        # A deferral was no attempt: give back the one its claim counted.
        attempts = {"attempt_count": F("attempt_count") - 1} if status == DeliveryStatus.DEFERRED else {}
        Delivery.objects.filter(id__in=ids).update(
            status=status,
            status_reason=status_reason,
            next_attempt_at=next_attempt_at,
            in_doubt_since=in_doubt_since,
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
            **attempts,
        )
    if dead_letters:
        DeadLetter.objects.bulk_create(dead_letters)
        recorded.dead_letters.extend(dead_letters)


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


class AddressReader(Protocol):
    """Where a recipient is reached on a channel: the reporting channel's address_for()."""

    def __call__(self, *, recipient: Recipient) -> str: ...


def feedback_record(*, feedback: Feedback, address_for: AddressReader | None) -> Recorded | None:
    """Apply provider feedback to a delivery; return what follows from it, or None when
    there is nothing to apply. A hard bounce, a complaint or an opt-out also suppresses the
    address for the tenant, when `address_for` (the reporting channel's) shows it is the
    delivery's own; parked feedback, applied again with None, suppressed it on arrival.
    Feedback that arrives while the delivery is still being sent is kept and applied as
    soon as the send is recorded, since providers need not send it again."""
    try:
        UUID(str(feedback.delivery_id))
    except ValueError:
        logger.info("feedback for malformed delivery id %r ignored", feedback.delivery_id)
        return None
    with transaction.atomic():
        delivery = (
            Delivery.objects.select_for_update(of=("self",))
            .select_related("notification__recipient")
            .filter(id=feedback.delivery_id)
            .first()
        )
        if delivery is None:
            logger.info("feedback for unknown delivery %s ignored", feedback.delivery_id)
            return None
        if feedback.channel and feedback.channel != delivery.channel:
            logger.warning("%s feedback for %s delivery %s ignored", feedback.channel, delivery.channel, delivery.id)
            return None
        if feedback.resend_round < delivery.resend_round:
            return None  # about an earlier send that has since been replaced
        if (
            feedback.signers is not None
            and delivery.status != DeliveryStatus.SENDING
            and delivery_sender(delivery_id=delivery.id) not in feedback.signers
        ):
            logger.warning("feedback for delivery %s signed by an account that did not send it ignored", delivery.id)
            return None
        address = (
            _reported_address(delivery=delivery, feedback=feedback, address_for=address_for)
            if feedback.normalized_status in SUPPRESSING_FEEDBACK and address_for is not None
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
            return Recorded(at=timezone.now())
        status_before = delivery.status
        recorded = _feedback_apply(delivery=delivery, feedback=feedback)
    if recorded is not None and delivery.status != status_before:
        signers = feedback.signers
        metrics.feedback_count(
            delivery=delivery,
            state=delivery.status,
            provider_name=signers[0] if signers is not None and len(signers) == 1 else None,
            now=timezone.now(),
        )
    if recorded is not None and delivery.step is not None:
        recorded.chains.add(delivery.notification_id)
    return recorded


def _reported_address(*, delivery: Delivery, feedback: Feedback, address_for: AddressReader) -> str:
    """The delivery's own address when the report is about it, else "": a report names the
    delivery it is about, and may suppress that delivery's address and no other."""
    if not feedback.address:
        return ""
    own = address_for(recipient=delivery.notification.recipient)
    canonical = address_canonical(channel=delivery.channel, address=feedback.address)
    if not own or address_canonical(channel=delivery.channel, address=own) != canonical:
        logger.warning("feedback for delivery %s names another address; nothing suppressed", delivery.id)
        return ""
    return own


def delivery_sender(*, delivery_id: UUID) -> str | None:
    """The provider account of the delivery's latest recorded attempt (a send, or a failed
    one whose outcome may still be that the provider took it): a Provider's name, "" for the
    configured default; None when no attempt is recorded yet."""
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


def early_feedback_apply(*, delivery_ids: list[UUID]) -> Recorded:
    """Apply feedback that arrived while these deliveries were being sent; return what follows."""
    recorded = Recorded(at=timezone.now())
    # Parked feedback is rare: a parameterless check first keeps the common chunk cheap.
    if not EarlyFeedback.objects.exists():
        return recorded
    parked = list(EarlyFeedback.objects.filter(delivery_id__in=delivery_ids).order_by("id"))
    for row in parked:
        payload = dict(row.payload)
        occurred = payload.pop("occurred_at", None)
        occurred_at = datetime.fromisoformat(occurred) if occurred else None
        applied = feedback_record(feedback=Feedback(**payload, occurred_at=occurred_at), address_for=None)
        if applied is not None:
            recorded.follow_ups_add(other=applied)
    if parked:
        EarlyFeedback.objects.filter(id__in=[row.id for row in parked]).delete()
    return recorded


# Feedback kept in the history without changing the state (the provider is still trying).
INFORMATIONAL_FEEDBACK = {"deferred": "the provider deferred it and is still trying"}


def _feedback_apply(*, delivery: Delivery, feedback: Feedback) -> Recorded | None:
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
        return Recorded(at=row.created_at, history=[row])
    if feedback.normalized_status not in FEEDBACK_TRANSITIONS:
        return None
    new_status, applies_to = FEEDBACK_TRANSITIONS[feedback.normalized_status]
    if delivery.status not in applies_to:
        return None
    now = timezone.now()
    recorded = Recorded(at=now)
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
            recorded.dead_letters.append(dead_letter)
        else:
            recorded.retries.append([delivery])
    else:
        delivery.status = new_status
        delivery.status_reason = feedback.reason
    delivery.save(update_fields=["status", "status_reason", "next_attempt_at", "resend_round", "updated_at"])
    recorded.history.append(
        history_event(
            delivery=delivery,
            status=delivery.status,
            reason=delivery.status_reason or "provider feedback",
            at=now,
            detail=detail,
        )
    )
    history_insert(rows=recorded.history)
    return recorded
