"""RabbitMQ as the broker: quorum queues and publisher confirms, so that a task the broker
acknowledged survives a broker restart, and the delivery guarantees hold as on Redis.

Every process here (the web server, the workers, beat) runs on RabbitMQ, in a virtual host of
this test process's own; Redis still keeps the caps, limits and circuits. The tests restart
the broker, so they run one after the other in one test process (SERIAL_MODULES in
tests/processes.py)."""

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
import requests
from kombu import Connection

from apps.deliveries.models import DeadLetter, Delivery, DeliveryStatus
from config.queues import ALL_QUEUES
from notify.pipeline.send import RECORD_CHUNK
from tests.e2e.test_delivery_guarantees import assert_each_accepted_exactly_once, statuses, wait_for_status
from tests.helpers import wait_for
from tests.processes import process_index

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

AMQP_ADDRESS = os.environ.get("TEST_RABBITMQ_ADDRESS", "guest:guest@127.0.0.1:5672")


def rabbitmqctl(*arguments: str, check: bool = True) -> None:
    command = shutil.which("rabbitmqctl")
    assert command, "these tests need RabbitMQ's rabbitmqctl; install it: apt-get install rabbitmq-server"
    subprocess.run([command, *arguments], check=check, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def rabbitmq_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A virtual host of this test process's own (its queues are purged before each test)."""
    # One process of the run at a time may hold the broker: another would see it restarted
    # under its feet. The lock lives in the run's shared base temp directory.
    with open(tmp_path_factory.getbasetemp().parent / "rabbitmq.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pytest.fail("another test process holds RabbitMQ: its tests must all run in one (SERIAL_MODULES)")
        yield rabbitmq_vhost_ready(f"notify-test-{process_index()}")


def rabbitmq_vhost_ready(vhost: str) -> str:
    # The node may still be starting (a restart by an earlier test or run): wait for it.
    rabbitmqctl("await_startup")
    # Kept between runs (it may exist already): deleting a virtual host with quorum queues
    # takes the broker a while.
    rabbitmqctl("add_vhost", vhost, check=False)
    rabbitmqctl("set_permissions", "-p", vhost, AMQP_ADDRESS.split(":")[0], ".*", ".*", ".*")
    return f"amqp://{AMQP_ADDRESS}/{vhost}"


@pytest.fixture
def on_rabbitmq(rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch, broker) -> str:  # type: ignore[no-untyped-def]
    """The processes this test starts use RabbitMQ as their broker, and Redis for the rest."""
    monkeypatch.setenv("NOTIFY_REDIS_URL", os.environ["CELERY_BROKER_URL"])
    monkeypatch.setenv("CELERY_BROKER_URL", rabbitmq_url)
    with Connection(rabbitmq_url) as connection:
        channel = connection.channel()
        for queue in ALL_QUEUES:
            try:
                channel.queue_purge(queue)
            except Exception:  # noqa: BLE001 - not declared yet: nothing to purge
                channel = connection.channel()  # RabbitMQ closed the channel that failed
    return rabbitmq_url


@pytest.fixture
def post_events(
    web_server_start: Callable[..., str], workspace, on_rabbitmq: str
) -> Iterator[Callable[..., list[str]]]:  # type: ignore[no-untyped-def]
    """Post events to a web server running on RabbitMQ, as a producer does."""
    base_url = web_server_start()
    session = requests.Session()
    session.headers["Authorization"] = workspace.auth_header

    def post(*, category: str, count: int, prefix: str = "r") -> list[str]:
        recipients = [{"external_id": f"{prefix}{i}", "email": f"{prefix}{i}@example.com"} for i in range(count)]
        response = session.post(
            f"{base_url}/api/v1/events",
            data=json.dumps({"category": category, "recipients": recipients, "data": {"name": "you"}}),
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 202, response.content
        return response.json()["notification_ids"]

    yield post
    session.close()


def queue_depth(url: str, queue: str) -> int:
    with Connection(url) as connection:
        return connection.channel().queue_declare(queue=queue, passive=True).message_count


def test_a_task_the_broker_acknowledged_survives_a_broker_restart(post_events, on_rabbitmq, workers, sandbox):
    notification_ids = post_events(category="otp", count=5)
    # Published with confirms into a quorum queue, and no worker yet to take them.
    assert queue_depth(on_rabbitmq, "email.critical") == 5

    rabbitmqctl("stop_app")
    try:
        time.sleep(1)
    finally:
        rabbitmqctl("start_app")
    wait_for(lambda: queue_depth(on_rabbitmq, "email.critical") == 5, timeout=60, what="the queue to come back")

    # No beat, so no sweeper to publish anything again: what is sent is what the broker kept.
    workers.start("critical")
    wait_for_status(notification_ids, DeliveryStatus.SENT, timeout=60)
    assert_each_accepted_exactly_once(sandbox, notification_ids)


def test_a_worker_killed_mid_batch_on_rabbitmq_loses_and_duplicates_nothing(post_events, workers, sandbox):
    sandbox.faults_set(latency_ms=300)
    doomed = workers.start("bulk")
    notification_ids = post_events(category="digest", count=RECORD_CHUNK)
    wait_for(lambda: sandbox.stats()["total"] >= 1, what="the first provider request")
    time.sleep(0.15)
    doomed.kill()
    assert statuses(notification_ids)[DeliveryStatus.SENT] < len(notification_ids)

    workers.start("bulk")
    workers.start("maintenance")
    workers.start_beat()
    wait_for_status(notification_ids, DeliveryStatus.SENT, timeout=90)
    assert_each_accepted_exactly_once(sandbox, notification_ids)


def test_a_transient_failure_on_rabbitmq_is_retried_from_the_database_then_succeeds(post_events, workers, sandbox):
    """On RabbitMQ no retry rides a broker countdown: each waits in the database until the
    sweeper publishes it again, and the delivery is sent once, on its third attempt."""
    sandbox.faults_set(fail_next=[503, 503])
    workers.start("critical")
    workers.start("maintenance")
    workers.start_beat()
    [notification_id] = post_events(category="otp", count=1)
    wait_for_status([notification_id], DeliveryStatus.SENT, timeout=60)
    delivery = Delivery.objects.get(notification_id=notification_id)
    assert delivery.attempt_count == 3
    assert list(delivery.events.values_list("status", flat=True)) == ["queued", "retrying", "retrying", "sent"]
    assert [r["status"] for r in sandbox.requests_log()] == [503, 503, 200]


def test_exhausted_retries_on_rabbitmq_become_a_dead_letter(post_events, workers, sandbox):
    """The dead-letter path runs through RabbitMQ's own dead-letter queue to the maintenance
    worker, as on Redis."""
    sandbox.faults_set(fail_next=[500, 500, 500])
    workers.start("critical")
    maintenance = workers.start("maintenance")
    workers.start_beat()
    [notification_id] = post_events(category="otp", count=1)
    wait_for_status([notification_id], DeliveryStatus.DEAD, timeout=60)
    dead_letter = DeadLetter.objects.get(delivery__notification_id=notification_id)
    assert dead_letter.attempts == 3
    assert [r["status"] for r in sandbox.requests_log()] == [500, 500, 500]
    wait_for(lambda: f"delivery {dead_letter.delivery_id} on email is dead" in maintenance.log(), what="the DLQ notice")
