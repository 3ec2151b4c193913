"""Recurring sends: each RecurringSend has a django-celery-beat PeriodicTask on a crontab in
its timezone, kept in step here, whose run triggers the event through the normal ingest.

A run's idempotency key names the minute beat scheduled it for (the PeriodicTask's
last_run_at, which beat sets when it sends the task), not the minute a worker got to it, so
beat firing twice for one schedule (a restart, two beat processes by mistake) still makes one
event, however late the task runs."""

import json
import logging
from datetime import datetime

from django.db import transaction
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from apps.deliveries.models import RecurringSend
from notify.pipeline.ingest import EventRequest, IngestError, IngestResult, RecipientRef, events_ingest
from notify.resilience.backpressure import Refused

logger = logging.getLogger(__name__)

TASK = "notify.recurring_send"


@transaction.atomic
def recurring_send_save(*, recurring: RecurringSend) -> RecurringSend:
    """Save it, and create or update the beat schedule that runs it."""
    recurring.save()
    minute, hour, day_of_month, month_of_year, day_of_week = recurring.cron.split()
    schedule, _ = CrontabSchedule.objects.get_or_create(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month_of_year,
        day_of_week=day_of_week,
        timezone=recurring.timezone,
    )
    task = recurring.periodic_task or PeriodicTask(name=f"recurring send {recurring.pk}", task=TASK)
    task.crontab = schedule
    task.kwargs = json.dumps({"recurring_send_id": recurring.pk})
    task.enabled = recurring.enabled
    task.queue = "maintenance"
    task.save()
    if recurring.periodic_task_id != task.pk:
        recurring.periodic_task = task
        recurring.save(update_fields=["periodic_task"])
    return recurring


@transaction.atomic
def recurring_send_delete(*, recurring: RecurringSend) -> None:
    if recurring.periodic_task is not None:
        recurring.periodic_task.delete()
    recurring.delete()


def recurring_send_run(*, recurring_send_id: int, now: datetime) -> IngestResult | None:
    """Trigger this run's event; None when the send is gone, disabled, or cannot be ingested
    (an unknown recipient, say: logged, and the schedule goes on)."""
    recurring = (
        RecurringSend.objects.select_related("tenant", "category", "periodic_task").filter(id=recurring_send_id).first()
    )
    if recurring is None or not recurring.enabled:
        return None
    scheduled = (recurring.periodic_task.last_run_at if recurring.periodic_task else None) or now
    request = EventRequest(
        category_key=recurring.category.key,
        recipients=[RecipientRef(external_id=external_id) for external_id in recurring.recipients],
        data=recurring.data,
        idempotency_key=f"recurring:{recurring.pk}:{scheduled:%Y-%m-%dT%H:%M}",
    )
    try:
        [result] = events_ingest(tenant=recurring.tenant, events=[request])
    except IngestError as error:
        logger.error("recurring send %s could not run: %s: %s", recurring.name, error.field, error.message)
        return None
    except Refused as error:  # a limit or backpressure: this run is skipped, the schedule goes on
        logger.error("recurring send %s was refused: %s", recurring.name, error)
        return None
    return result
