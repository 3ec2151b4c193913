"""Metrics moved by real workers: a delivery sent by a worker process and a provider's
delivered report show on the web /metrics; a worker with its own port serves its children's
counts."""

from urllib.parse import urlparse

import pytest
import requests

from apps.deliveries.models import DeliveryStatus
from tests.e2e.test_delivery_guarantees import trigger, wait_for_status
from tests.helpers import free_port, wait_for
from tests.helpers import metric_value as value
from tests.helpers import metrics_scrape as scrape

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def deltas(before: str, after: str, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_a_critical_email_sent_by_a_worker_moves_the_counters_on_the_web_metrics(
    api, workspace, workers, sandbox, metrics_token
):
    workers.start("critical")
    before = scrape()
    [notification_id] = trigger(api, category="otp")
    wait_for_status([notification_id], DeliveryStatus.SENT)
    # The worker records, then counts: wait for its count rather than sleep.
    sent = {"channel": "email", "priority": "critical", "category": "otp", "tenant": workspace.tenant.slug}
    after = wait_for(
        lambda: (text := scrape()) and deltas(before, text, "notify_deliveries_total", state="sent", **sent) and text,
        timeout=10,
        what="the sent delivery on /metrics",
    )
    assert deltas(before, after, "notify_deliveries_total", state="sent", provider="default", **sent) == 1
    assert deltas(before, after, "notify_provider_calls_total", channel="email", provider="default", outcome="ok") == 1
    assert deltas(before, after, "notify_provider_call_seconds_count", channel="email", provider="default") == 1
    latency = {"channel": "email", "priority": "critical"}
    assert deltas(before, after, "notify_accept_to_sent_seconds_count", **latency) == 1
    # Accepted and sent within seconds: in the buckets up to 10 s, not only in +Inf.
    assert deltas(before, after, "notify_accept_to_sent_seconds_bucket", le="10.0", **latency) == 1


def test_a_transient_failure_counts_a_retry(api, workers, sandbox, metrics_token):
    sandbox.faults_set(fail_next=[503])
    workers.start("critical")
    before = scrape()
    [notification_id] = trigger(api, category="otp")
    wait_for_status([notification_id], DeliveryStatus.SENT)
    after = wait_for(
        lambda: (
            (text := scrape())
            and deltas(before, text, "notify_deliveries_total", channel="email", state="sent")
            and text
        ),
        timeout=10,
        what="the sent delivery on /metrics",
    )
    assert deltas(before, after, "notify_retries_total", channel="email", priority="critical") == 1
    assert deltas(before, after, "notify_deliveries_total", channel="email", state="retrying") == 1
    assert deltas(before, after, "notify_provider_calls_total", channel="email", outcome="transient") == 1


def test_a_delivery_out_of_attempts_counts_a_dead_letter(api, workers, sandbox, metrics_token):
    sandbox.faults_set(fail_next=[503, 503, 503])  # the suite allows 3 attempts
    workers.start("critical")
    before = scrape()
    [notification_id] = trigger(api, category="otp")
    wait_for_status([notification_id], DeliveryStatus.DEAD)
    after = wait_for(
        lambda: (text := scrape()) and deltas(before, text, "notify_dead_letters_total", channel="email") and text,
        timeout=10,
        what="the dead letter on /metrics",
    )
    assert deltas(before, after, "notify_dead_letters_total", channel="email") == 1
    assert deltas(before, after, "notify_deliveries_total", channel="email", state="dead") == 1
    assert deltas(before, after, "notify_retries_total", channel="email", priority="critical") == 2


def test_a_delivered_report_moves_accept_to_delivered(api, workspace, workers, sandbox, live_server, metrics_token):
    port = urlparse(live_server.url).port
    sandbox.webhooks_set(postmark=f"http://sandbox:sandbox-webhook-secret@127.0.0.1:{port}/anymail/postmark/tracking/")
    workers.start("normal")
    before = scrape()
    [notification_id] = trigger(api, category="welcome")
    wait_for_status([notification_id], DeliveryStatus.DELIVERED, timeout=30)
    latency = {"channel": "email", "priority": "normal"}
    # The webhook's thread counts once its transaction has committed: wait for the count.
    after = wait_for(
        lambda: (
            (text := scrape()) and deltas(before, text, "notify_accept_to_delivered_seconds_count", **latency) and text
        ),
        timeout=10,
        what="the delivered report on /metrics",
    )
    assert deltas(before, after, "notify_accept_to_delivered_seconds_count", **latency) == 1
    assert (
        deltas(before, after, "notify_deliveries_total", state="delivered", tenant=workspace.tenant.slug, **latency)
        == 1
    )


def test_a_worker_with_a_metrics_port_serves_its_pool_childrens_counts(api, workers, sandbox, metrics_token):
    port = free_port()
    worker = workers.start("critical", concurrency=2, env={"NOTIFY_WORKER_METRICS_PORT": str(port)})
    url = f"http://127.0.0.1:{port}/metrics"
    web_before = scrape()
    ids = [trigger(api, category="otp", prefix=f"p{i}-")[0] for i in range(3)]
    wait_for_status(ids, DeliveryStatus.SENT)
    text = wait_for(
        lambda: (
            (body := requests.get(url, timeout=5).text)
            and value(body, "notify_deliveries_total", channel="email", state="sent") == 3
            and body
        ),
        timeout=10,
        what=f"the worker's own metrics ({worker.log()[-2000:]})",
    )
    assert value(text, "notify_accept_to_sent_seconds_count", channel="email", priority="critical") == 3
    # Its counts are its own: the web processes' /metrics does not show them twice.
    assert deltas(web_before, scrape(), "notify_deliveries_total", channel="email", state="sent") == 0


def test_with_metrics_off_a_worker_counts_nothing(api, workers, sandbox, metrics_token):
    worker = workers.start("critical", env={"NOTIFY_METRICS_ENABLED": "false"})
    before = scrape()
    [notification_id] = trigger(api, category="otp")
    wait_for_status([notification_id], DeliveryStatus.SENT)
    worker.stop()  # whatever it would have counted is written by now
    after = scrape()
    assert deltas(before, after, "notify_deliveries_total", channel="email") == 0
    assert deltas(before, after, "notify_provider_calls_total", channel="email") == 0
    # The API in this process still counts: only the worker was switched off.
    assert deltas(before, after, "notify_events_accepted_total", category="otp") == 1
