"""Bulk statements for the hot path: the thousands of rows one ingest or one batch reads and
writes."""

from collections.abc import Iterable, Sequence
from typing import Any
from uuid import UUID

from django.core.exceptions import EmptyResultSet
from django.db import connection, models
from django.db.models.lookups import In
from psycopg.types.json import Jsonb


@models.UUIDField.register_lookup
class AnyOf(In):
    """`id__any_of=[...]` on a uuid field: IN, written on PostgreSQL as `= ANY(%s)` with the values as one
    array. The statement's text is then the same for 1 or 500 values, so the driver converts
    it once and PostgreSQL parses a short statement, instead of one with 500 placeholders
    each time; that conversion cost more than the claim's work did."""

    lookup_name = "any_of"

    def as_postgresql(self, compiler: Any, connection: Any) -> tuple[str, list[Any]]:
        if not self.rhs:
            raise EmptyResultSet
        lhs, lhs_params = self.process_lhs(compiler, connection)
        return f"{lhs} = ANY(%s::uuid[])", [*lhs_params, uuid_array(self.rhs)]


def uuid_array(values: Iterable[UUID | str]) -> str:
    """A uuid[] parameter, as PostgreSQL's array text. The driver would adapt a list element
    by element and quote each one; joining them is several times cheaper, and a uuid needs
    no quoting inside an array."""
    return "{" + ",".join(map(str, values)) + "}"


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
