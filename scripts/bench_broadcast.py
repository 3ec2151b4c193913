"""Benchmark a broadcast end to end: import an audience through the import API, broadcast one
email to all of it, and send the same audience the textbook way for comparison.

  python scripts/bench_broadcast.py --broadcast 100000 [--baseline-limit 100000] [--beat]

Prints the import time; for the broadcast, the fan-out time (API call -> last notification
planned) and the delivery time (API call -> last delivery sent and recorded), each with the
CPU its phase took by process (what each notification cost, where the time goes); the critical
P99 (API call -> provider) of OTPs sent while the broadcast runs; then the textbook baseline
(one Celery task per notification, scripts/bench_baseline.py) on the first
`--baseline-limit` recipients of the same audience, the ratio of the two rates, and the peak
RSS of each process. Without --beat no periodic task runs (sweeper, rollups, gauges), so the
figures leave out what they cost a deployment. The maintenance worker has a process for each of
a broadcast's fan-out tasks (NOTIFY_BROADCAST_FAN_OUT_TASKS, 3; set it to 1 for one at a time).
Run it through `make bench ARGS="--broadcast 100000"`, which prepares
the database, Redis and the virtualenv."""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from bench import (
    FINAL,
    ROOT,
    WEB_PORT,
    CpuMeter,
    CriticalProbe,
    Processes,
    bench_categories_ensure,
    final_count,
    latency_split,
    percentile,
    ports_check,
    reset_database,
)
from bench_baseline import BASELINE_QUEUE, BASELINE_TASK
from bench_import import PeakRss, file_write
from celery import current_app
from django.conf import settings
from django.db import connection
from django.db.models import Max

from apps.audiences.models import Broadcast
from apps.catalog.models import Category
from apps.deliveries.models import CLAIMABLE_STATUSES, Delivery, DeliveryStatus, Event
from apps.recipients.models import Recipient
from apps.tenants.demo import demo_workspace_ensure
from config.queues import WORKER_GROUPS

BASE = f"http://127.0.0.1:{WEB_PORT}/api/v1"
CATEGORY = "bench-email-bulk"
DATA = {"headline": "News"}
CELERY = [sys.executable, "-m", "celery", "-A", "config", "worker", "--without-mingle", "--without-gossip"]


def audience_import(*, headers: dict[str, str], rows: int) -> float:
    """Import `rows` recipients through the import API; return seconds from the call to done."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-broadcast-"))
    path = workdir / "recipients.ndjson"
    file_write(path=path, rows=rows, phone_every=4, file_format="ndjson")
    started = time.monotonic()
    try:
        with path.open("rb") as body:
            response = requests.post(
                f"{BASE}/recipients/import",
                data=body,
                headers={**headers, "Content-Type": "application/x-ndjson"},
                timeout=600,
            )
        response.raise_for_status()
        import_id = response.json()["id"]
        while True:
            state = requests.get(f"{BASE}/recipients/imports/{import_id}", headers=headers, timeout=10).json()
            if state["status"] in ("completed", "failed"):
                break
            time.sleep(0.2)
    finally:
        path.unlink()
        workdir.rmdir()
    if state["status"] != "completed" or state["created"] != rows:
        raise SystemExit(f"the import did not complete: {state}")
    return time.monotonic() - started


class ProbeLoop:
    """Critical OTPs at a steady rate, in rounds, until stopped: the latencies of all rounds."""

    def __init__(self, *, headers: dict[str, str], rate: float) -> None:
        self.headers, self.rate = headers, rate
        self.totals_ms: list[float] = []
        self.api_ms: list[float] = []
        self.provider_ms: list[float] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        round_number = 0
        while not self.stopped.is_set():
            probe = CriticalProbe(headers=self.headers, count=100, rate=self.rate, prefix=f"otp{round_number}-")
            probe.run()
            self.totals_ms.extend(probe.totals_ms)
            self.api_ms.extend(probe.api_ms)
            self.provider_ms.extend(probe.provider_ms)
            round_number += 1

    def summary(self) -> str:
        totals = self.totals_ms
        if not totals:
            return "no critical notification was sent"
        return (
            f"{len(totals)} sent, P50 {percentile(totals, 0.5):.0f} ms, P95 {percentile(totals, 0.95):.0f} ms, "
            f"P99 {percentile(totals, 0.99):.0f} ms, max {max(totals):.0f} ms; "
            + latency_split(totals_ms=totals, api_ms=self.api_ms, provider_ms=self.provider_ms)
        )


def broadcast_run(*, headers: dict[str, str], audience: int, cpu: CpuMeter) -> tuple[float, Broadcast]:
    """One email broadcast to everyone: print the fan-out time and the CPU each phase took,
    return the delivery seconds from the call."""
    baseline_final = final_count()
    cpu.start()
    started = time.time()
    response = requests.post(
        f"{BASE}/broadcasts",
        json={"category": CATEGORY, "audience": {"all": True}, "data": DATA, "idempotency_key": f"bench-{started}"},
        headers=headers,
        timeout=30,
    )
    response.raise_for_status()
    broadcast_id = response.json()["id"]
    broadcast = Broadcast.objects.get(pk=broadcast_id)
    while broadcast.fanned_out_at is None:
        time.sleep(0.2)
        broadcast.refresh_from_db()
        if broadcast.state == "cancelled":
            raise SystemExit(f"the broadcast stopped: {broadcast.note}")
    fanned_out = broadcast.fanned_out_at.timestamp() - started
    print(
        f"fan-out: {audience} notifications planned {fanned_out:.1f} s after the API call = {audience / fanned_out:,.0f}/s"
    )
    # CPU a notification of the audience, by process: while fanning out (and sending), then after.
    print(f"  while fanning out (sending too), {cpu.report(count=audience, seconds=time.time() - started)}")
    cpu.start()
    fanned_out_seen = time.time()
    # Until no bulk delivery waits or is being sent. Each question reads one partial index: a
    # count of the final ones read the whole table every second, taking CPU from the broadcast.
    bulk = Delivery.objects.filter(priority="bulk")
    while bulk.filter(status__in=CLAIMABLE_STATUSES).exists() or bulk.filter(status=DeliveryStatus.SENDING).exists():
        time.sleep(1)
    if final_count() - baseline_final < audience:
        raise SystemExit(f"the broadcast ended with {final_count() - baseline_final} of {audience} deliveries final")
    last_sent = (
        Delivery.objects.filter(notification__event_id=broadcast.event_id, priority="bulk")
        .aggregate(last=Max("sent_at"))["last"]
        .timestamp()
    )
    print(
        f"  after the fan-out until the last send, {cpu.report(count=audience, seconds=time.time() - fanned_out_seen)}"
    )
    return last_sent - started, broadcast


def baseline_run(*, processes: Processes, tenant_id: object, limit: int, concurrency: int) -> float:
    """The textbook baseline on the first `limit` recipients: return seconds from the first
    task queued to the last email recorded."""
    processes.spawn(
        "baseline workers",
        "nice",
        "-n",
        "10",
        *CELERY,
        "-l",
        "warning",
        "--include",
        "scripts.bench_baseline",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "-Q",
        BASELINE_QUEUE,
        "-n",
        "baseline@%h",
    )
    category = Category.objects.get(tenant_id=tenant_id, key=CATEGORY)
    event = Event.objects.create(tenant_id=tenant_id, category=category, request_digest="baseline", data=DATA)
    done_before = Delivery.objects.filter(notification__event=event).count()
    started = time.time()
    ids = Recipient.objects.filter(tenant_id=tenant_id).order_by("id").values_list("id", flat=True)[:limit]
    for recipient_id in ids.iterator(chunk_size=5000):
        current_app.send_task(BASELINE_TASK, args=[str(recipient_id), str(event.id), DATA], queue=BASELINE_QUEUE)
    queued = time.time() - started
    print(f"  baseline: {limit} tasks queued in {queued:.1f} s")
    while Delivery.objects.filter(notification__event=event).count() - done_before < limit:
        time.sleep(1)
    last = Delivery.objects.filter(notification__event=event).aggregate(last=Max("sent_at"))["last"]
    return last.timestamp() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broadcast", type=int, default=100_000, help="audience size (default 100000)")
    parser.add_argument("--baseline-limit", type=int, default=0, help="recipients the baseline sends to (0: all)")
    parser.add_argument("--bulk-concurrency", type=int, default=3, help="bulk worker processes (default 3)")
    parser.add_argument("--web-workers", type=int, default=3, help="uvicorn worker processes (default 3)")
    parser.add_argument("--critical-rate", type=float, default=20.0, help="critical sends per second (default 20)")
    parser.add_argument(
        "--beat",
        action="store_true",
        help="run Celery beat too, as a deployment does: the sweeper's and the dashboard's periodic work",
    )
    args = parser.parse_args()
    audience = args.broadcast
    baseline_limit = min(args.baseline_limit or audience, audience)

    ports_check()
    (ROOT / "var" / "log").mkdir(parents=True, exist_ok=True)
    api_key = settings.NOTIFY_DEMO_API_KEY
    tenant = demo_workspace_ensure(api_key=api_key)
    bench_categories_ensure(tenant_id=tenant.id)
    headers = {"Authorization": f"Bearer {api_key}"}
    reset_database()
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE recipients_recipientimportline, recipients_recipientimportrefusal, recipients_recipientimport"
        )
    connection.close()
    processes = Processes(
        sink="sandbox", bulk_concurrency=args.bulk_concurrency, web_workers=args.web_workers, web_interface="asgi"
    )
    processes.start_web()
    processes.start_workers()
    if args.beat:
        processes.start_beat()
    fan_out_tasks = settings.NOTIFY_BROADCAST_FAN_OUT_TASKS
    processes.spawn(
        "maintenance worker",
        *CELERY,
        "-l",
        "warning",
        # A process for each fan-out task a broadcast starts, as the compose file runs them.
        *(("--pool", "solo") if fan_out_tasks == 1 else ("--pool", "prefork", "--concurrency", str(fan_out_tasks))),
        "-Q",
        ",".join(WORKER_GROUPS["maintenance"]),
        "-n",
        "maintenance@%h",
    )
    try:
        print(
            f"broadcast of {audience} emails; bulk batch {settings.NOTIFY_BATCH_SIZE['bulk']}, fan-out chunk "
            f"{settings.NOTIFY_BROADCAST_CHUNK}, {fan_out_tasks} at once; bulk worker processes {args.bulk_concurrency}, "
            f"web processes {args.web_workers}; beat {'on' if args.beat else 'off'}"
        )
        imported = audience_import(headers=headers, rows=audience)
        print(f"import: {audience} recipients in {imported:.1f} s = {audience / imported:,.0f}/s")

        probe = ProbeLoop(headers=headers, rate=args.critical_rate)
        probe.thread.start()
        delivered, broadcast = broadcast_run(headers=headers, audience=audience, cpu=CpuMeter(labels=processes.labels))
        probe.stopped.set()
        probe.thread.join()
        print(
            f"delivery: {audience} emails sent and recorded {delivered:.1f} s after the API call = {audience / delivered:,.0f}/s"
        )
        print(f"critical during the broadcast (API call -> provider): {probe.summary()}")
        broadcast.refresh_from_db()
        assert Delivery.objects.filter(notification__event_id=broadcast.event_id, status__in=FINAL).count() >= audience

        baseline = baseline_run(
            processes=processes, tenant_id=tenant.id, limit=baseline_limit, concurrency=args.bulk_concurrency
        )
        print(
            f"baseline, one Celery task per notification: {baseline_limit} emails in {baseline:.1f} s = "
            f"{baseline_limit / baseline:,.0f}/s"
        )
        ratio = (audience / delivered) / (baseline_limit / baseline)
        print(f"ratio: the broadcast delivers {ratio:.1f}x the baseline's rate")
        # Each process's high-water mark, so one reading at the end sees every peak.
        rss = PeakRss({label: pid for pid, label in processes.labels.items()})
        rss.sample()
        print(
            "peak RSS of one process: "
            + ", ".join(f"{label} {peak / 2**20:.0f} MB" for label, peak in rss.peaks.items())
        )
    finally:
        processes.stop()


if __name__ == "__main__":
    main()
