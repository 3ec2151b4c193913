"""/metrics: its token, the request and acceptance counters, and the gauges computed from the
database into Redis, which a scrape reads without a query."""

import json
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.deliveries.models import DeadLetter, Delivery, DeliveryStatus, Provider
from notify.observability.gauges import BACKLOG_STATUSES, GAUGES_KEY, gauges_compute
from notify.policy.caps import redis_client
from notify.resilience.providers import breaker_for, breaker_reset
from tests.helpers import METRICS_TOKEN as TOKEN
from tests.helpers import metric_value as value
from tests.helpers import metrics_scrape as scrape
from tests.notify.test_send import ingest_many


@pytest.fixture
def stored_gauges():  # type: ignore[no-untyped-def]
    redis_client().delete(GAUGES_KEY, "notify:metrics:gauges:lock")
    yield
    redis_client().delete(GAUGES_KEY, "notify:metrics:gauges:lock")


def test_metrics_ask_for_the_token(db, metrics_token):
    client = Client()
    missing = client.get("/metrics")
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    assert missing.json()["error"]["fields"] == {"Authorization": [missing.json()["error"]["message"]]}
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 401
    assert "notify_websocket_connections" in scrape()


def test_without_a_token_metrics_do_not_exist_outside_debug_and_are_open_in_debug(db, settings):
    settings.NOTIFY_METRICS_TOKEN = ""
    settings.DEBUG = False
    assert Client().get("/metrics").status_code == 404
    settings.DEBUG = True
    assert Client().get("/metrics").status_code == 200


def test_the_demo_metrics_token_is_refused_outside_debug(db, settings):
    from apps.deliveries.checks import sandbox_credentials_check

    settings.DEBUG = False
    settings.NOTIFY_METRICS_TOKEN = "demo-metrics-token"
    assert any("NOTIFY_METRICS_TOKEN" in error.msg for error in sandbox_credentials_check())


def test_an_accepted_event_counts_the_event_its_notifications_and_the_request(api, workspace, metrics_token):
    before = scrape()
    response = api.post(
        "/api/v1/events",
        data=json.dumps({"category": "welcome", "recipients": [{"external_id": "a"}, {"external_id": "b"}]}),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    api.get("/api/v1/notifications/" + response.json()["notification_ids"][0])
    after = scrape()
    tenant = workspace.tenant.slug

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("notify_events_accepted_total", tenant=tenant, category="welcome") == 1
    assert delta("notify_notifications_accepted_total", tenant=tenant, category="welcome", priority="normal") == 2
    assert delta("notify_api_requests_total", method="POST", route="api/v1/events", status="202") == 1
    # The route pattern, or for the router's regular expressions the view's name; never the path.
    assert delta("notify_api_requests_total", method="GET", route="notification-detail", status="200") == 1
    assert response.json()["notification_ids"][0] not in after


def test_the_tenant_label_collapses_when_turned_off(api, workspace, metrics_token, settings):
    settings.NOTIFY_METRICS_TENANT_LABEL = False
    before = value(scrape(), "notify_events_accepted_total", tenant="all", category="welcome")
    response = api.post(
        "/api/v1/events",
        data=json.dumps({"category": "welcome", "recipients": [{"external_id": "a"}]}),
        content_type="application/json",
    )
    assert response.status_code == 202
    assert value(scrape(), "notify_events_accepted_total", tenant="all", category="welcome") == before + 1


def test_the_gauges_match_the_database_and_a_scrape_runs_no_query(workspace, metrics_token, stored_gauges):
    ids = ingest_many(workspace, category="welcome", emails={f"r{i}": f"r{i}@example.com" for i in range(3)})
    now = timezone.now()
    Delivery.objects.filter(id__in=ids).update(next_attempt_at=now - timedelta(seconds=120))
    # Not due yet: queued, but no part of the oldest age.
    [later] = ingest_many(workspace, category="welcome", emails={"later": "later@example.com"})
    Delivery.objects.filter(id=later).update(next_attempt_at=now + timedelta(hours=1))
    dead = Delivery.objects.get(id=ids[0])
    DeadLetter.objects.create(delivery=dead, channel="email", reason="test", attempts=5)
    Delivery.objects.filter(id=ids[0]).update(status=DeliveryStatus.DEAD)

    assert gauges_compute(now=now) is True
    assert gauges_compute(now=now) is False  # within the interval: computed once
    with CaptureQueriesContext(connection) as queries:
        text = scrape()
    assert len(queries) == 0, [q["sql"] for q in queries]

    email_normal = {"channel": "email", "priority": "normal"}
    assert value(text, "notify_oldest_queued_delivery_seconds", **email_normal) == pytest.approx(120, abs=1)
    assert value(text, "notify_oldest_queued_delivery_seconds", channel="sms", priority="normal") == 0
    assert value(text, "notify_deliveries_backlog", status="queued", **email_normal) == 3
    assert value(text, "notify_dead_letters_pending", channel="email") == 1
    assert value(text, "notify_gauges_computed_timestamp_seconds") == pytest.approx(now.timestamp())
    assert value(text, "notify_queue_depth", queue="email.normal") == 0
    assert "notify_queue_depth" in text and 'queue="maintenance"' in text


def test_the_queue_depth_is_read_from_the_broker(db, metrics_token, stored_gauges, broker):
    from celery import current_app

    for _ in range(2):  # two task messages that no worker takes
        current_app.send_task("notify.sweep", queue="sms.bulk")
    gauges_compute(force=True)
    text = scrape()
    assert value(text, "notify_queue_depth", queue="sms.bulk") == 2
    assert value(text, "notify_queue_depth", queue="sms.normal") == 0


def test_reading_the_queue_depths_again_opens_no_new_broker_connections(db, broker):
    """The backpressure check reads the depths often; each read used to open and drop a socket
    per queue, which a long soak saw as ever more open files."""
    from notify.pipeline.dispatch import queue_depths

    queue_depths()  # the pooled connection is made once
    opened_before = broker.info("stats")["total_connections_received"]
    for _ in range(20):
        assert len(queue_depths()) == 15
    # The server's count includes other processes' connections: a margin for them, far below
    # the 600 that twenty reads opened when each queue's read had a socket of its own.
    assert broker.info("stats")["total_connections_received"] - opened_before < 30


def test_an_open_circuit_shows_as_two(db, metrics_token, stored_gauges):
    provider = Provider.objects.create(name="postmark-eu", channel="email")
    breaker = breaker_for(provider)
    try:
        gauges_compute(force=True)
        assert value(scrape(), "notify_circuit_state", provider="postmark-eu", channel="email") == 0
        breaker.open()
        gauges_compute(force=True)
        assert value(scrape(), "notify_circuit_state", provider="postmark-eu", channel="email") == 2
        breaker.half_open()
        gauges_compute(force=True)
        assert value(scrape(), "notify_circuit_state", provider="postmark-eu", channel="email") == 1
    finally:
        breaker_reset(provider)


def test_a_runaway_hold_shows(workspace, metrics_token, stored_gauges):
    gauges_compute(force=True)
    before = value(scrape(), "notify_runaway_holds")
    workspace.tenant.runaway_paused_at = timezone.now()
    workspace.tenant.save(update_fields=["runaway_paused_at"])
    gauges_compute(force=True)
    assert value(scrape(), "notify_runaway_holds") == before + 1


def test_every_stored_gauge_is_declared(db, stored_gauges):
    from notify.observability.metrics import DB_GAUGES

    gauges_compute(force=True)
    stored = json.loads(redis_client().get(GAUGES_KEY))
    assert {name for name, _, _ in stored} <= DB_GAUGES.keys()
    assert {"notify_queue_depth", "notify_circuit_state", "notify_broadcasts"} <= DB_GAUGES.keys()


def test_the_gauges_queries_can_be_served_by_the_partial_indexes(db, stored_gauges):
    """Each status the gauges count is covered by a partial index on deliveries, whatever the
    table's size (with sequential scans off, the planner shows that an index can serve)."""
    with CaptureQueriesContext(connection) as queries:
        gauges_compute(force=True)
    delivery_queries = [
        q["sql"] for q in queries if '"deliveries_delivery"' in q["sql"] or "deliveries_delivery " in q["sql"]
    ]
    assert len(delivery_queries) == 1 + len(BACKLOG_STATUSES)
    partial_indexes = ["delivery_claimable_due", "delivery_leased", "delivery_standby"]
    with connection.cursor() as cursor:
        # The table is partitioned by month: each partition holds its own copy of each index.
        cursor.execute(
            """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = ANY(%s::regclass[])""",
            [partial_indexes],
        )
        partial_indexes += [row[0] for row in cursor.fetchall()]
        cursor.execute("SET LOCAL enable_seqscan = off")
        plans = []
        for sql in delivery_queries:
            cursor.execute("EXPLAIN " + sql)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))
    for plan in plans:
        assert any(index in plan for index in partial_indexes), plan


def test_the_cache_shares_its_redis_connections_across_request_contexts(db, broker):
    """Under ASGI each request runs in a context of its own (a copy of the server's, where no
    cache was touched), and Django makes a cache object per context."""
    import contextvars

    from asgiref.sync import async_to_sync, sync_to_async
    from django.core.cache import caches

    async def one_request() -> None:
        await sync_to_async(lambda: caches["default"].get("shared-pool-probe"))()

    contextvars.Context().run(async_to_sync(one_request))
    opened_before = broker.info("stats")["total_connections_received"]
    for _ in range(100):
        contextvars.Context().run(async_to_sync(one_request))
    # A margin for other processes' connections, far below one for each context.
    assert broker.info("stats")["total_connections_received"] - opened_before < 30
