"""The index a broadcast's fan-out walks its audience by: (tenant, id), from the chunk cursor.
Without it each chunk read and sorted every recipient of the tenant to find the next 5,000.

The recipients table is large and takes writes all the time, so on PostgreSQL the index is
built CONCURRENTLY (no lock that stops inserts); the demo's SQLite gets a plain CREATE INDEX.
The migration state records the model's index."""

from typing import Any

from django.db import migrations, models

INDEX = "recipient_tenant_id"


def index_create(apps: Any, schema_editor: Any) -> None:
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    schema_editor.execute(f"CREATE INDEX {concurrently}IF NOT EXISTS {INDEX} ON recipients_recipient (tenant_id, id)")


def index_drop(apps: Any, schema_editor: Any) -> None:
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    schema_editor.execute(f"DROP INDEX {concurrently}IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [("recipients", "0009_recipient_erased_at")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddIndex(
                    model_name="recipient", index=models.Index(fields=["tenant", "id"], name=INDEX)
                )
            ],
            database_operations=[migrations.RunPython(index_create, index_drop)],
        )
    ]
