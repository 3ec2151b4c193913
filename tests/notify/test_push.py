"""Mobile push: the real firebase-admin SDK, OAuth included, over loopback to the sandbox's FCM."""

import json

import pytest

from apps.catalog.models import Category, TemplateVariant, TemplateVersion
from apps.deliveries.models import Delivery, DeliveryStatus
from apps.recipients.models import Device
from notify.channels.push import PAYLOAD_LIMIT_BYTES, push_payload_fit
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.send import deliveries_send
from tests.factories import CategoryFactory, RecipientFactory, TemplateFactory
from tests.helpers import wait_for


@pytest.fixture
def push_category(workspace) -> Category:  # type: ignore[no-untyped-def]
    template = TemplateFactory(tenant=workspace.tenant, key="alert")
    version = TemplateVersion.objects.create(template=template, number=1)
    TemplateVariant.objects.create(
        version=version, channel="push", title="Alert", body="{{ data.text }}", data={"screen": "alerts"}
    )
    return CategoryFactory(tenant=workspace.tenant, key="alert", template=template, default_channels=["push"])


@pytest.fixture
def ada(workspace):  # type: ignore[no-untyped-def]
    return RecipientFactory(tenant=workspace.tenant, external_id="ada")


def device(workspace, recipient, token: str, platform: str = "android") -> Device:  # type: ignore[no-untyped-def]
    return Device.objects.create(tenant=workspace.tenant, recipient=recipient, token=token, platform=platform)


def push(workspace, text: str = "Server down") -> Delivery:  # type: ignore[no-untyped-def]
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[EventRequest(category_key="alert", recipients=[RecipientRef(external_id="ada")], data={"text": text})],
    )
    delivery = Delivery.objects.get(notification_id=result.response["notification_ids"][0])
    deliveries_send(delivery_ids=[str(delivery.pk)])
    delivery.refresh_from_db()
    return delivery


def test_a_push_reaches_every_active_device(workspace, push_category, ada, sandbox):
    device(workspace, ada, "token-phone")
    device(workspace, ada, "token-tablet", platform="ios")
    Device.objects.create(tenant=workspace.tenant, recipient=ada, token="token-old", platform="android", active=False)
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.SENT
    log = sandbox.requests_log(provider="fcm")
    assert sorted(r["to"] for r in log) == ["token-phone", "token-tablet"]
    assert {r["text"] for r in log} == {"Server down"}
    assert log[0]["metadata"] == {"screen": "alerts", "delivery_id": str(delivery.pk)}
    assert delivery.provider_message_id.startswith("projects/notify-sandbox/messages/")


def test_google_auths_region_lookup_goes_to_the_sandbox_too(workspace, push_category, ada, sandbox):
    """After each new token google-auth looks up the service account's allowed regions at
    iamcredentials.googleapis.com, on a thread of its own. Against the sandbox that lookup is
    sent there as well: nothing leaves the machine, not even a DNS query for Google."""
    device(workspace, ada, "token-phone")
    assert push(workspace).status == DeliveryStatus.SENT
    wait_for(lambda: sandbox.stats()["iam_lookups"] >= 1, what="the region lookup, at the sandbox")


def test_a_transient_error_is_retried(workspace, push_category, ada, sandbox):
    device(workspace, ada, "token-phone")
    sandbox.faults_set(provider="fcm", fail_next=[503])
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.RETRYING
    assert Device.objects.get(token="token-phone").active


@pytest.mark.parametrize(("status", "dead"), [(404, True), (403, True), (400, True), (413, False)])
def test_only_errors_that_prove_a_token_dead_deactivate_it(workspace, push_category, ada, sandbox, status, dead):
    device(workspace, ada, "token-bad")
    sandbox.faults_set(provider="fcm", address_status={"token-bad": status})
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.FAILED  # permanent: not retried
    assert Device.objects.get(token="token-bad").active is not dead


def test_one_dead_device_does_not_fail_the_delivery(workspace, push_category, ada, sandbox):
    device(workspace, ada, "token-good")
    device(workspace, ada, "token-gone")
    sandbox.faults_set(provider="fcm", address_status={"token-gone": 404})
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.SENT
    assert not Device.objects.get(token="token-gone").active
    assert Device.objects.get(token="token-gone").deactivated_reason == "FCM reported the token dead"


def test_a_recipient_without_devices_is_suppressed_with_a_reason(workspace, push_category, ada, sandbox):
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.SUPPRESSED
    assert delivery.status_reason == "recipient has no push address"
    assert sandbox.requests_log(provider="fcm") == []


def test_a_long_body_is_shortened_to_fit_and_stays_valid(workspace, push_category, ada, sandbox):
    device(workspace, ada, "token-phone")
    delivery = push(workspace, text="é" * 5000)
    assert delivery.status == DeliveryStatus.SENT
    [request] = sandbox.requests_log(provider="fcm")
    assert request["status"] == 200
    body = push_payload_fit(title="Alert", body="é" * 5000, data={"screen": "alerts"})
    assert body.endswith("…")
    size = len(json.dumps({"notification": {"title": "Alert", "body": body}, "data": {"screen": "alerts"}}).encode())
    assert PAYLOAD_LIMIT_BYTES - 20 < size <= PAYLOAD_LIMIT_BYTES


def test_devices_register_upsert_list_and_delete_through_the_api(api, workspace, ada):
    body = {"recipient": "ada", "token": "token-1", "platform": "ios", "app": "com.example"}
    assert api.post("/api/v1/devices", body, format="json").status_code == 201
    again = api.post("/api/v1/devices", {**body, "platform": "ios", "app": "com.example.v2"}, format="json")
    assert again.status_code == 200
    assert Device.objects.get().app == "com.example.v2"
    assert [d["token"] for d in api.get("/api/v1/devices", {"recipient": "ada"}).json()["results"]] == ["token-1"]
    assert api.delete("/api/v1/devices/token-1").status_code == 204
    assert not Device.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"recipient": "ada", "token": "t", "platform": "symbian"}, "platform"),
        ({"recipient": "ghost", "token": "t", "platform": "ios"}, "recipient"),
        ({"recipient": "ada", "platform": "ios"}, "token"),
    ],
)
def test_bad_device_registrations_name_the_field(api, workspace, ada, body, field):
    response = api.post("/api/v1/devices", body, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
