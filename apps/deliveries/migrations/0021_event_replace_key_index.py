"""The index that finds a replace key's older events: (tenant, replace_key), only for events
that have a key.

The events table is large and takes writes all the time, so on PostgreSQL the index is built
CONCURRENTLY (no lock that stops inserts). AddIndexConcurrently would fail on the demo's
SQLite, which gets a plain CREATE INDEX; the migration state records the model's index."""

from typing import Any

from django.db import migrations, models

INDEX = "event_replace_key"


def index_create(apps: Any, schema_editor: Any) -> None:
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    schema_editor.execute(
        f"CREATE INDEX {concurrently}IF NOT EXISTS {INDEX} ON deliveries_event (tenant_id, replace_key) "
        "WHERE replace_key IS NOT NULL"
    )


def index_drop(apps: Any, schema_editor: Any) -> None:
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    schema_editor.execute(f"DROP INDEX {concurrently}IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [("deliveries", "0020_superseded_and_replace_key")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddIndex(
                    model_name="event",
                    index=models.Index(
                        condition=models.Q(replace_key__isnull=False),
                        fields=["tenant", "replace_key"],
                        name=INDEX,
                    ),
                )
            ],
            database_operations=[migrations.RunPython(index_create, index_drop)],
        )
    ]
