"""Content protection with a real worker and the provider sandbox. Sensitive categories
(HIPAA-style): email, SMS and mobile push carry only the notice and the link, whatever the
templates say; the content reaches only the authenticated in-app inbox. A tenant with
encrypt_content: its data is ciphertext at rest and its messages arrive as ever."""

import json

import pytest
from django.db import connection

from apps.catalog.models import Category, TemplateVariant, TemplateVersion
from apps.deliveries.models import DeliveryStatus
from apps.inbox.models import InboxItem
from apps.recipients.models import Device, Recipient
from apps.tenants.encryption import CIPHER_PREFIX
from tests.e2e.test_delivery_guarantees import statuses, wait_for_status
from tests.factories import CategoryFactory, TemplateFactory
from tests.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

CONTENT = "HbA1c 9.1 percent"
CHANNELS = ["email", "sms", "push", "inapp"]


@pytest.fixture
def lab_results(workspace) -> Category:  # type: ignore[no-untyped-def]
    """A category whose every template, careless as a template can be, puts the content in."""
    template = TemplateFactory(tenant=workspace.tenant, key="lab-results")
    version = TemplateVersion.objects.create(template=template, number=1)
    for channel in CHANNELS:
        TemplateVariant.objects.create(
            version=version,
            channel=channel,
            subject="Result: {{ data.result }}",
            title="Result: {{ data.result }}",
            body="Your result: {{ data.result }}",
            html="<p>Your result: {{ data.result }}</p>",
            data={"screen": "lab-result-details"},
        )
    return CategoryFactory(
        tenant=workspace.tenant,
        key="lab-results",
        template=template,
        default_channels=CHANNELS,
        sensitive=True,
        secure_message_text="Your clinic sent you a secure message",
    )


def test_a_sensitive_category_sends_only_the_notice_and_keeps_the_content_for_the_inbox(
    api, workspace, lab_results, workers, sandbox, settings
):
    workspace.tenant.secure_message_url = "https://clinic.example/inbox"
    workspace.tenant.save()
    workers.start("normal")
    recipient = {"external_id": "pat", "email": "pat@example.com", "phone": "+14155550142"}
    api.post("/api/v1/recipients", data=json.dumps(recipient), content_type="application/json")
    Device.objects.create(
        tenant=workspace.tenant, recipient=Recipient.objects.get(external_id="pat"), token="tok-pat", platform="ios"
    )
    response = api.post(
        "/api/v1/events",
        data=json.dumps({"category": "lab-results", "recipients": ["pat"], "data": {"result": CONTENT}}),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    notification_ids = response.json()["notification_ids"]
    wait_for(
        lambda: statuses(notification_ids)[DeliveryStatus.SENT] == len(CHANNELS),
        timeout=60,
        what=f"a delivery on each channel to be sent (now {dict(statuses(notification_ids))})",
    )

    received = {entry["provider"]: entry for entry in sandbox.requests_log()}
    assert set(received) == {"postmark", "twilio", "fcm"}
    notice, link = "Your clinic sent you a secure message", "https://clinic.example/inbox"
    assert received["twilio"]["text"] == f"{notice}: {link}"
    assert (received["fcm"]["subject"], received["fcm"]["text"]) == (notice, f"{notice}: {link}")
    assert received["postmark"]["subject"] == notice
    assert f"{notice}: {link}" in received["postmark"]["text"]
    assert f'<a href="{link}">{link}</a>' in received["postmark"]["html"]
    for entry in received.values():
        assert CONTENT not in json.dumps(entry), entry
    assert "screen" not in received["fcm"]["metadata"]  # the template's data stays with the content

    item = InboxItem.objects.get(recipient__external_id="pat")
    assert (item.title, item.body, item.data) == (
        f"Result: {CONTENT}",
        f"Your result: {CONTENT}",
        {"screen": "lab-result-details"},
    )


def test_the_notice_falls_back_to_the_installations_text_and_link(
    api, workspace, lab_results, workers, sandbox, settings
):
    lab_results.secure_message_text = ""
    lab_results.save()
    workers.start("normal", env={"NOTIFY_SECURE_MESSAGE_URL": "https://notify.example/inbox"})
    recipient = {"external_id": "pat", "phone": "+14155550142"}
    api.post("/api/v1/recipients", data=json.dumps(recipient), content_type="application/json")
    response = api.post(
        "/api/v1/events",
        data=json.dumps(
            {"category": "lab-results", "recipients": ["pat"], "channels": ["sms"], "data": {"result": CONTENT}}
        ),
        content_type="application/json",
    )
    wait_for_status(response.json()["notification_ids"], DeliveryStatus.SENT)
    [sms] = sandbox.requests_log(provider="twilio")
    assert sms["text"] == "You have a new secure message: https://notify.example/inbox"


def test_an_encrypt_content_tenants_data_is_ciphertext_at_rest_and_still_delivered(
    api, workspace, lab_results, workers, sandbox
):
    workspace.tenant.encrypt_content = True
    workspace.tenant.save()
    lab_results.sensitive = False
    lab_results.save()
    workers.start("normal")
    api.post(
        "/api/v1/recipients",
        data=json.dumps({"external_id": "pat", "email": "pat@example.com"}),
        content_type="application/json",
    )
    response = api.post(
        "/api/v1/events",
        data=json.dumps(
            {
                "category": "lab-results",
                "recipients": ["pat"],
                "channels": ["email", "inapp"],
                "data": {"result": CONTENT},
            }
        ),
        content_type="application/json",
    )
    notification_ids = response.json()["notification_ids"]
    wait_for(lambda: statuses(notification_ids)[DeliveryStatus.SENT] == 2, timeout=60, what="email and inbox sent")

    [email] = sandbox.requests_log(provider="postmark")
    assert (email["subject"], email["text"].splitlines()[0]) == (f"Result: {CONTENT}", f"Your result: {CONTENT}")
    item = InboxItem.objects.get(recipient__external_id="pat")
    assert item.body == f"Your result: {CONTENT}"
    with connection.cursor() as cursor:
        cursor.execute("SELECT data::text FROM deliveries_event WHERE id = %s", [response.json()["event_id"]])
        [event_data] = cursor.fetchone()
        cursor.execute("SELECT title || body FROM inbox_inboxitem WHERE id = %s", [item.pk])
        [inbox_text] = cursor.fetchone()
    assert '"fernet"' in event_data and "HbA1c" not in event_data
    assert inbox_text.startswith(CIPHER_PREFIX) and "HbA1c" not in inbox_text
