import shutil
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll until `condition()` is truthy and return its value; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The outbound guard's allow lists that name the sandbox (comma-separated, as in the environment).
SANDBOX_ALLOW_LISTS = ("NOTIFY_WEBPUSH_ALLOWED_HOSTS", "NOTIFY_PROVIDER_ALLOWED_HOSTS")


def provider_settings(*, sandbox_url: str) -> dict[str, str]:
    """Every provider's API address pointed at the sandbox, and the sandbox (its host and
    port only) on the outbound guard's allow lists."""
    sandbox_host = urlsplit(sandbox_url).netloc
    return {
        "POSTMARK_API_URL": f"{sandbox_url}/postmark/",
        "TWILIO_API_BASE": f"{sandbox_url}/twilio",
        "FCM_API_BASE": f"{sandbox_url}/fcm",
        "FCM_TOKEN_URI": f"{sandbox_url}/google/token",
        **{name: sandbox_host for name in SANDBOX_ALLOW_LISTS},
    }


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def chromium_launch(playwright: Any) -> Any:
    """Debian's Chromium under Playwright (which cannot download a browser of its own here)."""
    if not shutil.which(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install chromium); make test does it as root"
        )
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)


METRICS_TOKEN = "metrics-test-token"


def metrics_scrape(*, token: str = METRICS_TOKEN) -> str:
    """The web /metrics page, as Prometheus reads it with the token."""
    from django.test import Client

    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return response.content.decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`; 0 when none."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def inbox_history_analyze(*, item: Any, older_items: int = 3000, read: bool = False) -> None:
    """Copy `item` into a long history of older items in a few categories (read and seen, with
    `read`), and refresh the table's statistics, before a test reads a query's plan. With only
    a test's few rows the planner's estimates for two indexes tie, and whatever statistics the
    table last had (from other tests; autovacuum may be off) decide between them."""
    from django.db import connection

    from apps.inbox.models import InboxItem

    fresh = {
        "id": "gen_random_uuid()",
        "delivery_id": "gen_random_uuid()",
        "sort_at": "sort_at - n * interval '1 minute'",
        "created_at": "created_at - n * interval '1 minute'",
        "category": "'category-' || mod(n, 4)",
        **({"read_at": "now()", "seen_at": "now()"} if read else {}),
    }
    columns = [field.column for field in InboxItem._meta.concrete_fields]
    values = ", ".join(fresh.get(column, column) for column in columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO inbox_inboxitem ({', '.join(columns)}) SELECT {values}"
            " FROM inbox_inboxitem, generate_series(1, %s) AS n WHERE id = %s",
            [older_items, item.id],
        )
        cursor.execute("ANALYZE inbox_inboxitem")
