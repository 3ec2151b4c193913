"""The project's PostgreSQL backend (config/postgresql): timestamps come back exactly as
Django's own loader gives them, aware and in UTC, whatever the session's time zone."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.db import connection, transaction
from django.db.backends.postgresql.psycopg_any import register_tzloader
from psycopg.postgres import types
from psycopg.pq import Format

from config.postgresql.base import UtcTimestamptzLoader

pytestmark = pytest.mark.django_db

VALUES = [
    "2026-12-07 09:17:36.831234+00",
    "2026-12-07 09:17:36+00",
    "0001-01-01 00:00:00+00",
    "9999-12-30 12:00:00.999999+00",
    "2024-02-29 23:30:00.5-05:30",
]
QUERY = "SELECT " + ", ".join(f"'{value}'::timestamptz" for value in VALUES)


def test_the_connection_reads_timestamps_with_the_fast_loader() -> None:
    connection.ensure_connection()
    loader = connection.connection.adapters.get_loader(types["timestamptz"].oid, Format.TEXT)
    assert loader is UtcTimestamptzLoader


def test_timestamps_read_as_djangos_loader_reads_them() -> None:
    with connection.cursor() as cursor:
        cursor.execute(QUERY)
        fast = cursor.fetchone()
        register_tzloader(UTC, cursor.cursor)  # Django's own loader, on this cursor only
        cursor.execute(QUERY)
        django = cursor.fetchone()
    assert fast == django
    assert all(value.tzinfo is UTC for value in fast)
    assert fast[0] == datetime(2026, 12, 7, 9, 17, 36, 831234, tzinfo=UTC)
    assert fast[4] == datetime(2024, 2, 29, 23, 30, 0, 500000, tzinfo=timezone(-timedelta(hours=5, minutes=30)))


def test_a_session_in_another_zone_still_reads_the_right_instants_in_utc() -> None:
    """Django sets every session to UTC; should one drift (a pooler, a SET by hand), the
    values are converted, never relabelled."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT set_config('TimeZone', 'Asia/Kathmandu', true)")
        cursor.execute(QUERY)
        values = cursor.fetchone()
    assert all(value.tzinfo is UTC for value in values)
    assert values[0] == datetime(2026, 12, 7, 9, 17, 36, 831234, tzinfo=UTC)
    assert values[4] == datetime(2024, 3, 1, 5, 0, 0, 500000, tzinfo=UTC)


def test_what_iso_parsing_refuses_still_goes_through_djangos_loader() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT '294276-12-31 23:59:59+00'::timestamptz")  # past Python's year 9999
        with pytest.raises(Exception, match="year"):
            cursor.fetchone()
