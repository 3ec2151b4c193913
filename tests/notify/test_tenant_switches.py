"""Kill switches per installation and per tenant: a tenant's switch holds only that tenant's
deliveries on the channel (unclaimed and unchanged), and resuming publishes only them."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.deliveries.models import ChannelSwitch, Delivery, DeliveryStatus
from notify.pipeline.control import channel_pause, channel_resume
from notify.pipeline.dispatch import sweep
from notify.pipeline.send import deliveries_claim
from tests.notify.test_send import ingest_one
from tests.notify.test_tenant_providers import workspace_of_another_tenant


def test_a_tenants_switch_holds_only_that_tenants_deliveries_on_the_channel(workspace):
    other = workspace_of_another_tenant()
    channel_pause(channel="email", tenant=workspace.tenant, reason="their domain is blocklisted")
    mine, theirs = ingest_one(workspace), ingest_one(other)
    with CaptureQueriesContext(connection) as queries:
        _, claimed = deliveries_claim(delivery_ids=[str(mine.pk), str(theirs.pk)])
    assert [d.pk for d in claimed] == [theirs.pk]
    # What is paused is read once for the claim, whatever kind of switch holds what.
    assert sum('"deliveries_channelswitch"' in q["sql"] for q in queries.captured_queries) == 1
    mine.refresh_from_db()
    assert (mine.status, mine.attempt_count, mine.lease_token) == (DeliveryStatus.QUEUED, 0, None)
    assert ChannelSwitch.objects.get(tenant=workspace.tenant, channel="email").paused
    assert not ChannelSwitch.objects.filter(tenant=None, channel="email", paused=True).exists()


def test_the_installation_switch_holds_every_tenant(workspace):
    other = workspace_of_another_tenant()
    channel_pause(channel="email", reason="provider incident")
    mine, theirs = ingest_one(workspace), ingest_one(other)
    _, claimed = deliveries_claim(delivery_ids=[str(mine.pk), str(theirs.pk)])
    assert claimed == []


def test_a_tenants_switch_on_one_channel_leaves_its_other_channels_alone(workspace):
    channel_pause(channel="sms", tenant=workspace.tenant, reason="test")
    mine = ingest_one(workspace)  # email
    _, claimed = deliveries_claim(delivery_ids=[str(mine.pk)])
    assert [d.pk for d in claimed] == [mine.pk]


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_leaves_held_work_alone_and_a_resume_publishes_only_that_tenants(
    workspace, broker, django_capture_on_commit_callbacks
):
    other = workspace_of_another_tenant()
    channel_pause(channel="email", tenant=workspace.tenant, reason="test")
    mine, theirs = ingest_one(workspace), ingest_one(other)
    later = timezone.now() + timedelta(seconds=3)  # both past the 2 s republish threshold
    broker.flushdb()  # the broker lost both tasks
    assert sweep(now=later).republished == 1  # theirs only
    Delivery.objects.filter(pk=theirs.pk).update(status=DeliveryStatus.SENT)
    broker.flushdb()
    assert channel_resume(channel="email", tenant=workspace.tenant) == 1
    [message] = broker.lrange("email.normal", 0, -1)
    assert str(mine.pk).encode() in message
    _, claimed = deliveries_claim(delivery_ids=[str(mine.pk)])
    assert [d.pk for d in claimed] == [mine.pk]


@pytest.mark.django_db(transaction=True)
def test_resuming_the_installation_does_not_publish_what_a_tenants_switch_still_holds(workspace, broker):
    other = workspace_of_another_tenant()
    channel_pause(channel="email", reason="incident")
    channel_pause(channel="email", tenant=workspace.tenant, reason="test")
    mine, theirs = ingest_one(workspace), ingest_one(other)
    broker.flushdb()
    assert channel_resume(channel="email") == 1
    assert str(theirs.pk).encode() in broker.lrange("email.normal", 0, -1)[0]
    mine.refresh_from_db()
    assert mine.status == DeliveryStatus.QUEUED


def test_nothing_is_added_to_the_claim_while_nothing_is_held(workspace):
    delivery = ingest_one(workspace)
    with CaptureQueriesContext(connection) as queries:
        deliveries_claim(delivery_ids=[str(delivery.pk)])
    [update] = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert "EXISTS" not in update
