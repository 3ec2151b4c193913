"""Retention: each tenant's events, notifications, deliveries, history and inbox items older
than its retention are purged by beat, in small batches beside the running pipeline.

Each batch is one short transaction over at most NOTIFY_RETENTION_BATCH notifications, with a
lock timeout, so that the purge waits on no sender and no sender waits long on it; a pause
follows each batch. A notification goes only when none of its deliveries is in flight (queued,
sending, retrying, deferred, standby), checked again under the deliveries' row locks, which
it takes with SKIP LOCKED: a delivery a sender holds keeps its notification for a later run.
The rows are deleted by statements on id arrays rather than Django's cascade, which would load
every row first."""

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
    Delivery,
    Digest,
    DigestEntry,
    Event,
    Notification,
)
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


def retention_purge(*, now: datetime, deadline: float | None = None) -> PurgeReport:
    """Purge every tenant's expired rows, batch by batch, until done or past the deadline."""
    deadline = deadline if deadline is not None else time.monotonic() + settings.NOTIFY_RETENTION_RUN_SECONDS
    report = PurgeReport()
    for tenant_id, cutoff in retention_cutoffs(now=now).items():
        if not _tenant_purge(tenant_id=tenant_id, cutoff=cutoff, deadline=deadline, report=report):
            report.unfinished.append(str(tenant_id))
    for kind in ("notifications", "deliveries", "events"):
        metrics.retention_purged.labels(kind=kind).inc(getattr(report, kind))
    return report


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
