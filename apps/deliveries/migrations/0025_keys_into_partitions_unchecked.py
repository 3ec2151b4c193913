"""The foreign keys that point into the partitioned tables (a delivery's notification, a history
row's delivery, and the dead letters, early feedback, inbox items and canary runs that name a
delivery) are no longer checked by PostgreSQL; the relations stay, and Django still cascades.

A key checked against a partitioned table costs 30-55 µs a row, seven times the insert it
guards, because each check locks every partition and its indexes; a delivery pays it three
times (its own row and two history rows), a broadcast's fan-out for every recipient, and it
grows with the number of months. The pipeline writes each child row while its parent exists;
retention deletes what points at a row before the row (apps/ops/retention.py), and a month's
partitions detach without PostgreSQL scanning every table that could point into them.
`manage.py orphans_check` counts any row that names a missing one.

Dropping a constraint takes a brief lock and scans nothing. The demo's SQLite keeps its keys.
All six keys are dropped here, including those of the inbox and ops tables, whose migrations
record the change in their state only."""

from django.db import migrations, models

from apps.deliveries.partitions import keys_unchecked_operation

# (table, column, the partitioned table it points at)
KEYS = (
    ("deliveries_delivery", "notification_id", "deliveries_notification"),
    ("deliveries_deliveryevent", "delivery_id", "deliveries_delivery"),
    ("deliveries_earlyfeedback", "delivery_id", "deliveries_delivery"),
    ("deliveries_deadletter", "delivery_id", "deliveries_delivery"),
    ("inbox_inboxitem", "delivery_id", "deliveries_delivery"),
    ("ops_canaryrun", "delivery_id", "deliveries_delivery"),
)


class Migration(migrations.Migration):
    dependencies = [
        ("deliveries", "0024_time_partitions"),
        ("inbox", "0003_inbox_features"),
        ("ops", "0007_rollup_variant"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="delivery",
                    name="notification",
                    field=models.ForeignKey(
                        db_constraint=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="deliveries",
                        to="deliveries.notification",
                    ),
                ),
                migrations.AlterField(
                    model_name="deliveryevent",
                    name="delivery",
                    field=models.ForeignKey(
                        db_constraint=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="events",
                        to="deliveries.delivery",
                    ),
                ),
                migrations.AlterField(
                    model_name="earlyfeedback",
                    name="delivery",
                    field=models.ForeignKey(
                        db_constraint=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="+",
                        to="deliveries.delivery",
                    ),
                ),
                migrations.AlterField(
                    model_name="deadletter",
                    name="delivery",
                    field=models.ForeignKey(
                        db_constraint=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="dead_letters",
                        to="deliveries.delivery",
                    ),
                ),
            ],
            database_operations=[keys_unchecked_operation(keys=KEYS)],
        )
    ]
