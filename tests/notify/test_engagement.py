"""Engagement no provider reports: an in-app item read in the inbox opens its delivery, and a
web push notification's click, reported by the service worker through the message's signed
link, clicks its delivery; both reach the engagement analytics through the rollups."""

from datetime import timedelta
from urllib.parse import urlparse

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone

from apps.deliveries.models import Delivery, DeliveryStatus
from apps.recipients.tokens import WEBPUSH_CLICK, recipient_token_issue
from notify.observability.rollups import rollups_advance
from tests.apps.test_inbox import browser, notify  # noqa: F401 - the fixture is used by name
from tests.factories import RecipientFactory
from tests.notify.test_webpush import ada, alert, push, subscribe  # noqa: F401 - fixtures used by name


def history(delivery: Delivery) -> list[tuple[str, str]]:
    return list(delivery.events.order_by("created_at", "id").values_list("status", "reason"))


def engagement(api, channel: str) -> dict:  # type: ignore[no-untyped-def]
    rollups_advance(now=timezone.now() + timedelta(seconds=django_settings.NOTIFY_ROLLUP_SETTLE_SECONDS + 1))
    now = timezone.now()
    response = api.get(
        "/api/v1/analytics",
        {"from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat()},
    )
    assert response.status_code == 200, response.content
    return next(row for row in response.json()["results"] if row["channel"] == channel)


def test_reading_an_inbox_item_opens_its_delivery_once(workspace, browser, api):  # noqa: F811
    first, second, third = (notify(workspace, text=text) for text in ("one", "two", "three"))
    item_id = first.inbox_item.pk
    assert browser.post(f"/inbox/v1/items/{item_id}/read").status_code == 200
    browser.post(f"/inbox/v1/items/{item_id}/read")  # a repeat changes nothing
    first.refresh_from_db()
    assert first.status == DeliveryStatus.OPENED
    assert history(first) == [
        ("queued", "planned"),
        ("sent", "accepted by the provider"),
        ("opened", "read in the inbox"),
    ]

    assert browser.post("/inbox/v1/items/read-all").json() == {"updated": 2}
    assert set(Delivery.objects.filter(pk__in=[second.pk, third.pk]).values_list("status", flat=True)) == {"opened"}
    inapp = engagement(api, "inapp")
    assert (inapp["sent"], inapp["opened"], inapp["rates"]["opened"]) == (3, 3, 1.0)


def click_url_of(sandbox, delivery: Delivery) -> str:  # type: ignore[no-untyped-def]
    [request] = [r for r in sandbox.requests_log(provider="webpush") if r["delivery_id"] == str(delivery.pk)]
    return request["metadata"]["shown"]["click_url"]


def test_a_web_push_click_reported_by_the_service_worker_clicks_its_delivery(
    workspace,
    alert,  # noqa: F811
    ada,  # noqa: F811
    sandbox,
    api,
):
    subscribe(workspace, ada, sandbox, "sub-laptop")
    delivery = push(workspace)
    assert delivery.status == DeliveryStatus.SENT
    url = click_url_of(sandbox, delivery)
    assert url.startswith(django_settings.NOTIFY_PUBLIC_URL)
    path = urlparse(url).path
    service_worker = Client(enforce_csrf_checks=True)  # what a fetch() from a service worker is
    assert service_worker.get(path).status_code == 405
    assert service_worker.post(path).status_code == 204
    assert service_worker.post(path).status_code == 204  # a repeat changes nothing
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.CLICKED
    assert [status for status, _ in history(delivery)] == ["queued", "sent", "clicked"]
    webpush = engagement(api, "webpush")
    assert (webpush["sent"], webpush["clicked"]) == (1, 1)


def test_a_forged_or_misdirected_click_report_changes_nothing(workspace, alert, ada, sandbox):  # noqa: F811
    subscribe(workspace, ada, sandbox, "sub-laptop")
    delivery = push(workspace)
    path = urlparse(click_url_of(sandbox, delivery)).path
    client = Client()
    assert client.post(path[:-3] + "abc").status_code == 403
    # A genuine link, but for another recipient than the delivery's.
    other = RecipientFactory(tenant=workspace.tenant, external_id="bo")
    token = recipient_token_issue(purpose=WEBPUSH_CLICK, recipient_id=other.pk, d=str(delivery.pk))
    assert client.post(f"/webpush/v1/clicks/{token}").status_code == 404
    token = recipient_token_issue(purpose=WEBPUSH_CLICK, recipient_id=ada.pk, d="not-a-delivery")
    assert client.post(f"/webpush/v1/clicks/{token}").status_code == 404
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.SENT


@pytest.mark.django_db
def test_an_expired_click_link_is_refused(workspace, alert, ada, sandbox, settings):  # noqa: F811
    subscribe(workspace, ada, sandbox, "sub-laptop")
    delivery = push(workspace)
    path = urlparse(click_url_of(sandbox, delivery)).path
    settings.NOTIFY_WEBPUSH_CLICK_LINK_SECONDS = -1
    assert Client().post(path).status_code == 403
