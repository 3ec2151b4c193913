"""Fan-out in claimed chunks, several planned at once (notify/pipeline/broadcast.py).

A broadcast fanning out while this is applied goes on from its cursor. Its claimed count starts
at what it planned, which is what placed a paced broadcast's chunks in time until now."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("audiences", "0003_reached_broadcast_key_unchecked"),
    ]

    operations = [
        migrations.AddField(
            model_name="broadcast",
            name="claimed_count",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunSQL(
            "UPDATE audiences_broadcast SET claimed_count = planned_count", reverse_sql=migrations.RunSQL.noop
        ),
        migrations.CreateModel(
            name="BroadcastChunk",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("after", models.UUIDField(blank=True, null=True)),
                ("until", models.UUIDField()),
                ("position", models.PositiveIntegerField()),
                ("lease_expires_at", models.DateTimeField(blank=True, null=True)),
                ("planned_at", models.DateTimeField(blank=True, null=True)),
                ("planned", models.PositiveIntegerField(default=0)),
                (
                    "broadcast",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="chunks", to="audiences.broadcast"
                    ),
                ),
            ],
        ),
    ]
