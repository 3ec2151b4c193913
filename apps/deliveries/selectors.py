"""Reads of notifications and deliveries for the API and the admin."""

from datetime import datetime
from uuid import UUID

from django.db.models import Prefetch, QuerySet

from apps.deliveries.models import CLAIMABLE_STATUSES, Delivery, DeliveryStatus, Notification, RecurringSend
from apps.tenants.models import Tenant

PENDING_STATUSES = {*CLAIMABLE_STATUSES, DeliveryStatus.SENDING, DeliveryStatus.STANDBY}
NOTIFICATION_STATUSES = ["pending", *DeliveryStatus.values, "mixed"]


def notification_status(*, deliveries: list[Delivery]) -> str:
    """One word for a notification: "pending" while any delivery is still in flight,
    otherwise the deliveries' common status, or "mixed"."""
    statuses = {d.status for d in deliveries}
    if statuses & PENDING_STATUSES:
        return "pending"
    if len(statuses) == 1:
        return statuses.pop()
    return "mixed"


def notifications_list(
    *,
    tenant: Tenant,
    recipient: str | None = None,
    category: str | None = None,
    categories: list[str] | None = None,
    status: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> QuerySet[Notification]:
    notifications = (
        Notification.objects.filter(tenant=tenant)
        .select_related("recipient", "category", "template_version")
        .prefetch_related("deliveries")
        .order_by("-created_at", "-id")
    )
    if recipient:
        notifications = notifications.filter(recipient__external_id=recipient)
    if category:
        notifications = notifications.filter(category__key=category)
    if categories:  # the categories a limited API key may read
        notifications = notifications.filter(category__key__in=categories)
    if status:
        notifications = notifications.filter(deliveries__status=status).distinct()
    if created_after:
        notifications = notifications.filter(created_at__gte=created_after)
    if created_before:
        notifications = notifications.filter(created_at__lt=created_before)
    return notifications


def recurring_sends_list(*, tenant: Tenant, categories: list[str] | None = None) -> QuerySet[RecurringSend]:
    """The tenant's recurring sends; with `categories` (a limited API key's), only theirs."""
    recurring = RecurringSend.objects.filter(tenant=tenant).select_related("category")
    return recurring.filter(category__key__in=categories) if categories else recurring


def notification_get(*, tenant: Tenant, notification_id: UUID) -> Notification:
    """One notification with its deliveries and their full history; raises DoesNotExist."""
    return (
        Notification.objects.select_related("recipient", "category", "template_version")
        .prefetch_related(Prefetch("deliveries", queryset=Delivery.objects.prefetch_related("events")))
        .get(tenant=tenant, id=notification_id)
    )
