"""Retention: each tenant's events, notifications, deliveries, history and inbox items older
than its retention are purged by beat, in small batches beside the running pipeline.

Each batch is one short transaction over at most NOTIFY_RETENTION_BATCH notifications, with a
lock timeout, so that the purge waits on no sender and no sender waits long on it; a pause
follows each batch. A notification goes only when none of its deliveries is in flight (queued,
sending, retrying, deferred, standby), checked again under the deliveries' row locks, which
it takes with SKIP LOCKED: a delivery a sender holds keeps its notification for a later run.
The rows are deleted by statements on id arrays rather than Django's cascade, which would load
every row first.

Before that, whole months go at once: on PostgreSQL the notifications, deliveries and delivery
history are partitioned by month (apps/deliveries/partitions.py), and a month whose every
notification is past its tenant's retention, with none of its deliveries in flight, is dropped
as three partitions rather than deleted row by row. The rows that point into it from elsewhere
go first: deliveries of its notifications made in a later month (a fallback step, a resend
just past midnight) with their history, and the dead letters, early feedback, inbox items and
canary runs of its deliveries. A month that straddles a cutoff is left to the batches."""

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import DatabaseError, connection, models, transaction
from django.db.models import ForeignObjectRel

from apps.deliveries.models import (
    CLAIMABLE_STATUSES,
    Delivery,
    DeliveryEvent,
    Digest,
    DigestEntry,
    Event,
    Notification,
)
from apps.deliveries.partitions import Partition, partitions_list, tables_partitioned, uuid7_time
from apps.deliveries.selectors import PENDING_STATUSES
from apps.ops.models import RetentionPolicy
from apps.tenants.models import Tenant
from notify.observability import metrics

logger = logging.getLogger(__name__)
LOCK_TIMEOUT = "2s"


@dataclass
class PurgeReport:
    notifications: int = 0
    deliveries: int = 0
    events: int = 0
    batches: int = 0
    # Months dropped whole, by their notifications partition's name, and the longest of those
    # drops' transactions (the partitioned tables are locked for its length).
    partitions: list[str] = field(default_factory=list)
    partition_drop_seconds: float = 0.0
    # Tenants whose purge stopped early (the run's budget, or a lock that did not come).
    unfinished: list[str] = field(default_factory=list)


def retention_cutoffs(*, now: datetime) -> dict[UUID, datetime]:
    """Per tenant with a retention, the time before which its rows are purged."""
    policies = dict(RetentionPolicy.objects.values_list("tenant_id", "retention_days"))
    cutoffs = {}
    for tenant_id in Tenant.objects.values_list("pk", flat=True):
        # A tenant's own policy wins, even when it says forever (empty).
        days = policies[tenant_id] if tenant_id in policies else settings.NOTIFY_RETENTION_DAYS
        if days is not None:
            cutoffs[tenant_id] = now - timedelta(days=days)
    return cutoffs


def retention_purge(*, now: datetime, deadline: float | None = None, partitions: bool = True) -> PurgeReport:
    """Purge every tenant's expired rows: whole months where they can go (unless `partitions`
    is off), then batch by batch, until done or past the deadline."""
    deadline = deadline if deadline is not None else time.monotonic() + settings.NOTIFY_RETENTION_RUN_SECONDS
    report = PurgeReport()
    cutoffs = retention_cutoffs(now=now)
    if partitions and cutoffs and tables_partitioned():
        _partitions_drop(cutoffs=cutoffs, deadline=deadline, report=report)
    for tenant_id, cutoff in cutoffs.items():
        if not _tenant_purge(tenant_id=tenant_id, cutoff=cutoff, deadline=deadline, report=report):
            report.unfinished.append(str(tenant_id))
    for kind in ("notifications", "deliveries", "events"):
        metrics.retention_purged.labels(kind=kind).inc(getattr(report, kind))
    metrics.retention_purged.labels(kind="partitions").inc(len(report.partitions))
    return report


# A delivery in flight (PENDING_STATUSES), spelled as the partial indexes' conditions, which
# hold only unfinished work, so that the check reads them; its parameter is _claimable().
IN_FLIGHT = "(status = ANY(%s) OR status = 'sending' OR status = 'standby')"


def _claimable() -> list[str]:
    return [str(status) for status in CLAIMABLE_STATUSES]


class MonthInFlight(Exception):
    """A delivery of the month went back in flight while it was being dropped."""


def _partitions_drop(*, cutoffs: dict[UUID, datetime], deadline: float, report: PurgeReport) -> None:
    """Drop, oldest first, each month that retention lets go whole."""
    latest_cutoff = max(cutoffs.values())
    notifications, _ = partitions_list(table=Notification._meta.db_table)
    deliveries = _by_bounds(partitions_list(table=Delivery._meta.db_table)[0])
    history = _by_bounds(partitions_list(table=DeliveryEvent._meta.db_table)[0])
    for partition in notifications:
        # Only months that ended before the latest cutoff can be past every tenant's retention.
        if partition.upper is None or uuid7_time(value=partition.upper) > latest_cutoff:
            break
        if time.monotonic() > deadline:
            return
        bounds = (partition.lower, partition.upper)
        if bounds not in deliveries or bounds not in history:
            continue
        try:
            if _partition_expired(partition=partition, deliveries=deliveries[bounds], cutoffs=cutoffs):
                started = time.monotonic()
                _partition_drop(partition=partition, deliveries=deliveries[bounds], history=history[bounds])
                elapsed = time.monotonic() - started
                report.partition_drop_seconds = max(report.partition_drop_seconds, elapsed)
                report.partitions.append(partition.name)
        except (DatabaseError, MonthInFlight) as error:  # a lock timeout: the batches take its rows
            logger.warning("retention could not drop partition %s: %s", partition.name, error)


def _by_bounds(partitions: list[Partition]) -> dict[tuple[UUID | None, UUID | None], str]:
    return {(p.lower, p.upper): p.name for p in partitions}


def _range_condition(*, column: str, lower: UUID | None, upper: UUID | None) -> tuple[str, list[Any]]:
    if lower is None:
        return f"{column} < %s", [upper]
    return f"{column} >= %s AND {column} < %s", [lower, upper]


def _partition_expired(*, partition: Partition, deliveries: str, cutoffs: dict[UUID, datetime]) -> bool:
    """Whether every notification in the partition is past its tenant's retention (a tenant
    kept forever keeps the month), none of their deliveries is in flight, and no delivery of
    the month belongs to an older notification (the batches take that one with its own)."""
    in_range, params = _range_condition(column="d.notification_id", lower=partition.lower, upper=partition.upper)
    with connection.cursor() as cursor:
        # An empty month has nothing to purge: it stays for rows still to come.
        cursor.execute(f"SELECT 1 FROM {partition.name} LIMIT 1")
        if cursor.fetchone() is None:
            return False
        # Each tenant's newest row in the partition: one probe of its (tenant, created_at) index.
        cursor.execute(
            f"""SELECT 1 FROM {_table(Tenant)} t
            LEFT JOIN unnest(%s::uuid[], %s::timestamptz[]) AS c(tenant_id, cutoff) ON c.tenant_id = t.id
            CROSS JOIN LATERAL (SELECT max(n.created_at) AS newest FROM {partition.name} n WHERE n.tenant_id = t.id) m
            WHERE m.newest IS NOT NULL AND (c.cutoff IS NULL OR m.newest >= c.cutoff) LIMIT 1""",
            [list(cutoffs), list(cutoffs.values())],
        )
        if cursor.fetchone():
            return False
        cursor.execute(
            f"SELECT 1 FROM {_table(Delivery)} d WHERE {in_range} AND {IN_FLIGHT} LIMIT 1", [*params, _claimable()]
        )
        if cursor.fetchone():
            return False
        if partition.lower is not None:
            cursor.execute(f"SELECT 1 FROM {deliveries} WHERE notification_id < %s LIMIT 1", [partition.lower])
            if cursor.fetchone():
                return False
    return True


def _partition_drop(*, partition: Partition, deliveries: str, history: str) -> None:
    """Delete what points into the month from outside it, then detach and drop its partitions,
    children first, in one transaction."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        in_range, params = _range_condition(column="notification_id", lower=partition.lower, upper=partition.upper)
        # Spelled so that the month's own deliveries partition is pruned from the scan.
        outside, outside_params = (
            ("id >= %s", [partition.upper])
            if partition.lower is None
            else ("(id < %s OR id >= %s)", [partition.lower, partition.upper])
        )
        cursor.execute(
            f"SELECT id FROM {_table(Delivery)} WHERE {in_range} AND {outside} FOR UPDATE",
            [*params, *outside_params],
        )
        later = [row[0] for row in cursor.fetchall()]
        if later:
            _references_clear(cursor=cursor, model=Delivery, ids=later)
            cursor.execute(f"DELETE FROM {_table(Delivery)} WHERE id = ANY(%s)", [later])
        _references_clear_range(cursor=cursor, model=Delivery, partition=partition, besides=DeliveryEvent)
        _references_clear_range(cursor=cursor, model=Notification, partition=partition, besides=Delivery)
        # Children first, each dropped before the next is detached: a detached history
        # partition would still point at the deliveries it held.
        for parent, name in ((DeliveryEvent, history), (Delivery, deliveries), (Notification, partition.name)):
            cursor.execute(f"ALTER TABLE {_table(parent)} DETACH PARTITION {name}")
            if parent is Delivery:
                _in_flight_refuse(cursor=cursor, deliveries=deliveries, month=partition.name)
            cursor.execute(f"DROP TABLE {name}")


def _in_flight_refuse(*, cursor: Any, deliveries: str, month: str) -> None:
    """Detached, the month's deliveries are out of every writer's reach: one put back in flight
    since the month was checked (a replayed dead letter) keeps the month after all."""
    cursor.execute(f"SELECT 1 FROM {deliveries} WHERE {IN_FLIGHT} LIMIT 1", [_claimable()])
    if cursor.fetchone():
        raise MonthInFlight(month)


def _references_clear_range(
    *, cursor: Any, model: type[models.Model], partition: Partition, besides: type[models.Model]
) -> None:
    """_references_clear for every row of a partition, by its key range; `besides` is the
    partitioned child dropped with it."""
    for relation in model._meta.get_fields(include_hidden=True):
        if not isinstance(relation, ForeignObjectRel) or relation.many_to_many or relation.related_model is None:
            continue
        if relation.related_model is besides:
            continue
        table, column = _table(relation.related_model), connection.ops.quote_name(str(relation.field.column))
        in_range, params = _range_condition(column=column, lower=partition.lower, upper=partition.upper)
        if relation.on_delete is models.SET_NULL:
            cursor.execute(f"UPDATE {table} SET {column} = NULL WHERE {in_range}", params)
        else:
            cursor.execute(f"DELETE FROM {table} WHERE {in_range}", params)


def _tenant_purge(*, tenant_id: UUID, cutoff: datetime, deadline: float, report: PurgeReport) -> bool:
    after: tuple[datetime, UUID] = (datetime.min.replace(tzinfo=UTC), UUID(int=0))
    while True:
        if time.monotonic() > deadline:
            return False
        expired = _notifications_expired(tenant_id=tenant_id, cutoff=cutoff, after=after)
        if not expired:
            break
        after = expired[-1]  # in-flight ones left behind are not looked at again this run
        ids = [notification_id for _, notification_id in expired]
        try:
            _notifications_delete(ids=ids, report=report)
        except DatabaseError as error:  # the lock timeout: someone holds these rows, try later
            logger.warning("retention purge of tenant %s paused: %s", tenant_id, error)
            return False
        report.batches += 1
        time.sleep(settings.NOTIFY_RETENTION_PAUSE_SECONDS)
    while time.monotonic() <= deadline:
        try:
            deleted = _events_delete(tenant_id=tenant_id, cutoff=cutoff)
        except DatabaseError as error:
            logger.warning("retention purge of tenant %s paused: %s", tenant_id, error)
            return False
        report.events += deleted
        if deleted < settings.NOTIFY_RETENTION_BATCH:
            return True
        report.batches += 1
        time.sleep(settings.NOTIFY_RETENTION_PAUSE_SECONDS)
    return False


def _table(model: type[models.Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _notifications_expired(
    *, tenant_id: UUID, cutoff: datetime, after: tuple[datetime, UUID]
) -> list[tuple[datetime, UUID]]:
    # Oldest first from a (created_at, id) cursor: each batch is a short range scan of the
    # (tenant, created_at) index, however many expired rows lie beyond it.
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT n.created_at, n.id FROM {_table(Notification)} n
            WHERE n.tenant_id = %s AND n.created_at < %s AND n.created_at >= %s AND (n.created_at, n.id) > (%s, %s)
              AND NOT EXISTS (SELECT 1 FROM {_table(Delivery)} d
                              WHERE d.notification_id = n.id AND d.status = ANY(%s))
            ORDER BY n.created_at, n.id LIMIT %s""",
            [tenant_id, cutoff, after[0], after[0], after[1], list(PENDING_STATUSES), settings.NOTIFY_RETENTION_BATCH],
        )
        return [(row[0], row[1]) for row in cursor.fetchall()]


def _notifications_delete(*, ids: list[UUID], report: PurgeReport) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        cursor.execute(
            f"""SELECT id, notification_id, status FROM {_table(Delivery)}
            WHERE notification_id = ANY(%s) FOR UPDATE SKIP LOCKED""",
            [ids],
        )
        locked = cursor.fetchall()
        cursor.execute(
            f"SELECT notification_id, count(*) FROM {_table(Delivery)} WHERE notification_id = ANY(%s) GROUP BY 1",
            [ids],
        )
        totals = dict(cursor.fetchall())
        held: dict[UUID, int] = {}
        in_flight = set()
        for _, notification_id, status in locked:
            held[notification_id] = held.get(notification_id, 0) + 1
            if status in PENDING_STATUSES:
                in_flight.add(notification_id)  # it went back in flight since it was chosen
        doomed = [i for i in ids if held.get(i, 0) == totals.get(i, 0) and i not in in_flight]
        doomed_set = set(doomed)
        deliveries = [d for d, n, _ in locked if n in doomed_set]
        _references_clear(cursor=cursor, model=Delivery, ids=deliveries)
        cursor.execute(f"DELETE FROM {_table(Delivery)} WHERE id = ANY(%s)", [deliveries])
        report.deliveries += cursor.rowcount
        _references_clear(cursor=cursor, model=Notification, ids=doomed)
        cursor.execute(f"DELETE FROM {_table(Notification)} WHERE id = ANY(%s)", [doomed])
        report.notifications += cursor.rowcount


def _references_clear(*, cursor: Any, model: type[models.Model], ids: list[Any]) -> None:
    """Delete or detach the rows of other tables that point at these rows, as each foreign key
    says (SET_NULL: detached; otherwise deleted), so that a table added later is handled too.
    The callers have already kept back rows whose notifications or broadcasts still need them."""
    for relation in model._meta.get_fields(include_hidden=True):  # "+" related names are hidden
        if not isinstance(relation, ForeignObjectRel) or relation.many_to_many or relation.related_model is None:
            continue
        table, column = _table(relation.related_model), connection.ops.quote_name(str(relation.field.column))
        if relation.on_delete is models.SET_NULL:
            cursor.execute(f"UPDATE {table} SET {column} = NULL WHERE {column} = ANY(%s)", [ids])
        else:
            cursor.execute(f"DELETE FROM {table} WHERE {column} = ANY(%s)", [ids])


def _events_delete(*, tenant_id: UUID, cutoff: datetime) -> int:
    """Delete one batch of the tenant's expired events that nothing refers to any more."""
    from apps.audiences.models import Broadcast

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        cursor.execute(
            f"""SELECT e.id FROM {_table(Event)} e
            WHERE e.tenant_id = %s AND e.created_at < %s
              AND NOT EXISTS (SELECT 1 FROM {_table(Notification)} n WHERE n.event_id = e.id)
              AND NOT EXISTS (SELECT 1 FROM {_table(Broadcast)} b WHERE b.event_id = e.id)
              AND NOT EXISTS (SELECT 1 FROM {_table(DigestEntry)} de JOIN {_table(Digest)} g ON g.id = de.digest_id
                              WHERE de.event_id = e.id AND g.flushed_at IS NULL)
            ORDER BY e.created_at LIMIT %s FOR UPDATE SKIP LOCKED""",
            [tenant_id, cutoff, settings.NOTIFY_RETENTION_BATCH],
        )
        ids = [row[0] for row in cursor.fetchall()]
        if not ids:
            return 0
        _references_clear(cursor=cursor, model=Event, ids=ids)
        cursor.execute(f"DELETE FROM {_table(Event)} WHERE id = ANY(%s)", [ids])
        return cursor.rowcount
