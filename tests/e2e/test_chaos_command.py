"""`make chaos` on a small load with a short schedule: its own services start, every fault of
the schedule happens, and the one summary line comes out with its fields, true to the load."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
FAULTS = (
    "maintenance worker SIGKILLed during fan-out",
    "bulk workers SIGKILLed during send",
    "bulk workers SIGKILLed during record",
    "critical worker SIGKILLed during send",
    "critical worker SIGKILLed during record",
    "Redis FLUSHALL",
    "Redis stopped, and started again empty",
    "PostgreSQL restarted (pg_ctl restart -m fast)",
    "PostgreSQL crashed (pg_ctl restart -m immediate)",
    "beat SIGKILLed",
    "every provider: 20% 503",
    "Postmark down for 4 s",
)
SUMMARY = re.compile(
    r"^chaos: accepted (?P<accepted>\d+), lost (?P<lost>\d+), "
    r"duplicates at the provider email=(?P<email>\d+) sms=(?P<sms>\d+) push=\d+ webpush=\d+, "
    r"visible duplicates push=(?P<push>\d+) webpush=(?P<webpush>\d+), "
    r"time to drain \d+ s, critical P99 during the faults \d+ ms \((?P<measured>\d+) sends\), "
    r"targets (?P<verdict>met|MISSED)$",
    re.MULTILINE,
)


@pytest.mark.worker
def test_the_chaos_command_runs_every_fault_and_prints_its_summary():
    env = {
        **os.environ,
        "CHAOS_WEB_PORT": str(free_port()),
        "CHAOS_SANDBOX_PORT": str(free_port()),
        "CHAOS_REDIS_PORT": str(free_port()),
        "CHAOS_POSTGRES_PORT": str(free_port()),
    }
    for name in ("NOTIFY_WEBPUSH_ALLOWED_HOSTS", "NOTIFY_PROVIDER_ALLOWED_HOSTS", "POSTMARK_API_URL"):
        env.pop(name, None)
    try:
        result = subprocess.run(
            [
                "bash",
                "scripts/chaos.sh",
                *("--notifications", "2000", "--fault-seconds", "1", "--down-seconds", "4", "--lease-seconds", "10"),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        # The run's own cluster, logs and beat schedule, named by its ports.
        shutil.rmtree(ROOT / "var" / "chaos" / f"postgres-{env['CHAOS_POSTGRES_PORT']}", ignore_errors=True)
        for leftover in (
            *(ROOT / "var" / "log").glob(f"chaos-{env['CHAOS_WEB_PORT']}-*.log"),
            *(ROOT / "var" / "chaos").glob(f"beat-schedule-chaos-{env['CHAOS_WEB_PORT']}*"),
            ROOT / "var" / "chaos" / f"redis-{env['CHAOS_REDIS_PORT']}.log",
        ):
            leftover.unlink(missing_ok=True)
    output = result.stdout + result.stderr
    for fault in FAULTS:
        assert f"fault: {fault}" in output, output
    assert "NOTIFY_<CHANNEL>_MAX_ATTEMPTS=30" in output
    summary = SUMMARY.search(result.stdout)
    assert summary, output
    # The bulk load plus the OTPs the API accepted, each with an email and an SMS measured.
    assert int(summary["accepted"]) > 2000
    assert int(summary["measured"]) > 0
    missed = any(int(summary[field]) for field in ("lost", "email", "sms", "push", "webpush"))
    assert summary["verdict"] == ("MISSED" if missed else "met")
    assert result.returncode == (1 if missed else 0), output
    assert "stopping the campaign's own Redis and PostgreSQL" in output
