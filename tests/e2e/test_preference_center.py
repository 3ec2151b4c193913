"""The hosted preference center, clicked through in headless Chromium on a phone-sized screen,
against the running server; then what it saved, and how it refuses a bad link."""

import pytest
from django.test import Client

from apps.catalog.models import CategoryKind
from apps.recipients.models import PreferenceSet, Recipient
from tests.helpers import chromium_launch

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def link(api, workspace, live_server, settings) -> str:  # type: ignore[no-untyped-def]
    settings.NOTIFY_PUBLIC_URL = live_server.url
    workspace.normal.default_channels = ["email", "sms"]
    workspace.normal.description = "Account news"
    workspace.normal.save()
    workspace.bulk.kind = CategoryKind.MARKETING
    workspace.bulk.description = "Offers and news"
    workspace.bulk.save()
    workspace.critical.kind = CategoryKind.CRITICAL
    workspace.critical.description = "Sign-in codes"
    workspace.critical.save()
    api.post("/api/v1/recipients", {"external_id": "ada", "email": "ada@example.com"}, format="json")
    response = api.post("/api/v1/recipients/ada/preference-link")
    assert response.status_code == 201
    return response.json()["url"]


def test_a_person_sets_their_preferences_by_clicking_and_typing(link):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = chromium_launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
            page.goto(link)
            expect(page.get_by_role("heading", name="Notification preferences")).to_be_visible()
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
            expect(page.get_by_text("Sign-in codes")).to_be_visible()  # shown as always sent, with no switch

            page.get_by_role("group", name="Account news").get_by_label("SMS").uncheck()
            page.get_by_label("I agree to marketing by Email").check()
            page.get_by_label("Hold notifications during quiet hours").check()
            page.get_by_label("From").fill("21:30")
            page.get_by_label("To", exact=True).fill("06:45")
            page.get_by_label("Your timezone").select_option("America/New_York")
            # By keyboard alone: focus Saturday and press Space to untick it.
            page.get_by_label("Sat").focus()
            page.keyboard.press("Space")
            expect(page.get_by_label("Sat")).not_to_be_checked()
            page.get_by_role("button", name="Save preferences").click()

            expect(page.get_by_role("status")).to_have_text("Your preferences are saved.")
            page.reload()
            expect(page.get_by_role("group", name="Account news").get_by_label("SMS")).not_to_be_checked()
            expect(page.get_by_role("group", name="Account news").get_by_label("Email")).to_be_checked()
            expect(page.get_by_label("I agree to marketing by Email")).to_be_checked()
            expect(page.get_by_label("From")).to_have_value("21:30")

            page.goto(link[:-4] + "abcd")
            expect(page.get_by_role("heading", name="This link does not work")).to_be_visible()
            expect(page.get_by_text("This preferences link is not valid.")).to_be_visible()
        finally:
            browser.close()

    ada = Recipient.objects.get(external_id="ada")
    preferences = PreferenceSet.objects.get(recipient=ada)
    assert preferences.categories == {"welcome": {"sms": False}}  # only what differs from the defaults
    assert preferences.quiet_hours == {"start": "21:30", "end": "06:45", "days": [0, 1, 2, 3, 4, 6]}
    assert ada.timezone == "America/New_York"
    [consent] = ada.consents.all()
    assert (consent.channel, consent.granted, consent.source) == ("email", True, "preference center")


def test_an_expired_link_is_refused_with_a_readable_page(link, settings):
    settings.NOTIFY_PREFERENCE_LINK_SECONDS = -1
    response = Client().get(link)
    assert response.status_code == 403
    assert b"This preferences link has expired" in response.content
