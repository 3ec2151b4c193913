"""The fault campaign: the whole pipeline under load, one fault at a time, then the truth.

  python scripts/chaos.py [--notifications 100000] [--fault-seconds 30] [--down-seconds 120]
                          [--broker redis|rabbitmq]

It runs its own Redis and its own PostgreSQL cluster on private ports (so that restarting
them harms nobody), migrates the database, starts the web server, the sandbox, the workers of
every group and beat, and pushes bulk notifications over all five channels (in-app through
broadcasts) while critical OTPs (email and SMS) go out at a steady rate. Meanwhile it injects
a fixed schedule of faults, printing each one; the processes it kills are started again, as
an operator's supervisor would, and nothing else intervenes. Then it waits until every
delivery is final and prints one summary line. It exits 1 when a target is missed: nothing
lost, no email or SMS sent twice to the provider, no push a person sees twice.
Run it through `make chaos`, which prepares the virtualenv."""

import argparse
import glob
import hashlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Self

import psycopg
import redis
import requests
from urllib3.util.retry import Retry

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / "var" / "chaos"
DATABASE = "notify_chaos"
CHANNEL_SHARES = {"email": 0.3, "sms": 0.15, "push": 0.2, "webpush": 0.15, "inapp": 0.2}
INAPP_BROADCASTS = 4  # the in-app share goes out as this many broadcasts, the first one under a kill
PROVIDER_CHANNELS = {"postmark": "email", "twilio": "sms", "fcm": "push", "webpush": "webpush"}
# Retries for the campaign: enough attempts, with a short backoff, that no single fault
# (a provider down for minutes included) exhausts them.
RETRY = {"MAX_ATTEMPTS": "30", "RETRY_BASE_SECONDS": "1", "RETRY_CAP_SECONDS": "10"}
# A killed worker's claim is taken back after the lease; a lost task message is published
# again after the republish delay.
# (The lease is --lease-seconds: longer than the slowest batch's send, timeouts included.)
CLOCKS = {"NOTIFY_REPUBLISH_AFTER_SECONDS": "20"}
RETRY_ENVIRONMENT = {
    **{f"NOTIFY_{channel.upper()}_{name}": value for channel in CHANNEL_SHARES for name, value in RETRY.items()},
    **CLOCKS,
}
PROVIDER_TIMEOUT_SECONDS = 5.0
# The statements that show a worker in the act, as pg_stat_activity shows them.
CAUGHT_STATEMENTS = {
    # Outcomes: the sent mark, the failures' update, the history rows.
    "record": (
        "UPDATE deliveries_delivery AS d SET status%",
        'UPDATE "deliveries_delivery" SET "status"%',
        "%deliveries_deliveryevent%",
    ),
    # A broadcast's chunk: who it reached, and the notifications and deliveries planned for them.
    "fan-out": (
        "%audiences_broadcastrecipient%",
        'INSERT INTO "deliveries_notification"%',
        'INSERT INTO "deliveries_delivery"%',
        'COPY "deliveries_notification"%',
        'COPY "deliveries_delivery" %',
    ),
}  # the clients' timeout; a latency spike longer than this is a timeout


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def die(message: str) -> NoReturn:
    sys.exit(f"error: {message}")


# --- The campaign's own services ------------------------------------------------------------


class PrivateRedis:
    """A Redis of the campaign's own, a child process that keeps nothing on disk."""

    def __init__(self, *, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        server = shutil.which("redis-server") or die(
            "redis-server is needed (Debian/Ubuntu: apt-get install redis-server)."
        )
        log = open(STATE / f"redis-{self.port}.log", "w")
        self.process = subprocess.Popen(
            [str(server), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
        die(f"the campaign's Redis did not start on port {self.port}; see {log.name}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def flushall(self) -> None:
        redis.Redis.from_url(self.url).flushall()


class PrivatePostgres:
    """A PostgreSQL cluster of the campaign's own under var/, run as the `postgres` user when
    this runs as root (PostgreSQL refuses to run as root)."""

    def __init__(self, *, port: int) -> None:
        self.port = port
        self.directory = STATE / f"postgres-{port}"
        self.url = f"postgres://postgres@127.0.0.1:{port}/{DATABASE}"
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        on_path = shutil.which("pg_ctl")
        if not found and not on_path:
            die(
                "the campaign runs its own PostgreSQL cluster and needs initdb and pg_ctl "
                "(Debian/Ubuntu: apt-get install postgresql, which puts them in /usr/lib/postgresql/<version>/bin)."
            )
        self.bin = Path(found[-1] if found else str(on_path)).parent
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                die("running as root, the campaign runs PostgreSQL as the 'postgres' user, which does not exist.")
            runuser = shutil.which("runuser") or die("running as root, the campaign needs runuser (util-linux).")
            self.as_user = [str(runuser), "-u", "postgres", "--"]
            # The postgres user may not reach into this checkout (a private temporary clone):
            # its cluster lives in the system's temporary directory, one per checkout and port.
            checkout = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
            home = Path(tempfile.gettempdir()) / f"notify-chaos-{checkout}"
            home.mkdir(mode=0o755, exist_ok=True)
            self.directory = home / f"postgres-{port}"

    def pg_ctl(self, *args: str) -> None:
        command = [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.directory), "-w", "-t", "120", *args]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd="/")

    def start(self) -> None:
        """Start the cluster: made on the first run, kept for the next ones."""
        if not (self.directory / "PG_VERSION").exists():
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True)
            if self.as_user:
                shutil.chown(self.directory, user="postgres", group="postgres")
            initdb = [
                str(self.bin / "initdb"),
                "-D",
                str(self.directory),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
            ]
            subprocess.run([*self.as_user, *initdb, "--no-sync"], check=True, stdout=subprocess.DEVNULL, cwd="/")
        elif (self.directory / "postmaster.pid").exists():
            # Left running by a run that was killed itself.
            subprocess.run(
                [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.directory), "-m", "immediate", "stop"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        # fsync off: the faults crash PostgreSQL, never the machine, so what it wrote survives.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.directory} -c fsync=off"
        )
        self.pg_ctl("-l", str(self.directory / "server.log"), "-o", options, "start")

    def database_fresh(self) -> None:
        """An empty, migrated database: a copy of a template migrated once for the project's
        current migrations (migrating from nothing takes longer than many a fault)."""
        migrations = sorted(ROOT.glob("apps/*/migrations/*.py"))
        digest = hashlib.sha256(b"".join(path.read_bytes() for path in migrations)).hexdigest()[:12]
        template = f"{DATABASE}_{digest}"
        admin = self.url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as connection:
            names = {name for (name,) in connection.execute("select datname from pg_database").fetchall()}
            if template not in names:
                for stale in names:
                    if stale.startswith(f"{DATABASE}_"):
                        connection.execute(f'drop database "{stale}"')
                connection.execute(f'create database "{template}"')
                migrate = [sys.executable, "manage.py", "migrate", "--no-input", "-v", "0"]
                url = self.url.rsplit("/", 1)[0] + f"/{template}"
                if subprocess.run(migrate, cwd=ROOT, env={**os.environ, "DATABASE_URL": url}).returncode:
                    connection.execute(f'drop database "{template}"')
                    die("the migrations failed; see above")
            connection.execute(f'drop database if exists "{DATABASE}" with (force)')
            connection.execute(f'create database "{DATABASE}" template "{template}"')

    def restart(self, *, mode: str) -> None:
        self.pg_ctl("-m", mode, "restart")

    def stop(self) -> None:
        if (self.directory / "postmaster.pid").exists():
            self.pg_ctl("-m", "fast", "stop")


class RabbitVhost:
    """A private vhost on the machine's RabbitMQ; its broker fault restarts the whole node's app."""

    def __init__(self) -> None:
        self.name = f"notify-chaos-{os.getpid()}"
        self.url = f"amqp://guest:guest@127.0.0.1:5672/{self.name}"
        self.ctl = shutil.which("rabbitmqctl") or die(
            "--broker rabbitmq needs rabbitmqctl and a running RabbitMQ (apt-get install rabbitmq-server)."
        )

    def run(self, *args: str) -> None:
        subprocess.run([str(self.ctl), *args], check=True, stdout=subprocess.DEVNULL)

    def start(self) -> None:
        self.run("add_vhost", self.name)
        self.run("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")

    def stop(self) -> None:
        subprocess.run([str(self.ctl), "delete_vhost", self.name], stdout=subprocess.DEVNULL, check=False)


# --- Finding a process in the act, from /proc -------------------------------------------------

# x86_64 system calls a process waits in for a socket: the fd is the first argument, or the
# first struct pollfd's.
FD_SYSCALLS = {0, 45, 47}  # read, recvfrom, recvmsg
POLL_SYSCALLS = {7, 271}  # poll, ppoll


def group_members(leader: int) -> list[int]:
    """The processes of one process group (a worker and its pool)."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    text = stat.read()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2 :].split()[2]) == leader:
                members.append(int(entry.name))
    return members


def tcp_sockets() -> dict[int, tuple[int, int]]:
    """Socket inode -> (local port, remote port), for every TCP socket of the machine."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                sockets[int(fields[9])] = (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16))
    return sockets


def socket_inode(pid: int, fd: int) -> int | None:
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return int(target[8:-1]) if target.startswith("socket:[") else None


def waiting_on(pid: int) -> int | None:
    """The socket fd a process is blocked on, read from /proc/<pid>/syscall."""
    try:
        with open(f"/proc/{pid}/syscall") as syscall:
            fields = syscall.read().split()
        number, first = int(fields[0]), int(fields[1], 16)
        if number in FD_SYSCALLS:
            return first
        if number in POLL_SYSCALLS:
            with open(f"/proc/{pid}/mem", "rb") as memory:
                memory.seek(first)
                return int.from_bytes(memory.read(4), "little", signed=True)
    except (OSError, ValueError, IndexError):
        return None
    return None


def ports_of(pid: int, sockets: dict[int, tuple[int, int]]) -> set[int]:
    """The local ports of a process's TCP sockets."""
    ports: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ports
    for fd in fds:
        inode = socket_inode(pid, int(fd))
        if inode in sockets:
            ports.add(sockets[inode][0])
    return ports


# --- The campaign ------------------------------------------------------------------------------


class CountedRetry(Retry):
    """The producers' retries, counted by what caused them: an API that answers 500 during a
    fault is a finding even when a retry then succeeds."""

    causes: Counter[str] = Counter()

    def increment(
        self, method: Any = None, url: Any = None, response: Any = None, error: Any = None, *args: Any, **kwargs: Any
    ) -> Self:
        CountedRetry.causes[f"HTTP {response.status}" if response is not None else "no connection"] += 1
        return super().increment(method, url, response, error, *args, **kwargs)


@dataclass
class Window:
    started: float
    ended: float = 0.0


@dataclass
class Probe:
    """Critical OTPs, email and SMS, at a steady rate from a thread of its own: when each was
    posted and what the API accepted."""

    post: Callable[[int], list[str]]
    rate: float
    sent: list[tuple[float, str]] = field(default_factory=list)  # (posted at, notification id)
    refused: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def one(number: int) -> None:
            posted = time.time()
            try:
                ids = self.post(number)
            except requests.RequestException:
                self.refused += 1
                return
            self.sent.extend((posted, notification_id) for notification_id in ids)

        with ThreadPoolExecutor(max_workers=16) as pool:
            number = 0
            began = time.monotonic()
            while not self.stopping.is_set():
                pool.submit(one, number)
                number += 1
                time.sleep(max(0.0, began + number / self.rate - time.monotonic()))


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notifications", type=int, default=100_000, help="bulk notifications (default 100000)")
    parser.add_argument(
        "--fault-seconds", type=float, default=30.0, help="how long each fault lasts or is watched (default 30)"
    )
    parser.add_argument("--down-seconds", type=float, default=120.0, help="how long a provider is down (default 120)")
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=120.0,
        help="how long a claimed delivery waits for its worker before it is sent again (default 120)",
    )
    parser.add_argument(
        "--critical-lease-seconds",
        type=float,
        help="the same for critical work, one OTP a batch (default 30, or --lease-seconds if shorter)",
    )
    parser.add_argument("--otp-rate", type=float, default=2.0, help="critical OTPs a second (default 2)")
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--drain-timeout", type=float, default=1800.0, help="seconds to wait for the drain")
    parser.add_argument("--bulk-concurrency", type=int, default=3, help="bulk worker processes (default 3)")
    parser.add_argument("--web-port", type=int, default=int(os.environ.get("CHAOS_WEB_PORT", "8400")))
    parser.add_argument("--sandbox-port", type=int, default=int(os.environ.get("CHAOS_SANDBOX_PORT", "8425")))
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("CHAOS_REDIS_PORT", "6425")))
    parser.add_argument("--postgres-port", type=int, default=int(os.environ.get("CHAOS_POSTGRES_PORT", "5475")))
    args = parser.parse_args()
    if args.notifications < 1000:
        parser.error("--notifications: at least 1000")
    return args


def critical_lease_seconds(*, args: argparse.Namespace) -> float:
    return args.critical_lease_seconds or min(30.0, args.lease_seconds)


def main() -> None:
    args = arguments()
    # Stopped from outside, it still stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    (ROOT / "var" / "log").mkdir(parents=True, exist_ok=True)
    STATE.mkdir(parents=True, exist_ok=True)
    private_redis = PrivateRedis(port=args.redis_port)
    postgres = PrivatePostgres(port=args.postgres_port)
    rabbit = RabbitVhost() if args.broker == "rabbitmq" else None
    say(f"starting the campaign's own Redis (port {args.redis_port}) and PostgreSQL (port {args.postgres_port})")
    try:
        private_redis.start()
        postgres.start()
        if rabbit:
            rabbit.start()
        os.environ.update(
            {
                "DATABASE_URL": postgres.url,
                "CELERY_BROKER_URL": rabbit.url if rabbit else private_redis.url,
                "NOTIFY_REDIS_URL": private_redis.url,
                "BENCH_WEB_PORT": str(args.web_port),
                "BENCH_SANDBOX_PORT": str(args.sandbox_port),
                **{
                    f"NOTIFY_{channel}_TIMEOUT_SECONDS": str(PROVIDER_TIMEOUT_SECONDS)
                    for channel in ("EMAIL", "SMS", "PUSH", "WEBPUSH")
                },
                **RETRY_ENVIRONMENT,
                "NOTIFY_LEASE_SECONDS": str(args.lease_seconds),
                "NOTIFY_CRITICAL_LEASE_SECONDS": str(critical_lease_seconds(args=args)),
            }
        )
        postgres.database_fresh()
        code = Campaign(args=args, redis=private_redis, postgres=postgres, rabbit=rabbit).run()
    finally:
        say("stopping the campaign's own Redis and PostgreSQL")
        private_redis.stop()
        postgres.stop()
        if rabbit:
            rabbit.stop()
    sys.exit(code)


class Campaign:
    def __init__(
        self, *, args: argparse.Namespace, redis: PrivateRedis, postgres: PrivatePostgres, rabbit: RabbitVhost | None
    ) -> None:
        # The benchmark's process management, load and measurement; importing it sets Django up
        # on the environment made above.
        import bench

        self.bench = bench
        # A well-made producer's retries through the faults are expected, not news.
        logging.getLogger("urllib3").setLevel(logging.ERROR)
        self.args, self.redis, self.postgres, self.rabbit = args, redis, postgres, rabbit
        self.windows: list[Window] = []
        self.counts = {
            channel: int(args.notifications * share) for channel, share in CHANNEL_SHARES.items() if channel != "email"
        }
        self.counts["email"] = args.notifications - sum(self.counts.values())
        self.broadcast_ids: list[str] = []
        self.load_stopped: list[str] = []  # channels whose producer gave up
        self.slices: list[int] = []  # the in-app broadcasts' audiences
        self.inapp_accepted = 0
        self.api = f"http://127.0.0.1:{args.web_port}/api/v1"
        self.sandbox = bench.SandboxClient(base_url=f"http://127.0.0.1:{args.sandbox_port}")

    # -- set-up

    def prepare(self) -> None:
        from django.conf import settings

        from apps.audiences.models import Segment
        from apps.catalog.models import Category, Priority, Template, TemplateVariant, TemplateVersion
        from apps.recipients.models import Recipient

        bench = self.bench
        tenant = bench.demo_workspace_ensure(api_key=settings.NOTIFY_DEMO_API_KEY)
        self.headers = {"Authorization": f"Bearer {settings.NOTIFY_DEMO_API_KEY}"}
        bench.bench_categories_ensure(tenant_id=tenant.id)
        template = Template.objects.create(tenant_id=tenant.id, key="chaos-otp", name="OTP")
        version = TemplateVersion.objects.create(template=template, number=1)
        for channel in ("email", "sms"):
            TemplateVariant.objects.create(
                version=version, channel=channel, subject="Your code", body="Your code is {{ data.code }}"
            )
        Category.objects.create(
            tenant_id=tenant.id,
            key="chaos-otp",
            template=template,
            default_channels=["email", "sms"],
            default_priority=Priority.CRITICAL,
        )
        for channel in ("push", "webpush"):
            bench.endpoints_register(tenant_id=tenant.id, channel=channel, count=self.counts[channel], prefix=channel)
        slice_size = -(-self.counts["inapp"] // INAPP_BROADCASTS)
        for number in range(INAPP_BROADCASTS):
            size = min(slice_size, self.counts["inapp"] - number * slice_size)
            self.slices.append(size)
            Recipient.objects.bulk_create(
                [Recipient(tenant_id=tenant.id, external_id=f"inapp{number}-{i}") for i in range(size)], batch_size=5000
            )
            Segment.objects.create(
                tenant_id=tenant.id, key=f"inapp{number}", filter={"field": "external_id", "prefix": f"inapp{number}-"}
            )

    # -- load

    def otp_post(self, number: int) -> list[str]:
        response = self.session.post(
            f"{self.api}/events",
            json={
                "category": "chaos-otp",
                "recipient": {
                    "external_id": f"otp{number}",
                    "email": f"otp{number}@example.com",
                    "phone": f"+1628{5550000 + number:07d}",
                },
                "data": {"code": f"{number % 1_000_000:06d}"},
                "idempotency_key": f"otp{number}",
            },
            headers=self.headers,
            timeout=30,
        )
        response.raise_for_status()
        return list(response.json()["notification_ids"])

    def broadcast_post(self, number: int) -> None:
        """Start in-app broadcast `number`; a producer that gives up is reported, not fatal."""
        try:
            response = self.broadcast_request(number)
        except requests.RequestException as error:
            say(f"  in-app broadcast {number} was not accepted: {error}")
            return
        self.broadcast_ids.append(response.json()["id"])
        self.inapp_accepted += self.slices[number]

    def broadcast_request(self, number: int) -> requests.Response:
        response = self.session.post(
            f"{self.api}/broadcasts",
            json={
                "category": "bench-inapp-bulk",
                "audience": {"segment": f"inapp{number}"},
                "data": {"headline": f"Broadcast {number}"},
                "idempotency_key": f"inapp{number}",
            },
            headers=self.headers,
            timeout=60,
        )
        response.raise_for_status()
        return response

    def load(self, *, spread_seconds: float) -> list[threading.Thread]:
        """Bulk load over all five channels, spread over the fault schedule so that every fault
        finds work in flight; the first in-app broadcast is left to the fan-out fault."""

        def bulk(channel: str) -> None:
            try:
                ingest(channel)
            except requests.RequestException as error:
                self.load_stopped.append(channel)
                say(f"  the {channel} load stopped: {error}")

        def ingest(channel: str) -> None:
            self.bench.ingest_bulk(
                session=self.session,
                headers=self.headers,
                count=self.counts[channel],
                prefix=channel,
                threads=2,
                channel=channel,
                spread_seconds=spread_seconds,
            )

        def broadcasts() -> None:
            for number in range(1, INAPP_BROADCASTS):
                time.sleep(spread_seconds / INAPP_BROADCASTS)
                self.broadcast_post(number)

        threads = [
            threading.Thread(target=bulk, args=(channel,), daemon=True)
            for channel in ("email", "sms", "push", "webpush")
        ]
        threads.append(threading.Thread(target=broadcasts, daemon=True))
        for thread in threads:
            thread.start()
        return threads

    # -- faults

    @contextmanager
    def fault(self, name: str) -> Iterator[None]:
        window = Window(started=time.time())
        say(f"fault: {name}")
        yield
        window.ended = time.time()
        self.windows.append(window)

    def catch(self, *, label: str, phase: str, timeout: float) -> int | None:
        """A process of the group `label` caught in `phase`: waiting on the provider ("send"),
        or on the database writing outcomes ("record") or a broadcast's chunk ("fan-out"),
        which the database's sessions show (pg_stat_activity's client port is the worker's)."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.postgres.url, autocommit=True, connect_timeout=3) as connection:
            while time.monotonic() < deadline:
                members = group_members(self.processes.leaders[label])
                sockets = tcp_sockets()
                if phase == "send":
                    for pid in members:
                        fd = waiting_on(pid)
                        inode = socket_inode(pid, fd) if fd is not None else None
                        if inode in sockets and sockets[inode][1] == self.args.sandbox_port:
                            return pid
                else:
                    rows = connection.execute(
                        "select client_port from pg_stat_activity where state in ('active', 'idle in transaction') "
                        "and query ilike any(%s)",
                        (list(CAUGHT_STATEMENTS[phase]),),
                    ).fetchall()
                    ports = {port for (port,) in rows}
                    for pid in members:
                        if ports and ports & ports_of(pid, sockets):
                            return pid
                time.sleep(0.002)
        return None

    def kill_in(self, *, label: str, phase: str) -> None:
        """SIGKILL the process of a worker group caught in `phase`: a pool process, which its
        worker replaces, or a solo worker, which is started again."""
        with self.fault(f"{label} SIGKILLed during {phase}"):
            leader = self.processes.leaders[label]
            pid = self.catch(label=label, phase=phase, timeout=max(2 * self.args.fault_seconds, 5))
            if pid is None:
                pool = [member for member in group_members(leader) if member != leader]
                pid = pool[0] if pool else leader
                say(f"  no process of the {label} was caught during {phase} in time; killing one anyway")
            if pid == leader:
                self.processes.kill(label=label)
                say(f"  killed worker {pid}")
            else:
                os.kill(pid, signal.SIGKILL)
                say(f"  killed pool process {pid} of worker {leader}; the worker starts a new one")
            time.sleep(self.args.fault_seconds)

    def kill_fan_out(self) -> None:
        """A broadcast starts, and the maintenance worker is killed inside one of its chunks."""
        self.broadcast_post(0)
        self.kill_in(label="maintenance worker", phase="fan-out")

    def redis_flushall(self) -> None:
        with self.fault("Redis FLUSHALL"):
            self.redis.flushall()
            time.sleep(self.args.fault_seconds)

    def redis_restart(self) -> None:
        with self.fault("Redis stopped, and started again empty"):
            self.redis.stop()
            time.sleep(min(5.0, self.args.fault_seconds))
            self.redis.start()
            time.sleep(self.args.fault_seconds)

    def postgres_restart(self, *, mode: str) -> None:
        how = "crashed (pg_ctl restart -m immediate)" if mode == "immediate" else "restarted (pg_ctl restart -m fast)"
        with self.fault(f"PostgreSQL {how}"):
            self.postgres.restart(mode=mode)
            time.sleep(self.args.fault_seconds)

    def beat_kill(self) -> None:
        with self.fault("beat SIGKILLed"):
            self.processes.kill(label="beat")
            time.sleep(self.args.fault_seconds)

    def providers_flaky(self) -> None:
        spike_ms = (PROVIDER_TIMEOUT_SECONDS + 2) * 1000
        with self.fault(f"every provider: 20% 503, 10% of answers {spike_ms / 1000:g} s late (timeouts)"):
            for provider in PROVIDER_CHANNELS:
                self.sandbox.faults_set(
                    provider=provider, error_rate=0.2, error_status=503, spike_rate=0.1, spike_ms=spike_ms
                )
            time.sleep(self.args.fault_seconds)
            for provider in PROVIDER_CHANNELS:
                self.sandbox.faults_set(provider=provider)
        time.sleep(self.args.fault_seconds)

    def provider_down(self) -> None:
        with self.fault(f"Postmark down for {self.args.down_seconds:.0f} s (every request 503)"):
            self.sandbox.faults_set(provider="postmark", error_rate=1.0, error_status=503)
            time.sleep(self.args.down_seconds)
            self.sandbox.faults_set(provider="postmark")
            say("  Postmark back")
        time.sleep(self.args.fault_seconds)

    def broker_restart(self) -> None:
        assert self.rabbit
        with self.fault("RabbitMQ stopped and started again (rabbitmqctl stop_app / start_app: the whole node)"):
            self.rabbit.run("stop_app")
            time.sleep(min(5.0, self.args.fault_seconds))
            self.rabbit.run("start_app")
            time.sleep(self.args.fault_seconds)

    def schedule(self) -> list[Callable[[], None]]:
        steps: list[Callable[[], None]] = [
            self.kill_fan_out,
            lambda: self.kill_in(label="bulk workers", phase="send"),
            lambda: self.kill_in(label="bulk workers", phase="record"),
            lambda: self.kill_in(label="critical worker", phase="send"),
            lambda: self.kill_in(label="critical worker", phase="record"),
            self.redis_flushall,
            self.redis_restart,
            lambda: self.postgres_restart(mode="fast"),
            lambda: self.postgres_restart(mode="immediate"),
            self.beat_kill,
            self.providers_flaky,
            self.provider_down,
        ]
        if self.rabbit:
            steps.insert(7, self.broker_restart)
        return steps

    def schedule_seconds(self, steps: int) -> float:
        """About how long the schedule takes: the load is spread over it."""
        return (steps + 2) * self.args.fault_seconds + self.args.down_seconds

    # -- the truth

    def with_database(self, read: Callable[[], Any]) -> Any:
        """A read through Django, reconnecting after the database was restarted."""
        from django.db import OperationalError, connection
        from django.db.utils import InterfaceError

        for _ in range(120):
            try:
                return read()
            except (OperationalError, InterfaceError):
                connection.close()
                time.sleep(1)
        return read()

    def unsettled(self) -> int:
        from apps.deliveries.models import Delivery, DeliveryStatus

        pending = (DeliveryStatus.QUEUED, DeliveryStatus.SENDING, DeliveryStatus.RETRYING, DeliveryStatus.DEFERRED)
        return self.with_database(lambda: Delivery.objects.filter(status__in=pending).count())

    def drain(self) -> float:
        began = time.monotonic()
        deadline = began + self.args.drain_timeout
        while (left := self.unsettled()) and time.monotonic() < deadline:
            say(f"draining: {left} deliveries not final yet") if int(time.monotonic() - began) % 30 == 0 else None
            time.sleep(1)
        if left:
            say(f"gave up waiting after {self.args.drain_timeout:.0f} s: {left} deliveries not final")
        return time.monotonic() - began

    def truth(self, *, accepted: int) -> dict[str, Any]:
        """Lost: accepted notifications missing from the database, or with a delivery that
        never reached the provider (dead letters and never-finished alike)."""
        from django.db.models import Count

        from apps.deliveries.models import Delivery, DeliveryStatus, Notification

        reached = (DeliveryStatus.SENT, DeliveryStatus.DELIVERED, DeliveryStatus.OPENED, DeliveryStatus.CLICKED)
        unreached = Delivery.objects.exclude(status__in=reached)
        by_status = dict(unreached.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
        if by_status:
            say(f"deliveries that did not reach the provider, by status: {by_status}")
        notifications = Notification.objects.count()
        lost = max(0, accepted - notifications) + unreached.values("notification_id").distinct().count()
        return {"notifications": notifications, "lost": lost}

    def accepted_count(self) -> int:
        """What the API acknowledged: the bulk load (where a producer gave up, what it had
        got accepted), the broadcasts' audiences and the OTPs."""
        from apps.deliveries.models import Notification

        bulk = sum(
            Notification.objects.filter(category__key=f"bench-{channel}-bulk").count()
            if channel in self.load_stopped
            else self.counts[channel]
            for channel in ("email", "sms", "push", "webpush")
        )
        return bulk + self.inapp_accepted + len(self.probe.sent)

    def critical_p99(self) -> tuple[float, int]:
        from apps.deliveries.models import Delivery

        fault_began, fault_ended = self.windows[0].started, self.windows[-1].ended
        posted = {notification_id: at for at, notification_id in self.probe.sent if fault_began <= at <= fault_ended}
        rows = Delivery.objects.filter(notification_id__in=list(posted), sent_at__isnull=False).values_list(
            "notification_id", "sent_at"
        )
        latencies = [
            (sent_at.timestamp() - posted[str(notification_id)]) * 1000 for notification_id, sent_at in rows if sent_at
        ]
        return (self.bench.percentile(latencies, 0.99) if latencies else float("nan")), len(latencies)

    def run(self) -> int:
        args, bench = self.args, self.bench
        self.prepare()
        # Producers that send again, under the same idempotency key, whatever 5xx the API answers.
        self.session = bench.producer_session(retry_class=CountedRetry, statuses=(429, 500, 502, 503, 504))
        say(
            "retries for the campaign, every channel: "
            + ", ".join(f"NOTIFY_<CHANNEL>_{name}={value}" for name, value in RETRY.items())
            + "; "
            + ", ".join(f"{name}={value}" for name, value in CLOCKS.items())
            + f", NOTIFY_LEASE_SECONDS={args.lease_seconds:g}"
            + f", NOTIFY_CRITICAL_LEASE_SECONDS={critical_lease_seconds(args=args):g}"
            + f"; provider timeouts {PROVIDER_TIMEOUT_SECONDS:g} s"
        )
        self.processes = fleet_class()(
            web_port=args.web_port,
            sink="sandbox",
            bulk_concurrency=args.bulk_concurrency,
            web_workers=2,
            web_interface="asgi",
            sandbox_args=("--log-size", str(max(100_000, 4 * args.notifications))),
        )
        self.probe = Probe(post=self.otp_post, rate=args.otp_rate)
        steps = self.schedule()
        span = self.schedule_seconds(len(steps))
        try:
            self.processes.start_web()
            self.processes.start_workers()
            self.processes.start_others()
            probe_thread = threading.Thread(target=self.probe.run, daemon=True)
            probe_thread.start()
            say(
                f"load: {args.notifications} bulk notifications over about {span:.0f} s "
                + ", ".join(f"{channel} {count}" for channel, count in self.counts.items())
                + f"; critical OTPs (email + SMS) at {args.otp_rate:g}/s"
            )
            loaders = self.load(spread_seconds=span * 0.8)
            time.sleep(min(10.0, args.fault_seconds))
            for step in steps:
                step()
            for loader in loaders:
                loader.join()
            self.probe.stopping.set()
            probe_thread.join()
            say(
                f"schedule done; {len(self.probe.sent)} critical OTP notifications accepted, {self.probe.refused} refused"
            )
            drain_seconds = self.drain()
            time.sleep(2)  # the last provider callbacks
            stats = self.sandbox.stats()
        finally:
            self.probe.stopping.set()
            self.processes.stop()
        accepted = self.with_database(self.accepted_count)
        truth = self.with_database(lambda: self.truth(accepted=accepted))
        p99, measured = self.with_database(self.critical_p99)
        if "duplicates" not in stats or "visible_duplicates" not in stats:
            die("the sandbox does not count duplicates (GET /_sandbox/stats has no 'duplicates'); update it")
        # A provider that was never sent to has no count yet.
        duplicates = {channel: stats["duplicates"].get(p, 0) for p, channel in PROVIDER_CHANNELS.items()}
        visible = {PROVIDER_CHANNELS[p]: stats["visible_duplicates"].get(p, 0) for p in ("fcm", "webpush")}
        if CountedRetry.causes:
            causes = ", ".join(f"{cause} ×{n}" for cause, n in CountedRetry.causes.most_common())
            say(f"the producers sent requests again after: {causes}")
        if self.processes.crashes:
            say(f"processes that exited by themselves during the campaign: {', '.join(self.processes.crashes)}")
        missed = (
            truth["lost"] > 0
            or duplicates["email"] > 0
            or duplicates["sms"] > 0
            or visible["push"] > 0
            or visible["webpush"] > 0
        )
        print(
            f"chaos: accepted {accepted}, lost {truth['lost']}, "
            f"duplicates at the provider {' '.join(f'{c}={n}' for c, n in duplicates.items())}, "
            f"visible duplicates {' '.join(f'{c}={n}' for c, n in visible.items())}, "
            f"time to drain {drain_seconds:.0f} s, critical P99 during the faults {p99:.0f} ms ({measured} sends), "
            f"{'targets MISSED' if missed else 'targets met'}",
            flush=True,
        )
        return 1 if missed else 0


def fleet_class() -> type:
    import bench

    class Fleet(bench.Processes):
        """The benchmark's processes, with the maintenance worker and beat, under a supervisor:
        a process that exits is started again, as an operator's supervisor (systemd, Docker's
        restart policy) would. Exits the campaign did not cause are reported."""

        def __init__(self, *, web_port: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.log_prefix = f"chaos-{web_port}"
            # What each process was started with, to start it again the same way.
            self.commands: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}
            self.current: dict[str, subprocess.Popen] = {}
            self.killed: set[int] = set()  # leaders the campaign killed
            self.crashes: list[str] = []
            self.lock = threading.Lock()
            self.supervising = threading.Event()

        @property
        def leaders(self) -> dict[str, int]:
            return {label: child.pid for label, child in self.current.items()}

        def spawn(self, label: str, *command: str, **options: Any) -> subprocess.Popen:
            child = super().spawn(label, *command, **options)
            self.commands[label], self.current[label] = (command, options), child
            return child

        def start_others(self) -> None:
            self.spawn("maintenance worker", *bench.celery_worker(group="maintenance"))
            schedule = STATE / f"beat-schedule-{self.log_prefix}"
            self.spawn("beat", *bench.celery_command("beat", "--pidfile=", "-s", str(schedule)))
            self.supervising.set()
            threading.Thread(target=self.supervise, daemon=True).start()

        def kill(self, *, label: str) -> int:
            """SIGKILL a whole process (a worker with its pool); the supervisor starts it again."""
            with self.lock:
                leader = self.current[label].pid
                self.killed.add(leader)
                os.killpg(leader, signal.SIGKILL)
            return leader

        def supervise(self) -> None:
            while self.supervising.is_set():
                with self.lock:
                    for label, child in list(self.current.items()):
                        if child.poll() is None or not self.supervising.is_set():
                            continue
                        if child.pid not in self.killed:
                            self.crashes.append(label)
                            say(f"  {label} (pid {child.pid}) exited by itself, code {child.returncode}; started again")
                        else:
                            say(f"  {label} started again")
                        # Whatever its pool left behind goes with it.
                        with suppress(ProcessLookupError):
                            os.killpg(child.pid, signal.SIGKILL)
                        command, options = self.commands[label]
                        self.spawn(label, *command, **options)
                time.sleep(0.5)

        def stop(self) -> None:
            self.supervising.clear()
            with self.lock:
                super().stop()

    return Fleet


if __name__ == "__main__":
    main()
