"""Benchmark the whole pipeline: the ASGI web server ingests over HTTP, real workers send
through the sandbox (or an in-process sink) and record every status in PostgreSQL.

  python scripts/bench.py --bulk 100000 --critical 200 [--sink sandbox|memory]
  python scripts/bench.py --bulk 30000 --metrics-compare

Prints sustained bulk notifications/s, then the end-to-end latency of critical
notifications (API call -> provider accepted and recorded) sent while a bulk backlog drains.
With --metrics-compare it drains the same bulk backlog twice, with the Prometheus metrics
off (NOTIFY_METRICS_ENABLED=false) and on, and prints both drain rates. With --critical-pool
the critical probe goes through a web pool of its own (NOTIFY_WEB_POOL=critical), as
docs/operations.md deploys one, while the bulk producers keep to the main pool.
Run it through `make bench`, which prepares the database, Redis and the virtualenv."""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.db.models import Max, Min  # noqa: E402

from apps.catalog.models import Category, Priority, Template, TemplateVariant, TemplateVersion  # noqa: E402
from apps.deliveries.models import Delivery, DeliveryEvent, DeliveryStatus  # noqa: E402
from apps.recipients.models import Device, Recipient, WebPushSubscription  # noqa: E402
from apps.tenants.demo import demo_workspace_ensure  # noqa: E402
from apps.tenants.models import Tenant  # noqa: E402
from config.queues import CHANNELS, WORKER_GROUPS  # noqa: E402
from notify.sandbox.client import SandboxClient, browser_subscription_keys  # noqa: E402
from tests.hosts import Host  # noqa: E402

WEB_PORT = int(os.environ.get("BENCH_WEB_PORT", "8100"))
SANDBOX_PORT = int(os.environ.get("BENCH_SANDBOX_PORT", "8125"))
# The web pool kept for critical events (`--critical-pool`; docs/operations.md).
CRITICAL_WEB_PORT = int(os.environ.get("BENCH_CRITICAL_WEB_PORT", "8101"))
API = f"http://127.0.0.1:{WEB_PORT}/api/v1/events"
CRITICAL_POOL_API = f"http://127.0.0.1:{CRITICAL_WEB_PORT}/api/v1/events"
# Every state a delivery reaches once the pipeline is done with it (feedback may follow).
FINAL = tuple(
    status
    for status in DeliveryStatus
    if status not in (DeliveryStatus.QUEUED, DeliveryStatus.SENDING, DeliveryStatus.RETRYING)
)


def celery_command(*args: str) -> list[str]:
    """A Celery process of the project (a worker, or beat), without its start-up chatter."""
    return [sys.executable, "-m", "celery", "-A", "config", *args, "-l", "warning"]


def celery_worker(*, group: str, pool: tuple[str, ...] = ("--pool", "solo")) -> list[str]:
    """A worker that serves one worker group's queues."""
    queues = ",".join(WORKER_GROUPS[group])
    return celery_command("worker", "--without-mingle", "--without-gossip", *pool, "-Q", queues, "-n", f"{group}@%h")


def ports_check(*extra_ports: int) -> None:
    """Stop before anything starts when another server holds the run's ports (a benchmark or
    soak still running, or one killed earlier): it would take this run's requests into its own
    database, and its figures would be that server's."""
    for port in (WEB_PORT, SANDBOX_PORT, *extra_ports):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(
                    f"port {port} is in use: stop what listens there, or set BENCH_WEB_PORT/BENCH_SANDBOX_PORT"
                )


class Processes:
    log_prefix = "bench"  # var/log/<prefix>-<n>.log, one a child

    def __init__(
        self,
        *,
        sink: str,
        bulk_concurrency: int,
        web_workers: int,
        web_interface: str,
        metrics: bool = True,
        sandbox_args: tuple[str, ...] = (),
        web_args: tuple[str, ...] = (),
    ) -> None:
        self.web_workers = web_workers
        self.sandbox_args = sandbox_args
        self.web_args = web_args  # more uvicorn options (the inbox benchmark's connection limits)
        # WSGI under uvicorn runs each request on its own thread, so a small request is not
        # queued behind a large one in the same process; ASGI runs sync views on one thread.
        self.web_app = (
            ["config.asgi:application"]
            if web_interface == "asgi"
            else ["--interface", "wsgi", "config.wsgi:application"]
        )
        self.children: list[subprocess.Popen] = []
        self.web: subprocess.Popen | None = None
        self.labels: dict[int, str] = {}  # process group -> what it is, for the CPU breakdown
        # The children run in process groups of their own: a run stopped with SIGTERM (as a
        # timeout stops it) unwinds through its `finally`, which stops them, rather than
        # leaving workers behind that would take the next run's tasks.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        self.env = {**os.environ, "LOG_LEVEL": "WARNING", "NOTIFY_METRICS_ENABLED": "true" if metrics else "false"}
        if sink == "memory":
            self.env["EMAIL_BACKEND"] = "django.core.mail.backends.dummy.EmailBackend"
        else:
            self.env["POSTMARK_API_URL"] = f"http://127.0.0.1:{SANDBOX_PORT}/postmark/"
        # SMS has no in-process sink: it always goes to the sandbox's Messages API, whose
        # status callbacks come back to this benchmark's web server.
        self.env["TWILIO_API_BASE"] = f"http://127.0.0.1:{SANDBOX_PORT}/twilio"
        self.env["NOTIFY_PUBLIC_URL"] = f"http://127.0.0.1:{WEB_PORT}"
        self.env["FCM_API_BASE"] = f"http://127.0.0.1:{SANDBOX_PORT}/fcm"
        self.env["FCM_TOKEN_URI"] = f"http://127.0.0.1:{SANDBOX_PORT}/google/token"
        # The web push subscriptions point at the sandbox, on loopback over http.
        self.env["NOTIFY_WEBPUSH_ALLOWED_HOSTS"] = f"127.0.0.1:{SANDBOX_PORT}"
        # One producer sending many times its audience on purpose: the runaway-send guard
        # would pause it (the second phase starts again from an empty recipients table).
        self.env["NOTIFY_RUNAWAY_MULTIPLE"] = "0"
        self.bulk_concurrency = bulk_concurrency

    def spawn(
        self, label: str, *command: str, host: Host | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start a child; with `host`, in that host's network namespace and working directory;
        `env` adds to the run's environment."""
        log = open(ROOT / "var" / "log" / f"{self.log_prefix}-{len(self.children)}.log", "w")
        child = subprocess.Popen(
            host.command(*command) if host else command,
            cwd=host.directory if host else ROOT,
            env={**self.env, **(env or {}), **(host.environment() if host else {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.children.append(child)
        # Each child leads a process group of its own, which its worker processes join.
        self.labels[child.pid] = label
        return child

    def start_web(self) -> None:
        python = sys.executable
        # The sandbox stands in for a remote provider, whose CPU would not be ours: it runs
        # at a low priority so that it takes only what our processes leave.
        self.spawn(
            "sandbox",
            "nice",
            "-n",
            "15",
            python,
            "-m",
            "notify.sandbox",
            "--port",
            str(SANDBOX_PORT),
            *self.sandbox_args,
        )
        self.web_start()

    def web_start(self) -> None:
        """The ASGI server, as the run command serves it; returns once it answers."""
        self.web = self._uvicorn_spawn(
            label="web", port=WEB_PORT, options=("--workers", str(self.web_workers), *self.web_args)
        )
        SandboxClient(base_url=f"http://127.0.0.1:{SANDBOX_PORT}").wait_until_up()
        _answer_wait(url=f"http://127.0.0.1:{WEB_PORT}/api/schema/")

    def critical_web_start(self) -> None:
        """A web pool of one process that takes only critical events, as docs/operations.md
        deploys it; returns once it answers."""
        self._uvicorn_spawn(label="critical web", port=CRITICAL_WEB_PORT, env={"NOTIFY_WEB_POOL": "critical"})
        if not _answer_wait(url=CRITICAL_POOL_API):  # any answer will do
            raise SystemExit(f"the critical web pool did not answer on port {CRITICAL_WEB_PORT}")

    def _uvicorn_spawn(
        self, *, label: str, port: int, options: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        return self.spawn(
            label,
            sys.executable,
            "-m",
            "uvicorn",
            *self.web_app,
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
            *options,
            env=env,
        )

    def web_stop(self) -> None:
        """Stop the ASGI server (and its worker processes) as a deploy does, with SIGTERM."""
        assert self.web is not None
        os.killpg(self.web.pid, signal.SIGTERM)
        self.web.wait(timeout=60)

    def start_group(self, *, label: str, group: str, pool: str = "solo", concurrency: int = 1, nice: int = 0) -> None:
        """One Celery worker for a worker group of config/queues.py, named after the group."""
        niced = ("nice", "-n", str(nice)) if nice else ()
        pool_args = ("--pool", pool, *(("--concurrency", str(concurrency)) if pool == "prefork" else ()))
        self.spawn(label, *niced, *celery_worker(group=group, pool=pool_args))

    def start_workers(self) -> None:
        self.start_group(label="critical worker", group="critical")
        # Bulk workers run at a lower CPU priority, as deployments should run them, so
        # that critical work and the API are scheduled first when the cores are busy.
        self.start_group(label="bulk workers", group="bulk", pool="prefork", concurrency=self.bulk_concurrency, nice=10)

    def start_beat(self) -> None:
        """Celery beat, for the periodic tasks (sweeper, gauges, retention); its schedule file under var/."""
        self.spawn("beat", *celery_command("beat", "--pidfile=", "-s", str(ROOT / "var" / "bench-beat-schedule")))

    def stop(self) -> None:
        for child in self.children:
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for child in self.children:
            child.wait(timeout=30)


def bench_categories_ensure(*, tenant_id: object) -> None:
    """bench-<channel>-<priority> categories, one channel each, so every figure is one channel's."""
    for channel in CHANNELS:
        template, created = Template.objects.get_or_create(
            tenant_id=tenant_id, key=f"bench-{channel}", defaults={"name": channel}
        )
        if created:
            version = TemplateVersion.objects.create(template=template, number=1)
            TemplateVariant.objects.create(
                version=version,
                channel=channel,
                subject="News: {{ data.headline }}",
                title="News",
                body="{{ data.headline }}",
                html="<h1>{{ data.headline }}</h1>" if channel == "email" else "",
            )
        for priority in (Priority.BULK, Priority.CRITICAL):
            Category.objects.get_or_create(
                tenant_id=tenant_id,
                key=f"bench-{channel}-{priority}",
                defaults={"template": template, "default_channels": [channel], "default_priority": priority},
            )


def reset_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE deliveries_deliveryevent, deliveries_deadletter, deliveries_delivery, "
            "deliveries_notification, deliveries_event, recipients_recipient CASCADE"
        )


def endpoints_register(
    *, tenant_id: object, channel: str, count: int, prefix: str, sandbox_url: str = f"http://127.0.0.1:{SANDBOX_PORT}"
) -> None:
    """Push and web push reach recipients through registered devices or subscriptions, which
    must exist before the events are planned: make the recipients and one of each for them."""
    if channel not in ("push", "webpush"):
        return
    recipients = Recipient.objects.bulk_create(
        [Recipient(tenant_id=tenant_id, external_id=f"{prefix}{i}") for i in range(count)], batch_size=5000
    )
    if channel == "push":
        Device.objects.bulk_create(
            [
                Device(tenant_id=tenant_id, recipient=r, platform="android", token=f"bench-{r.external_id}")
                for r in recipients
            ],
            batch_size=5000,
        )
        return
    keys = browser_subscription_keys()
    WebPushSubscription.objects.bulk_create(
        [
            WebPushSubscription(
                tenant_id=tenant_id,
                recipient=r,
                endpoint=f"{sandbox_url}/webpush/{r.external_id}",
                **keys,
            )
            for r in recipients
        ],
        batch_size=5000,
    )


def producer_session(*, retry_class: type[Retry] = Retry, statuses: tuple[int, ...] = (429, 503)) -> requests.Session:
    """A session that behaves as a well-made producer: when the API sheds load (429, or 503
    while the database is away) it waits as Retry-After says and sends the request again."""
    retry = retry_class(
        total=None,
        status=60,
        connect=5,
        read=0,
        status_forcelist=statuses,
        allowed_methods=None,  # every method: the events API is idempotent by key
        respect_retry_after_header=True,
        backoff_factor=0.5,
        backoff_max=10,
        raise_on_status=False,
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=16))
    return session


def ingest_bulk(
    *,
    session: requests.Session,
    headers: dict[str, str],
    count: int,
    prefix: str,
    threads: int,
    channel: str,
    spread_seconds: float = 0.0,
    api: str = API,
) -> float:
    """Post `count` bulk notifications, 1,000 recipients a request; return seconds taken.
    With `spread_seconds`, the requests start evenly over that span instead of at once."""
    chunks = [(start, min(1000, count - start)) for start in range(0, count, 1000)]
    began = time.monotonic()

    def post(chunk: tuple[int, int]) -> None:
        start, size = chunk
        time.sleep(max(0.0, began + spread_seconds * start / count - time.monotonic()))
        recipients = [
            # One phone number a recipient (the first 10,000 are +1415555xxxx).
            {"external_id": f"{prefix}{i}", "email": f"{prefix}{i}@example.com", "phone": f"+1415{5550000 + i:07d}"}
            for i in range(start, start + size)
        ]
        response = session.post(
            api,
            json={
                "category": f"bench-{channel}-bulk",
                "recipients": recipients,
                "data": {"headline": "News"},
                # A request retried after backpressure is accepted once.
                "idempotency_key": f"{prefix}{start}",
            },
            headers=headers,
        )
        response.raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(post, chunks))
    return time.perf_counter() - started


def final_count() -> int:
    return Delivery.objects.filter(status__in=FINAL).count()


def wait_until_final(*, total: int, timeout: float) -> float:
    """Wait until `total` deliveries have a final status; return when the last one did."""
    deadline = time.monotonic() + timeout
    while (done := final_count()) < total:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {done}/{total} deliveries final after {timeout:.0f}s")
        time.sleep(0.5)  # a count over the whole table: not too often, it costs the workers CPU
    return time.perf_counter()


def _answer_wait(*, url: str, seconds: float = 30) -> bool:
    """Wait until a server answers `url` (with any status); False if it never did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return True
        except requests.RequestException:
            time.sleep(0.1)
    return False


class CriticalProbe:
    """Sends critical notifications one at a time at a steady rate and measures each from
    the API call to its delivery being sent and recorded."""

    def __init__(self, *, headers: dict[str, str], count: int, rate: float, prefix: str, api: str = API) -> None:
        self.headers, self.count, self.rate, self.prefix, self.api = headers, count, rate, prefix, api
        self.totals_ms: list[float] = []
        self.api_ms: list[float] = []
        # How long the provider took to answer the send, as its history row notes it: on
        # this machine, the sandbox's share of the two cores the pipeline also uses.
        self.provider_ms: list[float] = []
        self.backlog_at_end = 0

    def run(self) -> None:
        delivery_ids = []
        for i in range(self.count):
            began = time.time()
            response = requests.post(  # a new connection each time, as independent producers make
                self.api,
                json={
                    "category": "bench-email-critical",
                    "recipient": {"external_id": f"{self.prefix}{i}", "email": f"otp{i}@example.com"},
                    "data": {"code": "123456"},
                },
                headers=self.headers,
            )
            response.raise_for_status()
            answered = time.time()
            notification_id = response.json()["notification_ids"][0]
            # The latency is read from sent_at, so polling sooner or faster would only take
            # CPU from what is measured: the first look comes after a typical send's time.
            time.sleep(0.02)
            while True:
                delivery = (
                    Delivery.objects.filter(notification_id=notification_id).values("id", "status", "sent_at").get()
                )
                if delivery["status"] in FINAL:
                    break
                time.sleep(0.01)
            self.totals_ms.append((delivery["sent_at"].timestamp() - began) * 1000)
            self.api_ms.append((answered - began) * 1000)
            delivery_ids.append(delivery["id"])
            time.sleep(max(0.0, 1 / self.rate - (time.time() - began)))
        # How long the provider took, from each sent history row: read once for the run.
        elapsed = dict(
            DeliveryEvent.objects.filter(delivery_id__in=delivery_ids, status=DeliveryStatus.SENT).values_list(
                "delivery_id", "detail__elapsed_ms"
            )
        )
        self.provider_ms.extend(float(elapsed.get(delivery_id) or 0.0) for delivery_id in delivery_ids)
        self.backlog_at_end = Delivery.objects.filter(priority="bulk").exclude(status__in=FINAL).count()

    def report(self, *, label: str) -> None:
        if not self.totals_ms:
            return
        print(f"{label}: {len(self.totals_ms)} sent, bulk backlog still unsent at the end: {self.backlog_at_end}")
        totals = self.totals_ms
        print(
            f"  end to end P50 {percentile(totals, 0.5):.0f} ms, P95 {percentile(totals, 0.95):.0f} ms, "
            f"P99 {percentile(totals, 0.99):.0f} ms, max {max(totals):.0f} ms"
        )
        print(f"  {latency_split(totals_ms=totals, api_ms=self.api_ms, provider_ms=self.provider_ms)}")


def latency_split(*, totals_ms: list[float], api_ms: list[float], provider_ms: list[float]) -> str:
    """Where critical latency goes: the API call (the web process and its transaction), what
    follows its answer (the queue, the worker, the provider and the record), the provider's
    answer alone, and the whole without it: what the pipeline itself took, apart from the
    stand-in provider sharing this machine's cores."""
    after = [total - call for total, call in zip(totals_ms, api_ms, strict=True)]
    ours = [total - provider for total, provider in zip(totals_ms, provider_ms, strict=True)]
    return (
        f"of which the API call P50 {percentile(api_ms, 0.5):.0f} ms, P99 {percentile(api_ms, 0.99):.0f} ms; "
        f"queue, worker and provider P50 {percentile(after, 0.5):.0f} ms, P99 {percentile(after, 0.99):.0f} ms; "
        f"the provider's answer P50 {percentile(provider_ms, 0.5):.0f} ms, P99 {percentile(provider_ms, 0.99):.0f} ms; "
        f"end to end without it P50 {percentile(ours, 0.5):.0f} ms, P95 {percentile(ours, 0.95):.0f} ms, "
        f"P99 {percentile(ours, 0.99):.0f} ms"
    )


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc's CPU times


def process_table() -> Iterator[tuple[int, str, list[str]]]:
    """Every process on the machine: its pid, its name and the fields of /proc/<pid>/stat after
    the name (fields[0] is the state, fields[2] the process group)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                text = stat.read()
        except OSError:  # it ended meanwhile
            continue
        yield int(entry.name), text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()


class CpuMeter:
    """The CPU time the machine's processes spent between start() and report(), from /proc:
    in all (what each notification cost, which a shared machine's noise moves less than it
    moves wall-clock rates), and by component (web, workers, sandbox, PostgreSQL, Redis,
    this benchmark), to show where the time goes."""

    def __init__(self, *, labels: dict[int, str]) -> None:
        self.labels = labels
        self.busy_at_start = 0.0
        self.by_component_at_start: dict[str, float] = {}

    @staticmethod
    def busy_seconds() -> float:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle and iowait
        steal = fields[7] if len(fields) > 7 else 0
        return (sum(fields[:8]) - idle - steal) / CLOCK_TICKS

    def by_component(self) -> dict[str, float]:
        """CPU seconds of the processes alive now and of the children they reaped, by component."""
        seconds: dict[str, float] = {}
        for pid, name, fields in process_table():
            # pgrp; utime + stime, plus cutime + cstime: the CPU of children that have exited
            # (a PostgreSQL backend's goes to the postmaster) stays in the same component.
            process_group, cpu = int(fields[2]), sum(int(v) for v in fields[11:15])
            if pid == os.getpid():
                component = "benchmark client"
            elif process_group in self.labels:
                component = self.labels[process_group]
            elif name == "postgres":
                component = "PostgreSQL"
            elif name.startswith("redis-server"):
                component = "Redis"
            else:
                component = "other"
            seconds[component] = seconds.get(component, 0.0) + cpu / CLOCK_TICKS
        return seconds

    def start(self) -> None:
        self.busy_at_start = self.busy_seconds()
        self.by_component_at_start = self.by_component()

    def report(self, *, count: int, seconds: float) -> str:
        busy = self.busy_seconds() - self.busy_at_start
        now = self.by_component()
        parts = {
            component: (spent - self.by_component_at_start.get(component, 0.0)) / count * 1e6
            for component, spent in now.items()
        }
        breakdown = ", ".join(
            f"{component} {us:,.0f}" for component, us in sorted(parts.items(), key=lambda p: -p[1]) if us >= 1
        )
        return (
            f"CPU: {busy / seconds:.2f} of {os.cpu_count()} cores busy, {busy / count * 1e6:,.0f} µs of CPU a notification"
            f"\n  of which, in µs a notification: {breakdown}"
        )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def drain_rate(
    *, args: argparse.Namespace, tenant_id: object, headers: dict[str, str], metrics: bool
) -> tuple[float, float]:
    """Ingest a bulk backlog with the workers stopped, then start them and return the rate at
    which they send and record it, and the bulk workers' CPU µs a notification, with the
    metrics on or off in every process."""
    reset_database()
    processes = Processes(
        sink=args.sink,
        bulk_concurrency=args.bulk_concurrency,
        web_workers=args.web_workers,
        web_interface=args.web_interface,
        metrics=metrics,
    )
    processes.start_web()
    try:
        prefix = "m1-" if metrics else "m0-"
        endpoints_register(tenant_id=tenant_id, channel=args.channel, count=args.bulk, prefix=prefix)
        ingest_bulk(
            session=producer_session(),
            headers=headers,
            count=args.bulk,
            prefix=prefix,
            threads=args.ingest_threads,
            channel=args.channel,
        )
        processes.start_workers()
        cpu = CpuMeter(labels=processes.labels)
        while final_count() == 0:  # from the first send on: the workers' start-up is left out
            time.sleep(0.01)
        cpu.start()
        wait_until_final(total=args.bulk, timeout=1800)
        # The workers' own CPU: unlike a rate, other load on a shared machine hardly moves it.
        workers_cpu = cpu.by_component().get("bulk workers", 0.0) - cpu.by_component_at_start.get("bulk workers", 0.0)
    finally:
        processes.stop()
    span = Delivery.objects.filter(priority="bulk").aggregate(first=Min("sent_at"), last=Max("sent_at"))
    return args.bulk / (span["last"] - span["first"]).total_seconds(), workers_cpu / args.bulk * 1e6


def metrics_compare(*, args: argparse.Namespace, tenant_id: object, headers: dict[str, str]) -> None:
    """The drain rate with the metrics off and on, alternating for `--metrics-rounds` rounds:
    what counting costs the hot path."""
    print(f"machine: {os.cpu_count()} cores; bulk channel: {args.channel}; sink: {args.sink}; {args.bulk} bulk")
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for round_number in range(args.metrics_rounds):
        # Off first, then on first: whichever runs second in a round finds the database warmer.
        for metrics in (False, True) if round_number % 2 == 0 else (True, False):
            rate, workers_us = drain_rate(args=args, tenant_id=tenant_id, headers=headers, metrics=metrics)
            rates[metrics].append(rate)
            cpu[metrics].append(workers_us)
            print(
                f"drain with metrics {'on' if metrics else 'off'}: {rate:,.0f}/s; "
                f"bulk workers' CPU {workers_us:,.0f} µs a notification"
            )
    rate_off, rate_on = (statistics.median(rates[m]) for m in (False, True))
    cpu_off, cpu_on = (statistics.median(cpu[m]) for m in (False, True))
    print(
        f"metrics cost (medians): drain {rate_off:,.0f}/s off, {rate_on:,.0f}/s on "
        f"({(rate_on - rate_off) / rate_off * 100:+.1f}%); bulk workers' CPU {cpu_off:,.0f} µs off, "
        f"{cpu_on:,.0f} µs on ({(cpu_on - cpu_off) / cpu_off * 100:+.1f}%); target: within 5%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bulk", type=int, default=100_000, help="bulk notifications to push (default 100000)")
    parser.add_argument("--critical", type=int, default=200, help="critical notifications sent during the backlog")
    parser.add_argument("--critical-rate", type=float, default=20.0, help="critical sends per second (default 20)")
    parser.add_argument("--sink", choices=["sandbox", "memory"], default="sandbox")
    parser.add_argument(
        "--channel",
        choices=CHANNELS,
        default="email",
        help="the bulk channel (default email)",
    )
    parser.add_argument("--bulk-concurrency", type=int, default=3, help="bulk worker processes (default 3)")
    parser.add_argument("--web-workers", type=int, default=3, help="uvicorn worker processes (default 3)")
    parser.add_argument("--web-interface", choices=["asgi", "wsgi"], default="asgi")
    parser.add_argument("--ingest-threads", type=int, default=4, help="concurrent producer requests (default 4)")
    parser.add_argument(
        "--metrics-compare", action="store_true", help="drain rate with the Prometheus metrics off, then on"
    )
    parser.add_argument("--metrics-rounds", type=int, default=2, help="off/on rounds of --metrics-compare (default 2)")
    parser.add_argument(
        "--critical-pool",
        action="store_true",
        help="send the critical probe through a web pool of its own (NOTIFY_WEB_POOL=critical)",
    )
    args = parser.parse_args()
    ports_check(*([CRITICAL_WEB_PORT] if args.critical_pool else []))
    critical_api = CRITICAL_POOL_API if args.critical_pool else API

    (ROOT / "var" / "log").mkdir(parents=True, exist_ok=True)
    api_key = settings.NOTIFY_DEMO_API_KEY
    tenant = demo_workspace_ensure(api_key=api_key)
    bench_categories_ensure(tenant_id=tenant.id)
    # A runaway-send pause left by an earlier run (the guard is off in this run's processes).
    Tenant.objects.filter(pk=tenant.pk).update(runaway_paused_at=None, runaway_reason="")
    headers = {"Authorization": f"Bearer {api_key}"}
    if args.metrics_compare:
        metrics_compare(args=args, tenant_id=tenant.id, headers=headers)
        return
    reset_database()
    processes = Processes(
        sink=args.sink,
        bulk_concurrency=args.bulk_concurrency,
        web_workers=args.web_workers,
        web_interface=args.web_interface,
    )
    processes.start_web()
    if args.critical_pool:
        processes.critical_web_start()
    session = producer_session()
    try:
        print(
            f"machine: {os.cpu_count()} cores; bulk channel: {args.channel}; sink: {args.sink}; bulk batch {settings.NOTIFY_BATCH_SIZE['bulk']}; "
            f"bulk worker processes: {args.bulk_concurrency}; web: {args.web_workers} {args.web_interface} processes"
            + ("; critical events through a web pool of one process" if args.critical_pool else "")
        )

        # 1. Ingest alone; then the workers drain that backlog while critical notifications
        #    are sent through it.
        endpoints_register(tenant_id=tenant.id, channel=args.channel, count=args.bulk, prefix="a")
        ingest_seconds = ingest_bulk(
            session=session,
            headers=headers,
            count=args.bulk,
            prefix="a",
            threads=args.ingest_threads,
            channel=args.channel,
        )
        print(
            f"ingest: {args.bulk} notifications accepted in {ingest_seconds:.1f} s = {args.bulk / ingest_seconds:,.0f}/s"
        )
        processes.start_workers()
        cpu = CpuMeter(labels=processes.labels)
        while final_count() == 0:
            time.sleep(0.01)
        cpu.start()
        drain_started = time.perf_counter()
        probe = CriticalProbe(
            headers=headers, count=args.critical, rate=args.critical_rate, prefix="p1-", api=critical_api
        )
        probe.run()
        drained_at = wait_until_final(total=args.bulk + args.critical, timeout=1800)
        cpu_report = cpu.report(count=args.bulk, seconds=drained_at - drain_started)
        span = Delivery.objects.filter(priority="bulk").aggregate(first=Min("sent_at"), last=Max("sent_at"))
        drain_seconds = (span["last"] - span["first"]).total_seconds()
        print(
            f"drain: {args.bulk} queued notifications sent and recorded in {drain_seconds:.1f} s = "
            f"{args.bulk / drain_seconds:,.0f}/s; {cpu_report}"
        )
        probe.report(label="critical while that backlog drained")

        # 2. Sustained end to end: ingest and delivery at once, first request to last status,
        #    with critical notifications sent through it as well.
        reset_database()
        endpoints_register(tenant_id=tenant.id, channel=args.channel, count=args.bulk, prefix="b")
        started = time.perf_counter()
        cpu.start()
        backlog = threading.Thread(
            target=ingest_bulk,
            kwargs={
                "session": session,
                "headers": headers,
                "count": args.bulk,
                "prefix": "b",
                "threads": args.ingest_threads,
                "channel": args.channel,
            },
        )
        backlog.start()
        while final_count() == 0:
            time.sleep(0.01)
        probe = CriticalProbe(
            headers=headers, count=args.critical, rate=args.critical_rate, prefix="p2-", api=critical_api
        )
        probe.run()
        backlog.join()
        elapsed = wait_until_final(total=args.bulk + args.critical, timeout=1800) - started
        cpu_report = cpu.report(count=args.bulk, seconds=elapsed)
        sent = Delivery.objects.filter(status=DeliveryStatus.SENT).count()
        print(
            f"end to end: {args.bulk} bulk notifications ingested and delivered in {elapsed:.1f} s = "
            f"{args.bulk / elapsed:,.0f}/s sustained ({sent} sent in all); {cpu_report}"
        )
        probe.report(label="critical while bulk was ingested and drained at once")
    finally:
        processes.stop()


if __name__ == "__main__":
    main()
