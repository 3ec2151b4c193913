"""Benchmark the whole pipeline: the ASGI web server ingests over HTTP, real workers send
through the sandbox (or an in-process sink) and record every status in PostgreSQL.

  python scripts/bench.py --bulk 100000 --critical 200 [--sink sandbox|memory]

Prints sustained bulk notifications/s, then the end-to-end latency of critical
notifications (API call -> provider accepted and recorded) sent while a bulk backlog drains.
Run it through `make bench`, which prepares the database, Redis and the virtualenv."""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.db.models import Max, Min  # noqa: E402

from apps.deliveries.models import Delivery, DeliveryStatus  # noqa: E402
from apps.tenants.demo import demo_workspace_ensure  # noqa: E402
from notify.sandbox.client import SandboxClient  # noqa: E402

WEB_PORT = int(os.environ.get("BENCH_WEB_PORT", "8100"))
SANDBOX_PORT = int(os.environ.get("BENCH_SANDBOX_PORT", "8125"))
API = f"http://127.0.0.1:{WEB_PORT}/api/v1/events"
FINAL = (DeliveryStatus.SENT, DeliveryStatus.FAILED, DeliveryStatus.DEAD)


class Processes:
    def __init__(self, *, sink: str, bulk_concurrency: int, web_workers: int) -> None:
        self.web_workers = web_workers
        self.children: list[subprocess.Popen] = []
        self.env = {**os.environ, "LOG_LEVEL": "WARNING"}
        if sink == "memory":
            self.env["EMAIL_BACKEND"] = "django.core.mail.backends.dummy.EmailBackend"
        else:
            self.env["POSTMARK_API_URL"] = f"http://127.0.0.1:{SANDBOX_PORT}/postmark/"
        self.bulk_concurrency = bulk_concurrency

    def spawn(self, *command: str) -> None:
        log = open(ROOT / "var" / "log" / f"bench-{len(self.children)}.log", "w")
        self.children.append(
            subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def start_web(self) -> None:
        python = sys.executable
        self.spawn(python, "-m", "notify.sandbox", "--port", str(SANDBOX_PORT))
        self.spawn(
            python, "-m", "uvicorn", "config.asgi:application", "--port", str(WEB_PORT), "--no-access-log",
            "--log-level", "warning", "--workers", str(self.web_workers),
        )
        SandboxClient(base_url=f"http://127.0.0.1:{SANDBOX_PORT}").wait_until_up()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{WEB_PORT}/api/schema/", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)

    def start_workers(self) -> None:
        celery = [sys.executable, "-m", "celery", "-A", "config", "worker", "--without-mingle", "--without-gossip",
                  "-l", "warning"]
        self.spawn(*celery, "--pool", "solo", "-Q", "email.critical", "-n", "critical@%h")
        # Bulk workers run at a lower CPU priority, as deployments should run them, so
        # that critical work and the API are scheduled first when the cores are busy.
        self.spawn(
            "nice", "-n", "10", *celery, "--pool", "prefork", "--concurrency", str(self.bulk_concurrency),
            "-Q", "email.bulk", "-n", "bulk@%h",
        )

    def stop(self) -> None:
        for child in self.children:
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for child in self.children:
            child.wait(timeout=30)


def reset_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE deliveries_deliveryevent, deliveries_deadletter, deliveries_delivery, "
            "deliveries_notification, deliveries_event, recipients_recipient CASCADE"
        )


def ingest_bulk(*, session: requests.Session, headers: dict[str, str], count: int, prefix: str, threads: int) -> float:
    """Post `count` bulk notifications, 1,000 recipients a request; return seconds taken."""
    chunks = [(start, min(1000, count - start)) for start in range(0, count, 1000)]

    def post(chunk: tuple[int, int]) -> None:
        start, size = chunk
        recipients = [{"external_id": f"{prefix}{i}", "email": f"{prefix}{i}@example.com"} for i in range(start, start + size)]
        response = session.post(
            API, json={"category": "weekly-digest", "recipients": recipients, "data": {"headline": "News"}}, headers=headers
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
        time.sleep(0.2)
    return time.perf_counter()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bulk", type=int, default=100_000, help="bulk notifications to push (default 100000)")
    parser.add_argument("--critical", type=int, default=200, help="critical notifications sent during the backlog")
    parser.add_argument("--critical-rate", type=float, default=20.0, help="critical sends per second (default 20)")
    parser.add_argument("--sink", choices=["sandbox", "memory"], default="sandbox")
    parser.add_argument("--bulk-concurrency", type=int, default=2, help="bulk worker processes (default 2)")
    parser.add_argument("--web-workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    parser.add_argument("--ingest-threads", type=int, default=4, help="concurrent producer requests (default 4)")
    args = parser.parse_args()

    (ROOT / "var" / "log").mkdir(parents=True, exist_ok=True)
    api_key = settings.NOTIFY_DEMO_API_KEY
    demo_workspace_ensure(api_key=api_key)
    reset_database()
    headers = {"Authorization": f"Bearer {api_key}"}
    processes = Processes(sink=args.sink, bulk_concurrency=args.bulk_concurrency, web_workers=args.web_workers)
    processes.start_web()
    session = requests.Session()
    try:
        print(f"machine: {os.cpu_count()} cores; sink: {args.sink}; bulk batch {settings.NOTIFY_BATCH_SIZE['bulk']}; "
              f"bulk worker processes: {args.bulk_concurrency}; web processes: {args.web_workers}")

        # 1. Ingest alone, then the drain of that backlog by the workers alone.
        ingest_seconds = ingest_bulk(session=session, headers=headers, count=args.bulk, prefix="a", threads=args.ingest_threads)
        print(f"ingest: {args.bulk} notifications accepted in {ingest_seconds:.1f} s = {args.bulk / ingest_seconds:,.0f}/s")
        processes.start_workers()
        wait_until_final(total=args.bulk, timeout=1800)
        span = Delivery.objects.aggregate(first=Min("sent_at"), last=Max("sent_at"))
        drain_seconds = (span["last"] - span["first"]).total_seconds()
        print(f"drain: {args.bulk} queued notifications sent and recorded in {drain_seconds:.1f} s = "
              f"{args.bulk / drain_seconds:,.0f}/s")

        # 2. Sustained end to end: ingest and delivery at once, first request to last status.
        reset_database()
        started = time.perf_counter()
        ingest_bulk(session=session, headers=headers, count=args.bulk, prefix="b", threads=args.ingest_threads)
        elapsed = wait_until_final(total=args.bulk, timeout=1800) - started
        sent = Delivery.objects.filter(status=DeliveryStatus.SENT).count()
        print(f"end to end: {args.bulk} notifications ingested and delivered in {elapsed:.1f} s = "
              f"{args.bulk / elapsed:,.0f}/s sustained ({sent} sent)")

        # 3. Critical latency while a fresh bulk backlog drains.
        reset_database()
        backlog = threading.Thread(
            target=ingest_bulk,
            kwargs={"session": requests.Session(), "headers": headers, "count": args.bulk, "prefix": "c", "threads": 1},
        )
        backlog.start()
        while final_count() == 0 and Delivery.objects.count() < 5000:
            time.sleep(0.05)
        latencies: list[float] = []
        api_parts: list[float] = []
        for i in range(args.critical):
            began = time.time()
            response = requests.post(  # a new connection each time, as independent producers make
                API,
                json={"category": "otp", "recipient": {"external_id": f"otp{i}", "email": f"otp{i}@example.com"},
                      "data": {"code": "123456"}},
                headers=headers,
            )
            response.raise_for_status()
            answered = time.time()
            notification_id = response.json()["notification_ids"][0]
            while True:
                delivery = Delivery.objects.filter(notification_id=notification_id).values("status", "sent_at").get()
                if delivery["status"] in FINAL:
                    break
                time.sleep(0.002)
            latencies.append((delivery["sent_at"].timestamp() - began) * 1000)
            api_parts.append(answered - began)
            time.sleep(max(0.0, 1 / args.critical_rate - (time.time() - began)))
        backlog_at_end = Delivery.objects.exclude(status__in=FINAL).count()
        backlog.join()
        print(f"critical: {len(latencies)} sent while bulk drained (backlog left at the end: {backlog_at_end}); "
              f"end-to-end P50 {percentile(latencies, 0.5):.0f} ms, P95 {percentile(latencies, 0.95):.0f} ms, "
              f"P99 {percentile(latencies, 0.99):.0f} ms, max {max(latencies):.0f} ms, "
              f"mean {statistics.mean(latencies):.0f} ms")
        api_ms = [a * 1000 for a in api_parts]
        worker_ms = [total - api for total, api in zip(latencies, api_ms)]
        print(f"  of which the API call: P50 {percentile(api_ms, 0.5):.0f} ms, P99 {percentile(api_ms, 0.99):.0f} ms; "
              f"queue, worker and provider: P50 {percentile(worker_ms, 0.5):.0f} ms, P99 {percentile(worker_ms, 0.99):.0f} ms")
        wait_until_final(total=args.bulk + args.critical, timeout=1800)
    finally:
        processes.stop()


if __name__ == "__main__":
    main()
