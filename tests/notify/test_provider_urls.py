"""The API address on a Provider account (Postmark's api_url, Twilio's api_base) is set by a
tenant's staff, so it passes the outbound guard when saved and again at each send, with
NOTIFY_PROVIDER_ALLOWED_HOSTS as its allow list. The installation's own provider settings
(POSTMARK_API_URL, TWILIO_API_BASE) are the operator's and are not guarded.

Only IP literals are used, and every refusal comes before any connection."""

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse

from apps.deliveries.models import DeliveryStatus, Provider
from tests.notify.test_send import ingest_one, send_now
from tests.notify.test_sms import send_sms, sms_category  # noqa: F401 - a fixture


@pytest.mark.parametrize(
    ("channel", "config", "reason"),
    [
        (
            "email",
            {"api_url": "https://169.254.169.254/latest/"},
            "api_url is refused: 169.254.169.254 is a link-local",
        ),
        ("email", {"api_url": "http://203.0.113.10/"}, "api_url is refused: only https URLs are allowed"),
        ("sms", {"api_base": "https://10.0.0.1"}, "api_base is refused: 10.0.0.1 is a private address"),
        ("sms", {"api_base": "https://[::ffff:127.0.0.1]:9200"}, "is a loopback address (as 127.0.0.1)"),
    ],
)
def test_an_internal_provider_address_is_refused_when_saved(db, channel, config, reason):
    with pytest.raises(ValidationError) as refused:
        Provider(name="p", channel=channel, config=config).full_clean()
    [message] = refused.value.message_dict["config"]
    assert reason in message


def test_a_public_https_provider_address_or_an_allowed_host_is_accepted(db, settings):
    Provider(name="p", channel="email", config={"api_url": "https://8.8.8.8/"}).full_clean()
    settings.NOTIFY_PROVIDER_ALLOWED_HOSTS = ["127.0.0.1:8025"]
    Provider(name="q", channel="sms", config={"api_base": "http://127.0.0.1:8025/twilio"}).full_clean()


def test_the_admin_form_names_the_refused_address(admin_user, db):
    ops = Client()
    ops.force_login(admin_user)
    form = {
        "name": "internal",
        "channel": "email",
        "position": 0,
        "weight": 1,
        "enabled": "on",
        "config": '{"api_url": "https://127.0.0.1:9200/", "server_token": "t"}',
        "failure_threshold": 5,
        "cooldown_seconds": 30,
    }
    response = ops.post(reverse("admin:deliveries_provider_add"), form)
    assert response.status_code == 200  # the form again, with the error
    assert "api_url is refused: 127.0.0.1 is a loopback address" in response.content.decode()
    assert not Provider.objects.exists()


def test_an_email_provider_whose_address_no_longer_passes_sends_nothing(workspace, sandbox, settings, broker):
    Provider.objects.create(
        name="tenant-postmark",
        channel="email",
        config={"api_url": f"{sandbox.base_url}/postmark/", "server_token": "t"},
    )
    settings.NOTIFY_PROVIDER_ALLOWED_HOSTS = []  # as a rebound name no longer passes
    delivery = send_now(ingest_one(workspace))
    assert delivery.status == DeliveryStatus.RETRYING  # the provider is at fault, not the message
    assert "the provider's address is refused: only https URLs are allowed" in delivery.status_reason
    assert sandbox.requests_log() == []


@pytest.mark.usefixtures("sms_category")
def test_an_sms_provider_whose_address_no_longer_passes_sends_nothing(workspace, sandbox, settings, broker):
    Provider.objects.create(name="tenant-twilio", channel="sms", config={"api_base": f"{sandbox.base_url}/twilio"})
    settings.NOTIFY_PROVIDER_ALLOWED_HOSTS = []
    delivery = send_sms(workspace, phone="+14155550123")
    assert delivery.status == DeliveryStatus.RETRYING
    assert "only https URLs are allowed" in delivery.status_reason
    assert sandbox.requests_log(provider="twilio") == []


def test_the_operators_own_provider_settings_are_not_guarded(workspace, sandbox, settings):
    settings.NOTIFY_PROVIDER_ALLOWED_HOSTS = []
    settings.NOTIFY_WEBPUSH_ALLOWED_HOSTS = []
    delivery = send_now(ingest_one(workspace))  # POSTMARK_API_URL is the sandbox, over http
    assert delivery.status == DeliveryStatus.SENT
