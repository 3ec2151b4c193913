"""Benchmark the retention purge of a month of delivery history: batch deletes against dropping
the month's partitions.

  python scripts/bench_partition_purge.py --partition-purge 10000000 [--next-month-rows 2500000]

Generates, in SQL (generate_series), a month of rows for one tenant with a 30-day retention:
N/4 notifications, one delivery each, and four history rows a delivery (N in all), plus rows of
the following month that are not yet expired. Then it purges the expired month twice, from the
same generated rows: once in batches of NOTIFY_RETENTION_BATCH notifications (without the
pauses between batches that a running installation takes), once by dropping the month's
partitions. Prints the time of each, the rows a second, how long the drop held its locks, and
the drop's statements that took 50 ms or more.
Run it through `make bench ARGS="--partition-purge 10000000"`, which prepares the database."""

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from apps.catalog.models import Category, Template, TemplateVersion  # noqa: E402
from apps.deliveries.models import Event  # noqa: E402
from apps.deliveries.partitions import month_next, month_start, partitions_ensure, tables_partitioned  # noqa: E402
from apps.ops.models import RetentionPolicy  # noqa: E402
from apps.ops.retention import retention_purge  # noqa: E402
from apps.recipients.models import Recipient  # noqa: E402
from apps.tenants.models import Tenant  # noqa: E402

HISTORY_PER_DELIVERY = 4
RETENTION_DAYS = 30
TABLES = "deliveries_deliveryevent, deliveries_delivery, deliveries_notification"


def uuid7_sql(*, at: str, salt: str) -> str:
    """A UUIDv7 made at the SQL timestamp `at`, its random part from `salt` (deterministic)."""
    return (
        f"(lpad(to_hex((extract(epoch FROM {at}) * 1000)::bigint), 12, '0') || '7' "
        f"|| substr(md5({salt}), 1, 3) || '8' || substr(md5({salt}), 4, 15))::uuid"
    )


def rows_generate(*, start: datetime, span: timedelta, count: int, tag: str, ids: dict[str, object]) -> None:
    """`count` notifications spread over [start, start + span), each with one delivered delivery
    and its history."""
    at = "(%(start)s::timestamptz + (i - 1) * %(step)s::interval)"
    notification_id = uuid7_sql(at=at, salt=f"'{tag}n' || i")
    delivery_id = uuid7_sql(at=f"({at} + interval '1 second')", salt=f"'{tag}d' || i")
    params = {"start": start, "step": span / count, "count": count, **ids}
    with transaction.atomic(), connection.cursor() as cursor:
        # The rows are valid by construction: their foreign key checks (a trigger a row) are
        # skipped, which needs a superuser, as the benchmark's database has.
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute(
            f"""INSERT INTO deliveries_notification (id, tenant_id, event_id, recipient_id, category_id,
                template_version_id, locale, priority, created_at)
            SELECT {notification_id}, %(tenant)s, %(event)s, %(recipient)s, %(category)s, %(version)s,
                '', 'bulk', {at}
            FROM generate_series(1, %(count)s) i""",
            params,
        )
        cursor.execute(
            f"""INSERT INTO deliveries_delivery (id, notification_id, channel, priority, status, status_reason,
                attempt_count, next_attempt_at, provider_message_id, sent_at, updated_at, resend_round,
                escalation, variant)
            SELECT {delivery_id}, {notification_id}, 'email', 'bulk', 'delivered', '', 1, {at},
                'msg-' || i, {at}, {at}, 0, false, ''
            FROM generate_series(1, %(count)s) i""",
            params,
        )
        cursor.execute(
            f"""INSERT INTO deliveries_deliveryevent (delivery_id, status, reason, attempt, detail, created_at)
            SELECT {delivery_id}, (ARRAY['queued', 'sending', 'sent', 'delivered'])[k], '', 1, '{{}}',
                {at} + k * interval '1 second'
            FROM generate_series(1, %(count)s) i CROSS JOIN generate_series(1, {HISTORY_PER_DELIVERY}) k""",
            params,
        )
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {TABLES}")


def world_ensure() -> dict[str, object]:
    tenant, _ = Tenant.objects.get_or_create(slug="partition-purge-bench", defaults={"name": "Purge bench"})
    RetentionPolicy.objects.update_or_create(tenant=tenant, defaults={"retention_days": RETENTION_DAYS})
    template, _ = Template.objects.get_or_create(tenant=tenant, key="purge-bench", defaults={"name": "purge"})
    version, _ = TemplateVersion.objects.get_or_create(template=template, number=1)
    category, _ = Category.objects.get_or_create(
        tenant=tenant, key="purge-bench", defaults={"template": template, "default_channels": ["email"]}
    )
    recipient, _ = Recipient.objects.get_or_create(tenant=tenant, external_id="purge-bench")
    event = Event.objects.create(tenant=tenant, category=category, request_digest="bench")
    return {
        "tenant": tenant.pk,
        "event": event.pk,
        "recipient": recipient.pk,
        "category": category.pk,
        "version": version.pk,
    }


def statement_timer(statements: list[tuple[float, str]]) -> Callable[..., Any]:
    """A connection wrapper that notes each statement's time (the drop's, to show where it goes)."""

    def timed(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.monotonic()
        try:
            return execute(sql, params, many, context)
        finally:
            statements.append((time.monotonic() - started, " ".join(sql.split())[:100]))

    return timed


def history_count() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM deliveries_deliveryevent")
        return int(cursor.fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partition-purge", type=int, required=True, help="history rows in the expired month")
    parser.add_argument("--next-month-rows", type=int, default=None, help="history rows kept (default: N/4)")
    args = parser.parse_args()
    if not tables_partitioned():
        sys.exit("The delivery tables are not partitioned here: this benchmark needs PostgreSQL, migrated.")
    history_rows = args.partition_purge - args.partition_purge % HISTORY_PER_DELIVERY
    kept_rows = args.next_month_rows if args.next_month_rows is not None else history_rows // 4
    # Two months ahead of the clock, so that the purge sees only this benchmark's rows: the
    # retention's "now" is put 30 days after the second month's first day.
    expired_month = month_next(start=month_next(start=month_start(at=datetime.now(tz=UTC))))
    kept_month = month_next(start=expired_month)
    partitions_ensure(now=expired_month, months_ahead=1)
    now = kept_month + timedelta(days=RETENTION_DAYS, hours=12)
    settings.NOTIFY_RETENTION_PAUSE_SECONDS = 0
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {TABLES} CASCADE")
    ids = world_ensure()
    print(
        f"machine: {os.cpu_count()} cores; PostgreSQL {connection.pg_version}; expired month {expired_month:%Y-%m}: "
        f"{history_rows:,} history rows ({history_rows // HISTORY_PER_DELIVERY:,} notifications and deliveries); "
        f"next month, kept: {kept_rows:,} history rows; batch {settings.NOTIFY_RETENTION_BATCH} notifications"
    )
    started = time.monotonic()
    rows_generate(start=kept_month + timedelta(days=1), span=timedelta(days=27), count=kept_rows // 4, tag="k", ids=ids)
    print(f"generated the kept month in {time.monotonic() - started:.1f} s")

    results = {}
    for mode in ("batches", "partitions"):
        started = time.monotonic()
        rows_generate(start=expired_month, span=timedelta(days=28), count=history_rows // 4, tag="e", ids=ids)
        print(f"generated the expired month in {time.monotonic() - started:.1f} s")
        before = history_count()
        statements: list[tuple[float, str]] = []
        started = time.monotonic()
        with connection.execute_wrapper(statement_timer(statements)):
            report = retention_purge(now=now, deadline=float("inf"), partitions=mode == "partitions")
        elapsed = time.monotonic() - started
        purged = before - history_count()
        assert purged == history_rows, f"{mode}: {purged:,} history rows purged, {history_rows:,} expected"
        results[mode] = elapsed
        detail = (
            f"{report.batches} batches, {report.notifications:,} notifications and {report.deliveries:,} deliveries"
            if mode == "batches"
            else f"{len(report.partitions)} month dropped, its longest transaction {report.partition_drop_seconds:.2f} s"
        )
        print(
            f"purge by {mode}: {purged:,} history rows in {elapsed:.2f} s = {purged / elapsed:,.0f} rows/s ({detail})"
        )
        if mode == "partitions":
            for seconds, sql in statements:
                if seconds >= 0.05:
                    print(f"  {seconds:6.2f} s  {sql}")
    print(f"dropping the month is {results['batches'] / results['partitions']:,.0f}x faster than the batches")
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {TABLES} CASCADE")
    Event.objects.filter(tenant_id=ids["tenant"]).delete()


if __name__ == "__main__":
    main()
