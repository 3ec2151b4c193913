"""The sandbox's own behaviour: tests elsewhere rely on it, so it is tested too."""

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import requests
from django.conf import settings
from pywebpush import webpush
from twilio.rest import Client as TwilioClient

from notify.channels.sms import _ConfiguredHostHttpClient
from notify.channels.webpush import vapid_application_server_key
from notify.sandbox.client import SandboxClient, browser_subscription_keys
from notify.sandbox.server import Sandbox
from tests.helpers import free_port


def send(sandbox, to: str = "a@example.com", token: str = "t", **message: object) -> requests.Response:  # type: ignore[no-untyped-def]
    body = {"From": "n@example.com", "To": to, "Subject": "s", "TextBody": "b", **message}
    return requests.post(
        f"{sandbox.base_url}/postmark/email", json=body, headers={"X-Postmark-Server-Token": token}, timeout=5
    )


NO_DUPLICATES = {"postmark": 0, "twilio": 0, "fcm": 0, "webpush": 0}


def test_a_repeated_message_is_sent_again_and_counted_as_a_duplicate(sandbox):
    """Postmark has no idempotency key: a repeat is a second email, and the sandbox says so."""
    first = send(sandbox, Metadata={"delivery_id": "d1", "round": "0"})
    again = send(sandbox, Metadata={"delivery_id": "d1", "round": "0"})
    assert first.status_code == again.status_code == 200
    assert again.json()["MessageID"] != first.json()["MessageID"]
    send(sandbox, Metadata={"delivery_id": "d2", "round": "0"})
    send(sandbox, Metadata={"delivery_id": "d1", "round": "1"})  # a resend after a soft bounce
    assert [r["outcome"] for r in sandbox.requests_log()] == ["accepted"] * 4
    assert [r["repeat"] for r in sandbox.requests_log()] == [False, True, False, False]
    stats = sandbox.stats()
    assert stats["by_outcome"] == {"postmark.accepted": 4}
    assert stats["duplicates"] == stats["visible_duplicates"] == {**NO_DUPLICATES, "postmark": 1}


def postmark_search(sandbox, token: str = "t", **query: object) -> requests.Response:  # type: ignore[no-untyped-def]
    return requests.get(
        f"{sandbox.base_url}/postmark/messages/outbound",
        params={"count": 50, "offset": 0, **query},
        headers={"X-Postmark-Server-Token": token, "Accept": "application/json"},
        timeout=5,
    )


def test_postmark_search_finds_a_message_by_its_metadata_recipient_and_time(sandbox):
    message_id = send(sandbox, to="ada@example.com", Metadata={"delivery_id": "d1"}).json()["MessageID"]
    send(sandbox, to="bob@example.com", Metadata={"delivery_id": "d2"})
    eastern = ZoneInfo("America/New_York")
    an_hour_ago = (datetime.now(eastern) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    in_an_hour = (datetime.now(eastern) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")

    found = postmark_search(sandbox, recipient="ada@example.com", fromdate=an_hour_ago, metadata_delivery_id="d1")
    assert found.status_code == 200
    assert found.json()["TotalCount"] == 1
    [message] = found.json()["Messages"]
    assert (message["MessageID"], message["Metadata"], message["Recipients"]) == (
        message_id,
        {"delivery_id": "d1"},
        ["ada@example.com"],
    )
    assert postmark_search(sandbox, metadata_delivery_id="d1", fromdate=in_an_hour).json()["TotalCount"] == 0
    assert postmark_search(sandbox, recipient="bob@example.com", metadata_delivery_id="d1").json()["TotalCount"] == 0
    assert postmark_search(sandbox, token="another-server", metadata_delivery_id="d1").json()["TotalCount"] == 0
    assert postmark_search(sandbox).json()["TotalCount"] == 2
    assert postmark_search(sandbox, count=501).status_code == 422
    assert postmark_search(sandbox, token="").status_code == 401

    sandbox.faults_set(search_lag_ms=60_000)  # the search index has not caught up yet
    assert postmark_search(sandbox, metadata_delivery_id="d1").json()["TotalCount"] == 0


def test_twilio_lists_an_accounts_messages_newest_first_as_its_sdk_reads_them(sandbox):
    client = TwilioClient(
        "AC-sandbox",
        "secret",
        http_client=_ConfiguredHostHttpClient(api_base=f"{sandbox.base_url}/twilio", timeout=5, guarded=False),
    )
    for body in ("first", "second", "first"):
        client.messages.create(to="+15005550006", from_="+15005550001", body=body)
    client.messages.create(to="+15005550007", from_="+15005550001", body="other")
    listed = client.messages.list(to="+15005550006", page_size=2)
    assert [m.body for m in listed] == ["first", "second", "first"]  # three pages' worth, newest first
    assert sandbox.stats()["duplicates"] == sandbox.stats()["visible_duplicates"] == {**NO_DUPLICATES, "twilio": 1}
    # A message is dated sent only once it left the queue (0.2 s after it was taken): asked
    # for at once, the one just taken is not listed yet.
    client.messages.create(to="+15005550008", from_="+15005550001", body="just taken")
    assert client.messages.list(to="+15005550008", date_sent_after=datetime.now(UTC) - timedelta(hours=1)) == []
    time.sleep(0.3)
    assert len(client.messages.list(to="+15005550008", date_sent_after=datetime.now(UTC) - timedelta(hours=1))) == 1
    sent = client.messages.list(to="+15005550006", date_sent_after=datetime.now(UTC) - timedelta(hours=1))
    assert len(sent) == 3 and {m.status for m in sent} == {"sent"}
    other_account = TwilioClient(
        "AC-other",
        "secret",
        http_client=_ConfiguredHostHttpClient(api_base=f"{sandbox.base_url}/twilio", timeout=5, guarded=False),
    )
    assert other_account.messages.list(to="+15005550006") == []


def fcm_send(sandbox, *, delivery_id: str, tag: str | None) -> None:  # type: ignore[no-untyped-def]
    android = {"notification": {"tag": tag}} if tag else {}
    message = {"token": "device-1", "notification": {"title": "t", "body": "b"}, "data": {"delivery_id": delivery_id}}
    response = requests.post(
        f"{sandbox.base_url}/fcm/v1/projects/p/messages:send",
        json={"message": {**message, "android": android}},
        headers={"Authorization": "Bearer sandbox-token"},
        timeout=5,
    )
    assert response.status_code == 200


def webpush_send(sandbox, *, payload: dict) -> None:  # type: ignore[no-untyped-def]
    webpush(
        subscription_info={"endpoint": f"{sandbox.base_url}/webpush/browser-1", "keys": browser_subscription_keys()},
        data=json.dumps(payload),
        vapid_private_key=settings.WEBPUSH_VAPID_PRIVATE_KEY,
        vapid_claims={"sub": "mailto:ops@example.com"},
        ttl=60,
        timeout=5,
    )


def test_a_repeated_push_is_a_duplicate_and_visible_unless_it_replaces_the_shown_one(sandbox):
    fcm_send(sandbox, delivery_id="d1", tag="d1")
    fcm_send(sandbox, delivery_id="d1", tag="d1")  # replaces the notification on the device
    fcm_send(sandbox, delivery_id="d2", tag=None)
    fcm_send(sandbox, delivery_id="d2", tag=None)  # a second notification on the device
    webpush_send(sandbox, payload={"delivery_id": "w1", "tag": "w1", "title": "t", "body": "b"})
    webpush_send(sandbox, payload={"delivery_id": "w1", "tag": "w1", "title": "t", "body": "b"})
    webpush_send(sandbox, payload={"delivery_id": "w2", "title": "t", "body": "b"})
    webpush_send(sandbox, payload={"delivery_id": "w2", "title": "t", "body": "b"})
    stats = sandbox.stats()
    assert stats["duplicates"] == {**NO_DUPLICATES, "fcm": 2, "webpush": 2}
    assert stats["visible_duplicates"] == {**NO_DUPLICATES, "fcm": 1, "webpush": 1}
    assert [r["delivery_id"] for r in sandbox.requests_log(provider="webpush")] == ["w1", "w1", "w2", "w2"]


def test_a_web_push_logs_the_public_key_it_was_signed_with(sandbox):
    """So that a test can tell a sender's key from the one browsers subscribed with."""
    webpush_send(sandbox, payload={"delivery_id": "w1", "title": "t", "body": "b"})
    [entry] = sandbox.requests_log(provider="webpush")
    assert entry["metadata"]["vapid_key"] == vapid_application_server_key()


def test_callbacks_go_to_loopback_and_to_the_private_networks_named_only():
    sandbox = Sandbox(callback_networks=("10.231.7.0/24",))
    assert sandbox.callback_allowed("http://127.0.0.1:8000/webhooks/twilio/status")
    assert sandbox.callback_allowed("http://10.231.7.2:8000/webhooks/twilio/status")
    assert not sandbox.callback_allowed("http://10.231.8.2:8000/webhooks/twilio/status")
    assert not sandbox.callback_allowed("http://example.com/webhooks/twilio/status")
    assert not Sandbox().callback_allowed("http://10.231.7.2:8000/webhooks/twilio/status")


def test_a_public_callback_network_is_refused_with_the_fix():
    started = subprocess.run(
        [sys.executable, "-m", "notify.sandbox", "--callback-network", "8.8.8.0/24"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert started.returncode == 2
    assert "--callback-network 8.8.8.0/24: 8.8.8.0/24 is not a private network" in started.stderr
    assert "give a private network" in started.stderr


def test_injected_faults(sandbox):
    sandbox.faults_set(fail_next=[503, 429], address_status={"@bounce.test": 422})
    assert [send(sandbox).status_code for _ in range(3)] == [503, 429, 200]
    assert send(sandbox, to="x@bounce.test").status_code == 422
    sandbox.faults_set(error_rate=1.0, error_status=500)
    assert send(sandbox).status_code == 500
    sandbox.faults_set(latency_ms=150)
    assert send(sandbox).elapsed.total_seconds() >= 0.15


def test_checks_the_server_token_and_the_address(sandbox):
    assert send(sandbox, token="").status_code == 401
    assert send(sandbox, to="not-an-address").status_code == 422


def test_bad_fault_settings_are_refused(sandbox):
    response = requests.post(
        f"{sandbox.base_url}/_sandbox/faults", json={"provider": "postmark", "colour": "red"}, timeout=5
    )
    assert response.status_code == 400
    assert "bad fault settings" in response.json()["error"]


def listening_addresses(*, port: int) -> set[str]:
    """The local addresses (hex, as the kernel lists them) of TCP sockets listening on the port."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_the_sandbox_listens_on_loopback_only_by_default(sandbox_url):
    # Started as the tests and the run command start it, without --host.
    port = int(sandbox_url.rsplit(":", 1)[1])
    assert listening_addresses(port=port) == {"0100007F"}  # 127.0.0.1


def test_the_log_keeps_the_newest_requests_and_the_counts_cover_all(tmp_path):
    """A long run's memory stays flat: the log is bounded, the counts are not."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "notify.sandbox", "--port", str(port), "--log-size", "3"])
    try:
        client = SandboxClient(base_url=f"http://127.0.0.1:{port}")
        client.wait_until_up()
        for n in range(5):
            assert send(SimpleNamespace(base_url=client.base_url), to=f"r{n}@example.com").status_code == 200
        assert [(r["seq"], r["to"]) for r in client.requests_log()] == [
            (3, "r2@example.com"),
            (4, "r3@example.com"),
            (5, "r4@example.com"),
        ]
        after = requests.get(f"{client.base_url}/_sandbox/requests", params={"after": 4}, timeout=5).json()
        assert [r["seq"] for r in after["requests"]] == [5] and after["last_seq"] == 5
        stats = client.stats()
        assert (stats["total"], stats["by_outcome"]) == (5, {"postmark.accepted": 5})
    finally:
        process.terminate()
        process.wait(timeout=10)
