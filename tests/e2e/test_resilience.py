"""Protecting the service, with real workers, Redis, PostgreSQL and the sandbox: the kill
switch holds a channel's work and resuming drains it, nothing lost or sent twice."""

import pytest
from django.test import Client
from django.urls import reverse

from apps.deliveries.models import ChannelSwitch, Delivery, DeliveryStatus
from tests.e2e.test_delivery_guarantees import assert_each_accepted_exactly_once, statuses, trigger, wait_for_status
from tests.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


@pytest.fixture
def ops(admin_user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(admin_user)
    return client


def switch(ops: Client, action: str, channel: str) -> None:
    changelist = reverse("admin:deliveries_channelswitch_changelist")
    ops.get(changelist)  # lists (and so creates) a switch for every channel
    response = ops.post(changelist, {"action": action, "_selected_action": [channel]})
    assert response.status_code == 302


def test_a_paused_channel_holds_its_work_and_resuming_sends_all_of_it_once(api, workers, sandbox, ops):
    worker = workers.start("normal", "critical")
    switch(ops, "pause", "email")
    assert ChannelSwitch.objects.get(channel="email").paused
    held = trigger(api, category="welcome", count=5) + trigger(api, category="otp", count=2, prefix="c")
    # The worker runs both tasks, and they claim nothing (a send task answers how many it claimed).
    wait_for(lambda: worker.log().count("succeeded in") >= 3, what="the tasks to run")  # 1 normal + 2 critical
    assert all(line.endswith(": 0") for line in worker.log().splitlines() if "succeeded in" in line)
    assert statuses(held) == {DeliveryStatus.QUEUED: 7}
    assert sandbox.requests_log() == []
    assert not Delivery.objects.filter(notification_id__in=held, attempt_count__gt=0).exists()

    switch(ops, "resume", "email")
    wait_for_status(held, DeliveryStatus.SENT)
    assert_each_accepted_exactly_once(sandbox, held)
