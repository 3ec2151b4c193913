"""The delivery rollups: the history counted per minute and per hour, for the dashboard and the
engagement analytics, so that no page scans the history when it loads.

Each run counts the history rows whose created_at lies in [cursor, horizon) and adds them to
their buckets, then moves the cursor to the horizon in the same transaction, so every row is
counted exactly once. The horizon trails the clock by NOTIFY_ROLLUP_SETTLE_SECONDS: a history
row's created_at is taken before its transaction commits, so a row may become visible a little
after its time; the horizon waits that long, so a row committed late is still ahead of the
cursor when it becomes visible. (A cursor on the id would be no better: ids, too, are taken
before commit.) Provider feedback that arrives late is counted when it arrives, into the bucket
of the time the provider says it happened (`occurred_at` in the row's detail), never later
than the row itself.

Everything runs in SQL (INSERT ... SELECT ... GROUP BY ... ON CONFLICT DO UPDATE), a chunk of
history time at a time; no history row is loaded into Python. PostgreSQL only: the demo's
SQLite has no rollups, and its dashboard shows none."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Min
from django.utils import timezone

from apps.deliveries.models import Delivery, DeliveryEvent, Notification
from apps.ops.models import DeliveryRollupHour, DeliveryRollupMinute, RollupCursor
from notify.observability.metrics import LATENCY_BUCKETS

logger = logging.getLogger(__name__)

CURSOR_NAME = "deliveries"
# The upper bounds of the accept-to-sent histogram, in milliseconds (the metrics' buckets):
# bucket i counts latencies below LATENCY_BOUNDS_MS[i]; the last bucket everything above.
LATENCY_BOUNDS_MS = tuple(int(bound * 1000) for bound in LATENCY_BUCKETS)
# History time counted per statement: small enough to keep each transaction short.
CHUNK = timedelta(hours=1)
# Chunks per run at most: a long catch-up continues on the next runs.
CHUNKS_PER_RUN = 48
# Minutes are read for the last hour only (the longer views read hours): older ones are deleted.
MINUTES_KEPT = timedelta(days=2)

_COUNTED = f"""
    SELECT date_trunc('minute', least(coalesce((e.detail->>'occurred_at')::timestamptz, e.created_at),
                                       e.created_at)) AS bucket,
           n.tenant_id, n.category_id, n.template_version_id, d.channel, d.variant,
           CASE WHEN split_part(coalesce(e.detail->>'provider_status', ''), '/', 1) ~ '^[-a-zA-Z0-9_]+$'
                 AND position('/' IN e.detail->>'provider_status') > 0
                THEN left(split_part(e.detail->>'provider_status', '/', 1), 50) ELSE '' END AS provider,
           d.priority,
           CASE WHEN e.status = 'failed' AND e.reason LIKE 'opted out%%' THEN 'unsubscribed'
                ELSE e.status END AS outcome,
           CASE WHEN e.status = 'sent' THEN width_bucket(latency.ms, %(bounds)s::bigint[]) ELSE -1 END
               AS latency_bucket,
           count(*) AS count,
           coalesce(sum(latency.ms) FILTER (WHERE e.status = 'sent'), 0) AS latency_ms_sum
    FROM {DeliveryEvent._meta.db_table} e
    JOIN {Delivery._meta.db_table} d ON d.id = e.delivery_id
    JOIN {Notification._meta.db_table} n ON n.id = d.notification_id
    CROSS JOIN LATERAL (
        SELECT greatest(0, (extract(epoch FROM e.created_at - greatest(n.created_at, coalesce(n.send_at,
               n.created_at))) * 1000))::bigint AS ms
    ) latency
    WHERE e.created_at >= %(start)s AND e.created_at < %(end)s
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
"""
_COLUMNS = (
    "bucket, tenant_id, category_id, template_version_id, channel, variant, provider, priority, outcome, "
    "latency_bucket, count, latency_ms_sum"
)
# A rollup row's key: its bucket, then what it is counted by.
_COUNTED_BY = (
    "tenant_id, category_id, template_version_id, channel, variant, provider, priority, outcome, latency_bucket"
)
_KEY = f"bucket, {_COUNTED_BY}"


def _on_conflict_add(*, table: str) -> str:
    return (
        f"ON CONFLICT ({_KEY}) DO UPDATE SET count = {table}.count + EXCLUDED.count, "
        f"latency_ms_sum = {table}.latency_ms_sum + EXCLUDED.latency_ms_sum"
    )


_MINUTES, _HOURS = DeliveryRollupMinute._meta.db_table, DeliveryRollupHour._meta.db_table
# One read of the history for both grains: the hours are the minutes summed, since every count
# adds up and an hour is whole minutes. Counting each grain from the history read it twice, and
# these reads were the largest part of what beat's work cost a broadcast.
_ADD_SQL = f"""
    WITH minutes AS MATERIALIZED ({_COUNTED}),
    added AS (INSERT INTO {_MINUTES} ({_COLUMNS}) SELECT {_COLUMNS} FROM minutes {_on_conflict_add(table=_MINUTES)})
    INSERT INTO {_HOURS} ({_COLUMNS})
    SELECT date_trunc('hour', bucket), {_COUNTED_BY}, sum(count), sum(latency_ms_sum)
    FROM minutes GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    {_on_conflict_add(table=_HOURS)}
"""


def rollups_horizon(*, now: datetime) -> datetime:
    """The time before which every history row is taken to be committed."""
    return now - timedelta(seconds=settings.NOTIFY_ROLLUP_SETTLE_SECONDS)


def rollups_advance(*, now: datetime | None = None) -> int:
    """Count the history written since the last run into the minute and hour rollups; return
    how many chunks were counted (0 when there was nothing new or the database is not
    PostgreSQL)."""
    if connection.vendor != "postgresql":
        return 0
    horizon = rollups_horizon(now=now or timezone.now())
    chunks = 0
    while chunks < CHUNKS_PER_RUN:
        with transaction.atomic():
            cursor_row = _cursor_lock(horizon=horizon)
            start = cursor_row.counted_until
            if start >= horizon:
                break
            end = min(start + CHUNK, horizon)
            params: dict[str, Any] = {"start": start, "end": end, "bounds": list(LATENCY_BOUNDS_MS)}
            with connection.cursor() as cursor:
                cursor.execute(_ADD_SQL, params)
            cursor_row.counted_until = end
            cursor_row.save(update_fields=["counted_until", "updated_at"])
        chunks += 1
    DeliveryRollupMinute.objects.filter(bucket__lt=horizon - MINUTES_KEPT).delete()
    return chunks


def _cursor_lock(*, horizon: datetime) -> RollupCursor:
    """The cursor, locked for this chunk (so that two runs never count one row twice); a first
    run starts at the oldest history row."""
    cursor_row = RollupCursor.objects.select_for_update().filter(name=CURSOR_NAME).first()
    if cursor_row is not None:
        return cursor_row
    # Read once, on the first run: one scan of the history, so that nothing written before is left out.
    first = DeliveryEvent.objects.aggregate(first=Min("created_at"))["first"]
    start = min(first, horizon) if first is not None else horizon
    RollupCursor.objects.get_or_create(name=CURSOR_NAME, defaults={"counted_until": start})
    return RollupCursor.objects.select_for_update().get(name=CURSOR_NAME)
