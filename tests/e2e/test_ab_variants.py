"""An A/B test end to end: a real worker sends each recipient the variant this process would
assign them, the sandbox's opens come back through the provider webhook, and the comparison
counts them under each variant."""

import json
from collections import Counter
from datetime import timedelta
from urllib.parse import urlparse

import pytest
from django.conf import settings
from django.utils import timezone

from apps.catalog.models import Category
from apps.deliveries.models import Delivery, DeliveryStatus
from notify.observability.rollups import rollups_advance
from notify.pipeline.plan import variant_assign
from tests.helpers import wait_for
from tests.notify.test_ab_variants import ab_template

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def test_a_worker_sends_each_recipient_their_variant_and_the_opens_count_under_it(
    api, workspace, workers, sandbox, live_server
):
    template = ab_template(tenant=workspace.tenant, key="promo", weights={"a": 60, "b": 40})
    Category.objects.create(tenant=workspace.tenant, key="promo", template=template, default_channels=["email"])
    port = urlparse(live_server.url).port
    sandbox.webhooks_set(postmark=f"http://sandbox:sandbox-webhook-secret@127.0.0.1:{port}/anymail/postmark/tracking/")
    sandbox.faults_set(final_status="opened")
    workers.start("normal")
    recipients = [{"external_id": f"r{i}", "email": f"r{i}@example.com"} for i in range(30)]
    response = api.post(
        "/api/v1/events",
        data=json.dumps({"category": "promo", "recipients": recipients, "data": {}}),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    deliveries = Delivery.objects.filter(notification_id__in=response.json()["notification_ids"])
    wait_for(
        lambda: all(status == DeliveryStatus.OPENED for status in deliveries.values_list("status", flat=True)),
        timeout=60,
        what="every delivery to be opened",
    )
    version = template.versions.get()
    arms = list(version.variants.filter(channel="email").order_by("key"))
    subjects = {request["delivery_id"]: request["subject"] for request in sandbox.requests_log()}
    per_variant: Counter[str] = Counter()
    for delivery in deliveries.select_related("notification"):
        # The worker's choice is the one this process makes: the assignment is the same anywhere.
        expected = variant_assign(
            variants=arms, experiment=f"version:{version.pk}", recipient_id=delivery.notification.recipient_id
        ).key
        assert delivery.variant == expected
        assert subjects[str(delivery.pk)] == f"Subject {expected}"
        per_variant[expected] += 1
    assert set(per_variant) == {"a", "b"}

    rollups_advance(now=timezone.now() + timedelta(seconds=settings.NOTIFY_ROLLUP_SETTLE_SECONDS + 1))
    now = timezone.now()
    comparison = api.get(
        "/api/v1/analytics/variants",
        {
            "category": "promo",
            "channel": "email",
            "from": (now - timedelta(hours=1)).isoformat(),
            "to": (now + timedelta(hours=1)).isoformat(),
        },
    )
    assert comparison.status_code == 200, comparison.content
    figures = {row["variant"]: (row["sent"], row["delivered"], row["opened"]) for row in comparison.json()["variants"]}
    assert figures == {key: (count, count, count) for key, count in per_variant.items()}
