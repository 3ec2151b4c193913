"""The SMS channel: the real twilio SDK over loopback to the sandbox's Messages API."""

import json

import pytest
from django.conf import settings as django_settings
from django.test import Client
from twilio.request_validator import RequestValidator

from apps.catalog.models import Category, TemplateVariant, TemplateVersion
from apps.deliveries.models import Delivery, DeliveryStatus, Provider
from apps.recipients.models import HASHED_ADDRESS_PREFIX, Recipient, Suppression
from apps.recipients.phone import e164
from apps.recipients.privacy import recipient_erase
from notify.channels.sms import sms_segments
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.send import deliveries_send
from notify.policy.suppression import suppression_add
from tests.factories import CategoryFactory, TemplateFactory
from tests.helpers import wait_for


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("€" * 80, 1),  # an extension character takes two septets
        ("€" * 81, 2),
        ("é" * 160, 1),  # in the GSM basic set
        ("✓" * 70, 1),  # not GSM: UCS-2
        ("✓" * 71, 2),
        ("😀" * 35, 1),  # two UTF-16 code units each
        ("😀" * 36, 2),
    ],
)
def test_segments_are_counted_as_carriers_bill_them(text, segments):
    assert sms_segments(text=text) == segments


def test_numbers_are_checked_as_e164():
    assert e164(number="+14155550123") == "+14155550123"
    assert e164(number="+44 20 7946 0958") == "+442079460958"
    assert e164(number="4155550123") is None  # no country
    assert e164(number="+1415555") is None  # too short


@pytest.fixture
def sms_category(workspace) -> Category:  # type: ignore[no-untyped-def]
    template = TemplateFactory(tenant=workspace.tenant, key="code")
    version = TemplateVersion.objects.create(template=template, number=1)
    TemplateVariant.objects.create(version=version, channel="sms", body="{{ data.text }}")
    return CategoryFactory(tenant=workspace.tenant, key="code", template=template, default_channels=["sms"])


def send_sms(workspace, *, phone: str, text: str = "Your code is 123456") -> Delivery:  # type: ignore[no-untyped-def]
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key="code",
                recipients=[RecipientRef(external_id="ada", fields={"phone": phone})],
                data={"text": text},
            )
        ],
    )
    delivery = Delivery.objects.get(notification_id=result.response["notification_ids"][0])
    deliveries_send(delivery_ids=[str(delivery.pk)])
    delivery.refresh_from_db()
    return delivery


def test_a_text_is_sent_with_its_sid_first_status_and_segments(workspace, sms_category, sandbox):
    delivery = send_sms(workspace, phone="+14155550123", text="é" * 161)
    assert delivery.status == DeliveryStatus.SENT
    [request] = sandbox.requests_log(provider="twilio")
    assert (request["to"], request["text"]) == ("+14155550123", "é" * 161)
    assert delivery.provider_message_id == request["message_id"]
    assert delivery.provider_message_id.startswith("SM")
    assert delivery.segments == 2
    sent = delivery.events.get(status="sent")
    assert sent.detail["provider_status"] == "twilio:queued"


def test_a_transient_failure_is_retried(workspace, sms_category, sandbox):
    sandbox.faults_set(provider="twilio", fail_next=[503])
    delivery = send_sms(workspace, phone="+14155550123")
    assert delivery.status == DeliveryStatus.RETRYING
    assert "Twilio error 20500" in delivery.status_reason


def test_an_invalid_number_fails_permanently_before_any_request(workspace, sms_category, sandbox):
    delivery = send_sms(workspace, phone="+1415555")
    assert delivery.status == DeliveryStatus.FAILED
    assert "not a valid E.164 number" in delivery.status_reason
    assert sandbox.requests_log(provider="twilio") == []


def test_a_number_twilio_rejects_fails_permanently(workspace, sms_category, sandbox):
    sandbox.faults_set(provider="twilio", address_status={"+14155550199": 400})
    delivery = send_sms(workspace, phone="+14155550199")
    assert delivery.status == DeliveryStatus.FAILED
    assert "Twilio error 21211" in delivery.status_reason


def test_a_text_over_the_segment_limit_is_not_sent(workspace, sms_category, sandbox, settings):
    settings.NOTIFY_SMS_MAX_SEGMENTS = 2
    delivery = send_sms(workspace, phone="+14155550123", text="x" * 307)
    assert delivery.status == DeliveryStatus.FAILED
    assert "3 segments is over the limit of 2" in delivery.status_reason
    assert sandbox.requests_log(provider="twilio") == []


def test_a_bad_phone_number_is_refused_by_the_api(api, workspace, sms_category):
    body = {"category": "code", "recipient": {"external_id": "x", "phone": "+999"}}
    response = api.post("/api/v1/events", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    assert "recipient.phone" in response.json()["error"]["fields"]


@pytest.mark.django_db(transaction=True)
def test_signed_status_callbacks_update_the_delivery_and_forged_ones_get_403(
    workspace, sms_category, sandbox, live_server, settings
):
    settings.NOTIFY_PUBLIC_URL = live_server.url.replace("localhost", "127.0.0.1")
    delivery = send_sms(workspace, phone="+14155550123")
    wait_for(
        lambda: Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.DELIVERED, what="the delivered callback"
    )
    history = list(Delivery.objects.get(pk=delivery.pk).events.values_list("status", "detail"))
    assert history[-1] == ("delivered", {"provider_status": "twilio:delivered"})

    forged = Client().post(
        f"/webhooks/twilio/status?delivery={delivery.pk}",
        {"MessageSid": delivery.provider_message_id, "MessageStatus": "failed"},
        HTTP_X_TWILIO_SIGNATURE="forged",
    )
    assert forged.status_code == 403
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.DELIVERED


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("final_status", "status", "suppressed"),
    [
        ("undelivered:30007", DeliveryStatus.FAILED, False),  # filtered by the carrier: this message
        ("undelivered:30005", DeliveryStatus.BOUNCED, True),  # the number does not exist
        ("undelivered:30003", DeliveryStatus.RETRYING, False),  # unreachable for now: sent again
    ],
)
def test_an_undelivered_callback_is_classified_by_its_error_code(
    workspace, sms_category, sandbox, live_server, settings, final_status, status, suppressed
):
    settings.NOTIFY_PUBLIC_URL = live_server.url.replace("localhost", "127.0.0.1")
    sandbox.faults_set(provider="twilio", final_status=final_status)
    delivery = send_sms(workspace, phone="+14155550123")
    wait_for(lambda: Delivery.objects.get(pk=delivery.pk).status == status, what=f"status {status}")
    delivery = Delivery.objects.get(pk=delivery.pk)
    assert f"Twilio error {final_status.partition(':')[2]}" in delivery.status_reason
    assert Suppression.objects.filter(channel="sms", address="+14155550123").exists() is suppressed
    assert delivery.resend_round == (1 if status == DeliveryStatus.RETRYING else 0)


def test_a_number_that_replied_stop_is_suppressed(workspace, sms_category, sandbox):
    sandbox.faults_set(provider="twilio", address_status={"+14155550123": 21610})
    delivery = send_sms(workspace, phone="+1 415 555 0123")
    assert delivery.status == DeliveryStatus.FAILED
    assert Suppression.objects.get(channel="sms").address == "+14155550123"
    again = send_sms(workspace, phone="+14155550123")
    assert again.status == DeliveryStatus.SUPPRESSED
    assert len(sandbox.requests_log(provider="twilio")) == 1


def test_callbacks_are_refused_without_an_auth_token(workspace, sms_category, sandbox, settings):
    settings.TWILIO_AUTH_TOKEN = ""
    response = Client().post("/webhooks/twilio/status?delivery=x&round=0", {"MessageStatus": "delivered"})
    assert response.status_code == 403


def text_us(body: str, *, number: str = "+14155550123", signature: str | None = None):  # type: ignore[no-untyped-def]
    """A text someone sends to our number, as Twilio's messaging webhook delivers it, signed
    by twilio's own RequestValidator with the account's auth token."""
    params = {"From": number, "To": "+15005550006", "Body": body, "MessageSid": "SMinbound"}
    if signature is None:
        url = f"{django_settings.NOTIFY_PUBLIC_URL}/webhooks/twilio/inbound"
        signature = RequestValidator(django_settings.TWILIO_AUTH_TOKEN).compute_signature(url, params)
    return Client().post("/webhooks/twilio/inbound", params, HTTP_X_TWILIO_SIGNATURE=signature)


def test_replying_stop_opts_the_number_out_and_start_back_in(workspace, sms_category, sandbox):
    assert send_sms(workspace, phone="+14155550123").status == DeliveryStatus.SENT
    response = text_us(" stop ")
    assert (response.status_code, response["Content-Type"]) == (200, "text/xml")
    suppression = Suppression.objects.get(tenant=workspace.tenant, channel="sms")
    assert (suppression.address, suppression.reason) == ("+14155550123", "opted out (replied STOP)")
    stopped = send_sms(workspace, phone="+14155550123")
    assert stopped.status == DeliveryStatus.SUPPRESSED
    assert "replied STOP" in stopped.status_reason

    text_us("START")
    assert not Suppression.objects.filter(channel="sms").exists()
    assert send_sms(workspace, phone="+14155550123").status == DeliveryStatus.SENT
    assert len(sandbox.requests_log(provider="twilio")) == 2


def test_an_erased_person_who_replied_stop_stays_out_until_start(workspace, sms_category, sandbox):
    text_us("STOP")
    send_sms(workspace, phone="+14155550123")
    recipient_erase(recipient=Recipient.objects.get(tenant=workspace.tenant, external_id="ada"))
    assert Suppression.objects.get(tenant=workspace.tenant, channel="sms").address.startswith(HASHED_ADDRESS_PREFIX)
    assert send_sms(workspace, phone="+14155550123").status == DeliveryStatus.SUPPRESSED

    text_us("START")
    assert send_sms(workspace, phone="+14155550123").status == DeliveryStatus.SENT


def test_start_does_not_lift_a_suppression_made_for_another_reason(workspace, sms_category):
    suppression_add(
        tenant_id=workspace.tenant.id, channel="sms", address="+14155550123", reason="dead number", source="ops"
    )
    text_us("START")
    assert Suppression.objects.filter(channel="sms", address="+14155550123").exists()


def test_other_texts_change_nothing_and_forged_ones_get_403(workspace, sms_category):
    assert text_us("stop it please").status_code == 200
    assert text_us("STOP", signature="forged").status_code == 403
    assert not Suppression.objects.exists()


def signed_post(path: str, params: dict[str, str], *, token: str):  # type: ignore[no-untyped-def]
    """A webhook as Twilio posts it, signed with the auth token of one account."""
    signature = RequestValidator(token).compute_signature(f"{django_settings.NOTIFY_PUBLIC_URL}{path}", params)
    return Client().post(path, params, HTTP_X_TWILIO_SIGNATURE=signature)


def test_an_inbound_text_is_checked_against_the_account_that_owns_the_number(workspace, sms_category):
    Provider.objects.create(
        name="twilio-b",
        channel="sms",
        config={"account_sid": "ACb", "auth_token": "token-b", "from_number": "+15005550007"},
    )
    stop = {"From": "+14155550123", "Body": "STOP", "MessageSid": "SMb"}
    # Another account's valid signature on a text to the default number, or to a number no
    # account owns, is refused.
    assert signed_post("/webhooks/twilio/inbound", {**stop, "To": "+15005550006"}, token="token-b").status_code == 403
    assert signed_post("/webhooks/twilio/inbound", {**stop, "To": "+15005550009"}, token="token-b").status_code == 403
    assert not Suppression.objects.exists()
    # The owner's signature is taken.
    assert signed_post("/webhooks/twilio/inbound", {**stop, "To": "+15005550007"}, token="token-b").status_code == 200
    assert Suppression.objects.filter(channel="sms", address="+14155550123").exists()


def status_callback(delivery: Delivery, *, token: str, status: str = "undelivered", error: str = "30005"):  # type: ignore[no-untyped-def]
    params = {"MessageSid": delivery.provider_message_id or "SMx", "MessageStatus": status, "To": "+14155550123"}
    if error:
        params["ErrorCode"] = error
    return signed_post(f"/webhooks/twilio/status?delivery={delivery.pk}&round=0", params, token=token)


def test_a_status_callback_signed_by_another_providers_account_is_refused(workspace, sms_category, sandbox):
    delivery = send_sms(workspace, phone="+14155550123")  # by the configured default account
    Provider.objects.create(name="twilio-b", channel="sms", config={"account_sid": "ACb", "auth_token": "token-b"})
    assert status_callback(delivery, token="token-b").status_code == 403
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENT
    assert not Suppression.objects.exists()
    assert status_callback(delivery, token=django_settings.TWILIO_AUTH_TOKEN).status_code == 204
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.BOUNCED


def test_a_callback_is_checked_against_the_senders_account_in_its_own_tenant_when_names_repeat(
    workspace, sms_category, sandbox
):
    from tests.factories import TenantFactory

    # Names are unique only within a tenant: another tenant's account of the same name, with
    # its own token, must not be taken for the sender of this tenant's text.
    tenant = workspace.api_key.tenant
    api_base = f"{sandbox.base_url}/twilio"
    Provider.objects.create(
        tenant=tenant, name="twilio", channel="sms", position=0,
        config={"api_base": api_base, "account_sid": "ACa", "auth_token": "token-a"},
    )  # fmt: skip
    Provider.objects.create(
        tenant=TenantFactory(), name="twilio", channel="sms", position=1,
        config={"api_base": api_base, "account_sid": "ACo", "auth_token": "token-other"},
    )  # fmt: skip
    delivery = send_sms(workspace, phone="+14155550123")
    assert delivery.status == DeliveryStatus.SENT
    assert status_callback(delivery, token="token-other").status_code == 403
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENT
    assert status_callback(delivery, token="token-a").status_code == 204
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.BOUNCED


@pytest.mark.django_db(transaction=True)
def test_a_text_sent_by_a_provider_account_takes_only_its_callbacks(
    workspace, sms_category, sandbox, live_server, settings
):
    settings.NOTIFY_PUBLIC_URL = live_server.url.replace("localhost", "127.0.0.1")
    Provider.objects.create(
        name="twilio-b",
        channel="sms",
        config={"api_base": f"{sandbox.base_url}/twilio", "account_sid": "ACb", "auth_token": "token-b"},
    )
    delivery = send_sms(workspace, phone="+14155550123")
    # The sandbox signs its callbacks with the token the message was sent with: token-b's.
    wait_for(lambda: Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.DELIVERED, what="delivered")
    delivery.refresh_from_db()
    Delivery.objects.filter(pk=delivery.pk).update(status=DeliveryStatus.SENT)
    assert status_callback(delivery, token=django_settings.TWILIO_AUTH_TOKEN).status_code == 403
    assert Delivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENT


def test_a_callback_that_overtakes_its_send_counts_only_if_its_signer_sent_it(workspace, sms_category, sandbox):
    from notify.channels.base import SendOutcome
    from notify.pipeline.record import outcomes_record
    from notify.pipeline.send import deliveries_claim

    Provider.objects.create(name="twilio-b", channel="sms", config={"account_sid": "ACb", "auth_token": "token-b"})
    deliveries = []
    for signer in ("token-b", django_settings.TWILIO_AUTH_TOKEN):
        [result] = events_ingest(
            api_key=workspace.api_key,
            events=[
                EventRequest(
                    category_key="code",
                    recipients=[RecipientRef(external_id="ada", fields={"phone": "+14155550123"})],
                    data={"text": "x"},
                )
            ],
        )
        delivery = Delivery.objects.get(notification_id=result.response["notification_ids"][0])
        token, claimed = deliveries_claim(delivery_ids=[str(delivery.pk)])
        # Still being sent: either account's signature parks the feedback.
        assert status_callback(delivery, token=signer, status="delivered", error="").status_code == 204
        # The send, recorded as made by the configured default account.
        sent = SendOutcome(delivery_id=delivery.pk, provider_message_id="SMx", provider_status="twilio:queued")
        outcomes_record(lease_token=token, deliveries={d.pk: d for d in claimed}, outcomes=[sent])
        deliveries.append(Delivery.objects.get(pk=delivery.pk))
    assert [d.status for d in deliveries] == [DeliveryStatus.SENT, DeliveryStatus.DELIVERED]
