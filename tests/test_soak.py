"""`make soak`: the growth rule that decides its verdict, and a short run of the real thing."""

import importlib.util
import os
import random
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.db import connection

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
assert _spec and _spec.loader
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

HOUR = 3600.0
TIMES = [float(t) for t in range(10, 3601, 10)]  # a sample every 10 s for an hour
MIB = 1024 * 1024
PROCESSES = ("sandbox", "web", "critical", "normal", "bulk", "maintenance", "webhooks", "beat")


def grows(values: list[float], *, series: str = "rss") -> bool:
    return soak.keeps_growing(times=TIMES, values=values, duration=HOUR, series=series)


def test_warm_up_is_a_tenth_of_the_run_and_at_most_five_minutes():
    assert soak.warm_up_seconds(duration=HOUR) == 300
    assert soak.warm_up_seconds(duration=600) == 60


def test_a_flat_series_passes():
    assert not grows([200 * MIB] * len(TIMES))


def test_steady_growth_fails():
    # 1 MiB a minute on 200 MiB: about 10% over the last half hour.
    values = [200 * MIB + t / 60 * MIB for t in TIMES]
    assert grows(values)
    assert 0.05 < soak.growth(times=TIMES, values=values, duration=HOUR) < 0.15


def test_growth_during_warm_up_only_passes():
    values = [(100 + min(t, 300) / 3) * MIB for t in TIMES]  # 100 -> 200 MiB in five minutes, then flat
    assert values[0] < values[-1]
    assert not grows(values)


def test_growth_in_the_first_half_that_stops_passes():
    values = [(200 + min(t, 1500) / 60) * MIB for t in TIMES]
    assert not grows(values)


def test_noise_and_spikes_pass():
    noisy = random.Random(15)
    values = [200 * MIB * (1 + noisy.uniform(-0.05, 0.05)) for _ in TIMES]
    values[-1] = values[-2] = 400 * MIB  # a burst at the very end is not a trend
    assert not grows(values)


def test_counts_grow_by_more_than_a_unit_to_count():
    one_more = [2.0] * (len(TIMES) - 60) + [3.0] * 60  # a pool opened one more connection
    assert not grows(one_more, series="db")
    leaking = [5 + t / 240 for t in TIMES]  # a connection every four minutes
    assert grows(leaking, series="db")
    files = [60 + t // 120 for t in TIMES]  # a file every two minutes
    assert grows(files, series="files")


@pytest.mark.worker
def test_a_short_soak_samples_every_process_and_prints_a_summary(transactional_db):
    # The soak's processes work on this test's own database and Redis database.
    database = urlunsplit(urlsplit(os.environ["DATABASE_URL"])._replace(path=f"/{connection.settings_dict['NAME']}"))
    env = {
        **os.environ,
        "SOAK_DATABASE_URL": database,
        "SOAK_BROKER_URL": os.environ["CELERY_BROKER_URL"],
        "BENCH_WEB_PORT": str(free_port()),
        "BENCH_SANDBOX_PORT": str(free_port()),
    }
    result = subprocess.run(
        ["bash", "scripts/soak.sh", "--seconds", "20", "--interval", "4", "--rate", "20", "--recipients", "200"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    output = result.stdout + result.stderr
    samples = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(samples) >= 5, output
    for line in samples:
        for process in PROCESSES:
            assert re.search(rf"\| {process} [1-9]\d*M/[1-9]\d*/\d+", line), (process, line)
    last = samples[-1]
    accepted, done = (int(n) for n in re.search(r"accepted (\d+) done (\d+)", last).groups())  # type: ignore[union-attr]
    assert accepted >= 100 and done > 0, last
    # Connections are found for the processes that used the database.
    for process in ("web", "critical", "bulk"):
        assert int(re.search(rf"\| {process} \d+M/\d+/(\d+)", last).group(1)) >= 1, (process, last)  # type: ignore[union-attr]
    summary = result.stdout[result.stdout.index("process      series") :]
    for process in PROCESSES:
        for series in ("rss", "files", "db"):
            assert re.search(rf"^{process} +{series} ", summary, re.MULTILINE), (process, series, summary)
    assert re.search(r"^accepted \d+ notifications in \d+ s", result.stdout, re.MULTILINE), output
    verdict = "PASS" if result.returncode == 0 else "FAIL"
    assert result.returncode in (0, 1) and f"\n{verdict}: " in result.stdout, output
