"""An inbox item's key to its delivery is no longer checked by PostgreSQL: the constraint is
dropped by deliveries.0025, which says why; this records it in the state."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("inbox", "0003_inbox_features"),
        ("deliveries", "0025_keys_into_partitions_unchecked"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="inboxitem",
                    name="delivery",
                    field=models.OneToOneField(
                        db_constraint=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="inbox_item",
                        to="deliveries.delivery",
                    ),
                )
            ]
        )
    ]
