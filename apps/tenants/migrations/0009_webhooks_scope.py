from django.db import migrations


def webhooks_scope_grant(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Producer webhook endpoints needed the admin scope before they had one of their own:
    keys that held it keep what they could do."""
    ApiKey = apps.get_model("tenants", "ApiKey")
    # API keys are few: read them all (a JSON containment lookup is PostgreSQL's, not SQLite's).
    for key in ApiKey.objects.only("id", "scopes").iterator():
        if "admin" in key.scopes and "webhooks:manage" not in key.scopes:
            key.scopes = [*key.scopes, "webhooks:manage"]
            key.save(update_fields=["scopes"])


class Migration(migrations.Migration):
    dependencies = [("tenants", "0008_tenant_encrypt_content")]

    operations = [migrations.RunPython(webhooks_scope_grant, migrations.RunPython.noop)]
