"""Web push: the real pywebpush (encryption and VAPID) over loopback to the sandbox's push service."""

import base64

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

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


# --- The SSRF guard -----------------------------------------------------------------------
# Only IP literals and `localhost` are used, and every refusal comes before a connection.

INTERNAL_ENDPOINTS = [
    "https://169.254.169.254/latest/meta-data/",
    "https://127.0.0.1:9200/_search",
    "https://10.0.0.1/push/1",
    "https://[::1]/push/1",
    "https://[::ffff:127.0.0.1]/push/1",
    "https://localhost/push/1",
]
# Of those, the ones that stay on this machine even where no guard stops the send.
LOOPBACK_ENDPOINTS = [e for e in INTERNAL_ENDPOINTS if "169.254" not in e and "10.0.0.1" not in e]


def api_subscribe(api, endpoint: str, recipient: str = "ada"):  # type: ignore[no-untyped-def]
    body = {"recipient": recipient, "endpoint": endpoint, "keys": browser_subscription_keys()}
    return api.post("/api/v1/webpush-subscriptions", body, format="json")


@pytest.mark.parametrize("endpoint", [*INTERNAL_ENDPOINTS, "http://push.example.com/send/1"])
def test_an_endpoint_on_an_internal_address_or_over_http_is_refused_when_saved(api, ada, sandbox, endpoint):
    refused = api_subscribe(api, endpoint)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert list(error["fields"]) == ["endpoint"]
    assert error["fields"]["endpoint"][0].startswith("This endpoint is refused: ")
    assert not WebPushSubscription.objects.exists()


def test_an_endpoint_that_no_longer_passes_is_refused_when_sending(api, workspace, alert, ada, sandbox, settings):
    """Saved while its host passed (here: on the allow list), then refused at send time,
    as an endpoint whose name was rebound to an internal address is."""
    assert api_subscribe(api, f"{sandbox.base_url}/webpush/sub-rebound").status_code == 201
    settings.NOTIFY_WEBPUSH_ALLOWED_HOSTS = []
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.FAILED  # permanent: not retried
    assert "endpoint refused: only https URLs are allowed" in delivery.status_reason
    subscription = WebPushSubscription.objects.get()
    assert not subscription.active
    assert subscription.deactivated_reason == "endpoint refused: only https URLs are allowed"
    assert sandbox.requests_log(provider="webpush") == []


@pytest.mark.parametrize("endpoint", INTERNAL_ENDPOINTS)
def test_a_stored_internal_endpoint_is_refused_before_any_connection(workspace, alert, ada, sandbox, endpoint):
    # Stored without the service's check, as rows saved before the guard existed were.
    WebPushSubscription.objects.create(
        tenant=workspace.tenant, recipient=ada, endpoint=endpoint, **browser_subscription_keys()
    )
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.FAILED
    assert delivery.status_reason.startswith("permanent failure: endpoint refused: ")
    assert not WebPushSubscription.objects.get().active
    assert sandbox.requests_log(provider="webpush") == []


def test_a_redirect_from_the_push_service_is_not_followed(workspace, alert, ada, sandbox):
    subscription = subscribe(workspace, ada, sandbox, "sub-moved")
    sandbox.faults_set(provider="webpush", fail_next=[307])
    delivery = push(workspace)
    assert [r["to"] for r in sandbox.requests_log(provider="webpush")] == ["sub-moved"]  # not sub-moved/redirected
    assert delivery.status == DeliveryStatus.FAILED
    assert "HTTP 307 Temporary Redirect: redirects are not followed" in delivery.status_reason
    subscription.refresh_from_db()
    assert not subscription.active
    assert subscription.deactivated_reason == "the endpoint redirects (307); redirects are not followed"


@pytest.mark.parametrize("status", [400, 410, 500])
def test_the_push_services_answer_body_never_reaches_the_history(workspace, alert, ada, sandbox, status):
    subscribe(workspace, ada, sandbox, "sub-secret")
    secret = "INTERNAL-ANSWER-aws_secret_access_key=abc123"
    sandbox.faults_set(provider="webpush", address_status={"sub-secret": status}, error_body=f"<pre>{secret}</pre>")
    delivery = push(workspace)
    assert delivery.status in (DeliveryStatus.FAILED, DeliveryStatus.RETRYING)
    history = [delivery.status_reason, *delivery.events.values_list("reason", flat=True)]
    history += list(WebPushSubscription.objects.values_list("deactivated_reason", flat=True))
    assert all(secret not in text for text in history), history
    assert f"HTTP {status}" in delivery.status_reason


def test_a_recipients_subscriptions_are_capped_and_the_oldest_makes_room(api, ada, sandbox, settings):
    settings.NOTIFY_WEBPUSH_MAX_SUBSCRIPTIONS_PER_RECIPIENT = 2
    for name in ("sub-1", "sub-2", "sub-3"):
        assert api_subscribe(api, f"{sandbox.base_url}/webpush/{name}").status_code == 201

    def active() -> list[str]:
        return sorted(
            s.rsplit("/", 1)[1]
            for s in ada.webpush_subscriptions.filter(active=True).values_list("endpoint", flat=True)
        )

    assert active() == ["sub-2", "sub-3"]
    oldest = WebPushSubscription.objects.get(endpoint__endswith="/sub-1")
    assert oldest.deactivated_reason == "replaced by a newer subscription (at most 2 per recipient)"
    # The browser subscribing again brings it back, and the one refreshed longest ago goes.
    assert api_subscribe(api, f"{sandbox.base_url}/webpush/sub-1").status_code == 200
    assert active() == ["sub-1", "sub-3"]


def test_an_endpoint_edited_in_the_admin_is_checked_too(admin_user, workspace, ada, sandbox):
    subscription = subscribe(workspace, ada, sandbox, "sub-edit")
    ops = Client()
    ops.force_login(admin_user)
    form = {
        "tenant": workspace.tenant.pk,
        "recipient": ada.pk,
        "endpoint": "https://169.254.169.254/latest/meta-data/",
        "p256dh": subscription.p256dh,
        "auth": subscription.auth,
        "active": "on",
        "deactivated_reason": "",
    }
    response = ops.post(reverse("admin:recipients_webpushsubscription_change", args=[subscription.pk]), form)
    assert response.status_code == 200  # the form again, with the error
    assert "This endpoint is refused: 169.254.169.254 is a link-local address." in response.content.decode()
    subscription.refresh_from_db()
    assert subscription.endpoint.endswith("/webpush/sub-edit")


def test_a_click_the_service_worker_reports_makes_the_delivery_clicked_once(workspace, alert, ada, sandbox):
    subscribe(workspace, ada, sandbox, "sub-laptop")
    delivery = push(workspace)
    [request] = sandbox.requests_log(provider="webpush")
    click_url = request["shown"]["click_url"]
    assert click_url.startswith(f"{django_settings.NOTIFY_PUBLIC_URL}/webpush/clicks/")
    path = click_url.removeprefix(django_settings.NOTIFY_PUBLIC_URL)
    browser = Client()
    assert browser.get(path).status_code == 405  # a report is a POST
    assert browser.post(path).status_code == 204
    assert browser.post(path).status_code == 204  # reported twice: still one click
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.CLICKED
    assert delivery.events.filter(status="clicked", detail__provider_status="webpush:click").count() == 1
    tampered = browser.post(path[:-2] + ("AA" if not path.endswith("AA") else "BB"))
    assert tampered.status_code == 400
    assert tampered.json()["error"]["fields"] == {"token": ["the click report link is not valid"]}
