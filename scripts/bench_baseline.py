"""The textbook way to send a broadcast, which scripts/bench_broadcast.py compares with: one
Celery task per notification, which loads the recipient, renders the email, sends it with
Django's own send_mail through the provider, and records it. Registered only in the
benchmark's baseline worker (celery worker --include scripts.bench_baseline)."""

from typing import Any

from celery import shared_task
from django.core.mail import EmailMultiAlternatives
from django.utils import timezone

from apps.catalog.models import Category
from apps.deliveries.models import Delivery, DeliveryStatus, Event, Notification
from apps.recipients.models import Recipient
from notify.pipeline.plan import content_render, variant_resolve

BASELINE_TASK = "bench.baseline_send"
BASELINE_QUEUE = "bench-baseline"


@shared_task(name=BASELINE_TASK)
def baseline_send(recipient_id: str, event_id: str, data: dict[str, Any]) -> None:
    """Render and send one email to one recipient, then record it as sent."""
    recipient = Recipient.objects.get(pk=recipient_id)
    event = Event.objects.get(pk=event_id)
    category = Category.objects.select_related("template", "tenant").get(pk=event.category_id)
    version = category.template.current_version()
    assert version is not None
    locale = recipient.locale or category.tenant.default_locale
    variant = variant_resolve(
        version_id=version.pk,
        channel="email",
        locale=locale,
        default_locale=category.tenant.default_locale,
        recipient_id=recipient.pk,
    )
    content = content_render(variant=variant, data=data, recipient=recipient, locale=locale)
    message = EmailMultiAlternatives(subject=content.subject, body=content.body, to=[recipient.email])
    message.attach_alternative(content.html, "text/html")
    message.send()
    notification = Notification.objects.create(
        tenant_id=event.tenant_id,
        event=event,
        recipient=recipient,
        category=category,
        template_version=version,
        locale=locale,
        priority=category.default_priority,
    )
    now = timezone.now()
    Delivery.objects.create(
        notification=notification,
        channel="email",
        priority=category.default_priority,
        status=DeliveryStatus.SENT,
        next_attempt_at=now,
        sent_at=now,
    )
