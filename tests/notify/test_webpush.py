"""Web push: the real pywebpush (encryption and VAPID) over loopback to the sandbox's push service."""

import base64

import pytest
from django.core.management import call_command

from apps.catalog.models import Category, TemplateVariant, TemplateVersion
from apps.deliveries.models import Delivery, DeliveryStatus
from apps.recipients.models import WebPushSubscription
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.send import deliveries_send
from notify.sandbox.client import browser_subscription_keys
from tests.factories import CategoryFactory, RecipientFactory, TemplateFactory


@pytest.fixture
def alert(workspace) -> Category:  # type: ignore[no-untyped-def]
    template = TemplateFactory(tenant=workspace.tenant, key="browser-alert")
    version = TemplateVersion.objects.create(template=template, number=1)
    TemplateVariant.objects.create(version=version, channel="webpush", title="Alert", body="{{ data.text }}", link="/x")
    return CategoryFactory(
        tenant=workspace.tenant, key="browser-alert", template=template, default_channels=["webpush"]
    )


@pytest.fixture
def ada(workspace):  # type: ignore[no-untyped-def]
    return RecipientFactory(tenant=workspace.tenant, external_id="ada")


def subscribe(workspace, recipient, sandbox, name: str) -> WebPushSubscription:  # type: ignore[no-untyped-def]
    keys = browser_subscription_keys()
    return WebPushSubscription.objects.create(
        tenant=workspace.tenant, recipient=recipient, endpoint=f"{sandbox.base_url}/webpush/{name}", **keys
    )


def push(workspace) -> Delivery:  # type: ignore[no-untyped-def]
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key="browser-alert", recipients=[RecipientRef(external_id="ada")], data={"text": "Hi"}
            )
        ],
    )
    delivery = Delivery.objects.get(notification_id=result.response["notification_ids"][0])
    deliveries_send(delivery_ids=[str(delivery.pk)])
    delivery.refresh_from_db()
    return delivery


def test_an_encrypted_message_with_vapid_and_ttl_reaches_each_subscription(workspace, alert, ada, sandbox, settings):
    subscribe(workspace, ada, sandbox, "sub-laptop")
    subscribe(workspace, ada, sandbox, "sub-phone")
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.SENT
    log = sandbox.requests_log(provider="webpush")
    assert sorted(r["to"] for r in log) == ["sub-laptop", "sub-phone"]
    for request in log:
        assert request["metadata"]["content_encoding"] == "aes128gcm"
        assert request["metadata"]["vapid"] == "vapid"
        assert request["metadata"]["ttl"] == str(settings.WEBPUSH_TTL_SECONDS)
        assert request["metadata"]["plaintext_visible"] is False


@pytest.mark.parametrize("status", [404, 410])
def test_a_dropped_subscription_is_deactivated_and_not_retried(workspace, alert, ada, sandbox, status):
    subscription = subscribe(workspace, ada, sandbox, "sub-gone")
    sandbox.faults_set(provider="webpush", address_status={"sub-gone": status})
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.FAILED
    subscription.refresh_from_db()
    assert not subscription.active
    assert subscription.deactivated_reason == f"the push service answered {status}"


def test_a_busy_push_service_is_retried(workspace, alert, ada, sandbox):
    subscription = subscribe(workspace, ada, sandbox, "sub-busy")
    sandbox.faults_set(provider="webpush", fail_next=[429])
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.RETRYING
    subscription.refresh_from_db()
    assert subscription.active


def test_subscriptions_through_the_api(api, workspace, ada, sandbox):
    body = {"recipient": "ada", "endpoint": f"{sandbox.base_url}/webpush/sub-1", "keys": browser_subscription_keys()}
    created = api.post("/api/v1/webpush-subscriptions", body, format="json")
    assert created.status_code == 201
    assert api.post("/api/v1/webpush-subscriptions", body, format="json").status_code == 200
    assert WebPushSubscription.objects.count() == 1
    bad = api.post("/api/v1/webpush-subscriptions", {**body, "endpoint": "not a url"}, format="json")
    assert bad.status_code == 400 and "endpoint" in bad.json()["error"]["fields"]
    missing = api.post("/api/v1/webpush-subscriptions", {**body, "keys": {"p256dh": "x"}}, format="json")
    assert missing.status_code == 400 and "keys.auth" in missing.json()["error"]["fields"]
    assert api.delete(f"/api/v1/webpush-subscriptions/{created.json()['id']}").status_code == 204


def test_the_vapid_command_makes_a_usable_key_pair(capsys):
    call_command("vapid_keys")
    output = capsys.readouterr().out
    private = output.split("WEBPUSH_VAPID_PRIVATE_KEY=")[1].split()[0]
    assert len(base64.urlsafe_b64decode(private + "==")) > 100  # a DER-encoded EC private key
    assert "applicationServerKey" in output
