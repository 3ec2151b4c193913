import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.db import connection
from rest_framework.test import APIClient

from apps.catalog.models import Category, Priority, TemplateVariant, TemplateVersion
from apps.tenants.models import ApiKey, Tenant
from notify.sandbox.client import SandboxClient
from tests.factories import ApiKeyFactory, CategoryFactory, TemplateFactory
from tests.helpers import METRICS_TOKEN, SANDBOX_ALLOW_LISTS, free_port, provider_settings, wait_for
from tests.hosts import Host

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def offline_name_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names resolve as on a machine with no DNS server: loopback names and address literals
    only. The outbound guard resolves every host it checks, and no test may send a query off
    this machine (tests that need other answers replace the lookup themselves)."""
    import ipaddress
    import socket

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        name = host.decode() if isinstance(host, bytes) else host
        try:
            ipaddress.ip_address(str(name).strip("[]"))
        except ValueError:
            if name not in (None, "localhost", "localhost.localdomain", "ip6-localhost"):
                raise socket.gaierror(socket.EAI_NONAME, f"{name}: no DNS on the test machine")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@dataclass
class Workspace:
    tenant: Tenant
    api_key: ApiKey
    normal: Category
    critical: Category
    bulk: Category

    @property
    def auth_header(self) -> str:
        return f"Bearer {self.api_key.raw_key}"


# A table a test filled with more rows than this is truncated between tests; the others have
# their rows deleted.
TRUNCATE_FROM_ROWS = 10_000


@pytest.fixture(scope="session", autouse=True)
def flush_by_delete() -> Iterator[None]:
    """After each transactional test Django empties every table with one TRUNCATE, which makes
    each of the hundred-odd tables and their indexes anew: an empty test's teardown took
    0.85-0.92 s, and 0.17-0.23 s with deletes (a minute of the suite's wall time). A test leaves
    a few rows behind. The foreign keys are all deferrable, so the deletes' order is free."""
    ops = connection.ops
    truncate_all = ops.sql_flush

    def sql_flush(
        style: Any, tables: list[str], *, reset_sequences: bool = False, allow_cascade: bool = False
    ) -> list[str]:
        if reset_sequences or not tables:
            return truncate_all(style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
        quote = ops.quote_name
        sizes = " UNION ALL ".join(
            f"SELECT %s, (SELECT count(*) FROM (SELECT 1 FROM {quote(t)} LIMIT {TRUNCATE_FROM_ROWS + 1}) s)"
            for t in tables
        )
        with connection.cursor() as cursor:
            cursor.execute(sizes, tables)
            rows = dict(cursor.fetchall())
        big = [t for t in tables if rows[t] > TRUNCATE_FROM_ROWS]
        statements = ["SET CONSTRAINTS ALL DEFERRED"]
        statements += [f"DELETE FROM {quote(t)}" for t in tables if 0 < rows[t] <= TRUNCATE_FROM_ROWS]
        if big:
            statements.append(f"TRUNCATE {', '.join(quote(t) for t in big)} CASCADE")
        return statements

    ops.sql_flush = sql_flush  # type: ignore[method-assign]
    yield
    del ops.sql_flush


@pytest.fixture
def workspace(db: None) -> Workspace:
    key = ApiKeyFactory()
    tenant = key.tenant
    return Workspace(
        tenant=tenant,
        api_key=key,
        normal=CategoryFactory(tenant=tenant, key="welcome", default_priority=Priority.NORMAL),
        critical=CategoryFactory(tenant=tenant, key="otp", default_priority=Priority.CRITICAL),
        bulk=CategoryFactory(tenant=tenant, key="digest", default_priority=Priority.BULK),
    )


@pytest.fixture
def api(workspace: Workspace) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=workspace.auth_header)
    return client


@pytest.fixture(scope="session")
def sandbox_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "notify.sandbox", "--port", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    SandboxClient(base_url=url).wait_until_up()
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def sandbox(sandbox_url: str, settings) -> SandboxClient:  # type: ignore[no-untyped-def]
    """The provider sandbox, emptied, with this process's email pointed at it."""
    # Django's test set-up swaps in the in-memory email backend; the real one is wanted here.
    settings.EMAIL_BACKEND = "anymail.backends.postmark.EmailBackend"
    urls = provider_settings(sandbox_url=sandbox_url)
    settings.ANYMAIL = {**django_settings.ANYMAIL, "POSTMARK_API_URL": urls.pop("POSTMARK_API_URL")}
    for name in SANDBOX_ALLOW_LISTS:
        setattr(settings, name, urls.pop(name).split(","))
    for name, url in urls.items():
        setattr(settings, name, url)
    client = SandboxClient(base_url=sandbox_url)
    client.reset()
    return client


def process_env(*, sandbox_url: str) -> dict[str, str]:
    """The environment for a process of ours: this test's database, the sandbox's providers,
    and DEBUG on, the only mode that starts on the sandbox's published credentials."""
    db = connection.settings_dict
    return {
        **os.environ,
        "DJANGO_DEBUG": "1",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        **provider_settings(sandbox_url=sandbox_url),
    }


@dataclass
class WorkerProcess:
    """A real `celery worker` process consuming one or more worker groups' queues."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class WorkerPool:
    sandbox_url: str
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start(
        self, *groups: str, concurrency: int = 1, env: dict[str, str] | None = None, host: Host | None = None
    ) -> WorkerProcess:
        """Start a worker on the groups' queues (with `env` added to its environment, and on
        `host`'s network namespace and working directory when given) and wait until it is ready."""
        queues = subprocess.run(
            [sys.executable, "-m", "config.queues", *groups], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
        name = f"{'-'.join(groups)}-{len(self.workers)}"
        pool = ["--pool", "solo"] if concurrency == 1 else ["--pool", "prefork", "--concurrency", str(concurrency)]
        return self._spawn(
            name,
            [
                "worker",
                *pool,
                "-Q",
                queues,
                "-n",
                f"{name}@%h",
                "--without-mingle",
                "--without-gossip",
            ],
            ready=" ready.",
            env=env,
            host=host,
        )

    def start_beat(self, *, env: dict[str, str] | None = None, host: Host | None = None) -> WorkerProcess:
        """Start celery beat with the DatabaseScheduler, sweeping every second (with `env` added,
        and on `host` when given)."""
        return self._spawn(
            "beat",
            ["beat", "--pidfile="],
            ready="beat: Starting",
            env={"NOTIFY_SWEEP_INTERVAL_SECONDS": "1", **(env or {})},
            host=host,
        )

    def _spawn(
        self,
        name: str,
        arguments: list[str],
        *,
        ready: str,
        env: dict[str, str] | None = None,
        host: Host | None = None,
    ) -> WorkerProcess:
        log_path = self.log_dir / f"{name}.log"
        command = [sys.executable, "-m", "celery", "-A", "config", *arguments, "-l", "info"]
        process = subprocess.Popen(
            host.command(*command) if host else command,
            cwd=host.directory if host else ROOT,
            env={**process_env(sandbox_url=self.sandbox_url), **(host.environment() if host else {}), **(env or {})},
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
        )
        worker = WorkerProcess(name=name, process=process, log_path=log_path)
        self.workers.append(worker)
        wait_for(lambda: ready in worker.log() or process.poll() is not None, timeout=30, what=f"{name} to start")
        if process.poll() is not None:
            raise AssertionError(f"{name} exited:\n{worker.log()}")
        return worker

    def stop_all(self) -> None:
        """Stop them all at once: a warm shutdown takes a worker a second or two."""
        running = [worker for worker in self.workers if worker.process.poll() is None]
        for worker in running:
            worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for worker in running:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()


@pytest.fixture
def broker() -> redis.Redis:
    client = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    client.flushdb()
    return client


@pytest.fixture
def workers(
    transactional_db: None, sandbox: SandboxClient, broker: redis.Redis, tmp_path: Path
) -> Iterator[WorkerPool]:
    """Start real worker processes with `workers.start("critical")`; all stop afterwards."""
    pool = WorkerPool(sandbox_url=sandbox.base_url, log_dir=tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture
def web_server_start(transactional_db: None, sandbox: SandboxClient, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start the ASGI application under uvicorn, as the run command serves it (HTTP and
    WebSocket), on this test's database unless `env` says otherwise, with the demo pages on,
    on `host`'s network namespace and working directory when given; returns its base URL.
    Every server started stops afterwards."""
    processes: list[subprocess.Popen] = []

    def start(*, env: dict[str, str] | None = None, host: Host | None = None, port: int = 0) -> str:
        port = port or free_port()
        address = host.address if host else "127.0.0.1"
        log_path = tmp_path / f"web-{len(processes)}.log"
        command = [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", address, "--port", str(port)]
        process = subprocess.Popen(
            host.command(*command) if host else command,
            cwd=host.directory if host else ROOT,
            env={**process_env(sandbox_url=sandbox.base_url), **(host.environment() if host else {}), **(env or {})},
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        wait_for(
            lambda: "Uvicorn running" in log_path.read_text() or process.poll() is not None,
            timeout=30,
            what="the web server to start",
        )
        if process.poll() is not None:
            raise AssertionError(f"the web server exited:\n{log_path.read_text()}")
        return f"http://{address}:{port}"

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def web_server(web_server_start: Callable[..., str]) -> str:
    """The ASGI application served by uvicorn on this test's database; its base URL."""
    return web_server_start()


@pytest.fixture
def inbox_category(workspace: Workspace) -> Category:
    """`mention`: an in-app category whose items have a title, a body and a link."""
    template = TemplateFactory(tenant=workspace.tenant, key="mention")
    version = TemplateVersion.objects.create(template=template, number=1)
    TemplateVariant.objects.create(
        version=version, channel="inapp", title="{{ data.who }} mentioned you", body="{{ data.text }}", link="/c/1"
    )
    return CategoryFactory(tenant=workspace.tenant, key="mention", template=template, default_channels=["inapp"])


@pytest.fixture
def metrics_token(settings) -> str:  # type: ignore[no-untyped-def]
    """/metrics asks for this token, in this process and the processes it starts."""
    settings.NOTIFY_METRICS_TOKEN = METRICS_TOKEN
    return METRICS_TOKEN
