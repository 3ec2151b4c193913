"""Alerts: each rule fires once on a real condition, stays quiet within its window, fires again
after it while the condition lasts, and resolves when it clears; the webhook is signed and goes
through the outbound guard, and a failing outlet does not stop the others."""

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from apps.deliveries.models import Delivery, DeliveryStatus, Provider
from apps.ops.migrations import __name__ as migrations_package
from apps.ops.models import AlertFiring, AlertKind, AlertRule, CanaryState
from notify.observability.alerts import EVALUATORS, alerts_evaluate
from notify.observability.canary import canary_start
from notify.pipeline.send import deliveries_send
from notify.resilience.providers import breaker_for, breaker_reset
from notify.resilience.runaway import runaway_resume, runaway_trip
from tests.notify.test_send import ingest_one

ROOT = Path(__file__).resolve().parent.parent.parent
SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Receiver:
    """A loopback HTTP server standing in for the operators' webhook endpoint."""

    url: str
    status: int = 200
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def payloads(self) -> list[dict[str, Any]]:
        """Every request's body, after verifying its signature as a receiver would."""
        return [Webhook(SECRET).verify(body, headers) for headers, body in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the standard library's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state["receiver"].received.append((dict(self.headers.items()), body))
            self.send_response(state["receiver"].status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["receiver"] = Receiver(url=f"http://127.0.0.1:{server.server_port}/alerts")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state["receiver"]
    server.shutdown()
    server.server_close()


@pytest.fixture
def alerting(settings, sandbox, receiver, broker):  # type: ignore[no-untyped-def]
    """Alerts to the receiver (allow-listed: it is on loopback) and to ops@ through the sandbox."""
    settings.NOTIFY_ALERT_WEBHOOK_URL = receiver.url
    settings.NOTIFY_ALERT_WEBHOOK_SECRET = SECRET
    settings.NOTIFY_ALERT_WEBHOOK_ALLOWED_HOSTS = [receiver.url.split("/")[2]]
    settings.NOTIFY_ALERT_EMAILS = ["ops@example.com"]
    settings.SENTRY_DSN = ""
    settings.NOTIFY_CANARY_INTERVAL_SECONDS = 0
    AlertRule.objects.all().delete()  # the seeded defaults; each test makes the rule it tests
    return sandbox


def rule_make(**fields: Any) -> AlertRule:
    return AlertRule.objects.create(name=fields["kind"].replace("_", "-"), **fields)


def alert_emails(sandbox) -> list[str]:  # type: ignore[no-untyped-def]
    return [r["subject"] for r in sandbox.requests_log(provider="postmark") if r["to"] == "ops@example.com"]


def evaluate(at: datetime) -> dict[str, int]:
    return alerts_evaluate(now=at)


def assert_lifecycle(*, alerting, receiver, rule: AlertRule, subject: str, fired_at: datetime) -> AlertFiring:  # type: ignore[no-untyped-def]
    """The rule has just fired at `fired_at`: one signed webhook and one email, then quiet."""
    [payload] = receiver.payloads()
    assert payload["type"] == "alert.firing"
    assert payload["data"]["rule"] == rule.name and payload["data"]["subject"] == subject
    assert payload["data"]["kind"] == rule.kind
    [email] = alert_emails(alerting)
    assert email == f"[notify] ALERT: {rule.name} {subject}"
    firing = AlertFiring.objects.get(rule=rule)
    assert firing.subject == subject and firing.resolved_at is None and firing.notices == 1
    assert firing.outlets == "webhook: 200; email: sent"

    assert evaluate(fired_at + timedelta(seconds=1)) == {"firing": 0, "repeat": 0, "resolved": 0}
    assert len(receiver.received) == 1 and len(alert_emails(alerting)) == 1
    return firing


def test_a_channel_and_a_provider_failure_rate_fire_once_and_resolve_after_the_window(workspace, alerting, receiver):
    channel_rule = rule_make(kind=AlertKind.FAILURE_RATE, window_seconds=300, threshold=0.5, min_attempts=3)
    AlertRule.objects.create(
        name="provider-rate", kind=AlertKind.FAILURE_RATE, per_provider=True, threshold=0.5, min_attempts=3
    )
    alerting.faults_set(provider="postmark", address_status={"fail@example.com": 503})
    sent = ingest_one(workspace)
    deliveries_send(delivery_ids=[str(sent.pk)])
    assert evaluate(timezone.now()) == {"firing": 0, "repeat": 0, "resolved": 0}  # 1 attempt, none failed
    for _ in range(3):
        failing = ingest_one(workspace, email="fail@example.com")
        deliveries_send(delivery_ids=[str(failing.pk)])
        assert Delivery.objects.get(pk=failing.pk).status == DeliveryStatus.RETRYING

    now = timezone.now()
    assert evaluate(now) == {"firing": 2, "repeat": 0, "resolved": 0}
    by_subject = {p["data"]["subject"]: p for p in receiver.payloads()}
    assert set(by_subject) == {"channel:email", "provider:email/configured"}
    assert by_subject["channel:email"]["data"]["value"] == pytest.approx(0.75)
    assert "3 of 4 send attempts failed (75%" in by_subject["channel:email"]["data"]["message"]
    assert len(alert_emails(alerting)) == 2

    assert evaluate(now + timedelta(seconds=60)) == {"firing": 0, "repeat": 0, "resolved": 0}
    # Past the window the failures are no longer counted: resolved, and announced once.
    assert evaluate(now + timedelta(seconds=301)) == {"firing": 0, "repeat": 0, "resolved": 2}
    assert AlertFiring.objects.get(rule=channel_rule).resolved_at == now + timedelta(seconds=301)
    assert [p["type"] for p in receiver.payloads()[2:]] == ["alert.resolved", "alert.resolved"]
    assert evaluate(now + timedelta(seconds=302)) == {"firing": 0, "repeat": 0, "resolved": 0}


def test_dead_letters_over_the_threshold_fire_once(workspace, alerting, receiver):
    rule = rule_make(kind=AlertKind.DEAD_LETTERS, window_seconds=600, threshold=1)
    alerting.faults_set(provider="postmark", address_status={"fail@example.com": 503})

    def dead_letter_one() -> None:
        delivery = ingest_one(workspace, email="fail@example.com")
        while delivery.status != DeliveryStatus.DEAD:  # three attempts in the tests' settings
            Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
            deliveries_send(delivery_ids=[str(delivery.pk)])
            delivery.refresh_from_db()

    dead_letter_one()
    assert evaluate(timezone.now())["firing"] == 0  # one dead letter is not more than one
    dead_letter_one()
    now = timezone.now()
    assert evaluate(now)["firing"] == 1
    firing = assert_lifecycle(alerting=alerting, receiver=receiver, rule=rule, subject="channel:email", fired_at=now)
    assert firing.value == 2
    assert evaluate(now + timedelta(seconds=601))["resolved"] == 1


def test_an_old_queued_delivery_fires_repeats_after_the_window_and_resolves_when_sent(workspace, alerting, receiver):
    rule = rule_make(kind=AlertKind.QUEUE_AGE, window_seconds=600, threshold=60)
    waiting = ingest_one(workspace)  # no worker: it waits
    start = timezone.now()
    assert evaluate(start)["firing"] == 0

    fired_at = start + timedelta(seconds=61)
    assert evaluate(fired_at)["firing"] == 1
    firing = assert_lifecycle(alerting=alerting, receiver=receiver, rule=rule, subject="queue", fired_at=fired_at)
    assert 60 < firing.value < 70

    again = fired_at + timedelta(seconds=600)
    assert evaluate(again) == {"firing": 0, "repeat": 1, "resolved": 0}
    assert receiver.payloads()[-1]["type"] == "alert.repeat"
    assert alert_emails(alerting)[-1] == f"[notify] STILL FIRING: {rule.name} queue"
    assert AlertFiring.objects.get(pk=firing.pk).notices == 2

    deliveries_send(delivery_ids=[str(waiting.pk)])
    assert evaluate(again + timedelta(seconds=1)) == {"firing": 0, "repeat": 0, "resolved": 1}
    assert alert_emails(alerting)[-1] == f"[notify] RESOLVED: {rule.name} queue"


def test_an_open_circuit_fires_and_resolves_when_closed(db, alerting, receiver):
    rule = rule_make(kind=AlertKind.CIRCUIT_OPEN, window_seconds=900)
    provider = Provider.objects.create(name="postmark-main", channel="email")
    now = timezone.now()
    assert evaluate(now)["firing"] == 0
    breaker_for(provider).open()  # as a run of failed sends would, in the shared Redis state

    assert evaluate(now)["firing"] == 1
    assert_lifecycle(alerting=alerting, receiver=receiver, rule=rule, subject=f"provider:{provider.pk}", fired_at=now)
    assert evaluate(now + timedelta(seconds=900))["repeat"] == 1
    breaker_reset(provider)
    assert evaluate(now + timedelta(seconds=901))["resolved"] == 1


def test_a_late_canary_fires_and_resolves_when_a_run_succeeds(db, alerting, receiver, settings):
    settings.NOTIFY_CANARY_INTERVAL_SECONDS = 60
    settings.NOTIFY_CANARY_DEADLINE_SECONDS = 5
    settings.NOTIFY_CANARY_INAPP = True
    rule = rule_make(kind=AlertKind.CANARY_FAILING, window_seconds=900)
    start = timezone.now()
    [run] = canary_start(now=start)  # no worker sends it

    fired_at = start + timedelta(seconds=6)
    assert evaluate(fired_at)["firing"] == 1
    run.refresh_from_db()
    assert run.state == CanaryState.LATE
    firing = assert_lifecycle(
        alerting=alerting, receiver=receiver, rule=rule, subject="channel:inapp", fired_at=fired_at
    )
    assert "the canary's latest run is late" in firing.message

    [run] = canary_start(now=timezone.now())
    deliveries_send(delivery_ids=[str(run.delivery_id)])
    assert evaluate(timezone.now())["resolved"] == 1
    run.refresh_from_db()
    assert run.state == CanaryState.SENT

    # A channel the canary no longer runs on does not alert on its last run.
    later = timezone.now()
    canary_start(now=later)
    assert evaluate(later + timedelta(seconds=6))["firing"] == 1
    settings.NOTIFY_CANARY_INAPP = False
    assert evaluate(later + timedelta(seconds=7))["resolved"] == 1


def test_the_runaway_guard_firing_alerts_until_the_tenant_is_resumed(workspace, alerting, receiver):
    rule = rule_make(kind=AlertKind.RUNAWAY_GUARD, window_seconds=3600)
    assert runaway_trip(tenant=workspace.tenant, sent=500, recipients=2)
    now = timezone.now()
    assert evaluate(now)["firing"] == 1
    firing = assert_lifecycle(
        alerting=alerting, receiver=receiver, rule=rule, subject=f"tenant:{workspace.tenant.slug}", fired_at=now
    )
    assert "500 notifications" in firing.message
    assert evaluate(now + timedelta(seconds=3600))["repeat"] == 1
    runaway_resume(tenant_id=workspace.tenant.pk, actor="test")
    assert evaluate(now + timedelta(seconds=3601))["resolved"] == 1


def test_a_failing_webhook_does_not_stop_the_email(workspace, alerting, receiver):
    rule_make(kind=AlertKind.RUNAWAY_GUARD)
    runaway_trip(tenant=workspace.tenant, sent=500, recipients=2)
    receiver.status = 500
    evaluate(timezone.now())
    [firing] = AlertFiring.objects.all()
    assert firing.outlets == "webhook: failed (ValueError: the receiver answered 500); email: sent"
    assert len(receiver.received) == 1 and len(alert_emails(alerting)) == 1


def test_an_unsigned_webhook_is_not_sent_and_the_email_still_is(workspace, alerting, receiver, settings):
    settings.NOTIFY_ALERT_WEBHOOK_SECRET = ""
    rule_make(kind=AlertKind.RUNAWAY_GUARD)
    runaway_trip(tenant=workspace.tenant, sent=500, recipients=2)
    evaluate(timezone.now())
    [firing] = AlertFiring.objects.all()
    assert firing.outlets.startswith("webhook: failed (ValueError: NOTIFY_ALERT_WEBHOOK_SECRET cannot sign")
    assert firing.outlets.endswith("; email: sent")
    assert receiver.received == [] and len(alert_emails(alerting)) == 1


def test_the_webhook_to_loopback_is_refused_unless_allow_listed(workspace, alerting, receiver, settings):
    settings.NOTIFY_ALERT_WEBHOOK_ALLOWED_HOSTS = []
    rule_make(kind=AlertKind.RUNAWAY_GUARD)
    runaway_trip(tenant=workspace.tenant, sent=500, recipients=2)
    evaluate(timezone.now())
    [firing] = AlertFiring.objects.all()
    assert "webhook: failed (OutboundRefused: only https URLs are allowed)" in firing.outlets
    assert receiver.received == [] and len(alert_emails(alerting)) == 1


def test_a_disabled_rule_neither_fires_nor_keeps_its_firings_open(workspace, alerting, receiver):
    rule = rule_make(kind=AlertKind.RUNAWAY_GUARD)
    runaway_trip(tenant=workspace.tenant, sent=500, recipients=2)
    evaluate(timezone.now())
    AlertRule.objects.filter(pk=rule.pk).update(enabled=False)
    assert evaluate(timezone.now()) == {"firing": 0, "repeat": 0, "resolved": 0}
    assert AlertFiring.objects.get(rule=rule).resolved_at is not None
    assert len(receiver.received) == 1


def test_the_seeded_rules_cover_every_kind():
    from importlib import import_module

    seeded = import_module(f"{migrations_package}.0003_default_alert_rules").DEFAULT_RULES
    assert {rule["kind"] for rule in seeded} == set(AlertKind.values) == set(EVALUATORS)


def test_superusers_see_rules_firings_and_canary_runs_in_the_admin(workspace, alerting, receiver, admin_client):
    rule_make(kind=AlertKind.RUNAWAY_GUARD)
    runaway_trip(tenant=workspace.tenant, sent=500, recipients=2)
    evaluate(timezone.now())
    for page, expected in (
        ("alertrule", "runaway-guard"),
        ("alertfiring", f"tenant:{workspace.tenant.slug}"),
        ("canaryrun", "0 canary runs"),
    ):
        response = admin_client.get(f"/admin/ops/{page}/")
        assert response.status_code == 200 and expected in response.content.decode(), page


# The SDK in a process of its own (it installs itself globally), with a transport that
# records the envelopes it would send, as tests/test_sentry.py does.
SENTRY_ALERT_RUN = """
import json
import django
django.setup()
from django.conf import settings
from django.utils import timezone
from sentry_sdk.transport import Transport
from apps.ops.models import AlertFiring, AlertRule
from config.sentry import sentry_init
from notify.observability.alerts import FIRING, Notice, alert_notify

sent = []

class RecordingTransport(Transport):
    def capture_envelope(self, envelope):
        sent.extend(item.payload.json for item in envelope.items if item.payload.json)

settings.SENTRY_DSN = "https://public@sentry.invalid/1"
sentry_init(dsn=settings.SENTRY_DSN, traces_sample_rate=0.0, transport=RecordingTransport)
rule = AlertRule(name="dead-letters", kind="dead_letters", window_seconds=900, threshold=10)
firing = AlertFiring(rule=rule, subject="channel:sms", message="channel:sms: 12 dead letters", value=12,
                     first_fired_at=timezone.now(), last_notified_at=timezone.now())
outlets = alert_notify(rule=rule, notice=Notice(firing=firing, status=FIRING))
import sentry_sdk
sentry_sdk.flush()
print(json.dumps({"outlets": outlets, "sent": sent}))
"""


def test_an_alert_reaches_sentry_grouped_by_rule_and_subject():
    result = subprocess.run(
        [sys.executable, "-c", SENTRY_ALERT_RUN],
        cwd=ROOT,
        env={**os.environ, "NOTIFY_ALERT_WEBHOOK_URL": "", "NOTIFY_ALERT_EMAILS": "", "NOTIFY_OPS_EMAILS": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outlets"] == "sentry: sent"
    [event] = [item for item in report["sent"] if item.get("message")]
    assert event["message"].startswith("[notify] ALERT dead-letters: channel:sms: 12 dead letters")
    assert event["level"] == "error"
    assert event["fingerprint"] == ["notify-alert", "dead-letters", "channel:sms"]
    assert event["tags"]["alert_subject"] == "channel:sms"
