"""Log lines: the correlation id from the request (X-Request-ID) to the rows and the task's
lines, JSON lines with LOG_FORMAT=json, and no secret, token, address or phone number in
clear, in the real output of a web server and a worker."""

import json
import logging
import logging.config
import subprocess
import sys

import pytest
import requests
from celery import current_app
from django.conf import settings
from django.test import Client

from apps.audiences.models import Topic
from apps.deliveries.models import Event
from config.queues import dead_letter_queue
from notify.observability.logs import correlation_id_var
from notify.pipeline.dispatch import DEAD_LETTER_TASK
from tests.conftest import ROOT, process_env
from tests.helpers import free_port, wait_for

EMAIL, PHONE = "ada.lovelace@example.com", "+15555550006"
API_KEY = "ntf_a1b2c3d4e5f6_SeCrEtPaRtOfTheKey0123456789abcd"
SECRETS = (EMAIL, PHONE, "5555550006", API_KEY, "SeCrEtPaRtOfTheKey")


def event_post(client: Client, *, auth_header: str, request_id: str | None = None, category: str = "otp") -> dict:
    headers = {"HTTP_AUTHORIZATION": auth_header}
    if request_id is not None:
        headers["HTTP_X_REQUEST_ID"] = request_id
    response = client.post(
        "/api/v1/events",
        data=json.dumps({"category": category, "recipients": [{"external_id": "ada", "email": EMAIL}]}),
        content_type="application/json",
        **headers,
    )
    return {"status": response.status_code, "request_id": response.headers.get("X-Request-ID"), "body": response}


@pytest.mark.django_db
def test_a_producers_request_id_is_kept_on_the_event_and_returned(workspace):
    client = Client()
    sent = event_post(client, auth_header=workspace.auth_header, request_id="order-42/attempt-1")
    assert sent["status"] == 202
    assert sent["request_id"] == "order-42/attempt-1"
    event = Event.objects.get(id=sent["body"].json()["event_id"])
    assert event.correlation_id == "order-42/attempt-1"
    # Without tracing there is no trace to link to.
    assert event.traceparent is None


@pytest.mark.django_db
@pytest.mark.parametrize("offered", [None, "", "two words", "x" * 129, "caf\u00e9", "line\nbreak"])
def test_a_missing_or_insane_request_id_is_replaced_without_an_error(workspace, offered):
    sent = event_post(Client(), auth_header=workspace.auth_header, request_id=offered)
    assert sent["status"] == 202
    made = sent["request_id"]
    assert made and made != offered and len(made) == 32 and made.isalnum()
    assert Event.objects.get(id=sent["body"].json()["event_id"]).correlation_id == made


@pytest.mark.django_db
def test_every_response_carries_the_request_id_errors_included(workspace, settings):
    client = Client()
    assert event_post(client, auth_header="Bearer ntf_nope_nope", request_id="r-401")["request_id"] == "r-401"
    missing = client.get("/api/v1/no-such-thing", HTTP_X_REQUEST_ID="r-404")
    assert missing.status_code == 404 and missing.headers["X-Request-ID"] == "r-404"
    invalid = event_post(client, auth_header=workspace.auth_header, request_id="r-400", category="nope")
    assert invalid["status"] == 400 and invalid["request_id"] == "r-400"
    settings.NOTIFY_MAX_REQUEST_BYTES = 10
    too_large = event_post(client, auth_header=workspace.auth_header, request_id="r-413")
    assert too_large["status"] == 413 and too_large["request_id"] == "r-413"
    assert client.get("/healthz", HTTP_X_REQUEST_ID="r-probe").headers["X-Request-ID"] == "r-probe"


@pytest.mark.django_db
def test_a_broadcast_is_found_by_its_request_id(workspace):
    topic = Topic.objects.create(tenant=workspace.tenant, key="news")
    response = Client().post(
        "/api/v1/broadcasts",
        data=json.dumps({"category": "digest", "audience": {"topic": topic.key}}),
        content_type="application/json",
        HTTP_AUTHORIZATION=workspace.auth_header,
        HTTP_X_REQUEST_ID="campaign-7",
    )
    assert response.status_code == 202, response.content
    assert response.headers["X-Request-ID"] == "campaign-7"
    assert Event.objects.get(broadcast__id=response.json()["id"]).correlation_id == "campaign-7"


def test_log_lines_mask_arguments_and_exception_text(capsys):
    # The configured handler, writing to the captured stderr.
    logging.config.dictConfig(settings.LOGGING)
    logger = logging.getLogger("tests.masking")
    try:
        raise ValueError(f"provider refused {EMAIL}: Authorization: Basic dXNlcjpwYXNzd29yZA==")
    except ValueError:
        logger.exception("sending to %s (%s) with %s failed", EMAIL, PHONE, f"Bearer {API_KEY}")
    err = capsys.readouterr().err
    logging.config.dictConfig(settings.LOGGING)
    assert "sending to a***@example.com (+1******0006) with Bearer [Filtered] failed" in err
    assert "ValueError: provider refused a***@example.com: Authorization: [Filtered]" in err
    for secret in (*SECRETS, "dXNlcjpwYXNzd29yZA=="):
        assert secret not in err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.worker
def test_a_real_request_and_task_log_json_lines_with_ids_and_nothing_in_clear(
    workspace, workers, web_server_start, monkeypatch, tmp_path
):
    monkeypatch.setenv("LOG_FORMAT", "json")
    monkeypatch.setenv("LOG_LEVEL", "INFO")
    base_url = web_server_start()
    # Django logs a refused request with its path, and the server's access log the query too.
    answer = requests.get(
        f"{base_url}/api/v1/recipients/{EMAIL}/nothing",
        params={"phone": PHONE, "key": API_KEY},
        headers={"Authorization": workspace.auth_header, "X-Request-ID": "req-logs-1"},
        timeout=30,
    )
    assert answer.headers["X-Request-ID"] == "req-logs-1"
    web_log = tmp_path / "web-0.log"
    wait_for(lambda: "req-logs-1" in web_log.read_text(), what="the request's log line")

    worker = workers.start("maintenance")
    # The notice task logs the dead delivery's reason, which quotes the provider's answer.
    token = correlation_id_var.set("req-logs-2")
    try:
        current_app.send_task(
            DEAD_LETTER_TASK,
            args=["0192f3a4-0000-7000-8000-000000000001", "sms", f"{PHONE} refused for {EMAIL} (key {API_KEY})"],
            queue=dead_letter_queue(channel="sms"),
        )
    finally:
        correlation_id_var.reset(token)
    wait_for(lambda: "is dead" in worker.log(), what="the task's log line")

    web_lines, worker_lines = json_lines(web_log.read_text()), json_lines(worker.log())
    for text in (web_log.read_text(), worker.log()):
        for secret in (*SECRETS, workspace.api_key.raw_key):
            assert secret not in text
    [refused] = [line for line in web_lines if line["logger"] == "django.request"]
    assert refused["level"] == "WARNING"
    assert refused["correlation_id"] == "req-logs-1"
    assert refused["message"] == "Bad Request: /api/v1/recipients/a***@example.com/nothing"
    [access] = [line for line in web_lines if line["logger"] == "uvicorn.access"]
    assert "a***@example.com" in access["message"] and "+1******0006" in access["message"]
    assert "[Filtered]" in access["message"]
    [dead] = [line for line in worker_lines if "is dead" in line["message"]]
    assert dead["message"].endswith("+1******0006 refused for a***@example.com (key [Filtered])")
    assert dead["correlation_id"] == "req-logs-2"
    assert dead["delivery_id"] == "0192f3a4-0000-7000-8000-000000000001"
    assert dead["task_id"] and {"timestamp", "level", "logger"} <= dead.keys()


def test_uvicorns_log_level_holds_for_its_own_lines(transactional_db, sandbox, tmp_path):
    """Django's logging config resets uvicorn's logger "uvicorn.error"; the ASGI module puts
    --log-level back, or every WebSocket would log its lines at INFO whatever the level."""
    from websockets.sync.client import connect

    port, log_path = free_port(), tmp_path / "web.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=process_env(sandbox_url=sandbox.base_url),
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), what="the web server to answer")
        with connect(f"ws://127.0.0.1:{port}/inbox/v1/ws"):
            pass  # accepted, which uvicorn logs at INFO
    finally:
        server.terminate()
        server.wait(timeout=10)
    log = log_path.read_text()
    assert "WebSocket /inbox/v1/ws" not in log and "connection open" not in log, log


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
