"""Email unsubscribe: List-Unsubscribe with one-click POST (RFC 8058) and a link in the email,
both taking effect with the very next notification."""

import os
import subprocess
import sys
from urllib.parse import urlparse

import pytest
from django.test import Client

from apps.catalog.models import CategoryKind
from apps.deliveries.models import DeliveryStatus
from apps.recipients.models import Recipient
from apps.recipients.tokens import PREFERENCES, recipient_link
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


def test_links_made_under_a_rotated_key_work_until_it_leaves_the_fallbacks(workspace, sandbox, ada, settings):
    """Rotating the secret key: the old key moves to SECRET_KEY_FALLBACKS, so links already
    sent keep working, new ones are signed with the new key, and removing the old key from
    the fallbacks retires every link made under it."""
    unsubscribe = path_of(sent_email(workspace, sandbox)["headers"]["List-Unsubscribe"].strip("<>"))
    preferences = path_of(recipient_link(purpose=PREFERENCES, recipient_id=ada.id))
    old_key = settings.SECRET_KEY

    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "the-new-secret-key", [old_key]
    assert b"For ada@example.com." in Client().get(preferences).content
    new_preferences = path_of(recipient_link(purpose=PREFERENCES, recipient_id=ada.id))
    assert new_preferences != preferences
    response = Client().post(
        unsubscribe, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 200
    assert send_now(ingest_one(workspace)).status == DeliveryStatus.SUPPRESSED

    settings.SECRET_KEY_FALLBACKS = []
    for retired in (unsubscribe, preferences):
        response = Client().get(retired)
        assert response.status_code == 403
        assert b"not valid" in response.content
    assert Client().get(new_preferences).status_code == 200  # signed with the current key

    # A link signed with a key the service never had is refused, fallbacks or not.
    settings.SECRET_KEY = "a-key-an-attacker-chose"
    forged = path_of(recipient_link(purpose=PREFERENCES, recipient_id=ada.id))
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "the-new-secret-key", [old_key]
    assert Client().get(forged).status_code == 403


def test_the_key_fallbacks_are_read_from_the_environment():
    script = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY_FALLBACKS)"
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"}
    read = subprocess.run(
        [sys.executable, "-c", script],
        env={**environment, "DJANGO_SECRET_KEY_FALLBACKS": "the-old-key,the-older-key"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert read.stdout.strip() == "['the-old-key', 'the-older-key']"
    environment.pop("DJANGO_SECRET_KEY_FALLBACKS", None)
    unset = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True)
    assert unset.stdout.strip() == "[]"
