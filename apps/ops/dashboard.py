"""What the admin's home page shows: delivery figures from the rollups, the stored gauges, the
canary and the open alerts, and the charts drawn as inline SVG.

The page never reads the delivery history in bulk: the figures come from the rollups
(notify/observability/rollups.py) and the gauges that beat stores in Redis
(notify/observability/gauges.py). The top failure reasons read the window's failed history
rows, at most FAILURE_SAMPLE of them."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from django.db import connection
from django.db.models import Count
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from apps.deliveries.models import DeadLetter, DeliveryEvent, DeliveryStatus, Provider
from apps.ops.models import AlertFiring, DeliveryRollupHour, DeliveryRollupMinute
from notify.observability.canary import CanaryResult, canary_latest
from notify.observability.gauges import GAUGES_KEY
from notify.observability.rollups import LATENCY_BOUNDS_MS
from notify.policy.caps import redis_client
from notify.resilience.providers import breaker_state

logger = logging.getLogger(__name__)

# Each period: its span, and the step of its charts.
PERIODS: dict[str, tuple[timedelta, timedelta]] = {
    "hour": (timedelta(hours=1), timedelta(minutes=1)),
    "day": (timedelta(days=1), timedelta(hours=1)),
    "week": (timedelta(days=7), timedelta(hours=6)),
}
DEFAULT_PERIOD = "day"
# The outcomes the tables show, in order.
OUTCOMES = ("sent", "delivered", "failed", "bounced", "suppressed", "deferred")
SUCCESS_OUTCOMES = ("delivered", "opened", "clicked")
FAILED_OUTCOMES = ("failed", "dead", "bounced", "complained", "unsubscribed")
FAILURE_SAMPLE = 5000
TOP_REASONS = 10


@dataclass
class FigureRow:
    """One channel's (or one provider's) figures over the period, with the links behind them."""

    channel: str
    provider: str
    counts: dict[str, int]
    links: dict[str, str]

    @property
    def success_rate(self) -> float | None:
        """Delivered (or sent, where nothing reports delivery) over everything that finished."""
        finished = self.counts.get("sent", 0) + sum(self.counts.get(name, 0) for name in FAILED_OUTCOMES)
        if not finished:
            return None
        return 1 - sum(self.counts.get(name, 0) for name in FAILED_OUTCOMES) / finished

    def cells(self) -> list[tuple[str, int]]:
        return [(self.links.get(name, ""), self.counts.get(name, 0)) for name in OUTCOMES]


@dataclass
class Dashboard:
    period: str
    since: datetime
    channels: list[FigureRow]
    providers: list[FigureRow]
    latency: dict[str, tuple[float | None, float | None]]
    throughput_svg: SafeString
    latency_svg: SafeString
    failure_reasons: list[tuple[str, int]]
    dead_letters: dict[str, int]
    circuits_open: list[str]
    installation: bool
    queue_depth: dict[str, float] = field(default_factory=dict)
    oldest_queued_seconds: dict[str, float] = field(default_factory=dict)
    canary: list[CanaryResult] = field(default_factory=list)
    alerts: list[AlertFiring] = field(default_factory=list)
    dead_letters_link: str = ""


def period_parse(*, value: str | None) -> str:
    """The period asked for, or the default for anything else."""
    return value if value in PERIODS else DEFAULT_PERIOD


def _rollup_table(*, period: str) -> str:
    """Minutes for the last hour; hours for longer, so that a page reads a few thousand rows."""
    model = DeliveryRollupMinute if period == "hour" else DeliveryRollupHour
    return model._meta.db_table


def _scope_sql(*, tenant_id: UUID | None) -> tuple[str, list[Any]]:
    return ("AND tenant_id = %s", [tenant_id]) if tenant_id is not None else ("", [])


def _rows(*, sql: str, params: Sequence[Any]) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def percentile_estimate(*, histogram: dict[int, int], quantile: float) -> float | None:
    """The upper bound (ms) of the histogram bucket the quantile falls in; None when empty."""
    total = sum(histogram.values())
    if not total:
        return None
    wanted = quantile * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= wanted:
            # width_bucket(): bucket i holds latencies below bound i (and the last, above all).
            return float(LATENCY_BOUNDS_MS[min(bucket, len(LATENCY_BOUNDS_MS) - 1)])
    return float(LATENCY_BOUNDS_MS[-1])


def _delivery_link(*, since: datetime, **filters: str) -> str:
    query = {**filters, "updated_at__gte": since.replace(microsecond=0).isoformat()}
    return f"{reverse('admin:deliveries_delivery_changelist')}?{urlencode(query)}"


def dashboard_build(*, tenant_id: UUID | None, period: str, now: datetime | None = None) -> Dashboard:
    """The dashboard for one tenant (None: the installation, for superusers) over the period."""
    now = now or timezone.now()
    span, step = PERIODS[period]
    since = now - span
    table = _rollup_table(period=period)
    if table == DeliveryRollupHour._meta.db_table:
        since = since.replace(minute=0, second=0, microsecond=0)  # the whole first hour
    scope, scope_params = _scope_sql(tenant_id=tenant_id)
    counted = _rows(
        sql=f"SELECT channel, provider, outcome, sum(count) FROM {table} WHERE bucket >= %s {scope} "
        "GROUP BY channel, provider, outcome",
        params=[since, *scope_params],
    )
    by_channel: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_provider: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for channel, provider, outcome, total in counted:
        by_channel[channel][outcome] += int(total)
        by_provider[(channel, provider)][outcome] += int(total)
    channels = [
        FigureRow(
            channel=channel,
            provider="",
            counts=dict(counts),
            links={name: _delivery_link(since=since, channel=channel, status=name) for name in OUTCOMES},
        )
        for channel, counts in sorted(by_channel.items())
    ]
    providers = [
        FigureRow(
            channel=channel,
            provider=provider or "(configured)",
            counts=dict(counts),
            links={name: _delivery_link(since=since, channel=channel, status=name) for name in OUTCOMES},
        )
        for (channel, provider), counts in sorted(by_provider.items())
    ]
    histograms: dict[str, dict[int, int]] = defaultdict(dict)
    for priority, bucket, total in _rows(
        sql=f"SELECT priority, latency_bucket, sum(count) FROM {table} WHERE bucket >= %s AND outcome = 'sent' "
        f"{scope} GROUP BY priority, latency_bucket",
        params=[since, *scope_params],
    ):
        histograms[priority][int(bucket)] = int(total)
    latency = {
        priority: (
            percentile_estimate(histogram=histogram, quantile=0.5),
            percentile_estimate(histogram=histogram, quantile=0.99),
        )
        for priority, histogram in sorted(histograms.items())
    }
    throughput_svg, latency_svg = _charts(table=table, since=since, now=now, step=step, tenant_id=tenant_id)
    installation = tenant_id is None
    dashboard = Dashboard(
        period=period,
        since=since,
        channels=channels,
        providers=providers,
        latency=latency,
        throughput_svg=throughput_svg,
        latency_svg=latency_svg,
        failure_reasons=failure_reasons_top(tenant_id=tenant_id, since=since),
        dead_letters=_dead_letters(tenant_id=tenant_id),
        circuits_open=_circuits_open(tenant_id=tenant_id),
        installation=installation,
        dead_letters_link=f"{reverse('admin:deliveries_deadletter_changelist')}?replayed_at__isnull=True",
    )
    if installation:
        # The gauges, the canary and the alerts are the installation's, not any tenant's.
        dashboard.queue_depth, dashboard.oldest_queued_seconds = _stored_gauges()
        dashboard.canary = canary_latest()
        dashboard.alerts = list(AlertFiring.objects.filter(resolved_at__isnull=True).select_related("rule")[:20])
    return dashboard


def _stored_gauges() -> tuple[dict[str, float], dict[str, float]]:
    """Queue depth per queue and the oldest due delivery's age per channel, as beat stored them."""
    try:
        stored = redis_client().get(GAUGES_KEY)
    except Exception:  # noqa: BLE001 - the page is still worth showing without them
        logger.warning("the stored gauges could not be read", exc_info=True)
        return {}, {}
    depth: dict[str, float] = {}
    oldest: dict[str, float] = {}
    for name, labels, value in json.loads(stored) if stored else []:
        if name == "notify_queue_depth" and value:
            depth[labels["queue"]] = value
        elif name == "notify_oldest_queued_delivery_seconds":
            oldest[labels["channel"]] = max(oldest.get(labels["channel"], 0.0), value)
    return depth, oldest


def _dead_letters(*, tenant_id: UUID | None) -> dict[str, int]:
    pending = DeadLetter.objects.filter(replayed_at__isnull=True)
    if tenant_id is not None:
        pending = pending.filter(delivery__notification__tenant_id=tenant_id)
    return dict(pending.values_list("channel").annotate(n=Count("pk")).order_by("channel").values_list("channel", "n"))


def _circuits_open(*, tenant_id: UUID | None) -> list[str]:
    providers = Provider.objects.filter(enabled=True)
    if tenant_id is not None:
        providers = providers.filter(tenant_id=tenant_id)
    return [f"{provider.channel}/{provider.name}" for provider in providers if breaker_state(provider) != "closed"]


def failure_reasons_top(*, tenant_id: UUID | None, since: datetime) -> list[tuple[str, int]]:
    """The commonest reasons among the window's failed history rows (at most FAILURE_SAMPLE read)."""
    failures = DeliveryEvent.objects.filter(
        created_at__gte=since,
        status__in=[DeliveryStatus.FAILED, DeliveryStatus.DEAD, DeliveryStatus.BOUNCED, DeliveryStatus.RETRYING],
    )
    if tenant_id is not None:
        failures = failures.filter(delivery__notification__tenant_id=tenant_id)
    sample = failures.values_list("reason", flat=True)[:FAILURE_SAMPLE]
    counts: dict[str, int] = defaultdict(int)
    for reason in sample:
        counts[reason[:120] or "(no reason given)"] += 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_REASONS]


def _charts(
    *, table: str, since: datetime, now: datetime, step: timedelta, tenant_id: UUID | None
) -> tuple[SafeString, SafeString]:
    scope, scope_params = _scope_sql(tenant_id=tenant_id)
    steps = int((now - since) / step) + 1
    origin = since.replace(second=0, microsecond=0)
    throughput: dict[str, list[float]] = {"sent": [0.0] * steps, "failed": [0.0] * steps}
    histograms: list[dict[int, int]] = [defaultdict(int) for _ in range(steps)]
    rows = _rows(
        sql="SELECT date_bin(%s, bucket, %s) AS step, outcome, latency_bucket, sum(count) "
        f"FROM {table} WHERE bucket >= %s {scope} GROUP BY 1, 2, 3",
        params=[step, origin, since, *scope_params],
    )
    for at, outcome, bucket, total in rows:
        index = min(max(int((at - origin) / step), 0), steps - 1)
        if outcome == "sent":
            throughput["sent"][index] += int(total)
            histograms[index][int(bucket)] += int(total)
        elif outcome in FAILED_OUTCOMES:
            throughput["failed"][index] += int(total)
    p50 = [percentile_estimate(histogram=h, quantile=0.5) or 0.0 for h in histograms]
    p99 = [percentile_estimate(histogram=h, quantile=0.99) or 0.0 for h in histograms]
    return (
        line_chart_svg(
            title="Throughput per step", series={"sent": throughput["sent"], "failed": throughput["failed"]}
        ),
        line_chart_svg(title="Accept to sent (ms)", series={"P50": p50, "P99": p99}),
    )


_COLOURS = ("#2b7bb9", "#c0392b", "#27ae60", "#8e44ad")


def line_chart_svg(*, title: str, series: dict[str, list[float]], width: int = 560, height: int = 160) -> SafeString:
    """A small line chart as inline SVG. Hand-written: the admin must work offline, and a few
    polylines need no chart library."""
    pad = 30
    longest = max((len(values) for values in series.values()), default=0)
    top = max((max(values) for values in series.values() if values), default=0.0) or 1.0
    lines = []
    for (name, values), colour in zip(series.items(), _COLOURS, strict=False):
        if longest < 2:
            continue
        points = " ".join(
            f"{pad + i * (width - 2 * pad) / (longest - 1):.1f},{height - pad - v / top * (height - 2 * pad):.1f}"
            for i, v in enumerate(values)
        )
        lines.append((colour, points, name))
    polylines = format_html_join(
        "",
        '<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"><title>{}</title></polyline>',
        lines,
    )
    legend = format_html_join(
        "",
        '<text x="{}" y="14" fill="{}" font-size="11">{}</text>',
        ((pad + 200 + 60 * i, colour, name) for i, (colour, _, name) in enumerate(lines)),
    )
    return format_html(
        '<svg class="notify-chart" role="img" aria-label="{}" width="{}" height="{}" viewBox="0 0 {} {}" '
        'xmlns="http://www.w3.org/2000/svg"><text x="{}" y="14" font-size="12">{}</text>'
        '<text x="2" y="{}" font-size="10">{}</text>'
        '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999"/>{}{}</svg>',
        title,
        width,
        height,
        width,
        height,
        pad,
        title,
        pad,
        f"{top:g}",
        pad,
        height - pad,
        width - pad,
        height - pad,
        polylines,
        legend,
    )


# Engagement analytics: what each rate counts, over the deliveries sent in the group.
ENGAGEMENT_OUTCOMES = ("delivered", "opened", "clicked", "unsubscribed", "complained")
ANALYTICS_GROUPS = {
    "channel": "channel",
    "category": "category_id",
    "template_version": "template_version_id",
    "variant": "variant",
}


def engagement_rates(
    *,
    tenant_id: UUID | None,
    since: datetime,
    until: datetime,
    group_by: Sequence[str],
    category_id: int | None = None,
) -> list[dict[str, Any]]:
    """Sent, delivered, opened, clicked, unsubscribed and complained per group over
    [since, until) (whole hours, from the hourly rollups), with each as a rate of those sent."""
    columns = [ANALYTICS_GROUPS[name] for name in group_by]
    selected = ", ".join(columns)
    category_sql, category_params = ("AND category_id = %s", [category_id]) if category_id is not None else ("", [])
    scope, scope_params = _scope_sql(tenant_id=tenant_id)
    rows = _rows(
        sql=f"SELECT {selected}, outcome, sum(count) FROM {DeliveryRollupHour._meta.db_table} "
        f"WHERE bucket >= %s AND bucket < %s {scope} {category_sql} "
        f"AND outcome IN ('sent', {', '.join(['%s'] * len(ENGAGEMENT_OUTCOMES))}) "
        f"GROUP BY {selected}, outcome ORDER BY {selected}",
        params=[since, until, *scope_params, *category_params, *ENGAGEMENT_OUTCOMES],
    )
    groups: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        key, outcome, total = tuple(row[:-2]), row[-2], row[-1]
        groups[key][outcome] += int(total)
    results = []
    for key, counts in groups.items():
        sent = counts.get("sent", 0)
        results.append(
            {
                **dict(zip(group_by, key, strict=True)),
                "sent": sent,
                **{name: counts.get(name, 0) for name in ENGAGEMENT_OUTCOMES},
                "rates": {name: round(counts.get(name, 0) / sent, 4) if sent else None for name in ENGAGEMENT_OUTCOMES},
            }
        )
    return results
