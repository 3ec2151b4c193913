"""Webhooks to producers: endpoints, the transactional outbox, and at-least-once delivery.

Events are written as WebhookMessage rows in the transaction that records the state change
(one per subscribed endpoint, one INSERT ... SELECT per chunk for deliveries), so a message
exists exactly when its change was committed. A worker claims an endpoint's due messages
(UPDATE ... FOR UPDATE SKIP LOCKED), POSTs them signed per the Standard Webhooks
specification through the outbound guard, one event alone or a backlog as a JSON array,
and records every attempt. Failures back off exponentially in the database (next_attempt_at);
each endpoint has a circuit breaker in Redis (pybreaker, as providers do). A message whose
retries are spent, on an endpoint that has not succeeded since it was written, disables the
endpoint and tells its owner. docs/webhooks.md is the receivers' side of this."""

import base64
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from uuid import UUID

import pybreaker
import requests
import sentry_sdk
from celery import current_app
from django.conf import settings
from django.core.mail import send_mail
from django.db import connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from apps.catalog.models import Category
from apps.deliveries.models import Delivery, Notification
from apps.recipients.models import Recipient
from apps.tenants.models import Tenant
from apps.webhooks.models import MessageStatus, WebhookAttempt, WebhookEndpoint, WebhookMessage
from config.queues import WEBHOOK_QUEUE
from notify.observability import metrics
from notify.pipeline.bulk import uuid_array
from notify.resilience.failures import backoff_delay
from notify.resilience.outbound import OutboundRefused, signed_webhook_post

logger = logging.getLogger(__name__)

DISPATCH_TASK = "notify.webhooks_dispatch"
DELIVER_TASK = "notify.webhooks_deliver"
# A worker that dies mid-POST leaves its messages leased; after this they are due again.
LEASE_SECONDS = 120
# Batches one task sends before handing the rest of a backlog to a fresh task.
BATCHES_PER_TASK = 10


# --- Endpoints ------------------------------------------------------------------------------


def secret_generate() -> str:
    """A new Standard Webhooks signing secret: "whsec_" and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def endpoints_list(*, tenant: Tenant) -> QuerySet[WebhookEndpoint]:
    """The tenant's endpoints, newest first."""
    return WebhookEndpoint.objects.filter(tenant=tenant).select_related("category").order_by("-created_at", "-id")


def endpoint_create(
    *,
    tenant: Tenant,
    url: str,
    event_types: list[str],
    category: Category | None,
    description: str = "",
    alert_email: str = "",
) -> WebhookEndpoint:
    """Register an endpoint with a fresh secret (the caller shows it once)."""
    return WebhookEndpoint.objects.create(
        tenant=tenant,
        url=url,
        event_types=sorted(set(event_types)),
        category=category,
        description=description,
        alert_email=alert_email,
        secret=secret_generate(),
    )


def endpoint_secret_rotate(*, endpoint: WebhookEndpoint) -> str:
    """Replace the endpoint's secret; return the new one (shown once)."""
    endpoint.secret = secret_generate()
    endpoint.save(update_fields=["secret", "updated_at"])
    return str(endpoint.secret)


def endpoints_enable(*, endpoints: Iterable[WebhookEndpoint]) -> int:
    """Enable endpoints (after their owner fixed them), with a closed circuit; their pending
    messages go out at once."""
    ids = [endpoint.pk for endpoint in endpoints]
    count = WebhookEndpoint.objects.filter(pk__in=ids).update(
        enabled=True, disabled_reason="", updated_at=timezone.now()
    )
    for endpoint_id in ids:
        _breaker(endpoint_id).close()
    transaction.on_commit(lambda: dispatch_publish(endpoint_ids=ids))
    return count


def endpoints_disable(*, endpoints: Iterable[WebhookEndpoint], reason: str) -> int:
    """Disable endpoints: their messages wait, undelivered, until they are enabled again."""
    return WebhookEndpoint.objects.filter(pk__in=[e.pk for e in endpoints]).update(
        enabled=False, disabled_reason=reason[:500], updated_at=timezone.now()
    )


# --- The outbox -----------------------------------------------------------------------------


def _endpoints_exist() -> bool:
    # Parameterless and index-only: an installation without endpoints pays one tiny query a
    # chunk, never the join below.
    return WebhookEndpoint.objects.filter(enabled=True).exists()


_message_table = WebhookMessage._meta.db_table
_DELIVERY_EVENTS_SQL = (
    f"INSERT INTO {_message_table} (endpoint_id, tenant_id, event_type, payload, status, attempt_count, "
    "next_attempt_at, created_at, last_error) "
    "SELECT e.id, n.tenant_id, %(type)s, jsonb_build_object('type', %(type)s, 'timestamp', %(stamp)s, "
    "'data', jsonb_build_object('delivery_id', d.id, 'notification_id', n.id, 'event_id', n.event_id, "
    "'channel', d.channel, 'status', d.status, 'reason', d.status_reason, 'recipient', r.external_id, "
    "'category', c.key, 'priority', d.priority, 'attempt', d.attempt_count)), "
    "'pending', 0, %(at)s, %(at)s, '' "
    f"FROM {Delivery._meta.db_table} d "
    f"JOIN {Notification._meta.db_table} n ON n.id = d.notification_id "
    f"JOIN {Recipient._meta.db_table} r ON r.id = n.recipient_id "
    f"JOIN {Category._meta.db_table} c ON c.id = n.category_id "
    f"JOIN {WebhookEndpoint._meta.db_table} e ON e.tenant_id = n.tenant_id AND e.enabled "
    "AND e.event_types ? %(type)s AND (e.category_id IS NULL OR e.category_id = n.category_id) "
    "WHERE d.id = ANY(%(ids)s::uuid[])"
)


def delivery_events_emit(*, event_type: str, delivery_ids: list[UUID], at: datetime) -> int:
    """Write one message per subscribed endpoint for each delivery, in one INSERT ... SELECT,
    in the caller's transaction; return how many. Nothing is read when no endpoint exists."""
    if not delivery_ids or not _endpoints_exist():
        return 0
    if connection.vendor != "postgresql":  # the demo's SQLite: few rows, so the ORM will do
        return _delivery_events_emit_orm(event_type=event_type, delivery_ids=delivery_ids, at=at)
    with connection.cursor() as cursor:
        cursor.execute(
            _DELIVERY_EVENTS_SQL,
            {"type": event_type, "stamp": at.isoformat(), "at": at, "ids": uuid_array(delivery_ids)},
        )
        written = max(cursor.rowcount, 0)
    if written:
        transaction.on_commit(lambda: dispatch_publish(endpoint_ids=None))
    return written


def _delivery_events_emit_orm(*, event_type: str, delivery_ids: list[UUID], at: datetime) -> int:
    written = 0
    for delivery in Delivery.objects.filter(id__in=delivery_ids).select_related(
        "notification__recipient", "notification__category"
    ):
        notification = delivery.notification
        data = {
            "delivery_id": str(delivery.id),
            "notification_id": str(notification.id),
            "event_id": str(notification.event_id),
            "channel": delivery.channel,
            "status": delivery.status,
            "reason": delivery.status_reason,
            "recipient": notification.recipient.external_id,
            "category": notification.category.key,
            "priority": delivery.priority,
            "attempt": delivery.attempt_count,
        }
        written += event_emit(
            tenant_id=notification.tenant_id,
            event_type=event_type,
            data=data,
            category_id=notification.category_id,
            at=at,
        )
    return written


def event_emit(
    *, tenant_id: UUID, event_type: str, data: dict[str, Any], category_id: int | None = None, at: datetime
) -> int:
    """Write one message per endpoint of the tenant subscribed to the event, in the caller's
    transaction; return how many."""
    if not _endpoints_exist():
        return 0
    endpoints = WebhookEndpoint.objects.filter(
        Q(category__isnull=True) | Q(category_id=category_id),
        tenant_id=tenant_id,
        enabled=True,
        event_types__contains=[event_type],
    )
    payload = {"type": event_type, "timestamp": at.isoformat(), "data": data}
    messages = [
        WebhookMessage(
            endpoint_id=endpoint_id,
            tenant_id=tenant_id,
            event_type=event_type,
            payload=payload,
            next_attempt_at=at,
            created_at=at,
        )
        for endpoint_id in endpoints.values_list("pk", flat=True)
    ]
    WebhookMessage.objects.bulk_create(messages)
    if messages:
        transaction.on_commit(lambda: dispatch_publish(endpoint_ids=None))
    return len(messages)


# --- Delivery -------------------------------------------------------------------------------


def dispatch_publish(*, endpoint_ids: list[UUID] | None) -> None:
    """Ask the webhooks worker to send due messages (of these endpoints, or of all)."""
    try:
        if endpoint_ids is None:
            current_app.send_task(DISPATCH_TASK, queue=WEBHOOK_QUEUE)
        for endpoint_id in endpoint_ids or []:
            current_app.send_task(DELIVER_TASK, args=[str(endpoint_id)], queue=WEBHOOK_QUEUE)
    except Exception:  # noqa: BLE001 - the rows are the record; beat's dispatch finds them
        logger.exception("could not publish webhook work")


def webhooks_dispatch(*, now: datetime) -> int:
    """Free the leases of dead workers and hand each enabled endpoint with due messages to
    the worker; return how many endpoints."""
    WebhookMessage.objects.filter(status=MessageStatus.SENDING, lease_expires_at__lt=now).update(
        status=MessageStatus.PENDING, lease_expires_at=None
    )
    endpoint_ids = list(
        WebhookMessage.objects.filter(status=MessageStatus.PENDING, next_attempt_at__lte=now, endpoint__enabled=True)
        .values_list("endpoint_id", flat=True)
        .distinct()
    )
    dispatch_publish(endpoint_ids=endpoint_ids)
    return len(endpoint_ids)


@dataclass(frozen=True)
class Claimed:
    id: int
    payload: dict[str, Any]
    attempt_count: int
    created_at: datetime


def _claim(*, endpoint_id: UUID, now: datetime) -> list[Claimed]:
    if connection.vendor != "postgresql":  # the demo's SQLite: one writer at a time anyway
        return _claim_orm(endpoint_id=endpoint_id, now=now)
    # A second worker given the same endpoint skips the rows this one holds.
    sql = (
        f"UPDATE {_message_table} SET status = 'sending', lease_expires_at = %(lease)s, "
        "attempt_count = attempt_count + 1 "
        f"WHERE id IN (SELECT id FROM {_message_table} WHERE endpoint_id = %(endpoint)s AND status = 'pending' "
        "AND next_attempt_at <= %(now)s ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
        "RETURNING id, payload, attempt_count, created_at"
    )
    params = {
        "lease": now + timedelta(seconds=LEASE_SECONDS),
        "endpoint": endpoint_id,
        "now": now,
        "limit": settings.NOTIFY_WEBHOOK_BATCH_SIZE,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return sorted(
        (
            Claimed(
                id=row[0],
                payload=row[1] if isinstance(row[1], dict) else json.loads(row[1]),
                attempt_count=row[2],
                created_at=row[3],
            )
            for row in rows
        ),
        key=lambda claimed: claimed.id,
    )


def _claim_orm(*, endpoint_id: UUID, now: datetime) -> list[Claimed]:
    due = WebhookMessage.objects.filter(endpoint_id=endpoint_id, status=MessageStatus.PENDING, next_attempt_at__lte=now)
    ids = list(due.order_by("id").values_list("id", flat=True)[: settings.NOTIFY_WEBHOOK_BATCH_SIZE])
    claimed = due.filter(id__in=ids)
    claimed.update(
        status=MessageStatus.SENDING,
        lease_expires_at=now + timedelta(seconds=LEASE_SECONDS),
        attempt_count=F("attempt_count") + 1,
    )
    return [
        Claimed(id=m.id, payload=m.payload, attempt_count=m.attempt_count, created_at=m.created_at)
        for m in WebhookMessage.objects.filter(id__in=ids, status=MessageStatus.SENDING).order_by("id")
    ]


class EndpointFailed(Exception):
    """The endpoint answered other than 2xx, or could not be reached; counted by its circuit."""

    def __init__(self, *, reason: str, status_code: int | None = None, excerpt: str = "") -> None:
        super().__init__(reason)
        self.reason, self.status_code, self.excerpt = reason, status_code, excerpt


@lru_cache(maxsize=1024)
def _breaker(endpoint_id: UUID) -> pybreaker.CircuitBreaker:
    from notify.policy.caps import redis_client  # the policy reads recipients, which emit events here

    storage = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_CLOSED, redis_client(), namespace=f"notify:webhook:{endpoint_id}"
    )
    return pybreaker.CircuitBreaker(
        name=f"webhook {endpoint_id}",
        fail_max=settings.NOTIFY_WEBHOOK_CIRCUIT_FAILURES,
        reset_timeout=settings.NOTIFY_WEBHOOK_CIRCUIT_COOLDOWN_SECONDS,
        state_storage=storage,
        throw_new_error_on_trip=False,
    )


def webhook_body(*, messages: list[Claimed]) -> tuple[str, str]:
    """The webhook-id and JSON body of one POST: an event alone, or a backlog as an array."""
    events = [{"id": f"msg_{m.id}", **m.payload} for m in messages]
    if len(events) == 1:
        return events[0]["id"], json.dumps(events[0], separators=(",", ":"))
    return f"batch_{messages[0].id}_{len(events)}", json.dumps(events, separators=(",", ":"))


def _post(*, endpoint: WebhookEndpoint, webhook_id: str, body: str) -> requests.Response:
    try:
        response = signed_webhook_post(
            url=endpoint.url,
            secret=str(endpoint.secret),
            webhook_id=webhook_id,
            body=body,
            allowed_hosts=settings.NOTIFY_WEBHOOK_ALLOWED_HOSTS,
            timeout=settings.NOTIFY_WEBHOOK_TIMEOUT_SECONDS,
        )
    except OutboundRefused as refused:
        raise EndpointFailed(reason=f"refused by the outbound guard: {refused.reason}")
    except requests.RequestException as error:
        raise EndpointFailed(reason=f"{type(error).__name__}: {error}")
    if not 200 <= response.status_code < 300:
        raise EndpointFailed(
            reason=f"the endpoint answered {response.status_code}",
            status_code=response.status_code,
            excerpt=response.text[:500],
        )
    return response


def endpoint_deliver(*, endpoint_id: UUID) -> int:
    """Send the endpoint's due messages, batch after batch while it answers; return how many
    were delivered."""
    delivered = 0
    for _ in range(BATCHES_PER_TASK):
        endpoint = WebhookEndpoint.objects.filter(pk=endpoint_id, enabled=True).first()
        if endpoint is None:
            return delivered
        messages = _claim(endpoint_id=endpoint.pk, now=timezone.now())
        if not messages:
            return delivered
        if not _batch_send(endpoint=endpoint, messages=messages):
            return delivered
        delivered += len(messages)
    dispatch_publish(endpoint_ids=[endpoint_id])  # more backlog: a fresh task, so others get a turn
    return delivered


def _batch_send(*, endpoint: WebhookEndpoint, messages: list[Claimed]) -> bool:
    webhook_id, body = webhook_body(messages=messages)
    started = time.perf_counter()
    try:
        response = _breaker(endpoint.pk).call(_post, endpoint=endpoint, webhook_id=webhook_id, body=body)
    except pybreaker.CircuitBreakerError:
        # Not tried: the circuit is open. Wait for its cooldown without spending an attempt.
        _circuit_wait(messages=messages)
        metrics.webhook_deliveries_count(outcome="circuit_open", messages=len(messages))
        return False
    except EndpointFailed as failed:
        _failure_record(endpoint=endpoint, messages=messages, webhook_id=webhook_id, failed=failed, started=started)
        return False
    now = timezone.now()
    duration = (time.perf_counter() - started) * 1000
    ids = [m.id for m in messages]
    with transaction.atomic():
        WebhookMessage.objects.filter(id__in=ids).update(
            status=MessageStatus.DELIVERED, delivered_at=now, lease_expires_at=None, last_error=""
        )
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(last_success_at=now)
        _attempts_insert(
            ids=ids,
            webhook_id=webhook_id,
            status_code=response.status_code,
            excerpt=response.text[:500],
            error="",
            duration=duration,
            now=now,
        )
    metrics.webhook_deliveries_count(outcome="delivered", messages=len(messages))
    return True


def _circuit_wait(*, messages: list[Claimed]) -> None:
    until = timezone.now() + timedelta(seconds=settings.NOTIFY_WEBHOOK_CIRCUIT_COOLDOWN_SECONDS)
    for message in messages:  # each gives back the attempt its claim counted
        WebhookMessage.objects.filter(id=message.id).update(
            status=MessageStatus.PENDING,
            lease_expires_at=None,
            attempt_count=message.attempt_count - 1,
            next_attempt_at=until,
            last_error="the endpoint's circuit is open",
        )


def _attempts_insert(
    *,
    ids: list[int],
    webhook_id: str,
    status_code: int | None,
    excerpt: str,
    error: str,
    duration: float,
    now: datetime,
) -> None:
    WebhookAttempt.objects.bulk_create(
        WebhookAttempt(
            message_id=message_id,
            webhook_id=webhook_id,
            status_code=status_code,
            response_excerpt=excerpt,
            error=error[:500],
            duration_ms=round(duration, 1),
            created_at=now,
        )
        for message_id in ids
    )


def _failure_record(
    *, endpoint: WebhookEndpoint, messages: list[Claimed], webhook_id: str, failed: EndpointFailed, started: float
) -> None:
    now = timezone.now()
    duration = (time.perf_counter() - started) * 1000
    exhausted = [m for m in messages if m.attempt_count >= settings.NOTIFY_WEBHOOK_MAX_ATTEMPTS]
    retrying = [m for m in messages if m.attempt_count < settings.NOTIFY_WEBHOOK_MAX_ATTEMPTS]
    disable = bool(exhausted) and (
        endpoint.last_success_at is None or endpoint.last_success_at < min(m.created_at for m in exhausted)
    )
    with transaction.atomic():
        _attempts_insert(
            ids=[m.id for m in messages],
            webhook_id=webhook_id,
            status_code=failed.status_code,
            excerpt=failed.excerpt,
            error=failed.reason,
            duration=duration,
            now=now,
        )
        # What failed together retries together: one backoff draw per attempt number.
        by_attempt: dict[int, list[int]] = {}
        for message in retrying:
            by_attempt.setdefault(message.attempt_count, []).append(message.id)
        for attempt, ids in by_attempt.items():
            delay = backoff_delay(
                base_seconds=settings.NOTIFY_WEBHOOK_RETRY_BASE_SECONDS,
                cap_seconds=settings.NOTIFY_WEBHOOK_RETRY_CAP_SECONDS,
                attempt=attempt,
            )
            WebhookMessage.objects.filter(id__in=ids).update(
                status=MessageStatus.PENDING,
                lease_expires_at=None,
                next_attempt_at=now + delay,
                last_error=failed.reason[:500],
            )
        WebhookMessage.objects.filter(id__in=[m.id for m in exhausted]).update(
            status=MessageStatus.FAILED, lease_expires_at=None, last_error=failed.reason[:500]
        )
        if disable:
            reason = f"disabled after {settings.NOTIFY_WEBHOOK_MAX_ATTEMPTS} failed attempts: {failed.reason}"
            endpoints_disable(endpoints=[endpoint], reason=reason)
    metrics.webhook_deliveries_count(outcome="retrying", messages=len(retrying))
    metrics.webhook_deliveries_count(outcome="failed", messages=len(exhausted))
    if disable:
        endpoint_disabled_alert(endpoint=endpoint, reason=failed.reason)


def endpoint_disabled_alert(*, endpoint: WebhookEndpoint, reason: str) -> None:
    """Tell the endpoint's owner (its alert email) and operators (log, Sentry) that it was disabled."""
    text = (
        f"[notify] The webhook endpoint {endpoint.url} of tenant {endpoint.tenant_id} was disabled: its events "
        f"kept failing for the whole retry schedule ({reason}). Fix it, then enable it and replay its "
        "failed messages in the admin."
    )
    logger.error(text, extra={"webhook_endpoint_id": str(endpoint.pk)})
    with sentry_sdk.new_scope() as scope:
        scope.fingerprint = ["notify-webhook-disabled", str(endpoint.pk)]
        sentry_sdk.capture_message(text, level="warning")
    if endpoint.alert_email:
        try:
            send_mail(
                subject="[notify] Webhook endpoint disabled",
                message=text,
                from_email=None,
                recipient_list=[endpoint.alert_email],
            )
        except Exception:  # noqa: BLE001 - the log and Sentry still tell operators
            logger.exception("could not email the owner of webhook endpoint %s", endpoint.pk)


def messages_replay(*, messages: QuerySet[WebhookMessage]) -> int:
    """Send messages again from a fresh retry schedule (those not being sent right now)."""
    now = timezone.now()
    replayable = messages.exclude(status=MessageStatus.SENDING)
    endpoint_ids = list(replayable.values_list("endpoint_id", flat=True).distinct())
    count = replayable.update(
        status=MessageStatus.PENDING, attempt_count=0, next_attempt_at=now, lease_expires_at=None, last_error=""
    )
    transaction.on_commit(lambda: dispatch_publish(endpoint_ids=endpoint_ids))
    return count
