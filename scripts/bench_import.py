"""Benchmark the bulk recipient import: generate a file, upload it to the ASGI web server,
and wait for a real worker to finish it.

  python scripts/bench_import.py --import 1000000 [--phone-every 4] [--format ndjson|csv]

Prints the upload time (the request, which streams the file into the staging table), the
processing time (validation and upsert in the worker), rows/s over both, and the peak RSS
of the web and worker processes. Run it through `make bench ARGS="--import 1000000"`, which
prepares the database, Redis and the virtualenv."""

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402

from apps.recipients.models import RecipientImport  # noqa: E402
from apps.tenants.demo import demo_workspace_ensure  # noqa: E402
from config.queues import IMPORT_QUEUE  # noqa: E402

WEB_PORT = int(os.environ.get("BENCH_WEB_PORT", "8100"))
TIMEZONES = ("Europe/Paris", "America/New_York", "Asia/Tokyo", "UTC")
LOCALES = ("fr-FR", "en-US", "ja-JP", "en-GB")


def file_write(*, path: Path, rows: int, phone_every: int, file_format: str) -> int:
    """Write the file line by line (it is never in memory whole); returns its size in bytes."""
    with path.open("w", newline="") as out:
        writer = csv.writer(out) if file_format == "csv" else None
        if writer:
            writer.writerow(["external_id", "email", "phone", "locale", "timezone", "attributes"])
        for i in range(rows):
            row = {
                "external_id": f"bench-{i:07d}",
                "email": f"person{i}@example.com",
                "phone": f"+14152{i % 1_000_000:06d}" if phone_every and i % phone_every == 0 else "",
                "locale": LOCALES[i % 4],
                "timezone": TIMEZONES[i % 4],
                "attributes": {"plan": "pro" if i % 3 else "free", "signup_year": 2000 + i % 25},
            }
            if writer:
                writer.writerow([*list(row.values())[:5], json.dumps(row["attributes"])])
            else:
                if not row["phone"]:
                    del row["phone"]
                out.write(json.dumps(row) + "\n")
    return path.stat().st_size


class PeakRss:
    """The largest high-water mark of resident memory (VmHWM) of any one process in each
    process group (a worker and its pool's children), polled from /proc."""

    def __init__(self, groups: dict[str, int]) -> None:
        self.groups = groups
        self.peaks = dict.fromkeys(groups, 0)
        self.stopped = threading.Event()

        self.cpu = dict.fromkeys(groups, 0.0)

    def _read(self, *, label: str, group: int) -> int:
        peak = 0
        cpu = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                # After the command: state, ppid, pgrp, ... utime and stime are the 12th and 13th.
                if int(fields[2]) != group:
                    continue
                cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                for line in (stat.parent / "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except (OSError, IndexError, ValueError):
                continue
        self.cpu[label] = max(self.cpu[label], cpu)
        return peak

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            self.sample()

    def sample(self) -> None:
        for label, group in self.groups.items():
            self.peaks[label] = max(self.peaks[label], self._read(label=label, group=group))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import", dest="rows", type=int, default=100_000, help="rows in the file (default 100000)")
    parser.add_argument("--phone-every", type=int, default=4, help="every Nth row has a phone (0: none; default 4)")
    parser.add_argument("--format", choices=["ndjson", "csv"], default="ndjson")
    args = parser.parse_args()

    api_key = os.environ["NOTIFY_DEMO_API_KEY"]
    tenant = demo_workspace_ensure(api_key=api_key)
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE recipients_recipientimportline, recipients_recipientimportrefusal, "
            "recipients_recipientimport, recipients_recipient CASCADE"
        )
    connection.close()

    workdir = Path(tempfile.mkdtemp(prefix="bench-import-"))
    path = workdir / f"recipients.{args.format}"
    started = time.monotonic()
    size = file_write(path=path, rows=args.rows, phone_every=args.phone_every, file_format=args.format)
    print(f"file: {args.rows} rows, {size / 1e6:.0f} MB, written in {time.monotonic() - started:.1f} s")

    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    log = (ROOT / "var" / "log").resolve()
    log.mkdir(parents=True, exist_ok=True)
    web = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--port",
            str(WEB_PORT),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=(log / "bench-import-web.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(settings.NOTIFY_IMPORT_WORKERS),
            "-Q",
            IMPORT_QUEUE,
            "-n",
            "import@%h",
            "--without-mingle",
            "--without-gossip",
            "-l",
            "info",
        ],
        cwd=ROOT,
        env=env,
        stdout=(log / "bench-import-worker.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rss = PeakRss({"web": web.pid, "worker": worker.pid})
    threading.Thread(target=rss.run, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{WEB_PORT}"
        deadline = time.monotonic() + 60
        while " ready." not in (log / "bench-import-worker.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"{base}/api/schema/", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "text/csv" if args.format == "csv" else "application/x-ndjson",
        }
        started = time.monotonic()
        with path.open("rb") as body:  # requests streams a file object, with its Content-Length
            response = requests.post(f"{base}/api/v1/recipients/import", data=body, headers=headers, timeout=600)
        uploaded = time.monotonic()
        response.raise_for_status()
        import_id = response.json()["id"]
        print(f"upload: 202 after {uploaded - started:.1f} s ({args.rows / (uploaded - started):,.0f} rows/s)")
        last_print = 0.0
        while True:
            state = requests.get(f"{base}/api/v1/recipients/imports/{import_id}", headers=headers, timeout=10).json()
            if state["status"] in ("completed", "failed"):
                break
            if time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                print(f"  {state['status']}: {state['progress'] * 100:.0f}% after {last_print - started:.0f} s")
            time.sleep(0.2)
        finished = time.monotonic()
        rss.sample()
        recipient_import = RecipientImport.objects.get(id=import_id)
        assert recipient_import.tenant_id == tenant.id
        total = finished - started
        print(
            f"processing: {finished - uploaded:.1f} s in the worker ({args.rows / (finished - uploaded):,.0f} rows/s)"
        )
        print(
            f"import of {args.rows} rows: {state['status']} in {total:.1f} s from the API call, "
            f"{args.rows / total:,.0f} rows/s; created {state['created']}, updated {state['updated']}, "
            f"refused {state['refused']} (chunk {settings.NOTIFY_IMPORT_CHUNK}, "
            f"{settings.NOTIFY_IMPORT_WORKERS} workers)"
        )
        print(
            f"CPU seconds: web {rss.cpu['web']:.0f}, worker processes {rss.cpu['worker']:.0f} "
            f"(PostgreSQL's are not counted; the machine has {os.cpu_count()} cores)"
        )
        print(
            f"peak RSS of one process: web {rss.peaks['web'] / 2**20:.0f} MB, "
            f"worker {rss.peaks['worker'] / 2**20:.0f} MB"
        )
    finally:
        rss.stopped.set()
        for child in (web, worker):
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            child.wait(timeout=30)
        path.unlink()
        workdir.rmdir()


if __name__ == "__main__":
    main()
