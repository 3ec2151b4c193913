"""Several providers for a channel: failover when one is down or errors, circuit breakers
shared through Redis that open, half-open and close, and pausing a provider. The real
anymail and twilio SDKs talk to sandbox processes."""

import logging
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from apps.deliveries.models import Delivery, DeliveryStatus, Provider
from notify.resilience.providers import breaker_state
from notify.sandbox.client import SandboxClient
from tests.conftest import ROOT
from tests.helpers import free_port
from tests.notify.test_send import ingest_one, send_now

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def loopback_providers_allowed(sandbox, settings) -> None:  # type: ignore[no-untyped-def]
    """These providers' accounts point at sandboxes on random loopback ports (and one port
    where nothing listens): the outbound guard must let every loopback port through (after
    the sandbox fixture has put its own port there)."""
    settings.NOTIFY_PROVIDER_ALLOWED_HOSTS = ["127.0.0.1"]


def postmark(name: str, *, base_url: str, position: int, **fields) -> Provider:  # type: ignore[no-untyped-def]
    return Provider.objects.create(
        name=name,
        channel="email",
        position=position,
        config={"api_url": f"{base_url}/postmark/", "server_token": "sandbox-token"},
        **fields,
    )


@pytest.fixture
def sandbox_b() -> Iterator[SandboxClient]:
    """A second provider sandbox: provider B's own service."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "notify.sandbox", "--port", str(port)], cwd=ROOT)
    client = SandboxClient(base_url=f"http://127.0.0.1:{port}")
    client.wait_until_up()
    yield client
    process.terminate()
    process.wait(timeout=10)


def test_with_provider_a_down_b_takes_over_and_nothing_is_sent_twice(workspace, sandbox, sandbox_b, broker):
    postmark("a", base_url=f"http://127.0.0.1:{free_port()}", position=0)  # nothing listens there
    postmark("b", base_url=sandbox_b.base_url, position=1)
    deliveries = [send_now(ingest_one(workspace, email=f"p{n}@example.com")) for n in range(3)]
    assert {d.status for d in deliveries} == {DeliveryStatus.SENT}
    assert {d.attempt_count for d in deliveries} == {1}  # failover spent no retry
    assert deliveries[0].events.last().detail["provider_status"] == "b/accepted"
    accepted = [r["delivery_id"] for r in sandbox_b.requests_log() if r["outcome"] == "accepted"]
    assert sorted(accepted) == sorted(str(d.pk) for d in deliveries)
    assert sandbox.requests_log() == []


def test_an_error_answer_fails_over_but_the_provider_that_answered_sent_nothing(workspace, sandbox, sandbox_b, broker):
    postmark("a", base_url=sandbox.base_url, position=0)
    postmark("b", base_url=sandbox_b.base_url, position=1)
    sandbox.faults_set(fail_next=[503])
    delivery = send_now(ingest_one(workspace))
    assert delivery.status == DeliveryStatus.SENT
    assert [r["outcome"] for r in sandbox.requests_log()] == ["error"]
    assert [r["outcome"] for r in sandbox_b.requests_log()] == ["accepted"]


def test_a_circuit_opens_then_half_opens_then_closes(workspace, sandbox, broker, caplog):
    port = free_port()
    a = postmark("a", base_url=f"http://127.0.0.1:{port}", position=0, failure_threshold=2, cooldown_seconds=1)
    postmark("b", base_url=sandbox.base_url, position=1)
    caplog.set_level(logging.INFO, logger="notify.resilience.providers")
    for _ in range(2):
        assert send_now(ingest_one(workspace)).status == DeliveryStatus.SENT  # by b
    assert breaker_state(a) == "open"
    assert "circuit of provider a: closed -> open" in caplog.text

    time.sleep(1.1)  # the cooldown: the next send is a trial, which fails, so it opens again
    send_now(ingest_one(workspace))
    assert "circuit of provider a: open -> half-open" in caplog.text
    assert breaker_state(a) == "open"

    up = subprocess.Popen([sys.executable, "-m", "notify.sandbox", "--port", str(port)], cwd=ROOT)
    try:
        SandboxClient(base_url=f"http://127.0.0.1:{port}").wait_until_up()
        time.sleep(1.1)
        delivery = send_now(ingest_one(workspace))
        assert delivery.events.last().detail["provider_status"] == "a/accepted"
        assert breaker_state(a) == "closed"
        assert "circuit of provider a: half-open -> closed" in caplog.text
    finally:
        up.terminate()
        up.wait(timeout=10)


def test_with_every_provider_paused_or_open_the_work_waits_without_spending_a_retry(workspace, sandbox, broker):
    postmark("a", base_url=sandbox.base_url, position=0, enabled=False)
    delivery = send_now(ingest_one(workspace))
    assert delivery.status == DeliveryStatus.DEFERRED
    assert delivery.status_reason == "no provider can take it now: a is paused"
    assert delivery.attempt_count == 0
    Provider.objects.filter(name="a").update(enabled=True)
    assert send_now(Delivery.objects.get(pk=delivery.pk)).status == DeliveryStatus.SENT
