"""Every Prometheus metric of the service, and the few functions the code counts through.

Web and worker processes count in prometheus-client's multiprocess mode (each process writes
its own memory-mapped files under PROMETHEUS_MULTIPROC_DIR; see exposition.py). Gauges that
need the database are not kept here per process: a periodic task computes them into Redis
(gauges.py) and the web /metrics reads them back; DB_GAUGES declares them.

Labels are bounded: channel, priority, state and outcome are fixed sets; provider is a
Provider account's name ("default" for the configured one); tenant is the tenant's slug, or
"all" with NOTIFY_METRICS_TENANT_LABEL off; category is the category's key. Never an id.
With NOTIFY_METRICS_ENABLED off every function here returns at once (the benchmark's
baseline)."""

from __future__ import annotations

import atexit
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID

from django.conf import settings
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram

from notify.observability.exposition import process_exited

if TYPE_CHECKING:
    from apps.catalog.models import Category
    from apps.deliveries.models import Delivery
    from apps.tenants.models import Tenant
    from notify.channels.base import SendOutcome
    from notify.pipeline.record import HistoryRow

ENABLED: bool = settings.NOTIFY_METRICS_ENABLED

# From 10 ms to an hour: a critical send takes tens of milliseconds, a bulk one or a retried
# one minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# A provider call: a single message in milliseconds, a batch of 500 in seconds.
PROVIDER_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

events_accepted = PromCounter(
    "notify_events_accepted", "Events accepted by the API (new, not idempotent replays).", ["tenant", "category"]
)
notifications_accepted = PromCounter(
    "notify_notifications_accepted",
    "Notifications (one per recipient) planned from accepted events.",
    ["tenant", "category", "priority"],
)
api_requests = PromCounter(
    "notify_api_requests",
    "HTTP requests answered, by the URL pattern's route (never the raw path) and status code.",
    ["method", "route", "status"],
)
deliveries = PromCounter(
    "notify_deliveries",
    "Deliveries reaching a state (sent, delivered, retrying, dead, failed, suppressed, deferred, ...), "
    "counted once per state reached.",
    ["channel", "provider", "priority", "category", "tenant", "state"],
)
provider_calls = PromCounter(
    "notify_provider_calls",
    "Messages handed to a provider, by outcome: ok, transient, permanent, or error (the call raised).",
    ["channel", "provider", "outcome"],
)
provider_call_seconds = Histogram(
    "notify_provider_call_seconds",
    "Duration of one call to a provider (a single message or a batch).",
    ["channel", "provider"],
    buckets=PROVIDER_CALL_BUCKETS,
)
retries = PromCounter("notify_retries", "Deliveries scheduled for another attempt.", ["channel", "priority"])
dead_letters = PromCounter("notify_dead_letters", "Deliveries moved to the dead-letter queue.", ["channel"])
retention_purged = PromCounter(
    "notify_retention_purged", "Rows the retention purge deleted: notifications, deliveries, events.", ["kind"]
)
audit_entries = PromCounter(
    "notify_audit_entries", "Entries written to the audit log, by actor type (staff, api_key, system).", ["actor"]
)
accept_to_sent_seconds = Histogram(
    "notify_accept_to_sent_seconds",
    "From the notification's acceptance to the provider taking the message.",
    ["channel", "priority"],
    buckets=LATENCY_BUCKETS,
)
accept_to_delivered_seconds = Histogram(
    "notify_accept_to_delivered_seconds",
    "From the notification's acceptance to the provider reporting it delivered.",
    ["channel", "priority"],
    buckets=LATENCY_BUCKETS,
)
rate_limit_waits = PromCounter(
    "notify_rate_limit_waits", "Waits for a provider's rate-limit tokens before a send.", ["provider", "channel"]
)
rate_limit_wait_seconds = PromCounter(
    "notify_rate_limit_wait_seconds", "Seconds spent waiting for providers' rate limits.", ["provider", "channel"]
)
inbox_items_swept = PromCounter(
    "notify_inbox_items_swept",
    "Inbox items the sweeper brought back from a snooze (woken) or deleted after their expiry (purged).",
    ["action"],
)
# Summed over the live web processes: a process that exits takes its sockets with it (its
# file is removed as it exits, below; a pool child's by the worker_process_shutdown signal).
websocket_connections = Gauge(
    "notify_websocket_connections", "Open inbox WebSocket connections.", multiprocess_mode="livesum"
)
atexit.register(lambda: process_exited(pid=os.getpid()))


webhook_deliveries = PromCounter(
    "notify_webhook_deliveries",
    "Webhook messages by the outcome of the POST that carried them: delivered, retrying, failed "
    "(retries spent) or circuit_open (not tried).",
    ["outcome"],
)


class GaugeSpec(NamedTuple):
    help: str
    labels: tuple[str, ...]


# Computed from the database, the broker and the circuit storage by the periodic task
# `notify.metrics_gauges` (gauges.py) into Redis, and only read by a scrape.
DB_GAUGES: dict[str, GaugeSpec] = {
    "notify_queue_depth": GaugeSpec("Task messages waiting in each Celery queue on the broker.", ("queue",)),
    "notify_oldest_queued_delivery_seconds": GaugeSpec(
        "Age of the oldest due, unclaimed delivery (queued, retrying or deferred), since it became due.",
        ("channel", "priority"),
    ),
    "notify_deliveries_backlog": GaugeSpec(
        "Deliveries not yet finished, by status (capped at NOTIFY_GAUGES_COUNT_CAP per status).",
        ("channel", "priority", "status"),
    ),
    "notify_dead_letters_pending": GaugeSpec("Dead letters not replayed yet.", ("channel",)),
    "notify_circuit_state": GaugeSpec(
        "Each provider's circuit breaker: 0 closed, 1 half-open, 2 open (the worst of same-named accounts).",
        ("provider", "channel"),
    ),
    "notify_broadcasts": GaugeSpec("Broadcasts by state.", ("state",)),
    "notify_broadcast_remaining": GaugeSpec(
        "Deliveries planned but not finished over the broadcasts still running.", ()
    ),
    "notify_webhook_messages_pending": GaugeSpec("Webhook messages waiting for enabled endpoints.", ()),
    "notify_runaway_holds": GaugeSpec("Tenants paused by the runaway-send guard.", ()),
    "notify_rollup_lag_seconds": GaugeSpec(
        "How far behind the clock the dashboard's rollups have counted the delivery history.", ()
    ),
    # Filled from the canary's own results (see gauges.py, GAUGE_SOURCES).
    "notify_canary_success": GaugeSpec("1 when the channel's latest canary arrived in time, else 0.", ("channel",)),
    "notify_canary_last_success_timestamp_seconds": GaugeSpec(
        "When the channel's canary last arrived in time (Unix time).", ("channel",)
    ),
    "notify_canary_seconds": GaugeSpec(
        "The channel's latest settled canary: seconds from its start to sent, and to delivered.",
        ("channel", "stage"),
    ),
    "notify_gauges_computed_timestamp_seconds": GaugeSpec(
        "When these gauges were last computed (Unix time): a stale value means beat or the task stopped.", ()
    ),
}


# --- Label values -----------------------------------------------------------------------

# Tenants' slugs and categories' keys by id, learnt from the rows a batch already read:
# the hot path never queries for a label. Bounded by the number of tenants and categories.
_tenant_slugs: dict[UUID, str] = {}
_category_keys: dict[int, str] = {}


def _tenant_label(tenant_id: UUID) -> str:
    if not settings.NOTIFY_METRICS_TENANT_LABEL:
        return "all"
    slug = _tenant_slugs.get(tenant_id)
    if slug is None:
        from apps.tenants.models import Tenant

        slug = Tenant.objects.filter(pk=tenant_id).values_list("slug", flat=True).first() or "unknown"
        _tenant_slugs[tenant_id] = slug
    return slug


def _category_label(category_id: int) -> str:
    key = _category_keys.get(category_id)
    if key is None:
        from apps.catalog.models import Category

        key = Category.objects.filter(pk=category_id).values_list("key", flat=True).first() or "unknown"
        _category_keys[category_id] = key
    return key


def labels_learn(*, tenants: Iterable[Tenant] = (), categories: Iterable[Category] = ()) -> None:
    """Remember the label values of rows already read, so that counting needs no query."""
    if not ENABLED:
        return
    _tenant_slugs.update((t.pk, t.slug) for t in tenants)
    _category_keys.update((c.pk, c.key) for c in categories)


def provider_label(*, provider_name: str) -> str:
    """A Provider account's name; "default" for the provider the settings configure."""
    return provider_name or "default"


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# --- Counting ---------------------------------------------------------------------------


def api_request_count(*, method: str, route: str, status: int) -> None:
    """One answered HTTP request; `route` is the URL pattern, never the path."""
    if ENABLED:
        api_requests.labels(method if method in _METHODS else "other", route, str(status)).inc()


def events_accepted_count(*, tenant: Tenant, accepted: Sequence[tuple[Category, Sequence[Any]]]) -> None:
    """Events accepted by one call, each with its category and the notifications it made."""
    if not ENABLED or not accepted:
        return
    labels_learn(tenants=[tenant])
    tenant_label = _tenant_label(tenant.pk)
    for category, event_notifications in accepted:
        events_accepted.labels(tenant_label, category.key).inc()
        for priority, count in Counter(n.priority for n in event_notifications).items():
            notifications_accepted.labels(tenant_label, category.key, priority).inc(count)


def outcomes_count(
    *,
    recorded: Sequence[HistoryRow],
    deliveries: dict[UUID, Delivery],
    outcomes: Sequence[SendOutcome],
    now: datetime,
) -> None:
    """Count the states a recorded chunk reached, grouped (one increment per group, not per
    delivery), and observe accept -> sent for the sent ones."""
    if not ENABLED or not recorded:
        return
    from apps.deliveries.models import provider_name_of  # metrics load before the models do

    by_id = {o.delivery_id: o for o in outcomes}
    states: Counter[tuple[str, str, str, str, str, str]] = Counter()
    sent_latencies: list[tuple[str, str, float]] = []
    for row in recorded:
        delivery = deliveries[row.delivery_id]
        outcome = by_id.get(row.delivery_id)
        notification = delivery.notification
        provider = "none"
        if outcome is not None and not outcome.withheld:
            provider = provider_label(provider_name=provider_name_of(provider_status=outcome.provider_status))
        states[
            (
                delivery.channel,
                provider,
                delivery.priority,
                _category_label(notification.category_id),
                _tenant_label(notification.tenant_id),
                row.status,
            )
        ] += 1
        if row.status == "sent":
            sent_latencies.append(
                (delivery.channel, delivery.priority, (now - notification.created_at).total_seconds())
            )
    _states_count(states=states)
    for channel, priority, seconds in sent_latencies:
        accept_to_sent_seconds.labels(channel, priority).observe(seconds)


def _states_count(*, states: Counter[tuple[str, str, str, str, str, str]]) -> None:
    retried: Counter[tuple[str, str]] = Counter()
    for labels, count in states.items():
        deliveries.labels(*labels).inc(count)
        channel, _, priority, _, _, state = labels
        if state == "retrying":
            retried[(channel, priority)] += count
    for (channel, priority), count in retried.items():
        retries.labels(channel, priority).inc(count)


def dead_letters_count(*, channels: Sequence[str]) -> None:
    """Dead letters committed, one channel per dead letter."""
    if ENABLED:
        for channel, count in Counter(channels).items():
            dead_letters.labels(channel).inc(count)


def feedback_count(*, delivery: Delivery, state: str, provider_name: str | None, now: datetime) -> None:
    """A state reached through a provider's report; delivered also observes accept -> delivered."""
    if not ENABLED:
        return
    notification = delivery.notification
    provider = "unknown" if provider_name is None else provider_label(provider_name=provider_name)
    labels = (
        delivery.channel,
        provider,
        delivery.priority,
        _category_label(notification.category_id),
        _tenant_label(notification.tenant_id),
        state,
    )
    _states_count(states=Counter({labels: 1}))
    if state == "delivered":
        seconds = (now - notification.created_at).total_seconds()
        accept_to_delivered_seconds.labels(delivery.channel, delivery.priority).observe(seconds)


@contextmanager
def provider_call(*, channel: str, provider_name: str, messages: int) -> Iterator[list[SendOutcome]]:
    """Time one call to a provider and count its messages by outcome: the caller puts the
    call's outcomes in the yielded list; a call that raises counts its messages as errors."""
    if not ENABLED:
        yield []
        return
    provider = provider_label(provider_name=provider_name)
    outcomes: list[SendOutcome] = []
    started = time.perf_counter()
    try:
        yield outcomes
    except BaseException:
        provider_calls.labels(channel, provider, "error").inc(messages)
        raise
    finally:
        provider_call_seconds.labels(channel, provider).observe(time.perf_counter() - started)
    tally = Counter("ok" if o.failure is None else o.failure.value for o in outcomes if not o.withheld)
    for outcome, count in tally.items():
        provider_calls.labels(channel, provider, outcome).inc(count)


def rate_limit_wait_count(*, provider_name: str, channel: str, seconds: float) -> None:
    """A wait of `seconds` for a provider's rate-limit tokens."""
    if ENABLED:
        provider = provider_label(provider_name=provider_name)
        rate_limit_waits.labels(provider, channel).inc()
        rate_limit_wait_seconds.labels(provider, channel).inc(seconds)


def inbox_sweep_count(*, woken: int, purged: int) -> None:
    """What one sweep did to inbox items."""
    if ENABLED:
        if woken:
            inbox_items_swept.labels("woken").inc(woken)
        if purged:
            inbox_items_swept.labels("purged").inc(purged)


def websocket_opened() -> None:
    """An inbox WebSocket was accepted."""
    if ENABLED:
        websocket_connections.inc()


def websocket_closed() -> None:
    """An inbox WebSocket that websocket_opened() counted has closed."""
    if ENABLED:
        websocket_connections.dec()


def webhook_deliveries_count(*, outcome: str, messages: int) -> None:
    """Webhook messages that one POST (or an open circuit) settled, by outcome."""
    if ENABLED and messages:
        webhook_deliveries.labels(outcome).inc(messages)
