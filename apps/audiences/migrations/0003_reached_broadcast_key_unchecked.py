"""A reached row's broadcast is no longer checked by PostgreSQL; the relation stays, and Django
still cascades a broadcast's deletion to its reached rows.

A fan-out chunk writes its reached rows while it holds its broadcast's row (locked until the
chunk commits), so the broadcast exists; the check cost about 7 µs a row at the chunk's commit,
5,000 a chunk. A broadcast deleted while a chunk commits can leave that chunk's rows behind,
naming nobody; `manage.py orphans_check` counts them.

Dropping a constraint takes a brief lock and scans nothing. The demo's SQLite keeps its key."""

from django.db import migrations, models

from apps.deliveries.partitions import keys_unchecked_operation


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
            database_operations=[
                keys_unchecked_operation(keys=[("audiences_broadcastrecipient", "broadcast_id", "audiences_broadcast")])
            ],
        )
    ]
