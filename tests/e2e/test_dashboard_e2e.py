"""The dashboard in headless Chromium: a tenant's staff logs in, sees the charts, and follows a
number to the filtered list behind it."""

from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.utils import timezone

from notify.observability.rollups import rollups_advance
from tests.apps.test_dashboard import world_history
from tests.factories import tenant_world
from tests.helpers import chromium_launch

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_dashboard_shows_charts_and_a_number_leads_to_its_list(web_server):
    from playwright.sync_api import expect, sync_playwright

    alpha = tenant_world(tag="alpha")
    tenant_world(tag="bravo")
    world_history(tag="alpha", failures=2)
    world_history(tag="bravo", failures=5)
    alpha.staff.user_permissions.add(
        Permission.objects.get(content_type__app_label="deliveries", codename="view_delivery")
    )
    rollups_advance(now=timezone.now() + timedelta(seconds=settings.NOTIFY_ROLLUP_SETTLE_SECONDS + 1))

    with sync_playwright() as playwright:
        browser = chromium_launch(playwright)
        try:
            page = browser.new_page()
            page.goto(f"{web_server}/admin/login/?next=/admin/")
            page.fill("#id_username", alpha.staff.username)
            page.fill("#id_password", alpha.staff.raw_password)
            page.click("input[type=submit]")
            page.wait_for_url(f"{web_server}/admin/")
            expect(page.locator("svg.notify-chart")).to_have_count(2)
            expect(page.locator("svg.notify-chart polyline").first).to_be_attached()

            page.click("text=last week")
            expect(page.locator("#notify-dashboard h2")).to_contain_text("last week")
            email = page.locator("#notify-channels tr", has_text="email")
            failed = email.locator("td").nth(3).locator("a")
            expect(failed).to_have_text("2")
            failed.click()
            page.wait_for_url("**/admin/deliveries/delivery/**")
            assert "status=failed" in page.url and "channel=email" in page.url
            expect(page.locator("#result_list tbody tr")).to_have_count(2)
        finally:
            browser.close()
