"""A notification's tenant, category and template version are no longer checked by PostgreSQL;
the relations stay, and Django still cascades and protects.

Each is its event's (or its broadcast's pinned version), whose own keys are checked: every
notification is written in the transaction that writes its event (an event, a digest's flush),
or by a broadcast's fan-out, which holds its broadcast's row, whose keys name the same tenant,
category, event and version. The checks they replace cost about 7 µs a row each, at commit,
and a fan-out chunk of 5,000 spent about 45% of its time in its notifications' five checks.
The event's and the recipient's keys stay checked: the event's is what refuses to delete an
event (or its tenant) while a chunk of its broadcast commits. `manage.py orphans_check`
counts any notification that names a missing tenant, category or version.

Dropping a constraint takes a brief lock and scans nothing. The demo's SQLite keeps its keys."""

from django.db import migrations, models

from apps.deliveries.partitions import keys_unchecked_operation

# (table, column, the table it points at)
KEYS = (
    ("deliveries_notification", "tenant_id", "tenants_tenant"),
    ("deliveries_notification", "category_id", "catalog_category"),
    ("deliveries_notification", "template_version_id", "catalog_templateversion"),
)


class Migration(migrations.Migration):
    dependencies = [
        ("catalog", "0015_template_variant_key_weight"),
        ("deliveries", "0025_keys_into_partitions_unchecked"),
        ("tenants", "0009_webhooks_scope"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="notification",
                    name="tenant",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="notifications",
                        to="tenants.tenant",
                    ),
                ),
                migrations.AlterField(
                    model_name="notification",
                    name="category",
                    field=models.ForeignKey(
                        db_constraint=False,
                        on_delete=models.deletion.PROTECT,
                        related_name="notifications",
                        to="catalog.category",
                    ),
                ),
                migrations.AlterField(
                    model_name="notification",
                    name="template_version",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=models.deletion.PROTECT,
                        related_name="+",
                        to="catalog.templateversion",
                    ),
                ),
            ],
            database_operations=[keys_unchecked_operation(keys=KEYS)],
        )
    ]
