"""The tenancy migrations on a database with data in it: the channel switches' primary key
moves from the channel to an id, and existing switches become the installation's."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("deliveries", "0015_time_ordered_ids")]
AFTER = [("deliveries", "0016_tenant_providers_and_switches")]


def migrate(targets: list[tuple[str, str]]):  # type: ignore[no-untyped-def]
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def test_existing_switches_and_providers_become_the_installations():
    try:
        old = migrate(BEFORE)
        old.get_model("deliveries", "ChannelSwitch").objects.create(channel="email", paused=True, reason="incident")
        old.get_model("deliveries", "ChannelSwitch").objects.create(channel="sms", paused=False)
        old.get_model("deliveries", "Provider").objects.create(name="main", channel="email")
        new = migrate(AFTER)
        switches = new.get_model("deliveries", "ChannelSwitch").objects.order_by("channel")
        assert [(s.channel, s.paused, s.reason, s.tenant_id) for s in switches] == [
            ("email", True, "incident", None),
            ("sms", False, "", None),
        ]
        assert len({s.pk for s in switches}) == 2
        [provider] = new.get_model("deliveries", "Provider").objects.all()
        assert (provider.name, provider.tenant_id) == ("main", None)
    finally:
        migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
