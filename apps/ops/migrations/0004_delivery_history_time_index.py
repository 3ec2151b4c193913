"""An index for the failure-rate alert: the delivery history's recent rows by time.

DeliveryEvent is the largest table and takes a row for every state change, so the index is
BRIN on PostgreSQL: history rows are only appended, so their created_at follows their place
on disk, and a BRIN index keeps one small summary per range of pages. It costs the hot path
next to nothing, where a B-tree would take an entry for every row written. It is built
CONCURRENTLY, so a large table keeps taking writes meanwhile. Django's BrinIndex and
AddIndexConcurrently cannot express this here: the operation would have to live in the
deliveries app's migrations and would fail on the demo's SQLite, which gets a plain index."""

from typing import Any

from django.db import migrations

INDEX = "deliveryevent_created_brin"


def index_create(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON deliveries_deliveryevent "
            "USING brin (created_at) WITH (autosummarize = on)"
        )
    else:
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {INDEX} ON deliveries_deliveryevent (created_at)")


def index_drop(apps: Any, schema_editor: Any) -> None:
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    schema_editor.execute(f"DROP INDEX {concurrently}IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [("ops", "0003_default_alert_rules"), ("deliveries", "0017_admin_action_permissions")]

    operations = [migrations.RunPython(index_create, index_drop)]
