"""Email unsubscribe: List-Unsubscribe with one-click POST (RFC 8058) and a link in the email,
both taking effect with the very next notification."""

from urllib.parse import urlparse

import pytest
from django.test import Client

from apps.catalog.models import CategoryKind
from apps.deliveries.models import DeliveryStatus
from apps.recipients.models import Recipient
from tests.notify.test_send import ingest_one, send_now

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ada(workspace, broker) -> Recipient:  # type: ignore[no-untyped-def]
    return Recipient.objects.create(tenant=workspace.tenant, external_id="ada", email="ada@example.com")


def sent_email(workspace, sandbox, category: str = "welcome") -> dict:  # type: ignore[no-untyped-def]
    delivery = send_now(ingest_one(workspace, category=category))
    assert delivery.status == DeliveryStatus.SENT
    return sandbox.requests_log()[-1]


def path_of(url: str) -> str:
    return urlparse(url).path


def test_a_non_critical_email_carries_one_click_unsubscribe_and_the_links(workspace, sandbox, ada):
    email = sent_email(workspace, sandbox)
    unsubscribe_url = email["headers"]["List-Unsubscribe"].strip("<>")
    assert email["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert f"Unsubscribe: {unsubscribe_url}" in email["text"]
    assert "Your preferences: http" in email["text"]

    workspace.normal.kind = CategoryKind.CRITICAL
    workspace.normal.save()
    critical = sent_email(workspace, sandbox)
    assert critical["headers"] == {}
    assert "Unsubscribe" not in critical["text"]


def test_one_click_unsubscribes_from_that_category_before_the_next_email(workspace, sandbox, ada):
    url = path_of(sent_email(workspace, sandbox)["headers"]["List-Unsubscribe"].strip("<>"))
    response = Client().post(url, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200
    delivery = send_now(ingest_one(workspace))
    assert delivery.status == DeliveryStatus.SUPPRESSED
    assert delivery.status_reason == "'welcome' on email is turned off by the recipient"
    # Only that category: another one still arrives.
    assert send_now(ingest_one(workspace, category="digest")).status == DeliveryStatus.SENT


def test_the_preferences_link_in_the_email_opens_the_recipients_preference_center(workspace, sandbox, ada):
    text = sent_email(workspace, sandbox)["text"]
    url = path_of(text.split("Your preferences: ")[1].split()[0])
    response = Client().get(url)
    assert response.status_code == 302
    assert path_of(response["Location"]).startswith("/preferences/")
    page = Client().get(path_of(response["Location"]))
    assert page.status_code == 200
    assert b"For ada@example.com." in page.content
    assert Client().get(url.replace("/preferences", "xyz/preferences")).status_code == 403


def test_the_link_in_the_email_asks_first_because_scanners_follow_links(workspace, sandbox, ada):
    text = sent_email(workspace, sandbox)["text"]
    url = path_of(text.split("Unsubscribe: ")[1].split()[0])
    page = Client().get(url)
    assert b"<button" in page.content and b"Stop receiving" in page.content
    assert send_now(ingest_one(workspace)).status == DeliveryStatus.SENT  # nothing changed yet
    done = Client().post(url)
    assert b"You are unsubscribed" in done.content
    assert send_now(ingest_one(workspace)).status == DeliveryStatus.SUPPRESSED


def test_unsubscribing_from_marketing_withdraws_consent(api, workspace, sandbox, ada):
    workspace.bulk.kind = CategoryKind.MARKETING
    workspace.bulk.save()
    api.post("/api/v1/recipients/ada/consents", {"channel": "email", "granted": True, "source": "form"}, format="json")
    url = path_of(sent_email(workspace, sandbox, category="digest")["headers"]["List-Unsubscribe"].strip("<>"))
    Client().post(url, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    [standing] = api.get("/api/v1/recipients/ada/consents").json()
    assert (standing["granted"], standing["source"]) == (False, "unsubscribe link")


def test_a_tampered_unsubscribe_link_is_refused(workspace, sandbox, ada):
    url = path_of(sent_email(workspace, sandbox)["headers"]["List-Unsubscribe"].strip("<>"))
    response = Client().post(url[:-3] + "xyz")
    assert response.status_code == 403
    assert b"This unsubscribe link is not valid" in response.content
