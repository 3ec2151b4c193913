"""The admin's home page: the dashboard from the rollups, scoped to the staff user's tenant;
and the notification list's overall status and channels."""

import re
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.deliveries.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from apps.ops.dashboard import line_chart_svg, percentile_estimate
from notify.observability.rollups import LATENCY_BOUNDS_MS, rollups_advance
from tests.factories import tenant_world

pytestmark = pytest.mark.django_db


def world_history(*, tag: str, failures: int) -> None:
    """`failures` failed email deliveries for the world's notification, with a tagged reason."""
    notification = Notification.objects.get(tenant__slug=f"{tag}-tenant")
    now = timezone.now() - timedelta(minutes=5)
    for _ in range(failures):
        delivery = Delivery.objects.create(
            notification=notification, channel="email", priority="normal", status="failed", next_attempt_at=now
        )
        DeliveryEvent.objects.create(
            delivery=delivery, status="failed", reason=f"{tag} address rejected", created_at=now
        )


def figures(html: str, table: str) -> str:
    return re.search(rf'<table id="{table}">(.*?)</table>', html, re.S).group(1)  # type: ignore[union-attr]


def test_the_dashboard_shows_a_tenants_staff_only_their_tenants_figures():
    alpha = tenant_world(tag="alpha")
    tenant_world(tag="bravo")
    world_history(tag="alpha", failures=3)
    world_history(tag="bravo", failures=7)
    rollups_advance(now=timezone.now() + timedelta(seconds=settings.NOTIFY_ROLLUP_SETTLE_SECONDS + 1))

    client = Client()
    client.force_login(alpha.staff)
    response = client.get("/admin/?period=hour")
    assert response.status_code == 200
    html = response.content.decode()
    channels = figures(html, "notify-channels")
    # alpha's email: 3 failed (bravo's 7 are not counted); its in-app delivery: 1 sent.
    assert re.search(r"<td>email</td><td><a [^>]*>0</a></td><td><a [^>]*>0</a></td><td><a [^>]*>3</a>", channels)
    assert re.search(r"<td>inapp</td><td><a [^>]*>1</a>", channels)
    assert "alpha address rejected" in html and "bravo" not in html
    assert html.count('<svg class="notify-chart"') == 2
    # The installation's gauges, canary and alerts are for superusers.
    assert "Open alerts" not in html

    superuser = Client()
    superuser.force_login(_superuser())
    html = superuser.get("/admin/?period=week").content.decode()
    assert re.search(r"<td>email</td><td><a [^>]*>0</a></td><td><a [^>]*>0</a></td><td><a [^>]*>10</a>", html)
    assert "Open alerts" in html and "bravo address rejected" in html


def _superuser():  # type: ignore[no-untyped-def]
    from django.contrib.auth.models import User

    return User.objects.create_superuser("root", "root@example.com", "pw")


def test_each_number_links_to_the_filtered_delivery_list():
    alpha = tenant_world(tag="alpha")
    world_history(tag="alpha", failures=2)
    rollups_advance(now=timezone.now() + timedelta(seconds=settings.NOTIFY_ROLLUP_SETTLE_SECONDS + 1))
    alpha.staff.user_permissions.add(
        Permission.objects.get(content_type__app_label="deliveries", codename="view_delivery")
    )
    client = Client()
    client.force_login(alpha.staff)
    html = client.get("/admin/?period=day").content.decode()
    link = re.search(r'<td>email</td>(?:<td><a [^>]*>\d+</a></td>){2}<td><a href="([^"]+)">2</a>', html).group(1)  # type: ignore[union-attr]
    assert "channel=email" in link and "status=failed" in link
    listing = client.get(link.replace("&amp;", "&"))
    assert listing.status_code == 200
    assert "2 deliveries" in listing.content.decode()


def test_an_unknown_period_shows_the_default_and_an_empty_installation_renders(admin_client):
    response = admin_client.get("/admin/?period=fortnight")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Deliveries over the last day" in html and "No deliveries in this period." in html


def test_percentiles_are_the_upper_bound_of_the_bucket_they_fall_in():
    histogram = {0: 50, 3: 49, 5: 1}
    assert percentile_estimate(histogram=histogram, quantile=0.5) == LATENCY_BOUNDS_MS[0]
    assert percentile_estimate(histogram=histogram, quantile=0.99) == LATENCY_BOUNDS_MS[3]
    assert percentile_estimate(histogram=histogram, quantile=1.0) == LATENCY_BOUNDS_MS[5]
    assert percentile_estimate(histogram={}, quantile=0.5) is None


def test_a_chart_is_inline_svg_with_one_line_per_series():
    svg = str(line_chart_svg(title="Throughput <t>", series={"sent": [0, 5, 10], "failed": [1, 0, 0]}))
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    assert "Throughput &lt;t&gt;" in svg


def test_the_notification_list_shows_each_notifications_status_and_channels_without_a_query_per_row(admin_client):
    alpha = tenant_world(tag="alpha")
    tenant_world(tag="bravo")
    with CaptureQueriesContext(connection) as two:
        html = admin_client.get("/admin/deliveries/notification/").content.decode()
    # alpha's notification has an in-app delivery sent and an email one dead: sent overall.
    assert "inapp: sent, email: dead" in html or "email: dead, inapp: sent" in html
    assert '<td class="field-overall_status">sent</td>' in html
    notification = Notification.objects.get(tenant=alpha.tenant)
    for _ in range(3):
        copy = Notification.objects.create(
            tenant=alpha.tenant,
            event=notification.event,
            recipient=notification.recipient,
            category=notification.category,
            template_version=notification.template_version,
            priority="normal",
        )
        Delivery.objects.create(
            notification=copy,
            channel="email",
            priority="normal",
            status=DeliveryStatus.DELIVERED,
            next_attempt_at=timezone.now(),
        )
    with CaptureQueriesContext(connection) as five:
        html = admin_client.get("/admin/deliveries/notification/").content.decode()
    assert html.count('<td class="field-overall_status">delivered</td>') == 3
    assert len(five) == len(two)


def test_the_analytics_page_shows_the_staff_tenants_rates_only():
    alpha = tenant_world(tag="alpha")
    tenant_world(tag="bravo")
    world_history(tag="alpha", failures=1)
    world_history(tag="bravo", failures=1)
    rollups_advance(now=timezone.now() + timedelta(seconds=settings.NOTIFY_ROLLUP_SETTLE_SECONDS + 1))
    client = Client()
    client.force_login(alpha.staff)
    response = client.get("/admin/analytics/?days=nonsense")
    assert response.status_code == 200
    table = figures(response.content.decode(), "notify-analytics")
    assert "<td>alpha-category</td><td>inapp</td>" in table
    assert "bravo" not in table
