import json

import pytest
from django.test import Client

from apps.recipients.models import WebPushSubscription
from apps.tenants.demo import demo_workspace_ensure

pytestmark = pytest.mark.django_db


@pytest.fixture
def demo(settings):  # type: ignore[no-untyped-def]
    settings.DEBUG = True
    return demo_workspace_ensure(api_key="")


def test_the_page_carries_the_vapid_public_key_and_its_service_worker(demo, client: Client):
    from notify.channels.webpush import vapid_application_server_key

    page = client.get("/demo/webpush/")
    assert page.status_code == 200
    key = vapid_application_server_key()
    assert len(key) == 87  # an uncompressed P-256 point, base64url
    assert key.encode() in page.content
    worker = client.get("/demo/webpush/sw.js")
    assert worker["Content-Type"] == "application/javascript"
    assert b"showNotification" in worker.content and b"notificationclick" in worker.content


def test_a_browser_subscription_is_saved_for_the_demo_recipient(demo, client: Client, settings):
    # On the allow list, so that the guard does not look the made-up host up in the DNS.
    settings.NOTIFY_WEBPUSH_ALLOWED_HOSTS = ["push.example.test"]
    subscription = {"endpoint": "https://push.example.test/abc", "keys": {"p256dh": "BP" + "A" * 85, "auth": "x" * 22}}
    response = client.post("/demo/webpush/subscribe", json.dumps(subscription), content_type="application/json")
    assert response.status_code == 201
    assert WebPushSubscription.objects.get().recipient.external_id == "ada"
    bad = client.post("/demo/webpush/subscribe", json.dumps({"endpoint": "x"}), content_type="application/json")
    assert bad.status_code == 400


def test_the_demo_refuses_an_endpoint_on_an_internal_address(demo, client: Client):
    subscription = {"endpoint": "https://127.0.0.1:9200/_search", "keys": {"p256dh": "BP" + "A" * 85, "auth": "x"}}
    response = client.post("/demo/webpush/subscribe", json.dumps(subscription), content_type="application/json")
    assert response.status_code == 400
    assert "127.0.0.1 is a loopback address" in response.json()["error"]
    assert not WebPushSubscription.objects.exists()


def test_the_demo_pages_do_not_exist_outside_debug(demo, client: Client, settings):
    settings.DEBUG = False
    assert client.get("/demo/webpush/").status_code == 404
    assert client.post("/demo/webpush/subscribe", "{}", content_type="application/json").status_code == 404


def test_a_deeply_nested_subscription_gets_a_400(demo, client: Client):
    response = client.post("/demo/webpush/subscribe", "[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert response.status_code == 400
    assert not WebPushSubscription.objects.exists()
