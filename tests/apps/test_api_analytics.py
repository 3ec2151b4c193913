"""GET /api/v1/analytics: engagement rates from the rollups, for the key's tenant only, with
its query checked."""

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from apps.deliveries.models import Delivery, DeliveryEvent, Notification
from apps.tenants.models import Scope
from notify.observability.rollups import rollups_advance
from tests.factories import ApiKeyFactory, tenant_world

pytestmark = pytest.mark.django_db


def client_for(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


def history(*, tag: str, outcomes: list[list[str]]) -> Notification:
    """One email delivery per entry, going through the entry's states."""
    notification = Notification.objects.get(tenant__slug=f"{tag}-tenant")
    at = timezone.now() - timedelta(hours=1)
    for states in outcomes:
        delivery = Delivery.objects.create(
            notification=notification, channel="email", priority="normal", status=states[-1], next_attempt_at=at
        )
        for state in states:
            reason = "opted out (twilio:STOP)" if state == "unsubscribed" else ""
            DeliveryEvent.objects.create(
                delivery=delivery, status="failed" if state == "unsubscribed" else state, reason=reason, created_at=at
            )
    return notification


@pytest.fixture
def worlds():  # type: ignore[no-untyped-def]
    alpha, bravo = tenant_world(tag="alpha"), tenant_world(tag="bravo")
    history(
        tag="alpha",
        outcomes=[
            ["sent", "delivered", "opened", "clicked"],
            ["sent", "delivered", "opened"],
            ["sent", "delivered"],
            ["sent", "unsubscribed"],
        ],
    )
    history(tag="bravo", outcomes=[["sent", "delivered", "complained"]] * 5)
    rollups_advance(now=timezone.now() + timedelta(seconds=settings.NOTIFY_ROLLUP_SETTLE_SECONDS + 1))
    return alpha, bravo


def period() -> dict[str, str]:
    now = timezone.now()
    return {"from": (now - timedelta(days=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat()}


def test_rates_per_channel_count_only_the_keys_tenant(worlds):
    alpha, _ = worlds
    response = client_for(alpha.api_key.raw_key).get("/api/v1/analytics", {**period(), "group_by": "channel"})
    assert response.status_code == 200, response.content
    email = next(row for row in response.json()["results"] if row["channel"] == "email")
    assert (email["sent"], email["delivered"], email["opened"], email["clicked"]) == (4, 3, 2, 1)
    assert (email["unsubscribed"], email["complained"]) == (1, 0)
    assert email["rates"] == {
        "delivered": 0.75,
        "opened": 0.5,
        "clicked": 0.25,
        "unsubscribed": 0.25,
        "complained": 0.0,
    }
    # tenant_world's own in-app delivery was sent too.
    inapp = next(row for row in response.json()["results"] if row["channel"] == "inapp")
    assert inapp["sent"] == 1 and inapp["rates"]["delivered"] == 0.0


def test_rates_per_category_and_template_version(worlds):
    alpha, _ = worlds
    category = Notification.objects.get(tenant=alpha.tenant).category
    response = client_for(alpha.api_key.raw_key).get(
        "/api/v1/analytics", {**period(), "category": category.key, "group_by": "category,template_version"}
    )
    assert response.status_code == 200, response.content
    [row] = response.json()["results"]
    assert row["category"] == category.key and row["sent"] == 5 and row["clicked"] == 1
    assert row["template_version"] == Notification.objects.get(tenant=alpha.tenant).template_version_id


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"to": "2026-01-01T00:00:00Z"}, "from"),
        ({"from": "yesterday", "to": "2026-01-01T00:00:00Z"}, "from"),
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "to"),
        ({"from": "2025-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "to"),
        ({"from": "2025-12-01T00:00:00Z", "to": "2026-01-01T00:00:00Z", "group_by": "recipient"}, "group_by"),
        ({"from": "2025-12-01T00:00:00Z", "to": "2026-01-01T00:00:00Z", "category": "nope"}, "category"),
        ({"from": "2025-12-01T00:00:00Z", "to": "2026-01-01T00:00:00Z", "tenant": "x"}, "tenant"),
    ],
)
def test_bad_parameters_are_refused_naming_them(worlds, query, field):
    alpha, _ = worlds
    response = client_for(alpha.api_key.raw_key).get("/api/v1/analytics", query)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]


def test_the_analytics_scope_is_required(worlds):
    alpha, _ = worlds
    key = ApiKeyFactory(tenant=alpha.tenant, scopes=[Scope.EVENTS_SEND.value])
    response = client_for(key.raw_key).get("/api/v1/analytics", period())
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"


def test_another_tenants_category_is_unknown(worlds):
    alpha, bravo = worlds
    category = Notification.objects.get(tenant=bravo.tenant).category
    response = client_for(alpha.api_key.raw_key).get("/api/v1/analytics", {**period(), "category": category.key})
    assert response.status_code == 400
    assert "category" in response.json()["error"]["fields"]
