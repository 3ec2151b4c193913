"""The suite runs in several processes (pytest-xdist, `-n`). pytest-django gives each its own
PostgreSQL database; this gives each its own Redis database, so that one process's flush or
queue never touches another's, and its own metrics directory, so that one's counts never show
in another's /metrics. Loaded with `-p` (pytest.ini), before Django reads its settings."""

import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

# Test modules whose tests restart a service every process shares (RabbitMQ): each module runs
# whole, in one process, one test after the other.
SERIAL_MODULES = ("tests/e2e/test_rabbitmq.py",)

# The longest modules start first: at the end of the run each would leave the other processes
# idle for as long as it takes.
LONGEST_MODULES = ("tests/e2e/test_chaos_command.py", "tests/test_soak.py", "tests/e2e/test_run_command.py")

# Redis URLs the settings read; the cache, caps and live inbox default to the broker's.
REDIS_URL_SETTINGS = ("CELERY_BROKER_URL", "NOTIFY_REDIS_URL", "NOTIFY_INBOX_LIVE_URL")


def redis_database_shifted(url: str, *, by: int) -> str:
    """The same Redis server's URL with its database number moved down by `by` (of 16)."""
    parts = urlsplit(url)
    database = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(database - by) % 16}"))


def process_index() -> int:
    """This test process's number: 0 unless pytest-xdist runs it as gw1, gw2, ..."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw"))


for _name in REDIS_URL_SETTINGS:
    if os.environ.get(_name, "").startswith("redis") and process_index():
        os.environ[_name] = redis_database_shifted(os.environ[_name], by=process_index())
if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], str(process_index()))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Spread the tests one by one, except those of SERIAL_MODULES, which go to one process as
    a unit. Written here because pytest-xdist's xdist_group mark no longer groups under
    pytest 9: it renames each item through an attribute pytest stopped reading."""
    from xdist.scheduler import LoadScopeScheduling

    class SerialModulesScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SERIAL_MODULES else nodeid

    return SerialModulesScheduling(config, log)


@pytest.hookimpl(trylast=True)  # after pytest-django's own ordering
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort: the rest keep their order.
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0] not in LONGEST_MODULES)
