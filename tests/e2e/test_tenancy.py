"""Tenant isolation in the engine, with real workers, Redis, PostgreSQL and the sandbox: each
tenant's own provider account, a tenant's kill switch, and the runaway-send guard."""

import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from apps.deliveries.models import ChannelSwitch, Delivery, DeliveryStatus, Provider
from apps.tenants.models import Tenant
from notify.policy.caps import redis_client
from tests.e2e.test_delivery_guarantees import assert_each_accepted_exactly_once, statuses, trigger, wait_for_status
from tests.helpers import wait_for
from tests.notify.test_tenant_providers import workspace_of_another_tenant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


@pytest.fixture
def ops(admin_user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.fixture
def other_api(workspace):  # type: ignore[no-untyped-def]
    other = workspace_of_another_tenant()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=other.auth_header)
    client.tenant = other.tenant
    return client


def test_each_tenant_sends_through_its_own_account_or_the_installations(api, other_api, workspace, workers, sandbox):
    for tenant, token in ((None, "installation-token"), (workspace.tenant, "tenant-a-token")):
        Provider.objects.create(
            tenant=tenant,
            name="postmark",
            channel="email",
            config={"api_url": f"{sandbox.base_url}/postmark/", "server_token": token},
        )
    workers.start("normal")
    mine = trigger(api, category="welcome", count=2, prefix="a")
    theirs = trigger(other_api, category="welcome", count=2, prefix="b")
    wait_for_status(mine + theirs, DeliveryStatus.SENT)
    accounts = {r["to"][0]: r["account"] for r in sandbox.requests_log(provider="postmark")}
    assert accounts == {"a": "tenant-a-token", "b": "installation-token"}


def test_a_tenants_kill_switch_holds_only_its_work_and_resuming_delivers_it(
    api, other_api, workspace, workers, sandbox, ops
):
    worker = workers.start("normal")
    response = ops.post(
        reverse("admin:deliveries_channelswitch_add"),
        {"tenant": workspace.tenant.pk, "channel": "email", "paused": "on", "reason": "their list is suspect"},
    )
    assert response.status_code == 302, response.content
    switch = ChannelSwitch.objects.get(tenant=workspace.tenant, channel="email")
    held = trigger(api, category="welcome", count=3, prefix="a")
    theirs = trigger(other_api, category="welcome", count=3, prefix="b")
    wait_for_status(theirs, DeliveryStatus.SENT)
    wait_for(lambda: worker.log().count("succeeded in") >= 2, what="both tasks to run")
    assert statuses(held) == {DeliveryStatus.QUEUED: 3}
    assert not Delivery.objects.filter(notification_id__in=held, attempt_count__gt=0).exists()

    changelist = reverse("admin:deliveries_channelswitch_changelist")
    assert ops.post(changelist, {"action": "resume", "_selected_action": [switch.pk]}).status_code == 302
    wait_for_status(held, DeliveryStatus.SENT)
    assert_each_accepted_exactly_once(sandbox, held + theirs)


def test_a_runaway_tenant_is_paused_alerted_and_resumed_by_a_person(api, workspace, workers, sandbox, ops, settings):
    settings.NOTIFY_RUNAWAY_MULTIPLE = 2
    settings.NOTIFY_RUNAWAY_RECIPIENT_FLOOR = 2
    settings.NOTIFY_OPS_EMAILS = ["ops@example.com"]
    redis_client().delete(*redis_client().keys("notify:runaway:*") or ["-"])
    # A producer stuck in a loop: the same two people, again and again (over 2 x 2 at the third).
    looped = [n for _ in range(3) for n in trigger(api, category="welcome", count=2, prefix="r")]
    assert Tenant.objects.get(pk=workspace.tenant.pk).runaway_paused_at is not None
    bulk = trigger(api, category="digest", count=2, prefix="r")
    critical = trigger(api, category="otp", count=2, prefix="r")
    workers.start("normal", "bulk", "critical")
    wait_for_status(critical, DeliveryStatus.SENT)
    alerts = [r for r in sandbox.requests_log(provider="postmark") if r["to"] == "ops@example.com"]
    assert len(alerts) == 1 and workspace.tenant.slug in alerts[0]["subject"]
    held = looped + bulk  # every normal and bulk notification, those accepted before the trip too
    assert statuses(held) == {DeliveryStatus.QUEUED: len(held)}

    changelist = reverse("admin:tenants_tenant_changelist")
    ops.post(changelist, {"action": "resume_runaway", "_selected_action": [workspace.tenant.pk]})
    wait_for_status(held, DeliveryStatus.SENT)
    sent = [r["delivery_id"] for r in sandbox.requests_log(provider="postmark") if r["outcome"] == "accepted"]
    deliveries = Delivery.objects.filter(notification_id__in=held + critical).values_list("id", flat=True)
    assert sorted(key for key in sent if key) == sorted(str(d) for d in deliveries)  # each once
