"""The sandbox's own behaviour: tests elsewhere rely on it, so it is tested too."""

import subprocess
import sys
from types import SimpleNamespace

import requests

from notify.sandbox.client import SandboxClient
from tests.helpers import free_port


def send(sandbox, to: str = "a@example.com", key: str | None = None, token: str = "t") -> requests.Response:  # type: ignore[no-untyped-def]
    message = {"From": "n@example.com", "To": to, "Subject": "s", "TextBody": "b"}
    if key:
        message["Headers"] = [{"Name": "X-Idempotency-Key", "Value": key}]
    return requests.post(
        f"{sandbox.base_url}/postmark/email", json=message, headers={"X-Postmark-Server-Token": token}, timeout=5
    )


def test_accepts_logs_and_deduplicates_by_idempotency_key(sandbox):
    first = send(sandbox, key="k1")
    again = send(sandbox, key="k1")
    assert first.status_code == again.status_code == 200
    assert again.json()["MessageID"] == first.json()["MessageID"]
    assert [r["outcome"] for r in sandbox.requests_log()] == ["accepted", "duplicate"]
    assert sandbox.stats()["by_outcome"] == {"postmark.accepted": 1, "postmark.duplicate": 1}


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
        assert client.stats() == {"total": 5, "by_outcome": {"postmark.accepted": 5}}
    finally:
        process.terminate()
        process.wait(timeout=10)
