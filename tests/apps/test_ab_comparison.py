"""A/B variants compared side by side: the z-test's arithmetic against hand-computed values,
GET /api/v1/analytics/variants from the rollups, promoting a winner over the API and in the
admin, and bad input refused naming the field."""

import re
from datetime import timedelta

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from apps.catalog.models import Category, TemplateVariant, TemplateVersion
from apps.deliveries.models import Delivery, DeliveryEvent, Event, Notification
from apps.ops.experiments import two_proportion_z_test
from apps.tenants.models import Scope
from notify.observability.rollups import rollups_advance
from tests.factories import ApiKeyFactory, StaffUserFactory, tenant_world
from tests.notify.test_ab_variants import ab_template

pytestmark = pytest.mark.django_db


# Worked by hand: pooled p = (x1 + x2) / (n1 + n2), se = sqrt(p (1 - p) (1/n1 + 1/n2)),
# z = (x2/n2 - x1/n1) / se, two-sided p-value = 2 (1 - Phi(|z|)), Phi read off a normal table.
# 10/100 vs 20/100: p = 0.15, se = sqrt(0.15 * 0.85 * 0.02) = 0.050498, z = 0.1 / 0.050498 = 1.9803.
# 200/1000 vs 250/1000: p = 0.225, se = sqrt(0.225 * 0.775 * 0.002) = 0.018675, z = 2.6774.
# 50/400 vs 30/380: p = 80/780 = 0.102564, se = 0.021733, z = (0.078947 - 0.125) / se = -2.1190.
@pytest.mark.parametrize(
    ("control", "variant", "z", "p_value"),
    [
        ((10, 100), (20, 100), 1.9803, 0.0477),
        ((200, 1000), (250, 1000), 2.6774, 0.0074),
        ((50, 400), (30, 380), -2.1190, 0.0341),
        ((30, 300), (30, 300), 0.0, 1.0),
    ],
)
def test_the_z_test_matches_hand_computed_values(control, variant, z, p_value):
    test = two_proportion_z_test(control_hits=control[0], control_size=control[1], hits=variant[0], size=variant[1])
    assert test is not None
    assert test.z == pytest.approx(z, abs=1e-4)
    assert test.p_value == pytest.approx(p_value, abs=1e-4)
    assert test.difference == pytest.approx(variant[0] / variant[1] - control[0] / control[1])


@pytest.mark.parametrize(("control", "variant"), [((0, 0), (5, 10)), ((0, 50), (0, 50)), ((50, 50), (10, 10))])
def test_there_is_no_test_without_a_sample_or_without_variance(control, variant):
    assert (
        two_proportion_z_test(control_hits=control[0], control_size=control[1], hits=variant[0], size=variant[1])
        is None
    )


def client_for(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


def sent_history(*, notification: Notification, variant: str, sent: int, opened: int, clicked: int) -> None:
    """`sent` email deliveries of the variant, of which `opened` were opened and the first
    `clicked` of those clicked; the history an hour ago."""
    at = timezone.now() - timedelta(hours=1)
    deliveries = Delivery.objects.bulk_create(
        Delivery(notification=notification, channel="email", priority="normal", next_attempt_at=at, variant=variant)
        for _ in range(sent)
    )
    rows = []
    for index, delivery in enumerate(deliveries):
        states = (
            ["sent", "delivered"] + (["opened"] if index < opened else []) + (["clicked"] if index < clicked else [])
        )
        rows.extend(DeliveryEvent(delivery=delivery, status=state, created_at=at) for state in states)
    DeliveryEvent.objects.bulk_create(rows)


@pytest.fixture
def experiment():  # type: ignore[no-untyped-def]
    """A tenant whose `promo` category's version 1 tests two email subjects, with a hundred
    sends of each; and another tenant with the same figures under its own category."""
    worlds = []
    for tag in ("alpha", "bravo"):
        world = tenant_world(tag=tag)
        template = ab_template(tenant=world.tenant, key=f"{tag}-promo")
        category = Category.objects.create(
            tenant=world.tenant, key="promo", template=template, default_channels=["email"]
        )
        version = template.versions.get()
        event = Event.objects.create(
            tenant=world.tenant,
            api_key=world.api_key,
            category=category,
            idempotency_key=f"{tag}-ab",
            request_digest="0",
        )
        notification = Notification.objects.create(
            tenant=world.tenant,
            event=event,
            recipient=world.recipient,
            category=category,
            template_version=version,
            priority="normal",
        )
        sent_history(notification=notification, variant="a", sent=100, opened=10, clicked=4)
        sent_history(notification=notification, variant="b", sent=100, opened=20, clicked=5)
        worlds.append(world)
    rollups_advance(now=timezone.now() + timedelta(seconds=settings.NOTIFY_ROLLUP_SETTLE_SECONDS + 1))
    return worlds[0]


def period() -> dict[str, str]:
    now = timezone.now()
    return {"from": (now - timedelta(days=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat()}


def test_the_api_compares_the_variants_with_the_test_against_the_control(experiment):
    response = client_for(experiment.api_key.raw_key).get(
        "/api/v1/analytics/variants", {**period(), "category": "promo", "channel": "email"}
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["category"], body["version"], body["channel"], body["metric"]) == ("promo", 1, "email", "opened")
    control, challenger = body["variants"]
    assert control == {
        "variant": "a",
        "control": True,
        "sent": 100,
        "delivered": 100,
        "opened": 10,
        "clicked": 4,
        "rates": {"delivered": 1.0, "opened": 0.1, "clicked": 0.04},
        "test": None,
    }
    assert (challenger["variant"], challenger["control"], challenger["sent"], challenger["opened"]) == (
        "b",
        False,
        100,
        20,
    )
    # Only this tenant's figures: the other tenant's identical history would double them.
    assert challenger["test"]["difference"] == pytest.approx(0.1)
    assert challenger["test"]["z"] == pytest.approx(1.9803, abs=1e-4)
    assert challenger["test"]["p_value"] == pytest.approx(0.0477, abs=1e-4)


def test_the_click_rate_can_be_tested_instead(experiment):
    response = client_for(experiment.api_key.raw_key).get(
        "/api/v1/analytics/variants", {**period(), "category": "promo", "channel": "email", "metric": "clicked"}
    )
    assert response.status_code == 200, response.content
    _, challenger = response.json()["variants"]
    # 4/100 vs 5/100: p = 0.045, se = sqrt(0.045 * 0.955 * 0.02) = 0.029318, z = 0.01 / 0.029318.
    assert challenger["test"]["z"] == pytest.approx(0.3411, abs=1e-4)
    assert challenger["test"]["p_value"] == pytest.approx(0.7330, abs=1e-4)


def test_the_analytics_can_be_grouped_by_variant(experiment):
    response = client_for(experiment.api_key.raw_key).get(
        "/api/v1/analytics", {**period(), "category": "promo", "group_by": "variant"}
    )
    assert response.status_code == 200, response.content
    by_variant = {row["variant"]: (row["sent"], row["opened"]) for row in response.json()["results"]}
    assert by_variant == {"a": (100, 10), "b": (100, 20)}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"channel": "email"}, "category"),
        ({"category": "promo"}, "channel"),
        ({"category": "promo", "channel": "fax"}, "channel"),
        ({"category": "promo", "channel": "sms"}, "channel"),
        ({"category": "nope", "channel": "email"}, "category"),
        ({"category": "promo", "channel": "email", "version": "9"}, "version"),
        ({"category": "promo", "channel": "email", "version": "first"}, "version"),
        ({"category": "promo", "channel": "email", "metric": "bounced"}, "metric"),
        ({"category": "promo", "channel": "email", "variant": "a"}, "variant"),
    ],
)
def test_bad_parameters_are_refused_naming_them(experiment, query, field):
    response = client_for(experiment.api_key.raw_key).get("/api/v1/analytics/variants", {**period(), **query})
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]


def test_the_comparison_needs_the_analytics_scope(experiment):
    key = ApiKeyFactory(tenant=experiment.tenant, scopes=[Scope.EVENTS_SEND.value])
    response = client_for(key.raw_key).get("/api/v1/analytics/variants", {**period(), "category": "promo"})
    assert response.status_code == 403


def test_promoting_over_the_api_publishes_a_new_version(experiment):
    response = client_for(experiment.api_key.raw_key).post(
        "/api/v1/analytics/variants/promote",
        {"category": "promo", "version": 1, "channel": "email", "variant": "b"},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json() == {"template": "alpha-promo", "version": 2}
    promoted = TemplateVersion.objects.get(template__key="alpha-promo", number=2)
    assert list(promoted.variants.filter(channel="email").values_list("key", "weight", "subject")) == [
        ("", 100, "Subject b")
    ]
    assert TemplateVariant.objects.filter(version__template__key="alpha-promo", version__number=1).count() == 3
    # The category sends its template's newest version.
    assert Category.objects.get(tenant=experiment.tenant, key="promo").template.current_version() == promoted


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"category": "promo", "version": 1, "channel": "email", "variant": "z"}, "variant"),
        ({"category": "promo", "version": 1, "channel": "sms", "variant": "a"}, "channel"),
        ({"category": "promo", "version": 4, "channel": "email", "variant": "a"}, "version"),
        ({"category": "promo", "channel": "email", "variant": "a"}, "version"),
        ({"category": "bravo-category", "version": 1, "channel": "email", "variant": "a"}, "category"),
    ],
)
def test_a_bad_promotion_is_refused_naming_the_field(experiment, body, field):
    response = client_for(experiment.api_key.raw_key).post("/api/v1/analytics/variants/promote", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]
    assert not TemplateVersion.objects.filter(template__key="alpha-promo", number=2).exists()


def test_promoting_needs_the_admin_scope(experiment):
    key = ApiKeyFactory(tenant=experiment.tenant, scopes=[Scope.ANALYTICS_READ.value])
    response = client_for(key.raw_key).post(
        "/api/v1/analytics/variants/promote",
        {"category": "promo", "version": 1, "channel": "email", "variant": "b"},
        format="json",
    )
    assert response.status_code == 403


def test_the_admin_compares_the_variants_and_promotes_the_winner(experiment):
    version = TemplateVersion.objects.get(template__key="alpha-promo")
    staff = StaffUserFactory(
        tenant=experiment.tenant, permissions=["catalog.add_templateversion", "catalog.change_templateversion"]
    )
    client = Client()
    client.force_login(staff)
    assert client.get("/admin/catalog/templateversion/add/").status_code == 200
    change_page = client.get(f"/admin/catalog/templateversion/{version.pk}/change/")
    assert f"/admin/analytics/variants/?version={version.pk}&amp;channel=email" in change_page.content.decode()
    page = client.get("/admin/analytics/variants/", {"version": version.pk, "channel": "email"})
    assert page.status_code == 200
    table = re.search(r'<table id="notify-variants">(.*?)</table>', page.content.decode(), re.S).group(1)  # type: ignore[union-attr]
    assert "a (control)" in table and "1.980" in table and "0.0477" in table
    response = client.post(f"/admin/analytics/variants/?version={version.pk}&channel=email", {"promote": "b"})
    promoted = TemplateVersion.objects.get(template=version.template, number=2)
    assert response.status_code == 302 and response["Location"].endswith(f"/{promoted.pk}/change/")
    assert list(promoted.variants.filter(channel="email").values_list("subject", flat=True)) == ["Subject b"]


def test_the_admin_comparison_is_the_staff_tenants_only(experiment):
    other = TemplateVersion.objects.get(template__key="bravo-promo")
    staff = StaffUserFactory(tenant=experiment.tenant, permissions=["catalog.add_templateversion"])
    client = Client()
    client.force_login(staff)
    assert client.get("/admin/analytics/variants/", {"version": other.pk, "channel": "email"}).status_code == 302
    client.post(f"/admin/analytics/variants/?version={other.pk}&channel=email", {"promote": "b"})
    assert not TemplateVersion.objects.filter(template=other.template, number=2).exists()


def test_promoting_in_the_admin_needs_the_permission_to_add_versions(experiment):
    version = TemplateVersion.objects.get(template__key="alpha-promo")
    client = Client()
    client.force_login(experiment.staff)
    page = client.get("/admin/analytics/variants/", {"version": version.pk, "channel": "email"})
    assert page.status_code == 200 and "Promote b" not in page.content.decode()
    response = client.post(f"/admin/analytics/variants/?version={version.pk}&channel=email", {"promote": "b"})
    assert response.status_code == 403
    assert not TemplateVersion.objects.filter(template=version.template, number=2).exists()


def test_the_admin_refuses_several_variants_of_one_channel_without_keys(experiment):
    version = TemplateVersion.objects.get(template__key="alpha-promo")
    staff = StaffUserFactory(
        tenant=experiment.tenant,
        permissions=[
            f"catalog.{action}_{model}"
            for action in ("add", "change")
            for model in ("templateversion", "templatevariant")
        ],
    )
    client = Client()
    client.force_login(staff)
    rows = list(version.variants.order_by("channel", "key"))
    form = {
        "template": version.template_id,
        "note": "two unnamed subjects",
        "variants-TOTAL_FORMS": str(len(rows)),
        "variants-INITIAL_FORMS": str(len(rows)),
        "variants-MIN_NUM_FORMS": "0",
        "variants-MAX_NUM_FORMS": "1000",
    }
    for index, row in enumerate(rows):
        form.update(
            {
                f"variants-{index}-id": row.pk,
                f"variants-{index}-version": version.pk,
                f"variants-{index}-channel": row.channel,
                f"variants-{index}-locale": "",
                f"variants-{index}-key": "" if row.key == "b" else row.key,
                f"variants-{index}-weight": "100",
                f"variants-{index}-subject": row.subject,
                f"variants-{index}-data": "{}",
            }
        )
    # "a" and an unnamed one: the control could not be told from content outside the test.
    response = client.post(f"/admin/catalog/templateversion/{version.pk}/change/", form)
    assert response.status_code == 200
    assert "give each a key" in response.content.decode()
    assert not TemplateVersion.objects.filter(template=version.template, number=2).exists()
    form["variants-1-key"] = "c"
    response = client.post(f"/admin/catalog/templateversion/{version.pk}/change/", form)
    assert response.status_code == 302, response.content
    saved = TemplateVersion.objects.get(template=version.template, number=2)
    assert sorted(saved.variants.filter(channel="email").values_list("key", flat=True)) == ["a", "c"]
