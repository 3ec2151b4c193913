"""A reached row's broadcast is no longer checked by PostgreSQL; the relation stays, and Django
still cascades a broadcast's deletion to its reached rows.

A fan-out chunk writes its reached rows while it holds its broadcast's row (locked until the
chunk commits), so the broadcast exists; the check cost about 7 µs a row at the chunk's commit,
5,000 a chunk. A broadcast deleted while a chunk commits can leave that chunk's rows behind,
naming nobody; `manage.py orphans_check` counts them.

Dropping a constraint takes a brief lock and scans nothing. The demo's SQLite keeps its key."""

from typing import Any

from django.db import migrations, models

TABLE, COLUMN, TARGET = "audiences_broadcastrecipient", "broadcast_id", "audiences_broadcast"


def key_drop(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND confrelid = %s::regclass"
            " AND contype = 'f'",
            [TABLE, TARGET],
        )
        for (name,) in cursor.fetchall():
            cursor.execute(f'ALTER TABLE {TABLE} DROP CONSTRAINT "{name}"')


def key_add(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_{COLUMN}_fk FOREIGN KEY ({COLUMN})"
            f" REFERENCES {TARGET} (id) DEFERRABLE INITIALLY DEFERRED"
        )


class Migration(migrations.Migration):
    dependencies = [("audiences", "0002_broadcast_control_permission")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="broadcastrecipient",
                    name="broadcast",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="+",
                        to="audiences.broadcast",
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(key_drop, key_add)],
        )
    ]
