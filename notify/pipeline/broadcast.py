"""Broadcasts: one event for a whole audience.

Fan-out turns the audience into the broadcast event's notifications and deliveries a chunk
at a time, with several tasks at once (NOTIFY_BROADCAST_FAN_OUT_TASKS). A task claims a chunk
in a short transaction that locks the broadcast row: the next range of recipients after the
stored cursor, recorded as a BroadcastChunk with a lease, and the cursor moved past it. It then
plans the chunk in a transaction of its own, which records the range's recipients in
BroadcastRecipient (whose unique (broadcast, recipient) pair skips anyone reached before),
plans them as an event's recipients are planned, and notes the chunk planned. A worker killed
mid-chunk rolls the chunk back, and another task takes the chunk over once its lease runs out.
From there the ordinary pipeline sends: preferences, consent, quiet hours, caps, routing, rate
limits and kill switches apply at send time."""

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

from celery import current_app
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from apps.audiences.models import Broadcast, BroadcastChunk, BroadcastRecipient, BroadcastState
from apps.catalog.models import Category
from apps.deliveries.models import CLAIMABLE_STATUSES, Delivery, DeliveryStatus, Event, Notification
from apps.recipients.models import Recipient
from apps.tenants.encryption import content_seal
from apps.tenants.models import ApiKey, Tenant
from apps.webhooks.models import EventType
from apps.webhooks.services import event_emit
from config.queues import MAINTENANCE_QUEUE
from notify.observability.tracing import event_origin
from notify.pipeline import dispatch
from notify.pipeline.audience import AudienceError, audience_compile, audience_recipients
from notify.pipeline.ingest import (
    PLANNED_RECIPIENT_FIELDS,
    CategoryNotAllowed,
    IdempotencyConflict,
    IngestError,
    request_digest,
)
from notify.pipeline.plan import LocalSendTime, deliveries_supersede, notifications_plan, plan_save
from notify.pipeline.plan_sql import chunk_plan_sql, sql_plannable
from notify.pipeline.record import history_event, history_insert

logger = logging.getLogger(__name__)

FAN_OUT_TASK = "notify.broadcast_fan_out"
CANCEL_TASK = "notify.broadcast_cancel"
RESUME_TASK = "notify.broadcast_resume"
# A fan-out task works this long, then hands on to a new task, so one broadcast never holds
# a maintenance worker (and the sweeps queued behind it) for minutes.
TASK_BUDGET_SECONDS = 10.0
# Rows a cancel or a resume walks per statement.
WALK_CHUNK = 5000
# The rollup of a broadcast's delivery states is refreshed at most this often, and a large
# broadcast less often: a rollup reads every delivery of the broadcast (0.11 s at 100,000,
# so over a second at a million), and counting a million every 5 s would take about a
# quarter of a core away from its sending.
ROLLUP_EVERY = timedelta(seconds=5)
ROLLUP_DELIVERIES_PER_SECOND = 40_000

PENDING = (*CLAIMABLE_STATUSES, DeliveryStatus.SENDING)
HELD_STATES = (DeliveryStatus.QUEUED, DeliveryStatus.RETRYING, DeliveryStatus.DEFERRED, DeliveryStatus.STANDBY)
# The rollup's counts, from delivery states.
COUNTED = {
    "sent": ("sent", "delivered", "opened", "clicked"),
    "delivered": ("delivered", "opened", "clicked"),
    "failed": ("failed", "dead", "bounced", "complained", "expired"),
    "suppressed": ("suppressed",),
    "deferred": ("deferred",),
    "cancelled": ("cancelled",),
    "pending": ("queued", "sending", "retrying"),
}


class NotControllable(Exception):
    """The broadcast is in a state that the control does not apply to."""


@dataclass
class BroadcastRequest:
    category_key: str
    audience: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    # As an event's: the broadcast replaces, for each recipient it reaches, the earlier events with the key.
    replace_key: str | None = None
    send_at: datetime | None = None
    send_at_local: str | None = None
    max_per_second: int | None = None
    spread_over_seconds: int | None = None
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BroadcastAccepted:
    broadcast: Broadcast
    replayed: bool


def broadcast_create(*, api_key: ApiKey, request: BroadcastRequest, now: datetime | None = None) -> BroadcastAccepted:
    """Accept a broadcast: check it, store it with its event, and start its fan-out once the
    transaction commits (or leave it scheduled until send_at). A reused idempotency key
    returns the broadcast it made."""
    now = now or timezone.now()
    tenant = api_key.tenant
    digest = request_digest(body=request.body)
    if request.idempotency_key:
        existing = Broadcast.objects.filter(tenant=tenant, idempotency_key=request.idempotency_key).first()
        if existing is not None:
            return _replayed(existing=existing, digest=digest)
    category = _category_resolve(tenant=tenant, api_key=api_key, category_key=request.category_key)
    try:
        audience_compile(tenant=tenant, audience=request.audience)
    except AudienceError as error:
        raise IngestError(field=error.field, message=error.message) from error
    version = category.template.current_version()
    if version is None:
        raise IngestError(field="category", message=f"Category '{category.key}' has a template with no versions yet.")
    if category.digest_window is not None:
        raise IngestError(field="category", message="A digest category collects events: broadcast another category.")
    scheduled = request.send_at is not None and request.send_at > now
    broadcast = Broadcast(
        tenant=tenant,
        api_key=api_key,
        category=category,
        template_version=version,
        audience=request.audience,
        data=request.data,
        idempotency_key=request.idempotency_key,
        request_digest=digest,
        send_at=request.send_at,
        send_at_local=request.send_at_local or "",
        max_per_second=request.max_per_second,
        spread_over_seconds=request.spread_over_seconds,
        state=BroadcastState.SCHEDULED if scheduled else BroadcastState.FANNING_OUT,
    )
    try:
        with transaction.atomic():
            broadcast.event = Event.objects.create(
                tenant=tenant,
                api_key=api_key,
                category=category,
                request_digest=digest,
                replace_key=request.replace_key,
                data=content_seal(encrypt=tenant.encrypt_content, value=request.data),
                **event_origin(),
            )
            broadcast.save(force_insert=True)
            Event.objects.filter(pk=broadcast.event_id).update(response={"broadcast_id": str(broadcast.id)})
            if not scheduled:
                fan_out_publish_on_commit(broadcast_id=broadcast.id)
    except IntegrityError:
        # The same key, sent twice at once: the other request's broadcast is committed now.
        existing = Broadcast.objects.filter(tenant=tenant, idempotency_key=request.idempotency_key).first()
        if existing is None:
            raise
        return _replayed(existing=existing, digest=digest)
    return BroadcastAccepted(broadcast=broadcast, replayed=False)


def _replayed(*, existing: Broadcast, digest: str) -> BroadcastAccepted:
    if existing.request_digest != digest:
        raise IdempotencyConflict(key=existing.idempotency_key or "")
    return BroadcastAccepted(broadcast=existing, replayed=True)


def _category_resolve(*, tenant: Tenant, api_key: ApiKey, category_key: str) -> Category:
    if not api_key.allows_category(category_key):
        raise CategoryNotAllowed(field="category", category_key=category_key)
    category = Category.objects.filter(tenant=tenant, key=category_key).select_related("template").first()
    if category is None:
        valid = [
            key
            for key in sorted(Category.objects.filter(tenant=tenant).values_list("key", flat=True))
            if api_key.allows_category(key)
        ]
        raise IngestError(
            field="category",
            message=f"Unknown category '{category_key}'. Valid keys: {', '.join(valid) or '(none yet)'}.",
        )
    return category


def fan_out_publish_on_commit(*, broadcast_id: UUID) -> None:
    """Queue the broadcast's fan-out tasks once the transaction commits."""
    transaction.on_commit(partial(_fan_out_tasks_publish, broadcast_id=broadcast_id))


def _fan_out_tasks_publish(*, broadcast_id: UUID) -> None:
    """NOTIFY_BROADCAST_FAN_OUT_TASKS tasks, which plan that many chunks at once."""
    for _ in range(settings.NOTIFY_BROADCAST_FAN_OUT_TASKS):
        _task_publish(name=FAN_OUT_TASK, broadcast_id=broadcast_id)


def _task_publish(*, name: str, broadcast_id: UUID) -> None:
    try:
        current_app.send_task(name, args=[str(broadcast_id)], queue=MAINTENANCE_QUEUE)
    except Exception:  # noqa: BLE001 - the row is the truth: the sweeper starts it again
        logger.exception("publishing %s for broadcast %s failed; the sweeper will retry", name, broadcast_id)


def fan_out(*, broadcast_id: UUID, budget_seconds: float = TASK_BUDGET_SECONDS) -> int:
    """Fan out chunks for up to `budget_seconds`, then queue the rest as a new task; return
    how many recipients this call planned."""
    deadline = timezone.now() + timedelta(seconds=budget_seconds)
    planned = 0
    while True:
        outcome = fan_out_chunk(broadcast_id=broadcast_id)
        planned += outcome.planned
        if outcome.done:
            return planned
        if timezone.now() > deadline:
            _task_publish(name=FAN_OUT_TASK, broadcast_id=broadcast_id)
            return planned


@dataclass(frozen=True)
class ChunkOutcome:
    planned: int
    # Nothing more for this task now: the fan-out finished, paused or was cancelled, or what
    # is left is being planned by other tasks.
    done: bool


def fan_out_chunk(*, broadcast_id: UUID) -> ChunkOutcome:
    """Claim the next chunk of the audience, then plan it."""
    claim = chunk_claim(broadcast_id=broadcast_id)
    if claim is None:
        return ChunkOutcome(planned=0, done=True)
    return ChunkOutcome(planned=chunk_fan_out(broadcast_id=broadcast_id, claim=claim), done=False)


@dataclass(frozen=True)
class ChunkClaim:
    """A chunk a task holds the lease of, and when it claimed it: the chunk is planned as of
    that moment."""

    chunk: BroadcastChunk
    at: datetime


def chunk_claim(*, broadcast_id: UUID) -> ChunkClaim | None:
    """In one short transaction: take back a chunk whose task died, or claim the next range
    after the cursor; add what planned chunks reached to the broadcast's count; and finish the
    fan-out once every chunk is planned. None when this task has nothing left to do."""
    now = timezone.now()
    lease = now + timedelta(seconds=settings.NOTIFY_BROADCAST_LEASE_SECONDS)
    with transaction.atomic():
        # FOR NO KEY UPDATE: claims take turns, while chunks being planned (each holding the
        # row FOR KEY SHARE) go on; a pause or a cancel (FOR UPDATE) waits for both.
        broadcast = (
            Broadcast.objects.select_for_update(no_key=True, of=("self",))
            .select_related("event__tenant")
            .filter(pk=broadcast_id)
            .first()
        )
        if broadcast is None or broadcast.state != BroadcastState.FANNING_OUT:
            return None
        try:
            audience = audience_recipients(tenant=broadcast.event.tenant, audience=broadcast.audience)
        except AudienceError as error:
            # Its topic or segment was deleted since it was accepted: retrying cannot help.
            _stopped(broadcast=broadcast, note=f"stopped: {error.field}: {error.message}", now=now)
            return None
        if broadcast.started_at is None:
            broadcast.started_at = now
            broadcast.audience_count = audience.count()
        unplanned = BroadcastChunk.objects.filter(broadcast_id=broadcast_id, planned_at__isnull=True)
        chunk = (
            unplanned.filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))
            .select_for_update(skip_locked=True)
            .order_by("id")
            .first()
        )
        if chunk is not None:  # its task died, or stopped at a pause
            chunk.lease_expires_at = lease
            chunk.save(update_fields=["lease_expires_at"])
        else:
            chunk = _range_claim(broadcast=broadcast, audience=audience, lease=lease)
        if chunk is None and not unplanned.exists():
            broadcast.state = BroadcastState.SENDING
            broadcast.fanned_out_at = now
        # Counted after the decision above: a chunk planned since then is counted here.
        _planned_fold(broadcast=broadcast)
        broadcast.fanout_lease_expires_at = None if broadcast.fanned_out_at else lease
        broadcast.save(
            update_fields=[
                "started_at",
                "audience_count",
                "planned_count",
                "cursor",
                "claimed_count",
                "fanout_lease_expires_at",
                "state",
                "fanned_out_at",
            ]
        )
    return None if chunk is None else ChunkClaim(chunk=chunk, at=now)


def _range_claim(*, broadcast: Broadcast, audience: Any, lease: datetime) -> BroadcastChunk | None:
    """A chunk of the next NOTIFY_BROADCAST_CHUNK audience members after the cursor, which
    moves past them; None when none is left."""
    members = audience.order_by("id")
    if broadcast.cursor is not None:
        members = members.filter(id__gt=broadcast.cursor)
    window = members.values_list("id", flat=True)[: settings.NOTIFY_BROADCAST_CHUNK]
    if connection.vendor == "postgresql":
        window_sql, window_params = window.query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(
                f"WITH window_ids AS ({window_sql}) SELECT (SELECT count(*) FROM window_ids),"
                " (SELECT id FROM window_ids ORDER BY id DESC LIMIT 1)",
                window_params,
            )
            claimed, last_id = cursor.fetchone()
    else:  # the demo's SQLite
        ids = list(window)
        claimed, last_id = len(ids), (ids[-1] if ids else None)
    if not claimed:
        return None
    chunk = BroadcastChunk.objects.create(
        broadcast=broadcast,
        after=broadcast.cursor,
        until=last_id,
        position=broadcast.claimed_count,
        lease_expires_at=lease,
    )
    broadcast.cursor = last_id
    broadcast.claimed_count += claimed
    return chunk


def _planned_fold(*, broadcast: Broadcast) -> None:
    """Add the planned chunks' reached counts to the broadcast's, and drop those chunks. The
    caller holds the broadcast's row and saves it."""
    planned = list(
        BroadcastChunk.objects.filter(broadcast_id=broadcast.id, planned_at__isnull=False).values_list("id", "planned")
    )
    if planned:
        broadcast.planned_count += sum(count for _, count in planned)
        BroadcastChunk.objects.filter(id__in=[chunk_id for chunk_id, _ in planned]).delete()


def chunk_fan_out(*, broadcast_id: UUID, claim: ChunkClaim) -> int:
    """Plan a claimed chunk's recipients, in one transaction that notes the chunk planned;
    return how many it reached for the first time. It is planned as of its claim, which
    set a paced broadcast's start when it was the first."""
    now, chunk = claim.at, claim.chunk
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # A chunk's commit need not wait for its WAL to reach the disk: a crash can lose
            # only whole chunks, each still unplanned, so a fan-out plans them again (a send
            # task published for a lost delivery finds nothing to claim).
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        if not _still_fanning_out(broadcast_id=broadcast_id):
            # Paused or cancelled since the claim: a resumed fan-out takes the chunk at once.
            BroadcastChunk.objects.filter(pk=chunk.pk).update(lease_expires_at=None)
            return 0
        # Held until commit; skipped when another task holds it (it took the chunk over once
        # the lease ran out), and gone when that task planned it.
        if (
            BroadcastChunk.objects.select_for_update(skip_locked=True)
            .filter(pk=chunk.pk, planned_at__isnull=True)
            .first()
            is None
        ):
            return 0
        broadcast = Broadcast.objects.select_related("event__tenant", "category__template", "template_version").get(
            pk=broadcast_id
        )
        try:
            audience = audience_recipients(tenant=broadcast.event.tenant, audience=broadcast.audience)
        except AudienceError:
            return 0  # the next claim stops the broadcast and says why
        members = audience.order_by("id").filter(id__lte=chunk.until)
        if chunk.after is not None:
            members = members.filter(id__gt=chunk.after)
        reached_ids = _chunk_reach(broadcast=broadcast, members=members)
        deliveries_supersede(event=broadcast.event, recipient_ids=reached_ids, now=now)
        if sql_plannable(category=broadcast.category):
            chunk_plan_sql(
                broadcast=broadcast,
                recipient_ids=reached_ids,
                rate=broadcast_rate(broadcast=broadcast),
                start=_pace_start(broadcast=broadcast, now=now),
                position=chunk.position,
                now=now,
            )
        else:
            _chunk_plan(broadcast=broadcast, recipient_ids=reached_ids, position=chunk.position, now=now)
        BroadcastChunk.objects.filter(pk=chunk.pk).update(planned_at=now, planned=len(reached_ids))
    return len(reached_ids)


def _still_fanning_out(*, broadcast_id: UUID) -> bool:
    """Whether the broadcast is fanning out, holding its row FOR KEY SHARE until commit: other
    chunks and claims go on meanwhile, and a pause or a cancel waits for this chunk."""
    broadcasts = Broadcast.objects.filter(pk=broadcast_id, state=BroadcastState.FANNING_OUT)
    if connection.vendor != "postgresql":  # the demo's SQLite: one writer at a time anyway
        return broadcasts.exists()
    sql, params = broadcasts.values_list("id").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} FOR KEY SHARE", params)
        return cursor.fetchone() is not None


def _stopped(*, broadcast: Broadcast, note: str, now: datetime) -> None:
    """Cancel a broadcast the service cannot go on with, saying why."""
    logger.error("broadcast %s %s", broadcast.id, note)
    broadcast.state = BroadcastState.CANCELLED
    broadcast.note = note[:500]
    broadcast.cancelled_at = broadcast.finished_at = now
    broadcast.fanout_lease_expires_at = None
    broadcast.save(update_fields=["state", "note", "cancelled_at", "finished_at", "fanout_lease_expires_at"])
    transaction.on_commit(partial(_task_publish, name=CANCEL_TASK, broadcast_id=broadcast.id))


def _chunk_plan(*, broadcast: Broadcast, recipient_ids: list[str], position: int, now: datetime) -> None:
    """Plan the chunk's recipients through notifications_plan(), as an event's are: the
    demo's SQLite, and categories the database cannot plan (plan_sql.py)."""
    if not recipient_ids:
        return
    recipients = list(Recipient.objects.filter(id__any_of=recipient_ids).only(*PLANNED_RECIPIENT_FIELDS).order_by("id"))
    for send_at, group in _paced_groups(broadcast=broadcast, recipients=recipients, position=position, now=now):
        plan = notifications_plan(
            event=broadcast.event,
            category=broadcast.category,
            recipients=group,
            priority_override=None,
            channels_override=None,
            send_at=send_at,
            send_at_local=LocalSendTime.parse(broadcast.send_at_local) if broadcast.send_at_local else None,
            template_version=broadcast.template_version,
            now=now,
        )
        plan_save(plan=plan, now=now)


def _chunk_reach(*, broadcast: Broadcast, members: Any) -> list[str]:
    """Record the chunk's audience members as reached; return the ids reached for the first time."""
    if connection.vendor != "postgresql":  # the demo's SQLite: the same, in three statements
        ids = list(members.values_list("id", flat=True))
        seen = set(
            BroadcastRecipient.objects.filter(broadcast=broadcast, recipient_id__in=ids).values_list(
                "recipient_id", flat=True
            )
        )
        new = [i for i in ids if i not in seen]
        BroadcastRecipient.objects.bulk_create([BroadcastRecipient(broadcast=broadcast, recipient_id=i) for i in new])
        return [str(i) for i in new]
    members_sql, members_params = members.values_list("id").query.sql_with_params()
    with connection.cursor() as cursor:
        # One statement: skip whoever was reached before (a retried chunk, a recipient in two
        # topics), and say who is new.
        cursor.execute(
            f"""
            WITH reached AS (
                INSERT INTO {BroadcastRecipient._meta.db_table} (broadcast_id, recipient_id)
                SELECT %s, id FROM ({members_sql}) AS members ORDER BY id
                ON CONFLICT (broadcast_id, recipient_id) DO NOTHING
                RETURNING recipient_id
            )
            SELECT ARRAY(SELECT recipient_id::text FROM reached)
            """,
            [broadcast.id, *members_params],
        )
        (reached_ids,) = cursor.fetchone()
    return reached_ids


def _paced_groups(
    *, broadcast: Broadcast, recipients: list[Recipient], position: int, now: datetime
) -> list[tuple[datetime | None, list[Recipient]]]:
    """The chunk's recipients with the time each may be sent: the broadcast's send_at, or
    with a pace, one second's worth of recipients after another from the start."""
    rate = broadcast_rate(broadcast=broadcast)
    if rate is None or not recipients:
        return [(broadcast.send_at, recipients)] if recipients else []
    start = _pace_start(broadcast=broadcast, now=now)
    groups: list[tuple[datetime | None, list[Recipient]]] = []
    index = 0
    while index < len(recipients):
        second = (position + index) // rate
        size = (second + 1) * rate - (position + index)
        groups.append((start + timedelta(seconds=second), recipients[index : index + size]))
        index += size
    return groups


def _pace_start(*, broadcast: Broadcast, now: datetime) -> datetime:
    """When a paced broadcast's first second begins."""
    return max(broadcast.send_at or now, broadcast.started_at or now)


def broadcast_rate(*, broadcast: Broadcast) -> int | None:
    """Recipients a second the broadcast is paced at, or None when unpaced."""
    if broadcast.max_per_second:
        return broadcast.max_per_second
    if broadcast.spread_over_seconds and broadcast.audience_count is not None:
        return max(1, math.ceil(broadcast.audience_count / broadcast.spread_over_seconds))
    return None


def broadcast_pause(*, broadcast: Broadcast) -> Broadcast:
    """Hold everything not yet sent: fan-out stops after its chunk, and the senders leave the
    broadcast's deliveries unclaimed, unchanged, until it resumes."""
    with transaction.atomic():
        broadcast = Broadcast.objects.select_for_update().get(pk=broadcast.pk)
        if broadcast.state not in (BroadcastState.SCHEDULED, BroadcastState.FANNING_OUT, BroadcastState.SENDING):
            raise NotControllable(f"A {broadcast.state} broadcast cannot be paused.")
        broadcast.state = BroadcastState.PAUSED
        broadcast.paused_at = timezone.now()
        _planned_fold(broadcast=broadcast)  # the count stands while it is paused
        broadcast.save(update_fields=["state", "paused_at", "planned_count"])
    return broadcast


def broadcast_resume(*, broadcast: Broadcast) -> Broadcast:
    """Go on where the broadcast stopped: fan-out from its cursor, and what was held is
    published again."""
    now = timezone.now()
    with transaction.atomic():
        broadcast = Broadcast.objects.select_for_update().get(pk=broadcast.pk)
        if broadcast.state != BroadcastState.PAUSED:
            raise NotControllable(f"Only a paused broadcast can be resumed; this one is {broadcast.state}.")
        broadcast.paused_at = None
        if broadcast.started_at is None and broadcast.send_at is not None and broadcast.send_at > now:
            broadcast.state = BroadcastState.SCHEDULED
        elif broadcast.fanned_out_at is None:
            broadcast.state = BroadcastState.FANNING_OUT
            fan_out_publish_on_commit(broadcast_id=broadcast.id)
        else:
            broadcast.state = BroadcastState.SENDING
        broadcast.save(update_fields=["state", "paused_at"])
        transaction.on_commit(partial(_task_publish, name=RESUME_TASK, broadcast_id=broadcast.id))
    return broadcast


def broadcast_cancel(*, broadcast: Broadcast) -> Broadcast:
    """Stop everything not yet sent. From the commit on, no sender claims the broadcast's
    deliveries; a task then marks them cancelled, a chunk at a time."""
    with transaction.atomic():
        broadcast = Broadcast.objects.select_for_update().get(pk=broadcast.pk)
        if broadcast.state in (BroadcastState.COMPLETED, BroadcastState.CANCELLED):
            raise NotControllable(f"The broadcast is {broadcast.state} already.")
        now = timezone.now()
        broadcast.state = BroadcastState.CANCELLED
        broadcast.cancelled_at = broadcast.finished_at = now
        broadcast.fanout_lease_expires_at = now + timedelta(seconds=settings.NOTIFY_BROADCAST_LEASE_SECONDS)
        _planned_fold(broadcast=broadcast)
        broadcast.save(
            update_fields=["state", "cancelled_at", "finished_at", "fanout_lease_expires_at", "planned_count"]
        )
        transaction.on_commit(partial(_task_publish, name=CANCEL_TASK, broadcast_id=broadcast.id))
    return broadcast


def _reached_walk(*, broadcast_id: UUID, after: UUID | None) -> list[UUID]:
    """The next recipients the broadcast reached, in id order, through its unique index."""
    reached = BroadcastRecipient.objects.filter(broadcast_id=broadcast_id)
    if after is not None:
        reached = reached.filter(recipient_id__gt=after)
    return list(reached.order_by("recipient_id").values_list("recipient_id", flat=True)[:WALK_CHUNK])


def _broadcast_deliveries(*, broadcast: Broadcast, recipient_ids: list[UUID]) -> Any:
    notifications = Notification.objects.filter(event_id=broadcast.event_id, recipient_id__in=recipient_ids)
    return Delivery.objects.filter(notification__in=notifications)


def cancel_finish(*, broadcast_id: UUID) -> int:
    """Mark a cancelled broadcast's unsent deliveries cancelled, walking its recipients a
    chunk at a time; return how many were cancelled."""
    broadcast = Broadcast.objects.get(pk=broadcast_id)
    if broadcast.state != BroadcastState.CANCELLED or broadcast.cancel_finished_at is not None:
        return 0
    reason = "the broadcast was cancelled"
    cancelled = 0
    after: UUID | None = None
    while recipient_ids := _reached_walk(broadcast_id=broadcast.id, after=after):
        after = recipient_ids[-1]
        now = timezone.now()
        with transaction.atomic():
            deliveries = list(
                _broadcast_deliveries(broadcast=broadcast, recipient_ids=recipient_ids)
                .select_for_update(skip_locked=True)
                .filter(status__in=HELD_STATES)
                .only("id", "attempt_count", "notification_id")
            )
            if deliveries:
                Delivery.objects.filter(id__any_of=[d.id for d in deliveries]).update(
                    status=DeliveryStatus.CANCELLED, status_reason=reason, updated_at=now
                )
                history_insert(
                    rows=[
                        history_event(delivery=d, status=DeliveryStatus.CANCELLED, reason=reason, at=now)
                        for d in deliveries
                    ]
                )
                Notification.objects.filter(
                    id__any_of=list({d.notification_id for d in deliveries}), cancelled_at__isnull=True
                ).update(cancelled_at=now)
            Broadcast.objects.filter(pk=broadcast.pk).update(
                fanout_lease_expires_at=now + timedelta(seconds=settings.NOTIFY_BROADCAST_LEASE_SECONDS)
            )
        cancelled += len(deliveries)
    Broadcast.objects.filter(pk=broadcast.pk).update(cancel_finished_at=timezone.now(), fanout_lease_expires_at=None)
    return cancelled


def resume_publish(*, broadcast_id: UUID) -> int:
    """Publish a resumed broadcast's due, claimable deliveries again; return how many."""
    broadcast = Broadcast.objects.get(pk=broadcast_id)
    published = 0
    after: UUID | None = None
    while broadcast.state != BroadcastState.PAUSED and (
        recipient_ids := _reached_walk(broadcast_id=broadcast.id, after=after)
    ):
        after = recipient_ids[-1]
        now = timezone.now()
        with transaction.atomic():
            deliveries = list(
                _broadcast_deliveries(broadcast=broadcast, recipient_ids=recipient_ids)
                .select_for_update(skip_locked=True)
                .filter(status__in=CLAIMABLE_STATUSES)
                .only("id", "channel", "priority", "status", "next_attempt_at")
            )
            dispatch.deliveries_publish_on_commit(deliveries=deliveries, now=now)
            Delivery.objects.bulk_update(deliveries, fields=["published_at"], batch_size=WALK_CHUNK)
        published += len(deliveries)
        broadcast.refresh_from_db(fields=["state"])
    return published


def broadcasts_advance(*, now: datetime) -> int:
    """The sweeper's part: start broadcasts whose time has come, restart fan-outs and
    cancels whose worker was lost, and refresh the counts of those still moving. Return how
    many tasks were queued."""
    queued = 0
    due = Broadcast.objects.filter(state=BroadcastState.SCHEDULED, send_at__lte=now)
    for broadcast_id in due.values_list("id", flat=True):
        if Broadcast.objects.filter(pk=broadcast_id, state=BroadcastState.SCHEDULED).update(
            state=BroadcastState.FANNING_OUT
        ):
            _fan_out_tasks_publish(broadcast_id=broadcast_id)
            queued += settings.NOTIFY_BROADCAST_FAN_OUT_TASKS
    lease = timedelta(seconds=settings.NOTIFY_BROADCAST_LEASE_SECONDS)
    # A lease that ran out, or a fan-out queued a lease ago that never started.
    lost = Q(fanout_lease_expires_at__lt=now) | Q(
        fanout_lease_expires_at__isnull=True, started_at__isnull=True, created_at__lt=now - lease
    )
    for broadcast_id in Broadcast.objects.filter(lost, state=BroadcastState.FANNING_OUT).values_list("id", flat=True):
        _fan_out_tasks_publish(broadcast_id=broadcast_id)
        queued += settings.NOTIFY_BROADCAST_FAN_OUT_TASKS
    cancels = Broadcast.objects.filter(
        Q(fanout_lease_expires_at__lt=now) | Q(fanout_lease_expires_at__isnull=True),
        state=BroadcastState.CANCELLED,
        cancel_finished_at__isnull=True,
    )
    for broadcast_id in cancels.values_list("id", flat=True):
        _task_publish(name=CANCEL_TASK, broadcast_id=broadcast_id)
        queued += 1
    # A cancelled broadcast still moves until its cancel is done and its last sends are recorded.
    cancelled_moving = Q(state=BroadcastState.CANCELLED) & (
        Q(cancel_finished_at__isnull=True)
        | Q(counts_at__isnull=True)
        | Q(counts_at__lt=F("cancel_finished_at"))
        | Q(counts__pending__gt=0)
    )
    moving = Broadcast.objects.filter(
        Q(counts_at__isnull=True) | Q(counts_at__lt=now - ROLLUP_EVERY),
        Q(state__in=[BroadcastState.FANNING_OUT, BroadcastState.SENDING, BroadcastState.PAUSED]) | cancelled_moving,
    ).only("id", "event_id", "state", "fanned_out_at", "counts_at", "planned_count")
    for broadcast in moving:
        if broadcast.counts_at is None or broadcast.counts_at <= now - rollup_interval(broadcast=broadcast):
            broadcast_roll_up(broadcast=broadcast, now=now)
    return queued


def rollup_interval(*, broadcast: Broadcast) -> timedelta:
    """How long a broadcast's counts stand before they are counted again."""
    return max(ROLLUP_EVERY, timedelta(seconds=broadcast.planned_count / ROLLUP_DELIVERIES_PER_SECOND))


def broadcast_roll_up(*, broadcast: Broadcast, now: datetime) -> dict[str, int]:
    """Count the broadcast's deliveries by state into its row, where reads find them; a
    broadcast fanned out with nothing left pending is completed."""
    by_status = dict(
        Delivery.objects.filter(notification__event_id=broadcast.event_id, escalation=False)
        .values_list("status")
        .annotate(n=Count("id"))
        .order_by()
        .values_list("status", "n")
    )
    counts = {name: sum(by_status.get(status, 0) for status in statuses) for name, statuses in COUNTED.items()}
    update: dict[str, Any] = {"counts": counts, "counts_at": now}
    finished = (
        broadcast.state == BroadcastState.SENDING
        and broadcast.fanned_out_at is not None
        and counts["pending"] == 0
        and counts["deferred"] == 0
    )
    rows = Broadcast.objects.filter(pk=broadcast.pk, state=broadcast.state)
    if finished:
        update.update(state=BroadcastState.COMPLETED, finished_at=now)
    with transaction.atomic():
        if rows.update(**update) and finished:
            event_emit(
                tenant_id=broadcast.tenant_id,
                event_type=EventType.BROADCAST_COMPLETED,
                data={"broadcast_id": str(broadcast.pk), "event_id": str(broadcast.event_id), "counts": counts},
                category_id=broadcast.category_id,
                at=now,
            )
    return counts


def broadcast_estimate(*, broadcast: Broadcast, now: datetime) -> datetime | None:
    """When the broadcast should be done: from its pace when it has one, else from the rate
    it has been sending at so far. None until it can be told."""
    if broadcast.finished_at is not None:
        return broadcast.finished_at
    if broadcast.started_at is None or broadcast.audience_count is None:
        return None
    rate = broadcast_rate(broadcast=broadcast)
    start = max(broadcast.send_at or broadcast.started_at, broadcast.started_at)
    if rate is not None:
        return start + timedelta(seconds=broadcast.audience_count / rate)
    counts = broadcast.counts or {}
    finished = sum(counts.get(name, 0) for name in ("sent", "failed", "suppressed", "cancelled"))
    elapsed = ((broadcast.counts_at or now) - start).total_seconds()
    if finished <= 0 or elapsed <= 0:
        return None
    remaining = max(broadcast.audience_count - finished, 0)
    return (broadcast.counts_at or now) + timedelta(seconds=remaining * elapsed / finished)
