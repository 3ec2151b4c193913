"""The README's run command, as a new user runs it: everything starts, the printed curl line
sends a notification, and it is delivered."""

import os
import subprocess
from pathlib import Path

import pytest

from apps.tenants.demo import DEMO_READERS
from tests.helpers import free_port
from tests.processes import redis_database_shifted

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.worker
def test_the_run_command_delivers_the_demo_notification(tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",  # the demo's embedded database
        # A Redis database of its own, apart from the ones the suite's processes use.
        "CELERY_BROKER_URL": redis_database_shifted(os.environ["CELERY_BROKER_URL"], by=8),
        "NOTIFY_WEB_PORT": str(free_port()),
        "NOTIFY_SANDBOX_PORT": str(free_port()),
    }
    for name in ("POSTMARK_API_URL", "DJANGO_SECRET_KEY"):
        env.pop(name, None)
    result = subprocess.run(
        ["bash", "scripts/run.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "login: admin / admin" in output
    assert "curl -s -X POST" in output
    assert "/preferences/" in output
    assert "/readyz" in output
    assert "/metrics" in output and "Authorization: Bearer demo-metrics-token" in output
    assert output.count(": delivered") == 2  # the email and the SMS
    assert output.count(": sent") == 3  # the push, the web push and the in-app notification
    # The welcome email, then the broadcast to the product-news topic: the demo recipient and its readers.
    assert f'"postmark.accepted": {1 + 1 + DEMO_READERS}' in output
    assert '"twilio.accepted": 1' in output
    assert '"fcm.accepted": 1' in output
    assert '"webpush.accepted": 1' in output
