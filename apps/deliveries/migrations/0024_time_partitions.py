"""Notifications, deliveries and the delivery history become tables partitioned by month on
their UUIDv7 keys (apps/deliveries/partitions.py), on PostgreSQL; the models do not change.

Each table is rebuilt: a partitioned twin is made with the same columns, its rows are copied
over, the old table is dropped, and the twin takes its name, its primary key, its indexes and
its constraints under their old names, and the foreign keys that pointed at the old table. The
history's primary key becomes (id, delivery_id), as a partitioned table's must hold its
partition key; its ids still come from the same sequence position.

The partitions: `before` holds every id below this month's (older time-ordered ids, and the
random ids that sort low), one partition a month for this month and the next three, `beyond`
holds the random ids that sort above 2100, and the default partition the few random ids that
fall among the months. The tables are locked while they are copied: on a large installation
this migration takes a maintenance window."""

from datetime import UTC, datetime
from typing import Any

from django.db import migrations

TABLES = (
    ("deliveries_notification", "id"),
    ("deliveries_delivery", "id"),
    ("deliveries_deliveryevent", "delivery_id"),
)
MONTHS_AHEAD = 3
MONTHS_END = datetime(2100, 1, 1, tzinfo=UTC)


def uuid7_floor(at: datetime) -> str:
    value = int(at.timestamp() * 1000) << 80
    hexed = f"{value:032x}"
    return f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"


def months(now: datetime) -> list[tuple[datetime, datetime]]:
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spans = []
    for _ in range(MONTHS_AHEAD + 1):
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        spans.append((start, end))
        start = end
    return spans


def table_facts(cursor: Any, table: str) -> dict[str, Any]:
    """What the rebuilt table must get back: indexes, constraints, and the keys pointing at it."""
    cursor.execute(
        """SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
        WHERE indrelid = %s::regclass AND NOT indisprimary""",
        [table],
    )
    indexes = cursor.fetchall()
    cursor.execute(
        """SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE conrelid = %s::regclass AND contype = 'f' AND conparentid = 0""",
        [table],
    )
    outgoing = cursor.fetchall()
    cursor.execute(
        """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE confrelid = %s::regclass AND contype = 'f' AND conrelid <> confrelid AND conparentid = 0""",
        [table],
    )
    incoming = cursor.fetchall()
    cursor.execute("SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'p'", [table])
    primary_key = cursor.fetchone()[0]
    return {"indexes": indexes, "outgoing": outgoing, "incoming": incoming, "primary_key": primary_key}


def table_rebuild(
    cursor: Any, *, table: str, primary_key_columns: str, partition_by: str | None, partitions: list[tuple[str, str]]
) -> None:
    """Rebuild `table` as partitioned by `partition_by` (or, going back, as a plain table)."""
    facts = table_facts(cursor, table)
    twin = f"{table}_rebuilt"
    partitioning = f" PARTITION BY RANGE ({partition_by})" if partition_by else ""
    cursor.execute(
        f"CREATE TABLE {twin} (LIKE {table} INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING CONSTRAINTS){partitioning}"
    )
    for suffix, bound in partitions:
        cursor.execute(f"CREATE TABLE {table}_{suffix} PARTITION OF {twin} {bound}")
    cursor.execute(f"INSERT INTO {twin} SELECT * FROM {table}")
    cursor.execute(f"DROP TABLE {table} CASCADE")
    cursor.execute(f"ALTER TABLE {twin} RENAME TO {table}")
    # The history's identity sequence was made anew with the twin: it goes on from the last id.
    cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", [table])
    sequence = cursor.fetchone()[0]
    if sequence:
        cursor.execute(f"ALTER SEQUENCE {sequence} RENAME TO {table}_id_seq")
        cursor.execute(f"SELECT setval('{table}_id_seq', COALESCE(max(id), 0) + 1, false) FROM {table}")
    cursor.execute(f"ALTER TABLE {table} ADD CONSTRAINT {facts['primary_key']} PRIMARY KEY ({primary_key_columns})")
    for _, definition in facts["indexes"]:
        cursor.execute(definition)
    for name, definition in facts["outgoing"]:
        cursor.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
    for referencing, name, definition in facts["incoming"]:
        if referencing != table:
            cursor.execute(f"ALTER TABLE {referencing} ADD CONSTRAINT {name} {definition}")


def partitioned_layout(now: datetime) -> list[tuple[str, str]]:
    spans = months(now)
    layout = [("before", f"FOR VALUES FROM (MINVALUE) TO ('{uuid7_floor(spans[0][0])}')")]
    for start, end in spans:
        layout.append((f"p{start:%Y_%m}", f"FOR VALUES FROM ('{uuid7_floor(start)}') TO ('{uuid7_floor(end)}')"))
    layout.append(("beyond", f"FOR VALUES FROM ('{uuid7_floor(MONTHS_END)}') TO (MAXVALUE)"))
    layout.append(("default", "DEFAULT"))
    return layout


def partition(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    layout = partitioned_layout(datetime.now(tz=UTC))
    with schema_editor.connection.cursor() as cursor:
        for table, key in TABLES:
            columns = "id, delivery_id" if key == "delivery_id" else "id"
            table_rebuild(cursor, table=table, primary_key_columns=columns, partition_by=key, partitions=layout)


def unpartition(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        for table, _ in TABLES:
            table_rebuild(cursor, table=table, primary_key_columns="id", partition_by=None, partitions=[])


class Migration(migrations.Migration):
    dependencies = [
        ("deliveries", "0023_delivery_variant"),
        # Every migration that adds an index or a foreign key to these tables comes first.
        ("ops", "0007_rollup_variant"),
        ("inbox", "0003_inbox_features"),
        ("audiences", "0002_broadcast_control_permission"),
    ]

    operations = [migrations.RunPython(partition, unpartition)]
