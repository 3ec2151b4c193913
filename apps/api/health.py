"""Liveness and readiness probes for load balancers and container orchestrators.

/healthz says only that the process answers; /readyz says whether it can do its work: the
database, Redis and the broker answer, and every migration is applied. Neither reveals more than
the name of the failing part.

They are answered by a middleware at the head of the stack rather than by URL routes, because a
probe calls a container's own address: host validation (ALLOWED_HOSTS names the public host)
and the HTTPS redirect would refuse it before any view ran."""

from collections.abc import Callable

import redis
from django.conf import settings
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from kombu import Connection

# A probe that waits longer than its caller's timeout answers nothing useful.
PROBE_TIMEOUT_SECONDS = 2

# Migrations only change with a new release, which restarts the process, so once every
# migration is applied this process need not load the migration graph again.
_migrations_applied = False


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _migrations() -> None:
    global _migrations_applied
    if _migrations_applied:
        return
    executor = MigrationExecutor(connection)
    pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if pending:
        raise RuntimeError(f"{len(pending)} migrations not applied")
    _migrations_applied = True


def _redis() -> None:
    # A fresh client with a short timeout: the shared clients wait far longer than a probe may.
    client = redis.Redis.from_url(
        settings.NOTIFY_REDIS_URL, socket_timeout=PROBE_TIMEOUT_SECONDS, socket_connect_timeout=PROBE_TIMEOUT_SECONDS
    )
    try:
        client.ping()
    finally:
        client.close()


def _broker() -> None:
    with Connection(settings.CELERY_BROKER_URL, connect_timeout=PROBE_TIMEOUT_SECONDS) as broker:
        broker.ensure_connection(max_retries=0, timeout=PROBE_TIMEOUT_SECONDS)


READINESS_CHECKS: dict[str, Callable[[], None]] = {
    "database": _database,
    "migrations": _migrations,
    "redis": _redis,
    "broker": _broker,
}


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    for name, check in READINESS_CHECKS.items():
        # Without the database the migration check would only wait for the same failure again.
        if name == "migrations" and checks.get("database") != "ok":
            checks[name] = "skipped"
            continue
        try:
            check()
        except Exception as error:  # noqa: BLE001 - any failure means "not ready"; the kind is named below
            checks[name] = f"failing: {type(error).__name__}"
        else:
            checks[name] = "ok"
    failing = [name for name, state in checks.items() if state.startswith("failing")]
    return JsonResponse(
        {"status": "not ready" if failing else "ready", "failing": failing, "checks": checks},
        status=503 if failing else 200,
    )


PROBES: dict[str, Callable[[HttpRequest], HttpResponse]] = {"/healthz": healthz, "/readyz": readyz}


class ProbeMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        probe = PROBES.get(request.path_info)
        return probe(request) if probe else self.get_response(request)
