"""Benchmark workers on several hosts: the same bulk backlog is drained by the workers of one
worker host, then of two (or --hosts), each host a Linux network namespace with the same
worker configuration (tests/hosts.py), while the sandbox adds --provider-latency-ms to every
provider request, so that sending waits on the provider as it does in production. The web
server has a namespace of its own; PostgreSQL, Redis and the sandbox stay on the machine's
side. Prints each drain rate with where the CPU went, and the ratio of the median rates.

  scripts/bench.sh --hosts 2 --provider-latency-ms 50 [--channel sms] [--count 2400]
                   [--concurrency 4] [--batch-size 50] [--rounds 2]

Run it through `make bench ARGS="--hosts 2 --provider-latency-ms 50"`, as root (namespaces)."""

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import requests
from bench import (
    FINAL,
    WEB_PORT,
    CpuMeter,
    Processes,
    bench_categories_ensure,
    celery_command,
    endpoints_register,
    ingest_bulk,
    ports_check,
    producer_session,
    reset_database,
    wait_until_final,
)
from django.conf import settings
from django.db import connection
from django.db.models import Max

from apps.deliveries.models import Delivery, DeliveryStatus
from apps.tenants.demo import demo_workspace_ensure
from config.queues import CHANNELS, WORKER_GROUPS
from notify.sandbox.client import SandboxClient
from tests.hosts import Network, netns_unavailable

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_PORT = int(os.environ.get("BENCH_SANDBOX_PORT", "8125"))
PROVIDERS = ("postmark", "twilio", "fcm", "webpush")


class HostProcesses(Processes):
    """The benchmark's processes, placed on the hosts of `network`."""

    log_prefix = "bench-hosts"

    def __init__(self, *, network: Network, latency_ms: float, batch_size: int) -> None:
        super().__init__(sink="sandbox", bulk_concurrency=1, web_workers=1, web_interface="asgi")
        self.network = network
        self.latency_ms = latency_ms
        self.sandbox_url = f"http://{network.gateway}:{SANDBOX_PORT}"
        self.web_url = f"http://{network['web'].address}:{WEB_PORT}"
        database = connection.settings_dict
        gateway = network.gateway
        self.env.update(
            {
                "DATABASE_URL": f"postgres://{database['USER']}@{gateway}:{database['PORT']}/{database['NAME']}",
                "CELERY_BROKER_URL": network.reach(settings.CELERY_BROKER_URL),
                "NOTIFY_REDIS_URL": network.reach(settings.NOTIFY_REDIS_URL),
                "NOTIFY_INBOX_LIVE_URL": network.reach(settings.NOTIFY_INBOX_LIVE_URL),
                "POSTMARK_API_URL": f"{self.sandbox_url}/postmark/",
                "TWILIO_API_BASE": f"{self.sandbox_url}/twilio",
                "FCM_API_BASE": f"{self.sandbox_url}/fcm",
                "FCM_TOKEN_URI": f"{self.sandbox_url}/google/token",
                "NOTIFY_WEBPUSH_ALLOWED_HOSTS": f"{gateway}:{SANDBOX_PORT}",
                "NOTIFY_PROVIDER_ALLOWED_HOSTS": f"{gateway}:{SANDBOX_PORT}",
                "NOTIFY_PUBLIC_URL": self.web_url,
                "DJANGO_ALLOWED_HOSTS": network["web"].address,
                "NOTIFY_BULK_BATCH_SIZE": str(batch_size),
            }
        )
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each host has its own
        if network.forwarder is not None:
            self.labels[network.forwarder.pid] = "forwarder (PostgreSQL, Redis)"

    def start_web(self) -> None:
        faults = {provider: {"latency_ms": self.latency_ms} for provider in PROVIDERS}
        # Without --callback-network the sandbox sends no status callbacks to the web host:
        # what is measured is the workers' sending, not the callbacks' handling.
        self.spawn(
            "sandbox",
            *("nice", "-n", "15", sys.executable, "-m", "notify.sandbox"),
            *("--host", self.network.gateway, "--port", str(SANDBOX_PORT), "--faults", json.dumps(faults)),
        )
        web = self.network["web"]
        self.web = self.spawn(
            "web",
            *(sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", web.address),
            *("--port", str(WEB_PORT), "--no-access-log", "--log-level", "warning"),
            host=web,
        )
        SandboxClient(base_url=self.sandbox_url).wait_until_up()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.web_url}/api/schema/", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)
        raise SystemExit(f"the web server on {self.web_url} did not start; see var/log/{self.log_prefix}-*.log")

    def start_worker_hosts(self, *, hosts: int, concurrency: int) -> None:
        """One bulk worker on each of the first `hosts` worker hosts, all started at once."""
        for number in range(1, hosts + 1):
            queues = ",".join(WORKER_GROUPS["bulk"])
            pool = ("--pool", "prefork", "--concurrency", str(concurrency))
            # Named after its host: hosts share the machine's host name (%h).
            command = celery_command("worker", "--without-mingle", "--without-gossip", *pool, "-Q", queues)
            self.spawn(
                f"worker host {number}", *command, "-n", f"bulk-{number}@%h", host=self.network[f"work-{number}"]
            )


def drain(*, args: argparse.Namespace, hosts: int, tenant_id: object, headers: dict[str, str]) -> tuple[float, str]:
    """Ingest a backlog with no worker running, then drain it with the workers of `hosts`
    worker hosts; return the drain rate (first claim to last recorded send) and the CPU split."""
    reset_database()
    processes = HostProcesses(network=args.network, latency_ms=args.provider_latency_ms, batch_size=args.batch_size)
    try:
        processes.start_web()
        prefix = f"h{hosts}-"
        endpoints_register(
            tenant_id=tenant_id,
            channel=args.channel,
            count=args.count,
            prefix=prefix,
            sandbox_url=processes.sandbox_url,
        )
        ingest_bulk(
            session=producer_session(),
            headers=headers,
            count=args.count,
            prefix=prefix,
            threads=2,
            channel=args.channel,
            api=f"{processes.web_url}/api/v1/events",
        )
        processes.start_worker_hosts(hosts=hosts, concurrency=args.concurrency)
        cpu = CpuMeter(labels=processes.labels)
        claimed = Delivery.objects.exclude(status=DeliveryStatus.QUEUED)
        while not claimed.exists():
            time.sleep(0.01)
        first_claim = time.time()
        cpu.start()
        wait_until_final(total=args.count, timeout=900)
        cpu_report = cpu.report(count=args.count, seconds=time.time() - first_claim)
    finally:
        processes.stop()
    last = Delivery.objects.filter(status__in=FINAL).aggregate(last=Max("sent_at"))["last"]
    sent = Delivery.objects.filter(status=DeliveryStatus.SENT).count()
    if sent != args.count:
        raise SystemExit(f"{sent} of {args.count} sent with {hosts} worker host(s): see var/log/bench-hosts-*.log")
    return args.count / (last.timestamp() - first_claim), cpu_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=2, help="worker hosts to compare with one (default 2)")
    parser.add_argument(
        "--provider-latency-ms", type=float, default=50.0, help="added to every provider request (default 50)"
    )
    parser.add_argument("--channel", choices=CHANNELS, default="sms", help="the bulk channel (default sms)")
    parser.add_argument("--count", type=int, default=2400, help="bulk notifications a drain (default 2400)")
    parser.add_argument("--concurrency", type=int, default=4, help="worker processes on each worker host (default 4)")
    parser.add_argument(
        "--batch-size", type=int, default=50, help="bulk deliveries a task (NOTIFY_BULK_BATCH_SIZE, default 50)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="drains of each, one host first then the other way (default 2)"
    )
    args = parser.parse_args()
    if args.hosts < 2:
        parser.error("--hosts must be 2 or more: one worker host is the baseline it is compared with")
    if reason := netns_unavailable():
        raise SystemExit(f"cannot make the hosts: {reason}")
    ports_check(SANDBOX_PORT)  # a benchmark already running would share the database
    (ROOT / "var" / "log").mkdir(parents=True, exist_ok=True)
    api_key = settings.NOTIFY_DEMO_API_KEY
    tenant = demo_workspace_ensure(api_key=api_key)
    bench_categories_ensure(tenant_id=tenant.id)
    headers = {"Authorization": f"Bearer {api_key}"}
    names = ["web", *(f"work-{number}" for number in range(1, args.hosts + 1))]
    database_port = int(connection.settings_dict["PORT"] or 5432)
    redis_port = urlsplit(settings.CELERY_BROKER_URL).port or 6379
    args.network = Network(names=names, directory=ROOT / "var" / "hosts", forward_ports=(database_port, redis_port))
    print(
        f"machine: {os.cpu_count()} cores; {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; channel {args.channel}; "
        f"{args.count} bulk a drain; provider latency {args.provider_latency_ms:.0f} ms; each worker host: "
        f"{args.concurrency} worker processes, batches of {args.batch_size}"
    )
    rates: dict[int, list[float]] = {1: [], args.hosts: []}
    try:
        args.network.up()
        for round_number in range(args.rounds):
            # One host first, then the other way: whichever runs second may find the machine
            # busier or quieter (it is shared), so each goes first as often.
            for hosts in (1, args.hosts) if round_number % 2 == 0 else (args.hosts, 1):
                rate, cpu_report = drain(args=args, hosts=hosts, tenant_id=tenant.id, headers=headers)
                rates[hosts].append(rate)
                load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
                print(
                    f"{hosts} worker host(s): {args.count} drained at {rate:,.0f}/s (load average {load}); {cpu_report}"
                )
    finally:
        args.network.down()
    one, many = statistics.median(rates[1]), statistics.median(rates[args.hosts])
    pairs = ", ".join(f"{b / a:.2f}x" for a, b in zip(rates[1], rates[args.hosts], strict=True))
    print(
        f"scaling: {args.hosts} worker hosts deliver {many / one:.2f}x what one does (medians: {many:,.0f}/s "
        f"against {one:,.0f}/s; each round: {pairs}; target >= {0.9 * args.hosts:.1f}x)"
    )


if __name__ == "__main__":
    main()
