"""Bulk statements for the hot path: the thousands of rows one ingest or one batch reads and
writes."""

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Self, cast
from uuid import UUID

from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import EmptyResultSet
from django.db import DEFAULT_DB_ALIAS, OperationalError, connection, connections, models
from django.db.models.base import ModelState
from django.db.models.lookups import In
from psycopg.types.json import Jsonb
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random


def _is_lock_conflict(error: BaseException) -> bool:
    """A deadlock or serialization failure: the database rolled back, and a retry is safe."""
    return isinstance(error, OperationalError) and getattr(error.__cause__, "sqlstate", None) in ("40P01", "40001")


# For a transaction that takes many row locks at once: run it again if PostgreSQL aborted it
# to break a deadlock with another such transaction.
retry_lock_conflicts = retry(
    retry=retry_if_exception(_is_lock_conflict), stop=stop_after_attempt(3), wait=wait_random(0, 0.05), reraise=True
)


@models.UUIDField.register_lookup
class AnyOf(In):
    """`id__any_of=[...]` on a uuid field: IN, written on PostgreSQL as `= ANY(%s)` with the
    values as one array. The statement's text is then the same for 1 or 500 values, so the
    driver converts it once and PostgreSQL parses a short statement, instead of one with 500
    placeholders each time; that conversion cost more than the claim's work did."""

    lookup_name = "any_of"

    def get_prep_lookup(self) -> Any:
        # Not converted one by one (In would make 500 UUID objects): uuid_array writes them
        # as given and PostgreSQL checks them; other databases convert them as they bind.
        return list(self.rhs)

    def as_postgresql(self, compiler: Any, connection: Any) -> tuple[str, list[Any]]:
        if not self.rhs:
            raise EmptyResultSet
        lhs, lhs_params = self.process_lhs(compiler, connection)
        return f"{lhs} = ANY(%s::uuid[])", [*lhs_params, uuid_array(self.rhs)]


class PrimaryKeyPath(models.Func):
    """A text column's value written as an expression (`status || ''`), which no partial
    index's predicate can match. For a statement that names its rows by primary key and
    checks their status too: the partial indexes on status keep an entry for each row version
    that ever matched, until VACUUM, so they span the whole backlog, and the planner, which
    expects few rows in them, took a claim of 500 rows through one and read every queued
    row. Compared this way, the rows can only be found by primary key."""

    template = "(%(expressions)s || '')"
    output_field = models.CharField()


def uuid_array(values: Iterable[UUID | str]) -> str:
    """A uuid[] parameter, as PostgreSQL's array text. The driver would adapt a list element
    by element and quote each one; joining them is several times cheaper, and a uuid needs
    no quoting inside an array."""
    return "{" + ",".join(map(str, values)) + "}"


class LeanLoading:
    """For models the pipeline builds or loads by the thousand. Django builds an instance
    through __init__, which sets every field through its descriptor and sends two signals;
    this fills the instance's fields directly. Loading goes through Django's documented hook
    for customising it (Model.from_db), with the same result: fields not loaded stay deferred.
    Nothing listens to pre_init or post_init for these models."""

    _state: ModelState
    _meta: Any

    @classmethod
    def new(cls, **values: Any) -> Self:
        """An unsaved instance, as Model(**values) makes it: each field's default, then the
        values, given by field name (a related object) or attribute name (its id)."""
        blueprint = _blueprint(cast(Any, cls))  # a model class is hashable; the stubs do not say so
        instance = cls.__new__(cls)
        fields = instance.__dict__
        fields.update(blueprint.constants)
        for attname, make in blueprint.factories:
            if attname not in values:
                fields[attname] = make()
        instance._state = ModelState()
        for name, value in values.items():
            related_attname = blueprint.relations.get(name)
            if related_attname is not None:
                fields[related_attname] = value.pk
                instance._state.fields_cache[name] = value
            elif name in blueprint.attnames:
                fields[name] = value
            else:
                raise TypeError(f"{cls.__name__} has no field '{name}'")
        return instance

    @classmethod
    def from_db(
        cls,
        db: str | None,
        field_names: Collection[str],
        values: Collection[Any],
        *,
        fetch_mode: Any = None,  # in the type stubs for a later Django; 5.2 does not pass it
    ) -> Self:
        instance = cls.__new__(cls)
        instance.__dict__.update(zip(field_names, values, strict=True))
        instance._state = ModelState()
        instance._state.adding = False
        instance._state.db = db
        return instance


@dataclass(frozen=True)
class _Blueprint:
    constants: dict[str, Any]  # attname -> default
    factories: list[tuple[str, Callable[[], Any]]]  # attname -> a callable default (uuid4, dict)
    relations: dict[str, str]  # a foreign key's name -> its attname
    attnames: frozenset[str]


@cache
def _blueprint(model: Any) -> _Blueprint:
    fields = model._meta.concrete_fields
    return _Blueprint(
        constants={f.attname: f.get_default() for f in fields if not (f.has_default() and callable(f.default))},
        factories=[(f.attname, f.default) for f in fields if f.has_default() and callable(f.default)],
        relations={f.name: f.attname for f in fields if f.is_relation},
        attnames=frozenset(f.attname for f in fields),
    )


# Below this many rows a plain multi-row INSERT is as cheap as COPY and needs fewer round trips.
COPY_FROM_ROWS = 50


def copy_pays(*, rows: int) -> bool:
    """Whether to insert this many rows through COPY (rows_copy) rather than bulk_create():
    on PostgreSQL, and only for enough rows (the demo's SQLite has no COPY)."""
    return connection.vendor == "postgresql" and rows >= COPY_FROM_ROWS


def rows_insert(*, objects: Sequence[models.Model]) -> None:
    """Insert new model instances. On PostgreSQL this streams them through COPY, which
    skips the ORM's per-value query building: several times cheaper than bulk_create()
    at a thousand rows. For a few rows, and on SQLite (the demo), it is bulk_create()."""
    if not objects:
        return
    model = type(objects[0])
    if not copy_pays(rows=len(objects)):
        model._default_manager.bulk_create(objects)
        return
    fields = [f for f in model._meta.concrete_fields if not isinstance(f, models.AutoField)]
    # pre_save fills auto_now(_add) fields, as save() would.
    rows_copy(model=model, fields=fields, rows=([f.pre_save(obj, add=True) for f in fields] for obj in objects))
    for obj in objects:
        obj._state.adding = False
        obj._state.db = connection.alias


def rows_insert_new(*, objects: Sequence[models.Model]) -> int:
    """Insert new model instances, skipping any whose unique key a row holds already: what
    bulk_create(ignore_conflicts=True) does, as one INSERT … SELECT FROM unnest() of an array
    a column, which PostgreSQL parses and plans once for the batch. 250 inbox items take 27 ms
    this way against 41 ms as a pipelined statement a row, itself 3x cheaper than bulk_create's
    one statement with a parameter a value. The values are prepared as bulk_create prepares
    them (encrypted fields included). Returns how many rows were inserted."""
    if not objects:
        return 0
    model = type(objects[0])
    fields = [f for f in model._meta.concrete_fields if not isinstance(f, models.AutoField)]
    # The connection itself, not django.db.connection: each attribute read through that proxy
    # goes through a context-local lookup, and preparing a value reads several (half the cost).
    database = connections[DEFAULT_DB_ALIAS]
    rows = [[f.get_db_prep_save(f.pre_save(obj, add=True), database) for f in fields] for obj in objects]
    quote = connection.ops.quote_name
    table, columns = quote(str(model._meta.db_table)), ", ".join(quote(str(f.column)) for f in fields)
    if connection.vendor != "postgresql":  # the demo's SQLite: a statement a row
        with connection.cursor() as cursor:
            placeholders = ", ".join(["%s"] * len(fields))
            cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING", rows)
            return cursor.rowcount
    arrays, array_types, selected = [], [], []
    for position, field in enumerate(fields):
        column_type = field.db_type(database)
        values = [row[position] for row in rows]
        if isinstance(field, ArrayField):
            # unnest() would flatten an array of arrays: each row's array goes as its literal.
            values = [None if value is None else _array_literal(value) for value in values]
            array_types.append("text[]")
            selected.append(f"c{position}::{column_type}")
        else:
            array_types.append(f"{column_type}[]")
            selected.append(f"c{position}")
        arrays.append(values)
    statement = (
        f"INSERT INTO {table} ({columns}) "
        f"SELECT {', '.join(selected)} "
        f"FROM unnest({', '.join(f'%s::{t}' for t in array_types)}) AS v({', '.join(f'c{i}' for i in range(len(fields)))}) "
        "ON CONFLICT DO NOTHING"
    )
    with connection.cursor() as cursor:
        cursor.execute(statement, arrays)
        return cursor.rowcount


def _array_literal(values: Iterable[Any]) -> str:
    """PostgreSQL's text form of a one-dimensional array: '{"a","b \\"c\\""}'."""
    elements = (
        "NULL" if value is None else '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        for value in values
    )
    return "{" + ",".join(elements) + "}"


def rows_copy(*, model: type[models.Model], fields: Sequence[Any], rows: Iterable[Sequence[Any]]) -> None:
    """COPY rows of values, in the order of `fields`, into the model's table (PostgreSQL)."""
    columns = ", ".join(connection.ops.quote_name(str(f.column)) for f in fields)
    json_positions = [i for i, f in enumerate(fields) if isinstance(f, models.JSONField)]
    connection.ensure_connection()
    # The raw COPY bypasses Django's cursor wrapper: its errors are wrapped here, so that a
    # lost database is Django's OperationalError (the API's 503) like any other query's.
    with connection.wrap_database_errors, connection.cursor() as cursor:
        with cursor.cursor.copy(
            f"COPY {connection.ops.quote_name(str(model._meta.db_table))} ({columns}) FROM STDIN"
        ) as copy:
            for row in rows:
                if json_positions:
                    row = list(row)
                    for i in json_positions:
                        row[i] = Jsonb(row[i])
                copy.write_row(row)
