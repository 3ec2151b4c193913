"""Soak the whole pipeline: a steady mixed load through the ASGI web server, workers of every
group, celery beat and the sandbox, while every process is watched for leaks.

  python scripts/soak.py --minutes 60 [--rate 30] [--critical-rate 2]

Every --interval seconds (default 10) it samples, for each process and the processes it
started (uvicorn's workers, celery's prefork children): resident memory, open files and
PostgreSQL connections, and prints one line. At the end it prints a table per process and
exits 1 if any series keeps growing after warm-up (see `keeps_growing`) or a process died.
Run it through `make soak`, which prepares the database, Redis and the virtualenv."""

import argparse
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# The growth rule: after warm-up (the first 10% of the run, at most 5 minutes) a series is
# judged on the run's last half: the median of that half's last quarter against the median of
# its first quarter. Medians, so that a garbage collection or a burst does not decide.
WARM_UP_FRACTION = 0.10
WARM_UP_MAX_SECONDS = 300.0
GROWTH_LIMIT = 0.05
# Counts move by whole units: a pool that opens one more connection in a quiet process is
# not a leak. Growth must also exceed this many units (bytes for memory) to count.
GROWTH_FLOOR = {"rss": 4 * 1024 * 1024, "files": 2, "db": 1}
SERIES = ("rss", "files", "db")
# The sandbox stands in for the providers: the requests it logs and the sends it counts
# (to find duplicates) are a provider's records, so its memory grows by design. Shown, not
# judged; its open files and connections are.
NOT_JUDGED = {("sandbox", "rss")}


def warm_up_seconds(*, duration: float) -> float:
    return min(duration * WARM_UP_FRACTION, WARM_UP_MAX_SECONDS)


def growth(*, times: list[float], values: list[float], duration: float) -> float:
    """How much the series rose over the run's last half: the median of that half's last
    quarter over the median of its first quarter, minus one (0.05 is 5%)."""
    half = [v for t, v in zip(times, values, strict=True) if t >= duration / 2]
    if len(half) < 4:
        return 0.0
    quarter = len(half) // 4
    first, last = statistics.median(half[:quarter]), statistics.median(half[-quarter:])
    if first == 0:
        return 0.0 if last == 0 else float("inf")
    return last / first - 1


def keeps_growing(*, times: list[float], values: list[float], duration: float, series: str) -> bool:
    """Whether the series grew by more than 5% (and more than its floor) over the last half."""
    half = [v for t, v in zip(times, values, strict=True) if t >= duration / 2]
    if len(half) < 4:
        return False
    quarter = len(half) // 4
    rise = statistics.median(half[-quarter:]) - statistics.median(half[:quarter])
    return growth(times=times, values=values, duration=duration) > GROWTH_LIMIT and rise > GROWTH_FLOOR[series]


@dataclass
class Track:
    """One process's samples: seconds since the start, and each series at that time."""

    times: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SERIES})
    processes: int = 0


def tcp_inodes_to(*, port: int) -> dict[int, int]:
    """Socket inode -> local port, for the machine's TCP connections to `port`."""
    inodes: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if int(remote.rsplit(":", 1)[1], 16) == port and inode:
                inodes[inode] = int(local.rsplit(":", 1)[1], 16)
    return inodes


def process_usage(*, pid: int) -> tuple[int, int, set[int]]:
    """A process's resident bytes, open file count and the inodes of its sockets."""
    with open(f"/proc/{pid}/statm") as statm:
        rss = int(statm.read().split()[1]) * PAGE_SIZE
    sockets: set[int] = set()
    names = os.listdir(f"/proc/{pid}/fd")
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            sockets.add(int(target[8:-1]))
    return rss, len(names), sockets


def workers_wait_until_ready(*, names: list[str], timeout: float = 120.0) -> None:
    """Wait until every worker answers a ping, so that the clock starts with the pipeline up."""
    from config.celery import app

    deadline = time.monotonic() + timeout
    waiting = set(names)
    while waiting:
        if time.monotonic() > deadline:
            raise SystemExit(f"workers not up after {timeout:.0f} s: {', '.join(sorted(waiting))}")
        for reply in app.control.ping(destination=sorted(waiting), timeout=1.0):
            waiting -= set(reply)


def mib(value: float) -> str:
    return f"{value / 1024 / 1024:.0f}M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="how long to run (default 60)")
    parser.add_argument("--seconds", type=float, help="how long to run, in seconds (overrides --minutes)")
    parser.add_argument("--rate", type=float, default=30.0, help="notifications a second in all (default 30)")
    parser.add_argument(
        "--critical-rate", type=float, default=2.0, help="critical OTPs a second, half email, half SMS (default 2)"
    )
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--recipients", type=int, default=2000, help="recipients per channel (default 2000)")
    parser.add_argument("--bulk-concurrency", type=int, default=2, help="bulk worker processes (default 2)")
    parser.add_argument("--web-workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    args = parser.parse_args()
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    if args.critical_rate > args.rate:
        parser.error("--critical-rate cannot exceed --rate")

    # Django and the benchmark's process management only now: the growth rule above is
    # importable without them.
    import bench
    from django.conf import settings
    from django.db import connection

    from apps.deliveries.models import Delivery
    from apps.tenants.demo import demo_workspace_ensure
    from config.queues import CHANNELS, WORKER_GROUPS

    bench.ports_check()
    (bench.ROOT / "var" / "log").mkdir(parents=True, exist_ok=True)
    api_key = settings.NOTIFY_DEMO_API_KEY
    tenant = demo_workspace_ensure(api_key=api_key)
    bench.bench_categories_ensure(tenant_id=tenant.id)
    bench.reset_database()
    for channel in CHANNELS:
        bench.endpoints_register(tenant_id=tenant.id, channel=channel, count=args.recipients, prefix=f"soak-{channel}-")
    headers = {"Authorization": f"Bearer {api_key}"}
    database_port = int(settings.DATABASES["default"].get("PORT") or 5432)

    processes = bench.Processes(
        sink="sandbox", bulk_concurrency=args.bulk_concurrency, web_workers=args.web_workers, web_interface="asgi"
    )
    processes.start_web()
    for group in WORKER_GROUPS:
        if group == "bulk":
            processes.start_group(label="bulk", group=group, pool="prefork", concurrency=args.bulk_concurrency, nice=10)
        else:
            processes.start_group(label=group, group=group)
    processes.start_beat()
    workers_wait_until_ready(names=[f"{group}@{socket.gethostname()}" for group in WORKER_GROUPS])
    tracks = {label: Track() for label in processes.labels.values()}
    print(
        f"soak: {duration:.0f} s at {args.rate:g} notifications/s ({args.critical_rate:g}/s critical OTPs, "
        f"the rest bulk over {', '.join(CHANNELS)}); warm-up {warm_up_seconds(duration=duration):.0f} s; "
        f"a sample every {args.interval:g} s: resident memory / open files / database connections per process"
    )

    session = bench.producer_session()
    accepted = 0
    bulk_rate = (args.rate - args.critical_rate) / len(CHANNELS)
    owed = {channel: 0.0 for channel in (*CHANNELS, "otp-email", "otp-sms")}
    otps = 0
    died: list[str] = []

    def send_second(*, tick: int) -> None:
        """One second's notifications: each channel's bulk share in one request, then the OTPs."""
        nonlocal accepted, otps
        for channel in CHANNELS:
            owed[channel] += bulk_rate
            count, owed[channel] = int(owed[channel]), owed[channel] - int(owed[channel])
            if not count:
                continue
            first = (tick * count) % args.recipients
            recipients = [
                {
                    "external_id": f"soak-{channel}-{(first + i) % args.recipients}",
                    "email": f"soak{(first + i) % args.recipients}@example.com",
                    "phone": f"+1415555{(first + i) % args.recipients:04d}",
                }
                for i in range(count)
            ]
            response = session.post(
                bench.API,
                json={
                    "category": f"bench-{channel}-bulk",
                    "recipients": recipients,
                    "data": {"headline": f"Soak news {tick}"},
                    "idempotency_key": f"soak-{channel}-{tick}",
                },
                headers=headers,
            )
            response.raise_for_status()
            accepted += count
        for channel in ("email", "sms"):
            owed[f"otp-{channel}"] += args.critical_rate / 2
            while owed[f"otp-{channel}"] >= 1:
                owed[f"otp-{channel}"] -= 1
                otps += 1
                number = otps % 10000
                response = session.post(
                    bench.API,
                    json={
                        "category": f"bench-{channel}-critical",
                        "recipient": {
                            "external_id": f"soak-otp-{number}",
                            "email": f"otp{number}@example.com",
                            "phone": f"+1415556{number:04d}",
                        },
                        "data": {"headline": f"Your code is {100000 + number}"},
                        "idempotency_key": f"soak-otp-{otps}",
                    },
                    headers=headers,
                )
                response.raise_for_status()
                accepted += 1

    def sample(*, at: float) -> None:
        members: dict[str, list[int]] = {label: [] for label in tracks}
        for pid, _name, fields in bench.process_table():
            label = processes.labels.get(int(fields[2]))
            if label is not None and fields[0] != "Z":
                members[label].append(pid)
        to_database = tcp_inodes_to(port=database_port)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() AND client_port > 0"
            )
            client_ports = {port for (port,) in cursor.fetchall()}
        parts = []
        for label, pids in members.items():
            rss = files = db = 0
            for pid in pids:
                try:
                    process_rss, process_files, sockets = process_usage(pid=pid)
                except OSError:  # it ended between the scan and now (a recycled prefork child)
                    continue
                rss += process_rss
                files += process_files
                db += sum(1 for inode in sockets if to_database.get(inode) in client_ports)
            track = tracks[label]
            track.times.append(at)
            track.processes = len(pids)
            for series, value in zip(SERIES, (rss, files, db), strict=True):
                track.values[series].append(value)
            parts.append(f"{label} {mib(rss)}/{files}/{db}")
        final = Delivery.objects.filter(status__in=bench.FINAL).count()
        print(f"[{at:5.0f} s] accepted {accepted} done {final} | " + " | ".join(parts), flush=True)

    started = time.monotonic()
    tick = 0
    next_sample = args.interval
    try:
        while (elapsed := time.monotonic() - started) < duration:
            send_second(tick=tick)
            tick += 1
            if elapsed >= next_sample:
                sample(at=elapsed)
                next_sample += args.interval
                died = [processes.labels[child.pid] for child in processes.children if child.poll() is not None]
                if died:
                    break
            time.sleep(max(0.0, started + tick - time.monotonic()))
        ran = time.monotonic() - started
        if not died:
            sample(at=ran)
    finally:
        processes.stop()
    verdict = report(tracks=tracks, duration=duration)
    backlog = Delivery.objects.exclude(status__in=bench.FINAL).count()
    print(
        f"accepted {accepted} notifications in {ran:.0f} s ({accepted / ran:.1f}/s of the {args.rate:g}/s asked); "
        f"{backlog} not yet final when the load stopped"
    )
    if died:
        print(f"FAIL: {', '.join(died)} exited during the soak (see var/log/bench-*.log)")
        sys.exit(1)
    print("PASS: nothing kept growing after warm-up" if verdict else "FAIL: a series kept growing after warm-up")
    sys.exit(0 if verdict else 1)


def report(*, tracks: dict[str, Track], duration: float) -> bool:
    """Print the summary table; return whether every series held steady."""
    warm_up = warm_up_seconds(duration=duration)
    steady = True
    print(f"{'process':<12} {'series':<6} {'after warm-up':>14} {'end':>8} {'max':>8} {'growth':>8}  verdict")
    for label, track in tracks.items():
        after = next((i for i, t in enumerate(track.times) if t >= warm_up), 0)
        for series in SERIES:
            values = track.values[series]
            if not values:
                continue
            show = mib if series == "rss" else str
            rise = growth(times=track.times, values=values, duration=duration)
            grows = keeps_growing(times=track.times, values=values, duration=duration, series=series)
            judged = (label, series) not in NOT_JUDGED
            steady = steady and not (grows and judged)
            verdict = ("GROWING" if grows else "ok") if judged else "not judged (the providers' records)"
            print(
                f"{label:<12} {series:<6} {show(values[after]):>14} {show(values[-1]):>8} {show(max(values)):>8} "
                f"{rise * 100:>7.1f}%  {verdict}"
            )
    return steady


if __name__ == "__main__":
    main()
