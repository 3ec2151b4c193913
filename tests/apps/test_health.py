"""The liveness and readiness probes, and beat's heartbeat probe. Readiness is checked against
a Redis of the test's own, which it stops and starts again: the shared Redis is never stopped."""

import subprocess
import time
from collections.abc import Iterator
from io import StringIO

import pytest
import redis
from django.core.management import CommandError, call_command
from django.test import Client, override_settings

from config.beat import BEAT_HEARTBEAT_KEY
from notify.policy.caps import redis_client
from tests.conftest import WorkerPool
from tests.helpers import free_port, wait_for


class ThrowawayRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        wait_for(self._answers, timeout=10, what="the throwaway Redis to answer")

    def stop(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except redis.ConnectionError:
            return False


@pytest.fixture
def own_redis() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis()
    server.start()
    yield server
    if server.process and server.process.poll() is None:
        server.stop()


def test_liveness_answers_without_touching_anything() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readiness_names_redis_while_it_is_down_and_recovers_when_it_is_back(own_redis: ThrowawayRedis) -> None:
    with override_settings(NOTIFY_REDIS_URL=own_redis.url, CELERY_BROKER_URL=own_redis.url):
        ready = Client().get("/readyz")
        assert ready.status_code == 200, ready.content
        assert ready.json()["checks"] == {"database": "ok", "migrations": "ok", "redis": "ok", "broker": "ok"}

        own_redis.stop()
        down = Client().get("/readyz")
        assert down.status_code == 503
        assert down.json()["failing"] == ["redis", "broker"]
        assert down.json()["checks"]["database"] == "ok"

        own_redis.start()
        back = Client().get("/readyz")
        assert back.status_code == 200, back.content
        assert back.json()["failing"] == []


@pytest.mark.django_db
def test_readiness_refuses_other_methods() -> None:
    assert Client().post("/readyz").status_code == 405


@pytest.mark.django_db
@override_settings(ALLOWED_HOSTS=["notify.example.com"], SECURE_SSL_REDIRECT=True)
def test_probes_answer_on_the_containers_own_address_whatever_the_public_host() -> None:
    own_address = Client(HTTP_HOST="10.0.0.7:8000")
    assert own_address.get("/healthz").status_code == 200
    assert own_address.get("/readyz").status_code == 200
    assert own_address.get("/api/v1/topics").status_code == 400


def test_beat_health_fails_without_beat_and_passes_once_beat_ticks(workers: WorkerPool) -> None:
    redis_client().delete(BEAT_HEARTBEAT_KEY)
    with pytest.raises(CommandError, match="no heartbeat"):
        call_command("beat_health")

    beat = workers.start_beat()
    wait_for(lambda: redis_client().exists(BEAT_HEARTBEAT_KEY), timeout=20, what="beat's first heartbeat")
    out = StringIO()
    call_command("beat_health", stdout=out)
    assert "beat ticked" in out.getvalue()

    beat.stop()
    time.sleep(1.5)
    with pytest.raises(CommandError, match="stuck"):
        call_command("beat_health", max_age_seconds=1)
