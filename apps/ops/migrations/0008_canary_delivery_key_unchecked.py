"""A canary run's key to its delivery is no longer checked by PostgreSQL: the constraint is
dropped by deliveries.0025, which says why; this records it in the state."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("ops", "0007_rollup_variant"),
        ("deliveries", "0025_keys_into_partitions_unchecked"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="canaryrun",
                    name="delivery",
                    field=models.ForeignKey(
                        blank=True,
                        db_constraint=False,
                        null=True,
                        on_delete=models.deletion.SET_NULL,
                        related_name="+",
                        to="deliveries.delivery",
                    ),
                )
            ]
        )
    ]
