"""Dispatch: hand claimable deliveries to the broker after the writing transaction commits,
and sweep up anything the broker lost.

The database is the truth and the broker only a transport. `published_at` records when a
task for a delivery became due on the broker; the sweeper publishes again whatever has
been due and unclaimed for too long, and re-queues deliveries whose lease expired."""

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache, partial, reduce
from operator import or_
from typing import Any
from uuid import UUID

from celery import current_app
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, CharField, Exists, OuterRef, Q, QuerySet, Value, When
from django.utils import timezone

from apps.audiences.models import Broadcast, BroadcastState
from apps.catalog.models import Priority
from apps.deliveries.models import (
    CLAIMABLE_STATUSES,
    ChannelSwitch,
    DeadLetter,
    Delivery,
    DeliveryStatus,
    Notification,
)
from apps.tenants.models import Tenant
from config.queues import CHANNELS, PRIORITIES, dead_letter_queue, delivery_queue
from notify.observability import metrics
from notify.pipeline.record import Recorded, history_event, history_insert
from notify.resilience.failures import attempts_exhausted

logger = logging.getLogger(__name__)

SEND_TASK = "notify.send_deliveries"
DEAD_LETTER_TASK = "notify.dead_letter_notice"


def batch_size(*, priority: str) -> int:
    return settings.NOTIFY_BATCH_SIZE[priority]


def deliveries_publish_on_commit(*, deliveries: Iterable[Delivery], now: datetime) -> None:
    """Set `published_at` on claimable deliveries and publish them once the transaction
    commits: one message per batch, per channel and priority. The caller saves the rows."""
    groups: dict[tuple[str, str, datetime], list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        if delivery.status in CLAIMABLE_STATUSES:
            groups[(delivery.channel, delivery.priority, delivery.next_attempt_at)].append(delivery)
    for (channel, priority, due_at), group in groups.items():
        _publish_group(channel=channel, priority=priority, due_at=due_at, deliveries=group, now=now)


def retries_schedule(*, deliveries: list[Delivery], now: datetime) -> None:
    """Publish one batch's retries together, when the last of them is due; a delay too long
    for a broker countdown waits in the database for the sweeper instead."""
    due_at = max(d.next_attempt_at for d in deliveries)
    _publish_group(
        channel=deliveries[0].channel, priority=deliveries[0].priority, due_at=due_at, deliveries=deliveries, now=now
    )


def recorded_publish(*, recorded: Recorded) -> None:
    """Publish what a recording left due, in the recording's transaction: its retries, each
    batch once its last is due (with when it was published, which the sweeper reads), and
    its dead letters' notices."""
    for group in recorded.retries:
        retries_schedule(deliveries=group, now=recorded.at)
        Delivery.objects.filter(id__in=[d.id for d in group]).update(published_at=group[0].published_at)
    dead_letters_announce(dead_letters=recorded.dead_letters)


def _publish_group(*, channel: str, priority: str, due_at: datetime, deliveries: list[Delivery], now: datetime) -> None:
    # Due now (or overdue) goes out at once: a Celery ETA task would escape prefetch limits.
    countdown = max((due_at - now).total_seconds(), 0.0)
    if countdown > settings.NOTIFY_COUNTDOWN_MAX_SECONDS:
        for delivery in deliveries:
            delivery.published_at = None
        return
    for delivery in deliveries:
        delivery.published_at = due_at
    ids_publish_on_commit(
        channel=channel, priority=priority, delivery_ids=[str(d.id) for d in deliveries], countdown=countdown
    )


def ids_publish_on_commit(*, channel: str, priority: str, delivery_ids: list[str], countdown: float) -> None:
    """Publish deliveries known by id, a batch a message, once the transaction commits."""
    ids = delivery_ids
    size = batch_size(priority=priority)
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        transaction.on_commit(
            partial(publish, channel=channel, priority=priority, delivery_ids=chunk, countdown=countdown)
        )


def publish(*, channel: str, priority: str, delivery_ids: list[str], countdown: float = 0.0) -> None:
    """Send one batch to its queue. A broker failure is logged, not raised: the rows are
    committed, and the sweeper publishes them again."""
    try:
        current_app.send_task(
            SEND_TASK,
            args=[delivery_ids],
            queue=delivery_queue(channel=channel, priority=priority),
            countdown=countdown or None,
        )
    except Exception:  # noqa: BLE001 - any broker error; the sweeper recovers
        logger.exception("publishing %d %s deliveries failed; the sweeper will retry", len(delivery_ids), channel)


def dead_letters_announce(*, dead_letters: list[DeadLetter]) -> None:
    """Put a notice on each channel's dead-letter queue once the transaction commits."""
    for dead_letter in dead_letters:
        args = [str(dead_letter.delivery_id), dead_letter.channel, dead_letter.reason]
        queue = dead_letter_queue(channel=dead_letter.channel)
        transaction.on_commit(partial(_send_notice, args=args, queue=queue))


def _send_notice(*, args: list[str], queue: str) -> None:
    # Every dead letter passes here once committed (the send stage's, a soft bounce's, the sweeper's).
    metrics.dead_letters_count(channels=[args[1]])
    try:
        current_app.send_task(DEAD_LETTER_TASK, args=args, queue=queue)
    except Exception:  # noqa: BLE001 - the DeadLetter row is the record; the notice is a courtesy
        logger.exception("could not publish a dead-letter notice for delivery %s", args[0])


@dataclass(frozen=True)
class SweepReport:
    leases_expired: int
    republished: int


def sweep(*, now: datetime | None = None) -> SweepReport:
    """Re-queue expired leases, then publish due work that the broker does not hold."""
    now = now or timezone.now()
    expired = 0
    while count := _leases_expire(now=now):
        expired += count
    republished = 0
    while count := due_publish(now=now):
        republished += count
        if count < settings.NOTIFY_SWEEP_CHUNK:
            break
    if expired or republished:
        logger.info("sweep: %d leases expired, %d deliveries republished", expired, republished)
    return SweepReport(leases_expired=expired, republished=republished)


def lease_length(*, priority: str) -> timedelta:
    """How long a claim holds a delivery of this priority before the sweeper re-queues it."""
    if priority == Priority.CRITICAL:
        return timedelta(seconds=settings.NOTIFY_CRITICAL_LEASE_SECONDS)
    return timedelta(seconds=settings.NOTIFY_LEASE_SECONDS)


def lease_expiry(*, now: datetime) -> Case:
    """A claim's or a renewal's new lease_expires_at, each row by its own priority."""
    return Case(
        When(priority=Priority.CRITICAL, then=Value(now + lease_length(priority=Priority.CRITICAL))),
        default=Value(now + lease_length(priority=Priority.NORMAL)),
    )


def _leases_expire(*, now: datetime) -> int:
    with transaction.atomic():
        deliveries = list(
            Delivery.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("notification")  # for the metrics' labels
            .filter(status=DeliveryStatus.SENDING, lease_expires_at__lt=now)[: settings.NOTIFY_SWEEP_CHUNK]
        )
        history = []
        dead_letters = []
        for delivery in deliveries:
            # Its last claim or renewal is when an unrecorded request may have gone out.
            if delivery.in_doubt_since is None and delivery.lease_expires_at is not None:
                delivery.in_doubt_since = delivery.lease_expires_at - lease_length(priority=delivery.priority)
            delivery.lease_token = None
            delivery.lease_expires_at = None
            delivery.updated_at = now
            if delivery.provider_message_id:
                # The worker noted what the provider took before it was lost (one-message
                # requests, LeasedBatch.taken_note): the send happened; record it.
                reason = "sent: the provider took it before the worker was lost (its id was noted)"
                delivery.status = DeliveryStatus.SENT
                delivery.sent_at = now
                delivery.in_doubt_since = None
            elif attempts_exhausted(channel=delivery.channel, attempt=delivery.attempt_count):
                # A message that keeps killing its worker must not loop for ever.
                reason = f"worker lost during each of {delivery.attempt_count} attempts"
                delivery.status = DeliveryStatus.DEAD
                dead_letters.append(
                    DeadLetter(
                        delivery=delivery, channel=delivery.channel, reason=reason, attempts=delivery.attempt_count
                    )
                )
            else:
                reason = "lease expired: the worker did not report back; re-queued"
                delivery.status = DeliveryStatus.QUEUED
                delivery.next_attempt_at = now
            delivery.status_reason = "" if delivery.status == DeliveryStatus.SENT else reason
            history.append(history_event(delivery=delivery, status=delivery.status, reason=reason, at=now))
        deliveries_publish_on_commit(deliveries=[d for d in deliveries if d.status == DeliveryStatus.QUEUED], now=now)
        Delivery.objects.bulk_update(
            deliveries,
            fields=[
                "status",
                "status_reason",
                "lease_token",
                "lease_expires_at",
                "next_attempt_at",
                "published_at",
                "in_doubt_since",
                "sent_at",
                "updated_at",
            ],
        )
        history_insert(rows=history)
        if dead_letters:
            DeadLetter.objects.bulk_create(dead_letters)
            dead_letters_announce(dead_letters=dead_letters)
    # What the sweeper finished counts as the send stage's would (under provider "none": the
    # row does not say which account took a noted send). A re-queue is not a state reached;
    # the next attempt's outcome is.
    finished = {DeliveryStatus.SENT, DeliveryStatus.DEAD}
    metrics.outcomes_count(
        recorded=[row for row in history if row.status in finished],
        deliveries={delivery.pk: delivery for delivery in deliveries},
        outcomes=[],
        now=now,
    )
    return len(deliveries)


def queues_with_backlog() -> set[tuple[str, str]]:
    """The (channel, priority) pairs whose broker queue still holds messages."""
    return {queue for queue, depth in queue_depths().items() if depth}


def broker_queue_depths(*, queues: Iterable[str]) -> dict[str, int]:
    """How many task messages wait in each named queue on the broker, Redis or RabbitMQ (a
    queue that does not exist yet is empty). Empty when the broker cannot be read."""
    depths: dict[str, int] = {}
    try:
        with _broker_connection() as connection:
            on_rabbitmq = connection.transport.driver_type == "amqp"
            broker: Any = connection.default_channel  # kombu's channel for the transport
            for queue in queues:
                try:
                    depths[queue] = broker.queue_declare(queue=queue, passive=True).message_count
                except Exception:  # noqa: BLE001 - a queue that does not exist is empty
                    depths[queue] = 0
                    if on_rabbitmq:  # RabbitMQ closes a channel whose passive declare failed
                        broker = connection.channel()
    except Exception:  # noqa: BLE001 - with the broker down, publishing fails anyway
        logger.warning("could not read the broker's queue lengths", exc_info=True)
        return {}
    return depths


def _broker_connection() -> Any:
    """A broker connection to read queue lengths on. On Redis, one of the app's pooled
    connections, whose channel and sockets live on between reads: a fresh connection each
    read opened and dropped sockets at every backpressure check. On RabbitMQ a failed
    passive declare closes the channel, so each read gets a connection of its own."""
    if settings.BROKER_IS_AMQP:
        return current_app.connection_for_read()
    return current_app.pool.acquire(block=True)


def queue_depths() -> dict[tuple[str, str], int]:
    """How many task messages wait in each (channel, priority) queue on the broker; each
    carries up to a batch of deliveries. Empty when the broker cannot be read."""
    names = {
        (channel, priority): delivery_queue(channel=channel, priority=priority)
        for channel in CHANNELS
        for priority in PRIORITIES
    }
    depths = broker_queue_depths(queues=names.values())
    return {key: depths[name] for key, name in names.items() if name in depths}


# The priorities the runaway-send guard holds back; critical work always flows.
RUNAWAY_HELD_PRIORITIES = (Priority.NORMAL, Priority.BULK)


def of_tenants(tenant_ids: Iterable[UUID]) -> Exists:
    """A filter on deliveries: those of these tenants. A correlated subquery rather than a
    join, so that an UPDATE or a SELECT ... FOR UPDATE touches the deliveries' rows only."""
    return Exists(Notification.objects.filter(pk=OuterRef("notification_id"), tenant_id__in=list(tenant_ids)))


@dataclass(frozen=True)
class Holds:
    """What is held back now: channels ops paused for the whole installation, (tenant,
    channel) pairs paused for one tenant, tenants the runaway-send guard paused (their
    normal and bulk work), and the events of broadcasts that are paused or whose cancelling
    is still marking their deliveries. Held deliveries are not claimed, nor republished by
    the sweeper (a task published for one finds nothing to claim)."""

    channels: frozenset[str] = frozenset()
    tenant_channels: frozenset[tuple[UUID, str]] = frozenset()
    runaway_tenants: frozenset[UUID] = frozenset()
    broadcast_events: frozenset[UUID] = frozenset()

    def held(self) -> Q | None:
        """A filter matching the held deliveries (None: nothing is held)."""
        parts: list[Q] = []
        if self.channels:
            parts.append(Q(channel__in=sorted(self.channels)))
        tenants_by_channel: dict[str, set[UUID]] = defaultdict(set)
        for tenant_id, channel in self.tenant_channels:
            tenants_by_channel[channel].add(tenant_id)
        for channel, tenant_ids in sorted(tenants_by_channel.items()):
            if channel not in self.channels:
                parts.append(Q(of_tenants(tenant_ids), channel=channel))
        if self.runaway_tenants:
            parts.append(Q(of_tenants(self.runaway_tenants), priority__in=RUNAWAY_HELD_PRIORITIES))
        if self.broadcast_events:
            of_events = Notification.objects.filter(
                pk=OuterRef("notification_id"), event_id__in=sorted(self.broadcast_events)
            )
            parts.append(Q(Exists(of_events)))
        return reduce(or_, parts) if parts else None

    def exclude_from(self, deliveries: QuerySet[Delivery]) -> QuerySet[Delivery]:
        held = self.held()
        return deliveries if held is None else deliveries.exclude(held)


# Marks in holds_read()'s one query for the rows that are not a switch's (tenant, channel).
_RUNAWAY, _BROADCAST = "", "broadcast"


@cache
def _holds_statement() -> tuple[str, tuple[Any, ...]]:
    """holds_read()'s query, compiled once a process. Django took about a millisecond to
    compile the three-way union each time: most of what a claim of one critical delivery
    spent outside its own rows."""
    switches = ChannelSwitch.objects.filter(paused=True).values_list("tenant_id", "channel")
    runaway = Tenant.objects.filter(runaway_paused_at__isnull=False).values_list(
        "id", Value(_RUNAWAY, output_field=CharField())
    )
    broadcasts = Broadcast.objects.filter(
        Q(state=BroadcastState.PAUSED) | Q(state=BroadcastState.CANCELLED, cancel_finished_at__isnull=True)
    ).values_list("event_id", Value(_BROADCAST, output_field=CharField()))
    return switches.union(runaway, broadcasts, all=True).query.sql_with_params()


def holds_read() -> Holds:
    """Every paused switch, runaway-paused tenant and holding broadcast, in one query (read
    per claim and per sweep pass; nearly always empty)."""
    statement, params = _holds_statement()
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        rows = cursor.fetchall()
    channels: set[str] = set()
    tenant_channels: set[tuple[UUID, str]] = set()
    runaway_tenants: set[UUID] = set()
    broadcast_events: set[UUID] = set()
    for owner_id, channel in rows:
        if channel == _RUNAWAY:
            runaway_tenants.add(owner_id)
        elif channel == _BROADCAST:
            broadcast_events.add(owner_id)
        elif owner_id is None:
            channels.add(channel)
        else:
            tenant_channels.add((owner_id, channel))
    return Holds(
        channels=frozenset(channels),
        tenant_channels=frozenset(tenant_channels),
        runaway_tenants=frozenset(runaway_tenants),
        broadcast_events=frozenset(broadcast_events),
    )


def due_publish(
    *,
    now: datetime,
    channel: str | None = None,
    tenant_id: UUID | None = None,
    priorities: Iterable[str] | None = None,
) -> int:
    """Publish due work the broker may not hold. With `channel`, `tenant_id` or `priorities`,
    all of that due work, published or not: what a switch or the runaway guard held back,
    when it resumes. Work still held by another switch is left where it is."""
    if channel is None and tenant_id is None and priorities is None:
        stale_before = now - timedelta(seconds=settings.NOTIFY_REPUBLISH_AFTER_SECONDS)
        # Work published long ago but waiting behind a backlog is still on the broker: publish
        # it again only once its queue has drained, or a long backlog would feed on itself.
        stale = Q(published_at__lt=stale_before)
        for backlogged_channel, priority in queues_with_backlog():
            stale &= ~Q(channel=backlogged_channel, priority=priority)
        which = Q(published_at__isnull=True) | stale
    else:  # everything not published in this very pass
        which = Q(published_at__isnull=True) | Q(published_at__lt=now)
        if channel is not None:
            which &= Q(channel=channel)
        if tenant_id is not None:
            which &= Q(of_tenants([tenant_id]))
        if priorities is not None:
            which &= Q(priority__in=list(priorities))
    with transaction.atomic():
        due = Delivery.objects.select_for_update(skip_locked=True).filter(
            status__in=CLAIMABLE_STATUSES, next_attempt_at__lte=now
        )
        rows = list(
            holds_read()
            .exclude_from(due.filter(which))
            .values_list("id", "channel", "priority")[: settings.NOTIFY_SWEEP_CHUNK]
        )
        groups: dict[tuple[str, str], list[UUID]] = defaultdict(list)
        for delivery_id, delivery_channel, priority in rows:
            groups[(delivery_channel, priority)].append(delivery_id)
        for (delivery_channel, priority), ids in groups.items():
            Delivery.objects.filter(id__in=ids).update(published_at=now)
            size = batch_size(priority=priority)
            for start in range(0, len(ids), size):
                chunk = [str(i) for i in ids[start : start + size]]
                transaction.on_commit(partial(publish, channel=delivery_channel, priority=priority, delivery_ids=chunk))
    return len(rows)
