"""Alerts: rules that operators keep in the admin (AlertRule), evaluated by a periodic task.

Each enabled rule measures its condition with a few index-backed queries, per subject (a
channel, a provider, a tenant). A subject that meets it opens an AlertFiring and operators
are told: Sentry (when configured), the operator webhook (NOTIFY_ALERT_WEBHOOK_URL, signed
per the Standard Webhooks specification, through the outbound guard) and the ops email list
(NOTIFY_ALERT_EMAILS). While it lasts they are told again at most once per rule window; when
it clears, the firing is resolved and, if the rule says so, that is announced once.

Decisions are made under the rule's row lock and committed before anyone is told, so two
evaluations at once never tell twice; a notice whose outlets all fail is not retried (the
next window's repeat is)."""

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import sentry_sdk
from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Count, Q
from django.db.models.fields.json import KeyTextTransform
from sentry_sdk.integrations.logging import ignore_logger

from apps.deliveries.models import (
    CLAIMABLE_STATUSES,
    DeadLetter,
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Provider,
    provider_name_of,
)
from apps.ops.models import AlertFiring, AlertKind, AlertRule
from apps.tenants.models import Tenant
from notify.observability.canary import canary_channels, canary_latest, canary_runs_settle
from notify.resilience.outbound import signed_webhook_post, webhook_secret_problem
from notify.resilience.providers import breaker_state, provider_label

logger = logging.getLogger(__name__)
# Alerts reach Sentry once, explicitly, with their fingerprint; not again as log records.
alert_logger = logging.getLogger(f"{__name__}.alert")
ignore_logger(alert_logger.name)

FIRING, REPEAT, RESOLVED = "firing", "repeat", "resolved"
RUNBOOK = "docs/operations.md, Alerts"


@dataclass(frozen=True)
class Condition:
    """A subject that meets a rule now, with the measured figure and what to tell operators."""

    subject: str
    value: float
    message: str


@dataclass(frozen=True)
class Notice:
    firing: AlertFiring
    status: str  # firing, repeat or resolved


def _window_text(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def _failure_rate(*, rule: AlertRule, now: datetime) -> list[Condition]:
    """Failed attempts over all attempts in the window, per channel or provider account."""
    # Attempts are history rows: a send (sent) or a failed one (retrying, failed, dead, with
    # the failure's kind); rows that withheld a delivery (deferred, suppressed) are not.
    attempted = Q(status=DeliveryStatus.SENT) | (Q(detail__has_key="failure") & ~Q(detail__failure=""))
    events = DeliveryEvent.objects.filter(attempted, created_at__gt=now - timedelta(seconds=rule.window_seconds))
    if rule.channel:
        events = events.filter(delivery__channel=rule.channel)
    grouping = (
        events.values("delivery__channel", provider_status=KeyTextTransform("provider_status", "detail"))
        if rule.per_provider
        else events.values("delivery__channel")
    )
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    counted = grouping.annotate(attempts=Count("pk"), failures=Count("pk", filter=~Q(status=DeliveryStatus.SENT)))
    rows: list[dict[str, Any]] = [dict(row) for row in counted]
    for row in rows:
        channel = row["delivery__channel"]
        if rule.per_provider:
            name = provider_name_of(provider_status=row["provider_status"] or "") or "configured"
            subject = f"provider:{channel}/{name}"
        else:
            subject = f"channel:{channel}"
        totals[subject][0] += row["attempts"]
        totals[subject][1] += row["failures"]
    conditions = []
    for subject, (attempts, failures) in sorted(totals.items()):
        rate = failures / attempts
        if attempts >= rule.min_attempts and rate > rule.threshold:
            conditions.append(
                Condition(
                    subject=subject,
                    value=rate,
                    message=f"{subject}: {failures} of {attempts} send attempts failed ({rate:.0%}, over "
                    f"{rule.threshold:.0%}) in the last {_window_text(rule.window_seconds)}",
                )
            )
    return conditions


def _dead_letters(*, rule: AlertRule, now: datetime) -> list[Condition]:
    """New dead letters in the window, per channel."""
    letters = DeadLetter.objects.filter(created_at__gt=now - timedelta(seconds=rule.window_seconds))
    if rule.channel:
        letters = letters.filter(channel=rule.channel)
    return [
        Condition(
            subject=f"channel:{row['channel']}",
            value=row["count"],
            message=f"channel:{row['channel']}: {row['count']} deliveries were dead-lettered in the last "
            f"{_window_text(rule.window_seconds)} (more than {rule.threshold:g})",
        )
        for row in letters.values("channel").annotate(count=Count("pk")).order_by("channel")
        if row["count"] > rule.threshold
    ]


def _queue_age(*, rule: AlertRule, now: datetime) -> list[Condition]:
    """How long the oldest due delivery has waited to be claimed."""
    # The sweeper's partial index on next_attempt_at (delivery_claimable_due) hands over the
    # oldest due row first. A channel filter skips other channels' rows on the way, so the
    # installation-wide rule is the cheap one.
    waiting = Delivery.objects.filter(status__in=CLAIMABLE_STATUSES, next_attempt_at__lte=now)
    if rule.channel:
        waiting = waiting.filter(channel=rule.channel)
    oldest = waiting.order_by("next_attempt_at").values("next_attempt_at", "channel", "status").first()
    if oldest is None:
        return []
    age = (now - oldest["next_attempt_at"]).total_seconds()
    if age <= rule.threshold:
        return []
    subject = f"channel:{rule.channel}" if rule.channel else "queue"
    return [
        Condition(
            subject=subject,
            value=age,
            message=f"{subject}: the oldest due delivery ({oldest['channel']}, {oldest['status']}) has waited "
            f"{age:.0f} s to be sent (more than {rule.threshold:g} s)",
        )
    ]


def _circuits_open(*, rule: AlertRule, now: datetime) -> list[Condition]:
    """Providers whose circuit is open, as every worker sees it (pybreaker's Redis state)."""
    providers = Provider.objects.filter(enabled=True).order_by("pk")
    if rule.channel:
        providers = providers.filter(channel=rule.channel)
    conditions = []
    for provider in providers:
        try:
            state = breaker_state(provider)
        except redis.RedisError:
            logger.warning("the circuit of provider %s is unreadable", provider_label(provider), exc_info=True)
            continue
        if state == "open":
            conditions.append(
                Condition(
                    subject=f"provider:{provider.pk}",
                    value=1,
                    message=f"provider:{provider.pk}: the circuit of {provider.channel} provider "
                    f"{provider_label(provider)} is open; its work goes to the others, or waits",
                )
            )
    return conditions


def _canary_failing(*, rule: AlertRule, now: datetime) -> list[Condition]:
    """Channels whose latest settled canary run failed or was late (of those it still runs on)."""
    channels = set(canary_channels()) if settings.NOTIFY_CANARY_INTERVAL_SECONDS else set()
    return [
        Condition(
            subject=f"channel:{result.channel}",
            value=0,
            message=f"channel:{result.channel}: the canary's latest run is {result.settled_state}: {result.reason}",
        )
        for result in canary_latest()
        if result.success is False
        and result.channel in channels
        and (not rule.channel or result.channel == rule.channel)
    ]


def _runaway_guard(*, rule: AlertRule, now: datetime) -> list[Condition]:
    """Tenants the runaway-send guard has paused."""
    return [
        Condition(
            subject=f"tenant:{tenant.slug}",
            value=1,
            message=f"tenant:{tenant.slug}: paused by the runaway-send guard since "
            f"{tenant.runaway_paused_at:%Y-%m-%d %H:%M:%S} UTC: {tenant.runaway_reason}",
        )
        for tenant in Tenant.objects.filter(runaway_paused_at__isnull=False).order_by("slug")
    ]


EVALUATORS: dict[str, Callable[..., list[Condition]]] = {
    AlertKind.FAILURE_RATE: _failure_rate,
    AlertKind.DEAD_LETTERS: _dead_letters,
    AlertKind.QUEUE_AGE: _queue_age,
    AlertKind.CIRCUIT_OPEN: _circuits_open,
    AlertKind.CANARY_FAILING: _canary_failing,
    AlertKind.RUNAWAY_GUARD: _runaway_guard,
}


def alerts_evaluate(*, now: datetime) -> dict[str, int]:
    """Evaluate every rule, open, repeat and resolve its firings, and tell operators; return
    how many notices of each kind went out."""
    if settings.NOTIFY_CANARY_INTERVAL_SECONDS:
        canary_runs_settle(now=now)  # a canary past its deadline is late now, not at its next run
    report = {FIRING: 0, REPEAT: 0, RESOLVED: 0}
    for rule in AlertRule.objects.all():
        conditions = EVALUATORS[rule.kind](rule=rule, now=now) if rule.enabled else []
        for notice in _firings_update(rule=rule, conditions=conditions, now=now):
            notice.firing.outlets = alert_notify(rule=rule, notice=notice)[:500]
            AlertFiring.objects.filter(pk=notice.firing.pk).update(outlets=notice.firing.outlets)
            report[notice.status] += 1
    return report


@transaction.atomic
def _firings_update(*, rule: AlertRule, conditions: list[Condition], now: datetime) -> list[Notice]:
    # One evaluation of a rule at a time: a second waits here, then sees the first's firings.
    AlertRule.objects.select_for_update().filter(pk=rule.pk).exists()
    open_firings = {f.subject: f for f in AlertFiring.objects.filter(rule=rule, resolved_at__isnull=True)}
    window = timedelta(seconds=rule.window_seconds)
    notices = []
    for condition in conditions:
        firing = open_firings.pop(condition.subject, None)
        if firing is None:
            firing = AlertFiring.objects.create(
                rule=rule,
                subject=condition.subject,
                message=condition.message[:1000],
                value=condition.value,
                first_fired_at=now,
                last_notified_at=now,
            )
            notices.append(Notice(firing=firing, status=FIRING))
            continue
        firing.message, firing.value = condition.message[:1000], condition.value
        if now - firing.last_notified_at >= window:
            firing.last_notified_at = now
            firing.notices += 1
            notices.append(Notice(firing=firing, status=REPEAT))
        firing.save(update_fields=["message", "value", "last_notified_at", "notices"])
    for firing in open_firings.values():
        firing.resolved_at = now
        firing.save(update_fields=["resolved_at"])
        if rule.enabled and rule.notify_resolved:
            notices.append(Notice(firing=firing, status=RESOLVED))
    return notices


def alert_notify(*, rule: AlertRule, notice: Notice) -> str:
    """Tell operators through every configured outlet; one failing does not stop the others.
    Returns what each answered, for the admin."""
    firing = notice.firing
    headline = {FIRING: "ALERT", REPEAT: "STILL FIRING", RESOLVED: "RESOLVED"}[notice.status]
    text = f"[notify] {headline} {rule.name}: {firing.message}"
    if notice.status != RESOLVED:
        text += f" (since {firing.first_fired_at:%Y-%m-%d %H:%M:%S} UTC; what to do: {RUNBOOK})"
    (alert_logger.info if notice.status == RESOLVED else alert_logger.error)(text)
    outlets = []
    if settings.SENTRY_DSN:
        outlets.append(_outlet("sentry", lambda: _sentry_send(rule=rule, notice=notice, text=text)))
    if settings.NOTIFY_ALERT_WEBHOOK_URL:
        outlets.append(_outlet("webhook", lambda: _webhook_send(rule=rule, notice=notice)))
    if settings.NOTIFY_ALERT_EMAILS:
        outlets.append(_outlet("email", lambda: _email_send(rule=rule, notice=notice, text=text, headline=headline)))
    return "; ".join(outlets)


def _outlet(name: str, send: Callable[[], str]) -> str:
    try:
        return f"{name}: {send()}"
    except Exception as error:  # noqa: BLE001 - the other outlets still tell operators
        logger.exception("the %s outlet could not deliver an alert", name)
        return f"{name}: failed ({type(error).__name__}: {error})"[:200]


def _sentry_send(*, rule: AlertRule, notice: Notice, text: str) -> str:
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("alert_rule", rule.name)
        scope.set_tag("alert_subject", notice.firing.subject)
        scope.fingerprint = ["notify-alert", rule.name, notice.firing.subject]
        event_id = sentry_sdk.capture_message(text, level="info" if notice.status == RESOLVED else "error")
    return "sent" if event_id else "dropped"


def alert_payload(*, rule: AlertRule, notice: Notice) -> dict:
    """The operator webhook's JSON body for one notice."""
    firing = notice.firing
    return {
        "type": f"alert.{notice.status}",
        "timestamp": datetime.now(UTC).isoformat(),
        "data": {
            "firing_id": firing.pk,
            "rule": rule.name,
            "kind": rule.kind,
            "subject": firing.subject,
            "message": firing.message,
            "value": firing.value,
            "threshold": rule.threshold,
            "window_seconds": rule.window_seconds,
            "first_fired_at": firing.first_fired_at.isoformat(),
            "resolved_at": firing.resolved_at.isoformat() if firing.resolved_at else None,
            "notices": firing.notices,
        },
    }


def _webhook_send(*, rule: AlertRule, notice: Notice) -> str:
    secret = settings.NOTIFY_ALERT_WEBHOOK_SECRET
    if problem := webhook_secret_problem(secret=secret):
        # Never unsigned: a receiver could not tell it from a forgery. Start-up refuses this
        # outside DEBUG (apps/deliveries/checks.py).
        raise ValueError(f"NOTIFY_ALERT_WEBHOOK_SECRET cannot sign: {problem}")
    body = json.dumps(alert_payload(rule=rule, notice=notice), separators=(",", ":"))
    response = signed_webhook_post(
        url=settings.NOTIFY_ALERT_WEBHOOK_URL,
        secret=secret,
        webhook_id=f"msg_alert_{notice.firing.pk}_{notice.status}_{notice.firing.notices}",
        body=body,
        allowed_hosts=settings.NOTIFY_ALERT_WEBHOOK_ALLOWED_HOSTS,
        timeout=settings.NOTIFY_ALERT_WEBHOOK_TIMEOUT_SECONDS,
    )
    if response.status_code >= 300:
        raise ValueError(f"the receiver answered {response.status_code}")
    return str(response.status_code)


def _email_send(*, rule: AlertRule, notice: Notice, text: str, headline: str) -> str:
    send_mail(
        subject=f"[notify] {headline}: {rule.name} {notice.firing.subject}",
        message=text,
        from_email=None,  # DEFAULT_FROM_EMAIL
        recipient_list=settings.NOTIFY_ALERT_EMAILS,
    )
    return "sent"
