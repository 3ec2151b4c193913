"""Benchmark the inbox's live connections: N recipients each hold one inbox WebSocket to the
ASGI server of the run command, one in-app event goes to all of them, then the server restarts.

  python scripts/bench_inbox.py --inbox-connections 20000 [--web-processes 1] [--client-processes 2]

Prints the time to open every socket (each has its `hello`), how many closed with a server
error, the web processes' memory per connection (RSS after minus before, over N), then the
latency of one event sent to all N through the events API (1,000 recipients a request, the
in-app bulk category): from each request's acceptance to the item's arrival on the socket,
P50/P99/max, and how many never arrived. Then it stops the web server (SIGTERM, as a deploy
does), sends a second event while it is down, starts it again, and prints the time until
every client has reconnected (with the widget's jittered backoff) and caught up with that
event. Run it through `make bench ARGS="--inbox-connections 20000"`, which prepares the
database, Redis and the virtualenv.

The server gets the file limit's hard maximum and uvicorn's `--limit-concurrency` and
`--backlog` sized for N; the clients (scripts/bench_inbox_client.py, asyncio and the
`websockets` package) run in several processes, each with its own file limit."""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from bench import (
    CLOCK_TICKS,
    FINAL,
    ROOT,
    WEB_PORT,
    CpuMeter,
    Processes,
    bench_categories_ensure,
    percentile,
    ports_check,
    producer_session,
    reset_database,
)
from django.conf import settings

from apps.deliveries.models import Delivery
from apps.inbox.models import InboxItem
from apps.recipients.models import Recipient
from apps.recipients.tokens import INBOX, recipient_token_issue
from apps.tenants.demo import demo_workspace_ensure

# The producers' API has a web process of its own, as in a fleet, so that it still takes
# events while the socket server restarts.
API_PORT = WEB_PORT + 1
API = f"http://127.0.0.1:{API_PORT}/api/v1/events"
SOCKET_URL = f"ws://127.0.0.1:{WEB_PORT}/inbox/v1/ws"
CATEGORY = "bench-inapp-bulk"
PER_REQUEST = 1000  # the events API's most recipients a request
SERVER_ERROR = "1011"  # the close code of an exception in the application


class ClientProcess:
    """One scripts/bench_inbox_client.py process and the latest progress it printed."""

    def __init__(self, *, tokens: list[str], first: int, open_concurrency: int) -> None:
        self.first = first
        self.process = subprocess.Popen(
            [sys.executable, "-u", str(ROOT / "scripts" / "bench_inbox_client.py")]
            + ["--open-concurrency", str(open_concurrency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group of its own, which the CPU breakdown names
        )
        self.progress: dict[str, Any] = {"opened": 0, "connected": 0, "received": {}, "closes": {}}
        self.reports: list[dict[str, Any]] = []
        self.reported = threading.Condition()
        self.command({"url": SOCKET_URL, "tokens": tokens})
        threading.Thread(target=self._read, daemon=True).start()

    def command(self, line: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
        self.process.stdin.flush()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if "progress" in message:
                self.progress = message["progress"]
            else:
                with self.reported:
                    self.reports.append(message["report"])
                    self.reported.notify_all()

    def report(self) -> dict[str, Any]:
        with self.reported:
            wanted = len(self.reports) + 1
            self.command("report")
            self.reported.wait_for(lambda: len(self.reports) >= wanted, timeout=120)
            return self.reports[-1]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.command("stop")
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Clients:
    """All the client processes, as one."""

    def __init__(self, *, tokens: list[str], processes: int, open_concurrency: int) -> None:
        share = math.ceil(len(tokens) / processes)
        self.each = [
            ClientProcess(tokens=tokens[first : first + share], first=first, open_concurrency=open_concurrency)
            for first in range(0, len(tokens), share)
        ]

    def total(self, key: str) -> int:
        return sum(client.progress[key] for client in self.each)

    def received(self, body: str) -> int:
        return sum(client.progress["received"].get(body, 0) for client in self.each)

    def closes(self) -> Counter[str]:
        return sum((Counter(client.progress["closes"]) for client in self.each), Counter())

    def times(self, key: str, body: str = "") -> dict[int, float]:
        """Socket (over all processes) -> its time: of `key` (first_hello, last_hello), or
        of the first arrival of the item with `body`."""
        times: dict[int, float] = {}
        for client in self.each:
            report = client.report()
            if key == "received":
                times.update({client.first + int(i): t for i, t in report["received"].get(body, {}).items()})
            else:
                times.update({client.first + i: t for i, t in enumerate(report[key]) if t is not None})
        return times

    def stop(self) -> None:
        for client in self.each:
            client.stop()


def wait_until(condition: Any, *, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def api_up() -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{API_PORT}/api/schema/", timeout=1).ok
    except requests.RequestException:
        return False


def group_usage(process_group: int) -> tuple[int, float]:
    """The resident memory (bytes) and CPU time (seconds) of every process in the group
    (uvicorn and its workers)."""
    rss, cpu = 0, 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != process_group:
                continue
            cpu += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            for line in (stat.parent / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return rss, cpu


def web_log(processes: Processes) -> str:
    """What the web server (the one running now) wrote to its log."""
    assert processes.web is not None
    number = processes.children.index(processes.web)
    return (ROOT / "var" / "log" / f"{processes.log_prefix}-{number}.log").read_text(errors="replace")


def open_files(process_group: int) -> int:
    """The files (sockets included) the group's processes hold."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == process_group:
                count += len(list((stat.parent / "fd").iterdir()))
        except (OSError, IndexError, ValueError):
            continue
    return count


def event_send(*, headers: dict[str, str], count: int, body: str) -> list[float]:
    """One in-app event to recipients 0..count-1, whose text is `body`, through the events API;
    returns each recipient's acceptance time (when its request was answered)."""
    session = producer_session()
    accepted = [0.0] * count

    def post(start: int) -> None:
        size = min(PER_REQUEST, count - start)
        response = session.post(
            API,
            json={
                "category": CATEGORY,
                "recipients": [f"inbox{i}" for i in range(start, start + size)],
                "data": {"headline": body},
                "idempotency_key": f"{body}-{start}",
            },
            headers=headers,
        )
        response.raise_for_status()
        accepted[start : start + size] = [time.time()] * size

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(post, range(0, count, PER_REQUEST)))
    return accepted


def latency_line(*, started: list[float], arrived: dict[int, float]) -> str:
    latencies = [(arrived[i] - started[i]) * 1000 for i in arrived if started[i]]
    if not latencies:
        return "none arrived"
    return (
        f"P50 {percentile(latencies, 0.5):,.0f} ms, P99 {percentile(latencies, 0.99):,.0f} ms, "
        f"max {max(latencies):,.0f} ms; missed {len(started) - len(arrived)} of {len(started)}"
    )


def spread_line(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    return f"P50 {percentile(seconds, 0.5):.1f} s, all {max(seconds):.1f} s"


def stored_times(*, recipients: list[Recipient], since: float) -> list[float]:
    """When each recipient's item stored since `since` was stored (by a worker), a Unix time."""
    index = {recipient.id: i for i, recipient in enumerate(recipients)}
    stored = [0.0] * len(recipients)
    items = InboxItem.objects.filter(created_at__gte=datetime.fromtimestamp(since, tz=UTC))
    for recipient_id, created_at in items.values_list("recipient_id", "created_at").iterator(chunk_size=5000):
        stored[index[recipient_id]] = created_at.timestamp()
    return stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inbox-connections", type=int, default=20_000, help="sockets, one a recipient")
    parser.add_argument("--web-processes", type=int, default=1, help="uvicorn worker processes (default 1)")
    parser.add_argument("--client-processes", type=int, default=0, help="default: one per 10,000 sockets")
    parser.add_argument("--open-concurrency", type=int, default=100, help="handshakes in flight a client process")
    parser.add_argument("--bulk-concurrency", type=int, default=3, help="bulk worker processes (default 3)")
    parser.add_argument(
        "--ws-per-message-deflate",
        choices=["true", "false"],
        default="true",
        help="uvicorn's option of that name: compression, as browsers ask for it (default true, uvicorn's)",
    )
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for each phase (default 180)")
    args = parser.parse_args()
    count = args.inbox_connections
    # One file a socket: the server and the clients start with the hard limit as their own.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    per_process = math.ceil(count / args.web_processes)
    if per_process > hard - 50:
        print(f"warning: {per_process} sockets a web process is more than this machine's file limit ({hard}) allows")

    ports_check(API_PORT)
    (ROOT / "var" / "log").mkdir(parents=True, exist_ok=True)
    api_key = settings.NOTIFY_DEMO_API_KEY
    tenant = demo_workspace_ensure(api_key=api_key)
    bench_categories_ensure(tenant_id=tenant.id)
    headers = {"Authorization": f"Bearer {api_key}"}
    reset_database()
    recipients = Recipient.objects.bulk_create(
        [Recipient(tenant_id=tenant.id, external_id=f"inbox{i}") for i in range(count)], batch_size=5000
    )
    tokens = [recipient_token_issue(purpose=INBOX, recipient_id=recipient.id) for recipient in recipients]
    processes = Processes(
        sink="memory",
        bulk_concurrency=args.bulk_concurrency,
        web_workers=args.web_processes,
        web_interface="asgi",
        # No cap on concurrent connections beyond the sockets asked for, and a listen queue
        # as long as the kernel allows (net.core.somaxconn), for the reconnect storm.
        web_args=(
            *("--limit-concurrency", str(per_process + 1000), "--backlog", "4096"),
            *("--timeout-graceful-shutdown", "30"),  # a deploy's stop does not wait on every client
            *("--ws-per-message-deflate", args.ws_per_message_deflate),
        ),
    )
    processes.start_web()
    processes.spawn(
        "api",
        sys.executable,
        "-m",
        "uvicorn",
        "config.asgi:application",
        "--port",
        str(API_PORT),
        "--no-access-log",
        "--log-level",
        "warning",
    )
    processes.start_workers()
    wait_until(lambda: api_up(), timeout=30)
    clients: Clients | None = None
    try:
        assert processes.web is not None
        rss_before, cpu_before = group_usage(processes.web.pid)
        client_processes = args.client_processes or math.ceil(count / 10_000)
        print(
            f"inbox: {count} sockets to {args.web_processes} web process(es), from {client_processes} client "
            f"process(es); file limit {hard}; {os.cpu_count()} cores"
        )
        began = time.time()
        clients = Clients(tokens=tokens, processes=client_processes, open_concurrency=args.open_concurrency)
        processes.labels.update({client.process.pid: "socket clients" for client in clients.each})
        all_open = wait_until(lambda: clients.total("opened") >= count, timeout=args.timeout)
        opened_times = clients.times("first_hello")
        open_seconds = max(opened_times.values(), default=began) - began
        print(
            f"open: {len(opened_times)} of {count} sockets open (hello received) in {open_seconds:.1f} s"
            + ("" if all_open else f" (timed out after {args.timeout:.0f} s)")
        )
        cpu_open = group_usage(processes.web.pid)[1] - cpu_before
        time.sleep(2)  # the server's buffers settle
        rss_after = group_usage(processes.web.pid)[0]
        print(
            f"  the web server's CPU while they opened: {cpu_open:.1f} s "
            f"= {cpu_open / max(1, len(opened_times)) * 1e3:.2f} ms a connection"
        )
        print(
            f"memory: web RSS {rss_before / 2**20:,.0f} MB before, {rss_after / 2**20:,.0f} MB with the sockets open "
            f"= {(rss_after - rss_before) / max(1, len(opened_times)) / 1024:,.1f} KB a connection; "
            f"{open_files(processes.web.pid)} files open in the web process group"
        )

        live = f"live-{int(began)}"
        cpu = CpuMeter(labels=processes.labels)
        cpu.start()
        sent_at = time.time()
        accepted = event_send(headers=headers, count=count, body=live)
        print(
            f"send: {count} recipients accepted by the API in {max(accepted) - sent_at:.1f} s "
            f"({math.ceil(count / PER_REQUEST)} requests)"
        )
        wait_until(lambda: clients.received(live) >= count, timeout=args.timeout)
        arrived = clients.times("received", live)
        print(f"live: from API acceptance to the socket, {latency_line(started=accepted, arrived=arrived)}")
        # Where the time went: the API, the workers storing, PostgreSQL, the socket server, the clients.
        print(f"  until the last arrived, {cpu.report(count=count, seconds=time.time() - sent_at)}")
        stored = stored_times(recipients=recipients, since=sent_at)
        print(
            f"  of which from the item stored (by a worker) to the socket, {latency_line(started=stored, arrived=arrived)}"
        )
        stored_at = {i: t for i, t in enumerate(stored) if t}
        print(f"  and from API acceptance to the item stored, {latency_line(started=accepted, arrived=stored_at)}")
        rss_used = group_usage(processes.web.pid)[0]
        print(
            f"memory after the event: web RSS {rss_used / 2**20:,.0f} MB "
            f"= {(rss_used - rss_before) / max(1, len(opened_times)) / 1024:,.1f} KB a connection"
        )
        closes = clients.closes()
        print(
            f"closes before the restart: {dict(closes) or 'none'}; by a server error: {closes[SERVER_ERROR]}; "
            f"'Exception in ASGI application' in the web log: {web_log(processes).count('Exception in ASGI application')}"
        )

        processes.web_stop()
        stopped = time.time()
        away = f"away-{int(began)}"
        event_send(headers=headers, count=count, body=away)
        # Every item of the event is stored before the server comes back.
        wait_until(lambda: Delivery.objects.filter(status__in=FINAL).count() >= 2 * count, timeout=args.timeout)
        restarted = time.time()
        processes.web_start()
        print(f"  the restarted server answered HTTP {time.time() - restarted:.1f} s after its start")
        caught_up = wait_until(lambda: clients.received(away) >= count, timeout=args.timeout)
        reopened = {i: t - restarted for i, t in clients.times("last_hello").items() if t > stopped}
        caught = {i: t - restarted for i, t in clients.times("received", away).items()}
        print(
            f"restart: the server was down {restarted - stopped:.1f} s (the event sent meanwhile was stored); "
            f"from its start, {len(reopened)} of {count} clients reconnected in {spread_line(list(reopened.values()))} "
            f"and {len(caught)} caught up with that event in {spread_line(list(caught.values()))}"
            + ("" if caught_up else f" (timed out after {args.timeout:.0f} s)")
        )
        assert processes.web is not None
        cpu_restart = group_usage(processes.web.pid)[1]
        print(
            f"  the restarted server's CPU until then: {cpu_restart:.1f} s "
            f"= {cpu_restart / max(1, len(caught)) * 1e3:.2f} ms a client reconnected and caught up (with its start-up)"
        )
        restart_closes = clients.closes() - closes
        print(f"closes during the restart: {dict(restart_closes)}")
    finally:
        if clients:
            clients.stop()
        processes.stop()


if __name__ == "__main__":
    main()
