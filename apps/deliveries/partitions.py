"""Monthly partitions of the notifications, deliveries and delivery history tables.

The three tables are range-partitioned on UUIDv7 keys, which begin with their creation time in
milliseconds: notifications and deliveries on their own ids, the history on its delivery's id,
so that a delivery's history lives in the partition of the same months as the delivery. A month
is the range of ids from the first UUIDv7 of its first instant to the first of the next month's,
and all three tables share the same bounds. Keeping the primary key on the id alone lets the
other tables' foreign keys point at the partitioned tables, and a lookup by id reads one
partition. Rows from before the ids were time-ordered (random UUIDv4 ids) live in the
`before` and `beyond` partitions below and above the months, or in the default partition when
they fall among the months (docs/architecture.md, "Partitioned tables")."""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from django.apps import apps as django_apps
from django.db import connection, migrations, models, transaction

# (table, partition key). Parents before children: that is the order of creation.
PARTITIONED_TABLES = (
    ("deliveries_notification", "id"),
    ("deliveries_delivery", "id"),
    ("deliveries_deliveryevent", "delivery_id"),
)
# Months are created up to here; anything above (random ids) lies in the `beyond` partition.
MONTHS_END = datetime(2100, 1, 1, tzinfo=UTC)
# A month whose range holds rows of the default partition (ids made before time-ordered ids,
# or rows written while the month had no partition yet) is made of the gaps between them; gaps
# shorter than this stay in the default partition rather than becoming tiny partitions.
GAP_MIN_MILLISECONDS = 3_600_000
LOCK_TIMEOUT = "5s"
# One creator at a time (two beat runs, or a run beside a migration).
ADVISORY_LOCK = 0x70617274  # "part"

_BOUND = re.compile(r"FOR VALUES FROM \((?P<lower>[^)]*)\) TO \((?P<upper>[^)]*)\)")


@dataclass(frozen=True)
class Partition:
    name: str
    # None: MINVALUE / MAXVALUE.
    lower: UUID | None
    upper: UUID | None


def uuid7_floor(*, at: datetime) -> UUID:
    """The smallest UUIDv7 that can be made at or after this instant."""
    return UUID(int=int(at.timestamp() * 1000) << 80)


def uuid7_time(*, value: UUID) -> datetime:
    """When a UUIDv7 was made (for a random id, a meaningless time)."""
    return datetime.fromtimestamp((value.int >> 80) / 1000, tz=UTC)


def month_start(*, at: datetime) -> datetime:
    return at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def month_next(*, start: datetime) -> datetime:
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def tables_partitioned() -> bool:
    """Whether this database has the partitioned tables (PostgreSQL; the demo's SQLite does not)."""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", [PARTITIONED_TABLES[0][0]])
        row = cursor.fetchone()
    return row is not None and row[0] == "p"


def partitions_list(*, table: str) -> tuple[list[Partition], str | None]:
    """The table's range partitions, lowest first, and the name of its default partition."""
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)""",
            [table],
        )
        rows = cursor.fetchall()
    ranges, default = [], None
    for name, bound in rows:
        match = _BOUND.search(bound)
        if match is None:  # FOR VALUES DEFAULT
            default = name
            continue
        ranges.append(Partition(name=name, lower=_bound_value(match["lower"]), upper=_bound_value(match["upper"])))
    ranges.sort(key=lambda p: -1 if p.lower is None else p.lower.int)
    return ranges, default


def _bound_value(text: str) -> UUID | None:
    text = text.strip()
    return None if text in ("MINVALUE", "MAXVALUE") else UUID(text.strip("'"))


def _overlaps(partition: Partition, *, lower: UUID, upper: UUID) -> bool:
    starts_before_end = partition.lower is None or partition.lower.int < upper.int
    ends_after_start = partition.upper is None or partition.upper.int > lower.int
    return starts_before_end and ends_after_start


def partitions_ensure(*, now: datetime, months_ahead: int) -> list[str]:
    """Create this month's partitions and the next `months_ahead` months' where they are
    missing, in all the partitioned tables at once; returns the partitions created."""
    if not tables_partitioned():
        return []
    created: list[str] = []
    start = month_start(at=now)
    for _ in range(months_ahead + 1):
        end = month_next(start=start)
        if end > MONTHS_END:
            break
        created += _month_ensure(start=start, end=end)
        start = end
    return created


def _month_ensure(*, start: datetime, end: datetime) -> list[str]:
    lower, upper = uuid7_floor(at=start), uuid7_floor(at=end)
    created = []
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [ADVISORY_LOCK])
        # A creator waits on nobody for long, and makes nobody wait long: the next run retries.
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        listed = {table: partitions_list(table=table) for table, _ in PARTITIONED_TABLES}
        if any(_overlaps(p, lower=lower, upper=upper) for p in listed[PARTITIONED_TABLES[0][0]][0]):
            return []
        # Rows already in a default partition inside the month stay there: the month is made
        # of the ranges between them (a new partition may hold no row its default holds).
        taken: set[int] = set()
        for table, key in PARTITIONED_TABLES:
            default = listed[table][1]
            if default:
                # Held until the month is made: a row written meanwhile would make it fail.
                cursor.execute(f"LOCK TABLE {default} IN SHARE ROW EXCLUSIVE MODE")
                cursor.execute(f"SELECT DISTINCT {key} FROM {default} WHERE {key} >= %s AND {key} < %s", [lower, upper])
                taken.update(row[0].int for row in cursor.fetchall())
        ranges = _gaps(lower=lower.int, upper=upper.int, taken=sorted(taken))
        for table, _ in PARTITIONED_TABLES:
            for index, (gap_lower, gap_upper) in enumerate(ranges):
                suffix = f"_{index}" if len(ranges) > 1 else ""
                name = f"{table}_p{start:%Y_%m}{suffix}"
                cursor.execute(
                    f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM (%s) TO (%s)",
                    [str(UUID(int=gap_lower)), str(UUID(int=gap_upper))],
                )
                created.append(name)
    return created


def _gaps(*, lower: int, upper: int, taken: list[int]) -> list[tuple[int, int]]:
    gap_min = GAP_MIN_MILLISECONDS << 80
    ranges, start = [], lower
    for value in [*taken, upper]:
        if value - start >= gap_min or (value == upper and start == lower):
            ranges.append((start, value))
        start = value + 1
    return ranges


def keys_unchecked_operation(*, keys: Sequence[tuple[str, str, str]]) -> migrations.RunPython:
    """A migration's operation that stops PostgreSQL checking each (table, column, table it
    points at) foreign key, and checks it again when reversed. PostgreSQL only: the demo's
    SQLite keeps its keys."""

    def drop(apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        with schema_editor.connection.cursor() as cursor:
            for table, _, target in keys:
                # The top-level constraint only: on a partitioned table, dropping it drops its
                # copies on each partition.
                cursor.execute(
                    """SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass
                    AND confrelid = %s::regclass AND contype = 'f' AND conparentid = 0""",
                    [table, target],
                )
                for (name,) in cursor.fetchall():
                    cursor.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')

    def add(apps: Any, schema_editor: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        with schema_editor.connection.cursor() as cursor:
            for table, column, target in keys:
                cursor.execute(
                    f"ALTER TABLE {table} ADD CONSTRAINT {table}_{column}_fk FOREIGN KEY ({column})"
                    f" REFERENCES {target} (id) DEFERRABLE INITIALLY DEFERRED"
                )

    return migrations.RunPython(drop, add)


def unchecked_keys() -> list[tuple[type[models.Model], models.ForeignKey]]:
    """The foreign keys PostgreSQL does not check and the code keeps: into the partitioned
    tables (migration deliveries.0025), a notification's tenant, category and version (0026),
    a reached row's broadcast (audiences.0003). A key that may name a row gone since
    (an audit entry's tenant, a rollup's category) says so with DO_NOTHING, and is left out."""
    return [
        (model, field)
        for model in django_apps.get_models()
        for field in model._meta.concrete_fields
        if isinstance(field, models.ForeignKey) and field.remote_field.on_delete is not models.DO_NOTHING
        if not field.db_constraint  # type: ignore[attr-defined]  # set by ForeignKey.__init__, not in the stubs
    ]


def orphans_count() -> dict[str, int]:
    """For each unchecked key, how many rows name a row that does not exist, by
    "table.column". Each is one anti-join over the whole table: for an operator's check, not
    for a hot path."""
    quote = connection.ops.quote_name
    counts = {}
    with connection.cursor() as cursor:
        for model, field in unchecked_keys():
            child, column = quote(model._meta.db_table), quote(str(field.column))
            parent, parent_key = quote(field.related_model._meta.db_table), quote(str(field.target_field.column))
            cursor.execute(
                f"SELECT count(*) FROM {child} c WHERE c.{column} IS NOT NULL"
                f" AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE p.{parent_key} = c.{column})"
            )
            counts[f"{model._meta.db_table}.{field.column}"] = cursor.fetchone()[0]
    return counts
