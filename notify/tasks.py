"""Thin Celery tasks: ids in, one engine call, nothing else."""

import logging
from uuid import UUID

import sentry_sdk
from celery import shared_task
from django.conf import settings
from django.utils import timezone

from apps.inbox.live import inbox_snoozes_return
from apps.inbox.services import inbox_expired_purge
from apps.recipients import imports
from apps.webhooks import services as webhooks
from notify.observability import alerts, canary, metrics
from notify.pipeline import broadcast, digest, dispatch, recurring, routing, send

logger = logging.getLogger(__name__)


@shared_task(name=dispatch.SEND_TASK)
def send_deliveries(delivery_ids: list[str]) -> int:
    return send.deliveries_send(delivery_ids=delivery_ids)


@shared_task(name="notify.sweep")
def sweep() -> dict[str, int]:
    """Send the digests whose window has passed, start routing steps that came due, sweep up
    the deliveries, bring back snoozed inbox items and purge expired ones."""
    now = timezone.now()
    digests_sent = digest.digests_flush_due(now=now)
    steps_started = routing.routing_sweep(now=now)
    report = dispatch.sweep()
    imports_resumed = imports.recipient_imports_resume(now=now)
    broadcast_tasks = broadcast.broadcasts_advance(now=now)
    inbox_items_woken = inbox_snoozes_return(now=now)
    inbox_items_purged = inbox_expired_purge(now=now)
    metrics.inbox_sweep_count(woken=inbox_items_woken, purged=inbox_items_purged)
    return {
        "inbox_items_woken": inbox_items_woken,
        "inbox_items_purged": inbox_items_purged,
        "imports_resumed": imports_resumed,
        "broadcast_tasks": broadcast_tasks,
        "digests_sent": digests_sent,
        "routing_steps_started": steps_started,
        "leases_expired": report.leases_expired,
        "republished": report.republished,
    }


@shared_task(name=imports.IMPORT_TASK)
def recipient_import(import_id: str) -> None:
    imports.recipient_import_process(import_id=UUID(import_id))


@shared_task(name=recurring.TASK)
def recurring_send(recurring_send_id: int) -> None:
    recurring.recurring_send_run(recurring_send_id=recurring_send_id, now=timezone.now())


@shared_task(name=dispatch.DEAD_LETTER_TASK)
def dead_letter_notice(delivery_id: str, channel: str, reason: str) -> None:
    """Alert ops that a delivery died; the DeadLetter row is the durable record."""
    logger.warning("delivery %s on %s is dead: %s", delivery_id, channel, reason, extra={"delivery_id": delivery_id})
    sentry_sdk.capture_message(f"{channel} delivery {delivery_id} dead-lettered: {reason}", level="warning")


@shared_task(name=broadcast.FAN_OUT_TASK)
def broadcast_fan_out(broadcast_id: str) -> int:
    return broadcast.fan_out(broadcast_id=UUID(broadcast_id))


@shared_task(name=broadcast.CANCEL_TASK)
def broadcast_cancel(broadcast_id: str) -> int:
    return broadcast.cancel_finish(broadcast_id=UUID(broadcast_id))


@shared_task(name=broadcast.RESUME_TASK)
def broadcast_resume(broadcast_id: str) -> int:
    return broadcast.resume_publish(broadcast_id=UUID(broadcast_id))


@shared_task(name="notify.canary")
def canary_tick() -> dict[str, int]:
    return canary.canary_tick(now=timezone.now())


@shared_task(name="notify.alerts")
def alerts_evaluate() -> dict[str, int]:
    return alerts.alerts_evaluate(now=timezone.now())


@shared_task(name="notify.retention_purge")
def retention_purge() -> dict[str, int]:
    """Purge what each tenant's retention lets go, in small batches."""
    from apps.ops.retention import retention_purge

    report = retention_purge(now=timezone.now())
    return {
        "notifications": report.notifications,
        "events": report.events,
        "partitions": len(report.partitions),
        "unfinished": len(report.unfinished),
    }


@shared_task(name="notify.partitions_ensure")
def partitions_ensure() -> list[str]:
    """Create the partitions of this month and the months ahead that are still missing."""
    from apps.deliveries.partitions import partitions_ensure

    return partitions_ensure(now=timezone.now(), months_ahead=settings.NOTIFY_PARTITION_MONTHS_AHEAD)


@shared_task(name="notify.metrics_gauges")
def metrics_gauges() -> bool:
    """Compute the gauges that need the database into Redis, for /metrics to read."""
    from notify.observability.gauges import gauges_compute

    return gauges_compute()


@shared_task(name=webhooks.DISPATCH_TASK)
def webhooks_dispatch() -> int:
    return webhooks.webhooks_dispatch(now=timezone.now())


@shared_task(name=webhooks.DELIVER_TASK)
def webhooks_deliver(endpoint_id: str) -> int:
    return webhooks.endpoint_deliver(endpoint_id=UUID(endpoint_id))


@shared_task(name="notify.rollups")
def rollups_advance() -> int:
    """Count the new delivery history into the dashboard's rollups."""
    from notify.observability.rollups import rollups_advance as advance

    return advance()
