from django.db import migrations, models

# A category's template must be its own tenant's: on PostgreSQL a foreign key on (template_id,
# tenant_id) to the templates' (id, tenant_id) enforces it in the database. Django has no
# composite foreign keys, so it is written in SQL; the models check the same in clean() and
# save() (the demo's SQLite relies on those). It is checked at commit, like Django's own keys.
FOREIGN_KEY = (
    "ALTER TABLE catalog_category ADD CONSTRAINT category_template_same_tenant "
    "FOREIGN KEY (template_id, tenant_id) REFERENCES catalog_template (id, tenant_id) "
    "DEFERRABLE INITIALLY DEFERRED"
)
MISMATCHED = (
    "SELECT c.key, c.tenant_id FROM catalog_category c JOIN catalog_template t ON t.id = c.template_id "
    "WHERE t.tenant_id <> c.tenant_id LIMIT 5"
)


def foreign_key_add(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(MISMATCHED)
        mismatched = cursor.fetchall()
    if mismatched:
        listed = ", ".join(f"{key} (tenant {tenant_id})" for key, tenant_id in mismatched)
        raise RuntimeError(
            f"These categories use another tenant's template: {listed}. Point each at a template of its own "
            "tenant (copy the template there first), then migrate again."
        )
    schema_editor.execute(FOREIGN_KEY)


def foreign_key_drop(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE catalog_category DROP CONSTRAINT category_template_same_tenant")


class Migration(migrations.Migration):

    dependencies = [
        ('catalog', '0009_cost_guard'),
        ('tenants', '0004_cost_guard'),
    ]

    operations = [
        migrations.AddConstraint(
            model_name='template',
            constraint=models.UniqueConstraint(fields=('id', 'tenant'), name='template_id_tenant_unique'),
        ),
        migrations.RunPython(foreign_key_add, foreign_key_drop),
    ]
