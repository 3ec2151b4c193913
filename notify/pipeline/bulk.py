"""Bulk inserts for the hot path: the thousands of rows one ingest or one batch writes."""

from collections.abc import Sequence

from django.db import connection, models
from psycopg.types.json import Jsonb

# Below this many rows a plain multi-row INSERT is as cheap as COPY and needs fewer round trips.
COPY_FROM_ROWS = 50


def rows_insert(*, objects: Sequence[models.Model]) -> None:
    """Insert new model instances. On PostgreSQL this streams them through COPY, which
    skips the ORM's per-value query building: several times cheaper than bulk_create()
    at a thousand rows. For a few rows, and on SQLite (the demo), it is bulk_create()."""
    if not objects:
        return
    model = type(objects[0])
    if connection.vendor != "postgresql" or len(objects) < COPY_FROM_ROWS:
        model._default_manager.bulk_create(objects)
        return
    fields = [f for f in model._meta.concrete_fields if not isinstance(f, models.AutoField)]
    columns = ", ".join(connection.ops.quote_name(str(f.column)) for f in fields)
    json_fields = {f.attname for f in fields if isinstance(f, models.JSONField)}
    connection.ensure_connection()
    with connection.cursor() as cursor:
        with cursor.cursor.copy(
            f"COPY {connection.ops.quote_name(str(model._meta.db_table))} ({columns}) FROM STDIN"
        ) as copy:
            for obj in objects:
                # pre_save fills auto_now(_add) fields, as save() would.
                row = [f.pre_save(obj, add=True) for f in fields]
                copy.write_row([Jsonb(v) if f.attname in json_fields else v for f, v in zip(fields, row, strict=True)])
    for obj in objects:
        obj._state.adding = False
        obj._state.db = connection.alias
