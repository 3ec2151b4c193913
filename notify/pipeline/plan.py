"""Plan: decide the channels, the priority and the content of each notification.

Planning pins the template version on the notification. Rendering that version is
deterministic, so the send stage renders it then instead of storing the rendered text."""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from uuid import UUID
from zoneinfo import ZoneInfo

from django.conf import settings
from django.template import Context
from django.template import Template as DjangoTemplate

from apps.catalog.models import Category, Routing, TemplateVariant, TemplateVersion
from apps.deliveries.models import CLAIMABLE_STATUSES, Delivery, DeliveryStatus, Event, Notification
from apps.recipients.models import PreferenceSet, Recipient
from apps.tenants.encryption import content_seal
from apps.tenants.models import Tenant
from notify.channels import channel_get
from notify.channels.base import RenderedContent
from notify.pipeline.bulk import PrimaryKeyPath, rows_insert
from notify.pipeline.dispatch import deliveries_publish_on_commit
from notify.pipeline.record import HistoryRow, history_event, history_insert
from notify.pipeline.templating import ENGINE, formatting_for
from notify.policy.suppression import suppressed_addresses


class PlanError(Exception):
    """The request cannot be planned; `field` names the request field at fault."""

    def __init__(self, *, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class LocalSendTime:
    """A wall-clock time in each recipient's own timezone: the next 09:00 there, or 09:00 on
    a given day there."""

    clock: time
    day: date | None = None

    @classmethod
    def parse(cls, text: str) -> "LocalSendTime":
        """ "09:00", or "2026-12-01T09:00" with no offset; raises ValueError."""
        if "T" in text:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is not None:
                raise ValueError("a local time has no offset: give 2026-12-01T09:00, or use send_at")
            return cls(clock=moment.time(), day=moment.date())
        return cls(clock=time.fromisoformat(text))

    def due_at(self, *, timezone_name: str, now: datetime) -> datetime:
        zone = ZoneInfo(timezone_name or "UTC")
        day = self.day or now.astimezone(zone).date()
        due = datetime.combine(day, self.clock, tzinfo=zone).astimezone(UTC)
        if self.day is None and due <= now:  # today's has passed there: tomorrow's
            due = datetime.combine(day + timedelta(days=1), self.clock, tzinfo=zone).astimezone(UTC)
        return max(due, now)


@dataclass
class Plan:
    notifications: list[Notification]
    deliveries: list[Delivery]
    history: list[HistoryRow]


def notifications_plan(
    *,
    event: Event,
    category: Category,
    recipients: list[Recipient],
    priority_override: str | None,
    channels_override: list[str] | None,
    send_at: datetime | None,
    now: datetime,
    send_at_local: LocalSendTime | None = None,
    template_version: TemplateVersion | None = None,
) -> Plan:
    """Build (unsaved) notifications, deliveries and their first history rows, with the
    template's current version, or the one given (a broadcast pins it for every chunk)."""
    version = template_version or category.template.current_version()
    if version is None:
        raise PlanError(field="category", message=f"Category '{category.key}' has a template with no versions yet.")
    channels, escalations = plan_channels(category=category, version=version, channels_override=channels_override)
    escalate_after = category.escalate_after
    priority = priority_override or category.default_priority
    due_at = max(send_at, now) if send_at else now
    tenant_locale = event.tenant.default_locale

    addresses = {name: channel_get(name=name).addresses_for(recipients=recipients) for name in channels + escalations}
    suppressed = {
        name: suppressed_addresses(tenant_id=event.tenant_id, channel=name, addresses=addresses[name].values())
        for name in channels + escalations
    }
    fallback = category.routing == Routing.FALLBACK
    orders = _channel_orders(recipients=recipients) if fallback else {}
    plan = Plan(notifications=[], deliveries=[], history=[])
    for recipient in recipients:
        if send_at_local is not None:
            due_at = send_at_local.due_at(timezone_name=recipient.timezone, now=now)
        notification = Notification.new(
            tenant_id=event.tenant_id,
            event=event,
            recipient=recipient,
            category=category,
            template_version=version,
            locale=recipient.locale or tenant_locale,
            priority=priority,
            send_at=send_at if send_at_local is None else due_at,
        )
        plan.notifications.append(notification)
        ordered = chain_order(preferred=orders.get(recipient.id, []), channels=channels) if fallback else channels
        first_step_planned = False
        for step, channel_name in enumerate(ordered):
            delivery = Delivery.new(
                notification=notification,
                channel=channel_name,
                priority=priority,
                next_attempt_at=due_at,
                step=step if fallback else None,
            )
            unavailable = _unavailable(
                address=addresses[channel_name][recipient.id], suppressed=suppressed[channel_name], channel=channel_name
            )
            if unavailable:
                delivery.status, delivery.status_reason = DeliveryStatus.SUPPRESSED, unavailable
                reason = unavailable
            elif fallback and first_step_planned:
                # Later steps wait: they are sent only if the ones before do not reach the person.
                delivery.status = DeliveryStatus.STANDBY
                reason = delivery.status_reason = f"fallback step {step + 1}: sent if the steps before it fail"
            else:
                first_step_planned = True
                reason = f"scheduled for {due_at.isoformat()}" if due_at > now else "planned"
            plan.deliveries.append(delivery)
            plan.history.append(history_event(delivery=delivery, status=delivery.status, reason=reason, at=now))
        for channel_name in escalations:
            escalate_at = due_at + (escalate_after or timedelta(0))
            delivery = Delivery.new(
                notification=notification,
                channel=channel_name,
                priority=priority,
                next_attempt_at=escalate_at,
                escalation=True,
                status=DeliveryStatus.STANDBY,
                status_reason=f"escalation: sent at {escalate_at.isoformat()} unless the notification is read",
            )
            unavailable = _unavailable(
                address=addresses[channel_name][recipient.id], suppressed=suppressed[channel_name], channel=channel_name
            )
            if unavailable:
                delivery.status, delivery.status_reason = DeliveryStatus.SUPPRESSED, unavailable
            plan.deliveries.append(delivery)
            plan.history.append(
                history_event(delivery=delivery, status=delivery.status, reason=delivery.status_reason, at=now)
            )
    return plan


def plan_channels(
    *, category: Category, version: TemplateVersion, channels_override: list[str] | None
) -> tuple[list[str], list[str]]:
    """The channels a notification is planned on, and those it escalates to; raises PlanError
    when the template version has no content for one of them."""
    channels = channels_override or list(category.default_channels)
    escalations = [c for c in category.escalate_to if c not in channels] if category.escalate_after else []
    variants = version_variants(version_id=version.pk)
    missing = [c for c in channels + escalations if not any(channel == c for channel, _ in variants)]
    if missing:
        raise PlanError(
            field="channels",
            message=f"Template '{category.template.key}' v{version.number} has no content for: {', '.join(missing)}.",
        )
    return channels, escalations


def chain_order(*, preferred: list[str], channels: list[str]) -> list[str]:
    """A fallback chain: the recipient's own channel order first, then the category's."""
    return [c for c in preferred if c in channels] + [c for c in channels if c not in preferred]


def _channel_orders(*, recipients: list[Recipient]) -> dict[UUID, list[str]]:
    return dict(
        PreferenceSet.objects.filter(recipient__in=recipients)
        .exclude(channel_order=[])
        .values_list("recipient_id", "channel_order")
    )


def _unavailable(*, address: str, suppressed: dict[str, str], channel: str) -> str:
    """Why the recipient cannot be reached on the channel, or "" when they can."""
    if not address:
        return f"recipient has no {channel} address"
    if address in suppressed:
        return f"address is suppressed: {suppressed[address]}"
    return ""


def plan_save(*, plan: Plan, now: datetime) -> None:
    """Write a plan's rows and publish its deliveries once the transaction commits."""
    deliveries_publish_on_commit(deliveries=plan.deliveries, now=now)
    rows_insert(objects=plan.notifications)
    rows_insert(objects=plan.deliveries)
    history_insert(rows=plan.history)


# What a newer event with the same replace key stops: everything not yet being sent, an older
# chain's later steps and escalations included (they would wait on a chain that no longer
# moves). A delivery a worker holds (sending) is left to finish: the newer message carries the
# same collapse key, so on a device it replaces the older one rather than adding to it.
SUPERSEDABLE_STATUSES = (*CLAIMABLE_STATUSES, DeliveryStatus.STANDBY)


def deliveries_supersede(*, event: Event, recipient_ids: Sequence[UUID | str], now: datetime) -> int:
    """Mark superseded, with history, the unsent deliveries of the tenant's earlier events
    with the event's replace key to the same recipients; return how many. Runs in the
    planning transaction, before the event's own rows are written."""
    if not event.replace_key:
        return 0
    # Through the events' (tenant, replace_key) index and the foreign keys' indexes; the
    # status is compared as an expression so that no partial index on status is used instead.
    candidates = list(
        Delivery.objects.alias(current_status=PrimaryKeyPath("status"))
        .filter(
            notification__event__tenant_id=event.tenant_id,
            notification__event__replace_key=event.replace_key,
            notification__recipient_id__in=list(recipient_ids),
            current_status__in=SUPERSEDABLE_STATUSES,
        )
        .exclude(notification__event_id=event.id)
        .values_list("id", flat=True)
    )
    if not candidates:
        return 0
    reason = f"superseded by event {event.id}"
    # One UPDATE that re-checks each row's status as it takes the row's lock: a delivery a
    # worker claimed meanwhile is sending now, and is left to finish.
    Delivery.objects.alias(current_status=PrimaryKeyPath("status")).filter(
        id__any_of=candidates, current_status__in=SUPERSEDABLE_STATUSES
    ).update(status=DeliveryStatus.SUPERSEDED, status_reason=reason, updated_at=now)
    superseded = list(
        Delivery.objects.filter(id__any_of=candidates, status=DeliveryStatus.SUPERSEDED, status_reason=reason).only(
            "id", "attempt_count"
        )
    )
    history_insert(
        rows=[history_event(delivery=d, status=DeliveryStatus.SUPERSEDED, reason=reason, at=now) for d in superseded]
    )
    return len(superseded)


@lru_cache(maxsize=512)
def version_variants(*, version_id: int) -> dict[tuple[str, str], list[TemplateVariant]]:
    """A version's content by (channel, lower-cased locale): one variant, or an A/B test's
    variants in the order of their keys (the first is the control). Versions are immutable, so
    the cache never needs invalidating."""
    variants: dict[tuple[str, str], list[TemplateVariant]] = {}
    for variant in TemplateVariant.objects.filter(version_id=version_id).order_by("key"):
        variants.setdefault((variant.channel, variant.locale.lower()), []).append(variant)
    return variants


def locale_chain(*, locale: str, default_locale: str) -> list[str]:
    """es-MX -> es-mx, es, then the tenant default and its language, then "" (the default)."""
    chain: list[str] = []
    for candidate in (locale, default_locale):
        tag = candidate.replace("_", "-").lower()
        while tag:
            if tag not in chain:
                chain.append(tag)
            tag = tag.rpartition("-")[0]
    chain.append("")
    return chain


def variant_resolve(
    *, version_id: int, channel: str, locale: str, default_locale: str, recipient_id: UUID | str
) -> TemplateVariant:
    """The content a recipient gets: the closest locale first (a person reads their own
    language whatever the test), then, among that locale's A/B variants, the recipient's."""
    variants = version_variants(version_id=version_id)
    for tag in locale_chain(locale=locale, default_locale=default_locale):
        candidates = variants.get((channel, tag))
        if candidates:
            return variant_assign(variants=candidates, experiment=f"version:{version_id}", recipient_id=recipient_id)
    # Planning checked that the channel has content, so take any locale rather than fail.
    candidates = next(found for (c, _), found in sorted(variants.items()) if c == channel)
    return variant_assign(variants=candidates, experiment=f"version:{version_id}", recipient_id=recipient_id)


def variant_assign(
    *, variants: Sequence[TemplateVariant], experiment: str, recipient_id: UUID | str
) -> TemplateVariant:
    """The recipient's variant in an experiment: a hash of the two picks a point in the sum of
    the weights, so the same person always lands on the same variant, in any worker, on any
    retry, while another experiment splits people afresh."""
    total = sum(variant.weight for variant in variants)
    if len(variants) == 1 or total == 0:
        return variants[0]
    digest = hashlib.sha256(f"{experiment}:{recipient_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") % total
    for variant in variants:
        if point < variant.weight:
            return variant
        point -= variant.weight
    raise AssertionError("the point lies within the weights' sum")


def variant_mentions_recipient(*, variant: TemplateVariant) -> bool:
    """Whether the content can differ between recipients of one event (beyond their locale and
    timezone). A plain text search: it may say yes when the word is in a literal, never no
    when it is used."""
    return _mention_in(variant.subject, variant.title, variant.body, variant.html, variant.link)


@lru_cache(maxsize=4096)
def _mention_in(*parts: str) -> bool:
    return any("recipient" in part for part in parts)


@lru_cache(maxsize=4096)
def _compiled(source: str) -> DjangoTemplate:
    return ENGINE.from_string(source)


def _render(source: str, context: dict, *, html: bool = False) -> str:
    if "{" not in source:
        return source
    # Escaping is decided by the context: HTML parts are escaped, text parts are not.
    return _compiled(source).render(Context(context, autoescape=html))


def content_render(*, variant: TemplateVariant, data: dict, recipient: Recipient, locale: str) -> RenderedContent:
    """Render one variant with the event data and the recipient's public fields; money, numbers
    and dates are formatted for `locale` and the recipient's timezone."""
    context = {
        "data": data,
        "recipient": {
            "id": recipient.external_id,
            "email": recipient.email,
            "phone": recipient.phone,
            "locale": recipient.locale,
            "timezone": recipient.timezone,
            **({"attributes": recipient.attributes} if recipient.attributes else {}),
        },
    }
    with formatting_for(locale=locale, timezone=recipient.timezone):
        return RenderedContent(
            subject=_render(variant.subject, context),
            title=_render(variant.title, context),
            body=_render(variant.body, context),
            html=_render(variant.html, context, html=True),
            link=_render(variant.link, context),
            data=variant.data,
            variant=variant.key,
        )


def secure_notice_render(*, category: Category, tenant: Tenant) -> RenderedContent:
    """What a sensitive category sends on every channel but the in-app inbox: a notice and a
    link, never the content, whatever its templates hold (HIPAA-style; docs/compliance.md)."""
    notice = category.secure_message_text or tenant.secure_message_text or settings.NOTIFY_SECURE_MESSAGE_TEXT
    url = tenant.secure_message_url or settings.NOTIFY_SECURE_MESSAGE_URL
    return RenderedContent(
        subject=notice,
        title=notice,
        body=f"{notice}: {url}" if url else notice,
        html=_render(
            '<p>{{ notice }}{% if url %}: <a href="{{ url }}">{{ url }}</a>{% endif %}</p>',
            {"notice": notice, "url": url},
            html=True,
        ),
        link=url,
    )


def content_sealed(*, content: RenderedContent) -> RenderedContent:
    """The content marked to be stored encrypted (a tenant with encrypt_content)."""
    return replace(
        content,
        **{name: content_seal(encrypt=True, value=getattr(content, name)) for name in ("title", "body", "data")},
    )
