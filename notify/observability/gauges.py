"""Gauges that need the database, the broker or the circuit storage: computed by a periodic
task into Redis, and read back by the web /metrics without a query.

A scrape must stay cheap whatever the backlog, and Prometheus may scrape every web process
every few seconds: so the figures are computed once per NOTIFY_GAUGES_INTERVAL_SECONDS by
beat's task (guarded by a Redis lock, so that several beats or a backed-up queue compute
them at most once per interval), with bounded, index-backed queries."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pybreaker
from django.conf import settings
from django.db import connection
from django.db.models import Count
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from apps.audiences.models import Broadcast, BroadcastState
from apps.deliveries.models import CLAIMABLE_STATUSES, DeadLetter, Delivery, DeliveryStatus, Provider
from apps.ops.models import RollupCursor
from apps.tenants.models import Tenant
from config.queues import ALL_QUEUES, CHANNELS, PRIORITIES
from notify.observability.canary import canary_latest
from notify.observability.metrics import DB_GAUGES, provider_label
from notify.pipeline.dispatch import broker_queue_depths
from notify.policy.caps import redis_client
from notify.resilience.providers import breaker_state

logger = logging.getLogger(__name__)

GAUGES_KEY = "notify:metrics:gauges"
_LOCK_KEY = "notify:metrics:gauges:lock"
# One sample: (metric name, {label: value}, value).
Sample = tuple[str, dict[str, str], float]

# The states whose rows the partial indexes on deliveries cover (models.py: claimable, leased,
# standby): each is counted through its own index, and at most NOTIFY_GAUGES_COUNT_CAP rows.
BACKLOG_STATUSES = (*CLAIMABLE_STATUSES, DeliveryStatus.SENDING, DeliveryStatus.STANDBY)
CIRCUIT_STATES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}
RUNNING_BROADCASTS = (BroadcastState.FANNING_OUT, BroadcastState.SENDING, BroadcastState.PAUSED)


def queue_depth_samples(*, now: datetime) -> Iterator[Sample]:
    """Task messages waiting in every queue, as the broker counts them."""
    for queue, depth in broker_queue_depths(queues=ALL_QUEUES).items():
        yield "notify_queue_depth", {"queue": queue}, float(depth)


def delivery_samples(*, now: datetime) -> Iterator[Sample]:
    """The oldest due delivery's age and the backlog, per channel and priority."""
    cap = settings.NOTIFY_GAUGES_COUNT_CAP
    table = Delivery._meta.db_table
    # One walk of the claimable partial index in next_attempt_at order, stopped after `cap`
    # rows: exact for every channel and priority whose oldest due delivery is among the `cap`
    # oldest (a walk per pair would read the whole due backlog for each pair that has none).
    oldest_sql = (
        "SELECT channel, priority, min(next_attempt_at) FROM "
        f"(SELECT channel, priority, next_attempt_at FROM {table} WHERE status IN ({', '.join(['%s'] * len(CLAIMABLE_STATUSES))}) "
        "AND next_attempt_at <= %s "
        "ORDER BY next_attempt_at LIMIT %s) AS due GROUP BY channel, priority"
    )
    with connection.cursor() as cursor:
        cursor.execute(oldest_sql, [*(str(status) for status in CLAIMABLE_STATUSES), now, cap])
        oldest = {(channel, priority): at for channel, priority, at in cursor.fetchall()}
    for channel in CHANNELS:
        for priority in PRIORITIES:
            at = oldest.get((channel, priority))
            age = (now - at).total_seconds() if at else 0.0
            yield "notify_oldest_queued_delivery_seconds", {"channel": channel, "priority": priority}, age
    # The LIMIT inside bounds the work however large a backlog grows.
    sql = (
        "SELECT channel, priority, count(*) FROM "
        f"(SELECT channel, priority FROM {table} WHERE status = %s LIMIT %s) AS backlog "
        "GROUP BY channel, priority"
    )
    for status in BACKLOG_STATUSES:
        with connection.cursor() as cursor:
            cursor.execute(sql, [str(status), cap])
            counts = {(channel, priority): n for channel, priority, n in cursor.fetchall()}
        for channel in CHANNELS:
            for priority in PRIORITIES:
                labels = {"channel": channel, "priority": priority, "status": str(status)}
                yield "notify_deliveries_backlog", labels, float(counts.get((channel, priority), 0))
    pending = dict(
        DeadLetter.objects.filter(replayed_at__isnull=True)
        .values_list("channel")
        .annotate(n=Count("pk"))
        .order_by()
        .values_list("channel", "n")
    )
    for channel in CHANNELS:
        yield "notify_dead_letters_pending", {"channel": channel}, float(pending.get(channel, 0))


def circuit_samples(*, now: datetime) -> Iterator[Sample]:
    """Each provider account's circuit, as every worker sees it in Redis; the worst state of
    accounts that share a name (several tenants' own 'postmark')."""
    worst: dict[tuple[str, str], int] = {}
    for provider in Provider.objects.all():
        key = (provider_label(provider_name=provider.name), provider.channel)
        worst[key] = max(worst.get(key, 0), CIRCUIT_STATES.get(breaker_state(provider), 0))
    for (name, channel), state in worst.items():
        yield "notify_circuit_state", {"provider": name, "channel": channel}, float(state)


def broadcast_samples(*, now: datetime) -> Iterator[Sample]:
    """Broadcasts by state, and what the running ones have left to send (from their rollups)."""
    by_state = dict(Broadcast.objects.values_list("state").annotate(n=Count("pk")).order_by().values_list("state", "n"))
    for state in BroadcastState.values:
        yield "notify_broadcasts", {"state": state}, float(by_state.get(state, 0))
    remaining = 0
    for planned, counts in Broadcast.objects.filter(state__in=RUNNING_BROADCASTS).values_list(
        "planned_count", "counts"
    ):
        finished = sum(int(n) for name, n in (counts or {}).items() if name not in ("pending", "deferred"))
        remaining += max(planned - finished, 0)
    yield "notify_broadcast_remaining", {}, float(remaining)


def runaway_samples(*, now: datetime) -> Iterator[Sample]:
    """Tenants the runaway-send guard holds."""
    yield "notify_runaway_holds", {}, float(Tenant.objects.filter(runaway_paused_at__isnull=False).count())


def webhook_samples(*, now: datetime) -> Iterator[Sample]:
    """Webhook messages waiting to be delivered to enabled endpoints (the partial index of due rows)."""
    from apps.webhooks.models import MessageStatus, WebhookMessage

    pending = WebhookMessage.objects.filter(status=MessageStatus.PENDING, endpoint__enabled=True).count()
    yield "notify_webhook_messages_pending", {}, float(pending)


def rollup_samples(*, now: datetime) -> Iterator[Sample]:
    """How far the rollups' cursor trails the clock (the settling time when they keep up)."""
    counted_until = RollupCursor.objects.values_list("counted_until", flat=True).first()
    if counted_until is not None:
        yield "notify_rollup_lag_seconds", {}, max((now - counted_until).total_seconds(), 0.0)


def canary_samples(*, now: datetime) -> Iterator[Sample]:
    """Each channel's canary: whether its latest settled run arrived in time, when one last
    did, and how long its latest settled run took to each stage."""
    for result in canary_latest():
        labels = {"channel": result.channel}
        if result.success is not None:
            yield "notify_canary_success", labels, float(result.success)
        if result.last_success_at is not None:
            yield "notify_canary_last_success_timestamp_seconds", labels, result.last_success_at.timestamp()
        for stage, seconds in (("sent", result.sent_seconds), ("delivered", result.delivered_seconds)):
            if seconds is not None:
                yield "notify_canary_seconds", {**labels, "stage": stage}, float(seconds)


# Every source of the gauges, in order. A new gauge: declare it in metrics.DB_GAUGES and add
# its source here. A source that fails is logged and skipped: the others still publish.
GAUGE_SOURCES: tuple[Callable[..., Iterator[Sample]], ...] = (
    queue_depth_samples,
    delivery_samples,
    circuit_samples,
    broadcast_samples,
    runaway_samples,
    webhook_samples,
    canary_samples,
    rollup_samples,
)


def gauges_compute(*, now: datetime | None = None, force: bool = False) -> bool:
    """Compute every gauge and store them in Redis; False when they were computed less than
    an interval ago (another beat, a backed-up queue) and `force` is not set."""
    interval = settings.NOTIFY_GAUGES_INTERVAL_SECONDS
    client = redis_client()
    if not force and not client.set(_LOCK_KEY, "1", nx=True, px=max(int(interval * 1000) - 500, 1000)):
        return False
    now = now or timezone.now()
    samples: list[Sample] = []
    for source in GAUGE_SOURCES:
        try:
            samples.extend(source(now=now))
        except Exception:  # noqa: BLE001 - one unreadable part must not blank the others
            logger.exception("gauge source %s failed", source.__name__)
    samples.append(("notify_gauges_computed_timestamp_seconds", {}, now.timestamp()))
    unknown = {name for name, _, _ in samples} - DB_GAUGES.keys()
    if unknown:
        raise ValueError(f"gauges not declared in metrics.DB_GAUGES: {sorted(unknown)}")
    # Kept a while past the interval: a stopped beat shows as an old computed timestamp,
    # then as the gauges vanishing, rather than as figures frozen for ever.
    client.set(GAUGES_KEY, json.dumps(samples), ex=max(int(interval * 20), 300))
    return True


class StoredGaugesCollector(Collector):
    """The gauges as gauges_compute() last stored them: one Redis read, no query."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stored = redis_client().get(GAUGES_KEY)
        except Exception:  # noqa: BLE001 - the process's own metrics are still worth serving
            logger.warning("the stored gauges could not be read", exc_info=True)
            return
        samples: list[Any] = json.loads(stored) if stored else []
        families = {
            name: GaugeMetricFamily(name, spec.help, labels=list(spec.labels)) for name, spec in DB_GAUGES.items()
        }
        for name, labels, value in samples:
            if name in families:  # a gauge stored by an older release and since removed is left out
                families[name].add_metric([labels.get(label, "") for label in DB_GAUGES[name].labels], value)
        yield from (family for family in families.values() if family.samples)


def web_metrics_text() -> tuple[bytes, str]:
    """The web /metrics page: every process of the multiprocess directory, plus the stored gauges."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(StoredGaugesCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
