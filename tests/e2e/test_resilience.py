"""Protecting the service, with real workers, Redis, PostgreSQL and the sandbox: the kill
switch holds a channel's work and resuming drains it, nothing lost or sent twice; a
provider's rate limit holds across worker processes."""

import pytest
from django.test import Client
from django.urls import reverse

from apps.catalog.models import TemplateVariant, TemplateVersion
from apps.deliveries.models import ChannelSwitch, Delivery, DeliveryStatus, Provider
from tests.e2e.test_delivery_guarantees import assert_each_accepted_exactly_once, statuses, trigger, wait_for_status
from tests.factories import CategoryFactory, TemplateFactory
from tests.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


@pytest.fixture
def ops(admin_user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(admin_user)
    return client


def switch(ops: Client, action: str, channel: str) -> None:
    changelist = reverse("admin:deliveries_channelswitch_changelist")
    ops.get(changelist)  # lists (and so creates) an installation switch for every channel
    selected = ChannelSwitch.objects.get(tenant=None, channel=channel).pk
    response = ops.post(changelist, {"action": action, "_selected_action": [selected]})
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


def test_a_providers_rate_holds_across_worker_processes(api, workers, sandbox, workspace):
    """Four worker processes send 45 texts through a provider limited to 10 a second with a
    burst of 5. A token bucket lets at most burst + rate * t through in any t seconds; the
    sandbox sees arrival times, which lag the token by the time a message takes to reach it:
    up to 0.3 s for the first message of each worker process, which opens its connection after
    taking its token, so that is allowed for: in any second, at most 5 + 10 * 1.3 = 18. With no
    shared bucket the four processes would send 20 at once and 40 a second."""
    template = TemplateFactory(tenant=workspace.tenant, key="code")
    version = TemplateVersion.objects.create(template=template, number=1)
    TemplateVariant.objects.create(version=version, channel="sms", body="Your code is {{ data.code }}")
    CategoryFactory(
        tenant=workspace.tenant, key="code", template=template, default_channels=["sms"], default_priority="critical"
    )
    rate, burst, jitter = 10, 5, 0.3
    Provider.objects.create(
        name="twilio-main",
        channel="sms",
        config={"api_base": f"{sandbox.base_url}/twilio"},
        rate_per_second=rate,
        burst=burst,
    )
    workers.start("critical", concurrency=2)
    workers.start("critical", concurrency=2)
    recipients = [{"external_id": f"p{n}", "phone": f"+1415555{n:04d}"} for n in range(45)]
    response = api.post(
        "/api/v1/events", {"category": "code", "recipients": recipients, "data": {"code": "1"}}, format="json"
    )
    notification_ids = response.json()["notification_ids"]
    wait_for_status(notification_ids, DeliveryStatus.SENT)
    times = sorted(r["at"] for r in sandbox.requests_log(provider="twilio"))
    assert len(times) == 45
    for window in (0.5, 1.0, 2.0):
        busiest = max(sum(1 for t in times if start <= t < start + window) for start in times)
        assert busiest <= burst + rate * (window + jitter), (window, busiest)
    # It really had to wait: 40 past the burst at 10 a second is 4 s (unlimited, well under 1 s).
    assert times[-1] - times[0] >= 3.0
