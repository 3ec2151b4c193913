"""Providers belong to a tenant: a tenant's deliveries use its own providers (and sender
identity) for a channel if it has any, else the installation's, else the configured default.
The real anymail, twilio and firebase-admin SDKs talk to the sandbox."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.catalog.models import Priority, TemplateVariant, TemplateVersion
from apps.deliveries.models import Delivery, DeliveryStatus, Provider
from apps.recipients.models import Device
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.send import deliveries_send
from notify.resilience.providers import breaker_state
from tests.conftest import Workspace
from tests.factories import ApiKeyFactory, CategoryFactory, RecipientFactory, TemplateFactory
from tests.helpers import free_port
from tests.notify.test_send import ingest_one


def workspace_of_another_tenant() -> Workspace:
    key = ApiKeyFactory()
    return Workspace(
        tenant=key.tenant,
        api_key=key,
        normal=CategoryFactory(tenant=key.tenant, key="welcome", default_priority=Priority.NORMAL),
        critical=CategoryFactory(tenant=key.tenant, key="otp", default_priority=Priority.CRITICAL),
        bulk=CategoryFactory(tenant=key.tenant, key="digest", default_priority=Priority.BULK),
    )


def postmark(sandbox, *, name: str, token: str, tenant=None, **config) -> Provider:  # type: ignore[no-untyped-def]
    return Provider.objects.create(
        tenant=tenant,
        name=name,
        channel="email",
        config={"api_url": f"{sandbox.base_url}/postmark/", "server_token": token, **config},
    )


def due_now(*deliveries: Delivery) -> list[str]:
    Delivery.objects.filter(pk__in=[d.pk for d in deliveries]).update(next_attempt_at=timezone.now())
    return [str(d.pk) for d in deliveries]


def test_a_tenant_sends_through_its_own_provider_and_another_through_the_installations(workspace, sandbox):
    other = workspace_of_another_tenant()
    postmark(sandbox, name="main", token="installation-token")
    postmark(sandbox, name="main", token="tenant-a-token", tenant=workspace.tenant, from_email="A <hello@a.example>")
    mine, theirs = ingest_one(workspace, email="a@example.com"), ingest_one(other, email="b@example.com")
    # One batch holding both tenants' deliveries, as the sweeper or a resume publishes them.
    with CaptureQueriesContext(connection) as queries:
        assert deliveries_send(delivery_ids=due_now(mine, theirs)) == 2
    sent = {r["to"]: r for r in sandbox.requests_log(provider="postmark")}
    assert sent["a@example.com"]["account"] == "tenant-a-token"
    assert sent["a@example.com"]["from"] == "A <hello@a.example>"
    assert sent["b@example.com"]["account"] == "installation-token"
    assert sent["b@example.com"]["from"] == "Notify <notify@example.com>"  # DEFAULT_FROM_EMAIL
    # The providers of every tenant in the batch are read once.
    assert sum('"deliveries_provider"' in q["sql"] for q in queries.captured_queries) == 1


def test_without_any_provider_a_tenant_uses_the_configured_one(workspace, sandbox):
    other = workspace_of_another_tenant()
    postmark(sandbox, name="theirs", token="tenant-b-token", tenant=other.tenant)
    deliveries_send(delivery_ids=due_now(ingest_one(workspace)))
    [request] = sandbox.requests_log(provider="postmark")
    assert request["account"] == "sandbox-token"  # POSTMARK_SERVER_TOKEN


def test_a_tenants_texts_go_from_its_own_number(workspace, sandbox):
    template = TemplateFactory(tenant=workspace.tenant, key="code")
    version = TemplateVersion.objects.create(template=template, number=1)
    TemplateVariant.objects.create(version=version, channel="sms", body="Your code is 1")
    CategoryFactory(tenant=workspace.tenant, key="code", template=template, default_channels=["sms"])
    other = workspace_of_another_tenant()
    for tenant, position, account, number in (
        (None, 0, "ACinstall", "+15005550006"),
        (other.tenant, 0, "ACother", "+15005550007"),
        (workspace.tenant, 1, "ACtenant", "+15005550099"),
    ):
        Provider.objects.create(
            tenant=tenant,
            name="twilio",
            channel="sms",
            position=position,
            config={"account_sid": account, "auth_token": "auth", "from_number": number},
        )
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key="code", recipients=[RecipientRef(external_id="ada", fields={"phone": "+14155550123"})]
            )
        ],
    )
    delivery = Delivery.objects.get(notification_id=result.response["notification_ids"][0])
    deliveries_send(delivery_ids=due_now(delivery))
    [request] = sandbox.requests_log(provider="twilio")
    assert (request["account"], request["from"]) == ("ACtenant", "+15005550099")
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENT


def test_a_tenants_push_goes_through_its_own_firebase_project(workspace, sandbox):
    template = TemplateFactory(tenant=workspace.tenant, key="alert")
    version = TemplateVersion.objects.create(template=template, number=1)
    TemplateVariant.objects.create(version=version, channel="push", title="Alert", body="Server down")
    CategoryFactory(tenant=workspace.tenant, key="alert", template=template, default_channels=["push"])
    ada = RecipientFactory(tenant=workspace.tenant, external_id="ada")
    Device.objects.create(tenant=workspace.tenant, recipient=ada, token="tok-1", platform="android")
    Provider.objects.create(tenant=workspace.tenant, name="fcm", channel="push", config={"project_id": "tenant-app"})
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[EventRequest(category_key="alert", recipients=[RecipientRef(external_id="ada")])],
    )
    delivery = Delivery.objects.get(notification_id=result.response["notification_ids"][0])
    deliveries_send(delivery_ids=due_now(delivery))
    [request] = sandbox.requests_log(provider="fcm")
    assert request["account"] == "tenant-app"
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENT


def test_provider_names_are_unique_within_a_tenant_not_across_tenants(workspace, sandbox):
    other = workspace_of_another_tenant()
    postmark(sandbox, name="main", token="t")
    postmark(sandbox, name="main", token="t", tenant=workspace.tenant)
    postmark(sandbox, name="main", token="t", tenant=other.tenant)
    with pytest.raises(IntegrityError):
        postmark(sandbox, name="main", token="t", tenant=workspace.tenant)


@pytest.mark.django_db(transaction=True)
def test_each_tenants_provider_has_its_own_circuit_even_with_the_same_name(workspace, sandbox, broker):
    other = workspace_of_another_tenant()
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    broken = Provider.objects.create(
        tenant=workspace.tenant,
        name="main",
        channel="email",
        failure_threshold=1,
        config={"api_url": f"{down}/postmark/", "server_token": "a"},
    )
    healthy = postmark(sandbox, name="main", token="b", tenant=other.tenant)
    deliveries_send(delivery_ids=due_now(ingest_one(workspace)))
    assert breaker_state(broken) == "open"
    assert breaker_state(healthy) == "closed"
    theirs = ingest_one(other)
    deliveries_send(delivery_ids=due_now(theirs))
    assert Delivery.objects.get(pk=theirs.pk).status == DeliveryStatus.SENT


@pytest.mark.parametrize(
    ("channel", "config", "named"),
    [
        ("email", {"from_email": "not an address"}, "from_email"),
        ("sms", {"from_number": "4155550123"}, "from_number"),
        ("push", {"credentials": {"type": "user"}}, "credentials"),
        ("push", {"project_id": ""}, "project_id"),
    ],
)
def test_a_sender_identity_every_send_would_fail_on_is_refused_naming_the_key(db, channel, config, named):
    provider = Provider(name="p", channel=channel, config=config)
    with pytest.raises(ValidationError) as refused:
        provider.full_clean()
    assert named in refused.value.message_dict["config"][0]
