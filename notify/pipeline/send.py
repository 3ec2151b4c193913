"""Send: claim a batch of deliveries atomically, render and send them, record outcomes.

A duplicate task (a republish, a redelivery) finds nothing left to claim, so the same
delivery is never sent by two workers at once."""

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from uuid import UUID

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from apps.catalog.models import Category, CategoryKind
from apps.deliveries.models import CLAIMABLE_STATUSES, Delivery, DeliveryStatus, Event, Notification, Provider
from apps.recipients.models import Recipient
from apps.recipients.tokens import email_links
from apps.tenants.models import Tenant
from notify.channels import channel_for_provider, channel_get
from notify.channels.base import OutboundMessage, RenderedContent, SendOutcome
from notify.observability import metrics
from notify.observability.tracing import send_span_annotate
from notify.pipeline.bulk import PrimaryKeyPath, retry_lock_conflicts
from notify.pipeline.dispatch import holds_read
from notify.pipeline.plan import (
    content_render,
    content_sealed,
    secure_notice_render,
    variant_mentions_recipient,
    variant_resolve,
)
from notify.pipeline.record import deliveries_held, outcomes_record
from notify.pipeline.routing import chains_advance
from notify.policy.caps import budget_verdict, cap_verdict
from notify.policy.preferences import category_rules, recipient_rules_many, tenant_rules
from notify.policy.rules import CategoryRules, TenantRules, Verdict, verdict
from notify.policy.suppression import suppressed_addresses
from notify.resilience.failures import FailureKind
from notify.resilience.providers import providers_for_tenants, providers_send

logger = logging.getLogger(__name__)

# Deliveries are sent and recorded in chunks: bulk writes for throughput, while a worker
# killed mid-batch leaves at most one chunk to be sent again (which a provider that honours
# idempotency keys accepts once). The lease is renewed between chunks once half of it has
# passed, so it must only outlast two chunks' sending.
RECORD_CHUNK = 250


SEND_FIELDS = (
    "id",
    "channel",
    "priority",
    "attempt_count",
    "resend_round",
    "notification__id",
    "notification__created_at",
    "step",
    "notification__tenant_id",
    "notification__event_id",
    "notification__category_id",
    "notification__template_version_id",
    "notification__locale",
    "notification__recipient__id",
    "notification__recipient__external_id",
    "notification__recipient__email",
    "notification__recipient__phone",
    "notification__recipient__locale",
    "notification__recipient__timezone",
    "notification__recipient__attributes",
    # The recipient's own settings, read with its deliveries: what the database holds now.
    *(
        f"notification__recipient__preferences__{name}"
        for name in ("paused", "paused_until", "channels", "categories", "quiet_hours")
    ),
)


@retry_lock_conflicts
def deliveries_claim(*, delivery_ids: list[str]) -> tuple[UUID, list[Delivery]]:
    """Lease every due, claimable delivery among the ids; return the lease token and them."""
    now = timezone.now()
    token = uuid.uuid4()
    # One statement, which re-checks each row's status once it holds the row: of two workers
    # given the same ids (a republished batch), the second waits for the first's claim to
    # commit, then finds the rows leased and leaves them. (Locking them first with SKIP
    # LOCKED wrote every row twice.) Should it deadlock with another multi-row update, it
    # is run again.
    claimable = Delivery.objects.alias(current_status=PrimaryKeyPath("status")).filter(
        id__any_of=delivery_ids, current_status__in=CLAIMABLE_STATUSES, next_attempt_at__lte=now
    )
    claimed = (
        # What a kill switch (the installation's or a tenant's) or the runaway-send guard
        # holds stays queued, untouched, until it resumes.
        holds_read()
        .exclude_from(claimable)
        .update(
            status=DeliveryStatus.SENDING,
            attempt_count=F("attempt_count") + 1,
            lease_token=token,
            lease_expires_at=now + timedelta(seconds=settings.NOTIFY_LEASE_SECONDS),
            updated_at=now,
        )
    )
    if not claimed:
        return token, []
    # Only what sending needs: fewer columns to fetch and timestamps to parse for each row.
    deliveries = list(
        Delivery.objects.filter(id__any_of=delivery_ids, lease_token=token)
        .select_related("notification__recipient__preferences")
        .only(*SEND_FIELDS)
    )
    return token, deliveries


def deliveries_send(*, delivery_ids: list[str]) -> int:
    """Claim, send and record the given deliveries; return how many were claimed."""
    token, deliveries = deliveries_claim(delivery_ids=delivery_ids)
    if not deliveries:
        return 0
    # A batch shares a few events, categories and tenants: read each once, not per row.
    notifications = [d.notification for d in deliveries]
    tenant_ids = {n.tenant_id for n in notifications}
    events = list(
        Event.objects.filter(id__in={n.event_id for n in notifications}).values_list("id", "data", "traceparent")
    )
    # The task's span names its deliveries and links to the requests their events came from.
    send_span_annotate(delivery_ids=[d.id for d in deliveries], traceparents={tp for _, _, tp in events if tp})
    context = BatchContext(
        event_data={event_id: data for event_id, data, _ in events},
        categories=Category.objects.in_bulk({n.category_id for n in notifications}),
        tenants=Tenant.objects.in_bulk(tenant_ids),
        # A batch can hold several tenants' deliveries (the sweeper's, a resume's): each
        # tenant sends through its own providers, all read in one query.
        providers=providers_for_tenants(channel=deliveries[0].channel, tenant_ids=tenant_ids),
    )
    metrics.labels_learn(tenants=context.tenants.values(), categories=context.categories.values())
    by_id = {d.id: d for d in deliveries}
    lease = timedelta(seconds=settings.NOTIFY_LEASE_SECONDS)
    renew_after = timezone.now() + lease / 2
    for start in range(0, len(deliveries), RECORD_CHUNK):
        chunk = deliveries[start : start + RECORD_CHUNK]
        if start and timezone.now() > renew_after:
            # Half the lease is gone: extend it before sending more, or stop if it was lost.
            chunk = _lease_renew(lease_token=token, deliveries=chunk)
            renew_after = timezone.now() + lease / 2
        if chunk:
            outcomes = _send_chunk(deliveries=chunk, context=context)
            recorded = outcomes_record(lease_token=token, deliveries=by_id, outcomes=outcomes)
            metrics.outcomes_count(recorded=recorded, deliveries=by_id, outcomes=outcomes, now=timezone.now())
            # A fallback chain moves on (or stops) with its step's outcome.
            chains_advance(notification_ids=[d.notification_id for d in chunk if d.step is not None])
    return len(deliveries)


def _lease_renew(*, lease_token: UUID, deliveries: list[Delivery]) -> list[Delivery]:
    """Extend the lease on the deliveries still held and return them. Any whose lease
    expired were re-queued by the sweeper and are another worker's now: not sent here."""
    now = timezone.now()
    held = deliveries_held(delivery_ids=[d.id for d in deliveries], lease_token=lease_token)
    renewed = held.update(lease_expires_at=now + timedelta(seconds=settings.NOTIFY_LEASE_SECONDS), updated_at=now)
    if renewed == len(deliveries):
        return deliveries
    still_held = set(held.values_list("id", flat=True))
    logger.warning("lease lost for %d deliveries before sending", len(deliveries) - len(still_held))
    return [d for d in deliveries if d.id in still_held]


@dataclass(frozen=True)
class BatchContext:
    event_data: dict[UUID, dict]
    categories: dict[int, Category]
    tenants: dict[UUID, Tenant]
    providers: dict[UUID, list[Provider]]
    shared_content: dict[tuple, RenderedContent] = field(default_factory=dict)

    # The policy's view of each category and tenant, built once per batch, not per delivery.
    @cached_property
    def category_rules(self) -> dict[int, CategoryRules]:
        return {pk: category_rules(category=category) for pk, category in self.categories.items()}

    @cached_property
    def tenant_rules(self) -> dict[UUID, TenantRules]:
        return {pk: tenant_rules(tenant=tenant) for pk, tenant in self.tenants.items()}

    def content_for(self, *, delivery: Delivery, channel: str) -> RenderedContent:
        """The delivery's content. A bulk event goes to many people with the same data: a
        template that does not mention the recipient renders the same for everyone with the
        same locale and timezone, so it is rendered once per batch for each of those."""
        notification, recipient = delivery.notification, delivery.notification.recipient
        tenant = self.tenants[notification.tenant_id]
        category = self.categories[notification.category_id]
        if category.sensitive and channel != "inapp":
            # Enforced here, where content meets a channel, so no template can leak it.
            return secure_notice_render(category=category, tenant=tenant)
        content = self._content_render(notification=notification, recipient=recipient, tenant=tenant, channel=channel)
        # Only the in-app inbox stores what it sends; other channels need no marking.
        return content_sealed(content=content) if tenant.encrypt_content and channel == "inapp" else content

    def _content_render(
        self, *, notification: Notification, recipient: Recipient, tenant: Tenant, channel: str
    ) -> RenderedContent:
        variant = variant_resolve(
            version_id=notification.template_version_id,
            channel=channel,
            locale=notification.locale,
            default_locale=tenant.default_locale,
        )
        locale = notification.locale or tenant.default_locale
        shared_key = None
        if not variant_mentions_recipient(variant=variant):
            shared_key = (variant.pk, notification.event_id, locale, recipient.timezone)
            if shared_key in self.shared_content:
                return self.shared_content[shared_key]
        content = content_render(
            variant=variant, data=self.event_data[notification.event_id], recipient=recipient, locale=locale
        )
        if shared_key is not None:
            self.shared_content[shared_key] = content
        return content


def withheld_outcome(*, delivery: Delivery, decision: Verdict) -> SendOutcome:
    return SendOutcome(delivery_id=delivery.id, withheld=decision.status, reason=decision.reason, until=decision.until)


def _send_chunk(*, deliveries: list[Delivery], context: BatchContext) -> list[SendOutcome]:
    channel = channel_get(name=deliveries[0].channel)
    # Messages by the provider accounts they go through: tenants that use the installation's
    # providers share one send (and so one provider batch request).
    messages_by_providers: dict[tuple[int, ...], list[OutboundMessage]] = defaultdict(list)
    providers_by_key: dict[tuple[int, ...], list[Provider]] = {}
    outcomes: list[SendOutcome] = []
    addresses = {d.id: channel.address_for(recipient=d.notification.recipient) for d in deliveries}
    # Checked again here: an address can bounce after its notification was planned.
    suppressed = {
        tenant_id: suppressed_addresses(
            tenant_id=tenant_id,
            channel=channel.name,
            addresses=[addresses[d.id] for d in deliveries if d.notification.tenant_id == tenant_id],
        )
        for tenant_id in {d.notification.tenant_id for d in deliveries}
    }
    recipients_rules = recipient_rules_many(
        recipients=[d.notification.recipient for d in deliveries],
        with_consents={
            d.notification.recipient_id
            for d in deliveries
            if context.categories[d.notification.category_id].kind == CategoryKind.MARKETING
        },
    )
    now = timezone.now()
    for delivery in deliveries:
        notification = delivery.notification
        recipient = notification.recipient
        address = addresses[delivery.id]
        if address and address in suppressed[notification.tenant_id]:
            reason = f"address is suppressed: {suppressed[notification.tenant_id][address]}"
            outcomes.append(SendOutcome(delivery_id=delivery.id, withheld=DeliveryStatus.SUPPRESSED, reason=reason))
            continue
        if not address:
            outcomes.append(
                SendOutcome(
                    delivery_id=delivery.id,
                    failure=FailureKind.PERMANENT,
                    reason=f"recipient has no {channel.name} address",
                )
            )
            continue
        category, tenant = context.categories[notification.category_id], context.tenants[notification.tenant_id]
        # What the person asked for, read now: a change made after the event still applies.
        decision = verdict(
            recipient=recipients_rules[recipient.id],
            category=context.category_rules[category.id],
            tenant=context.tenant_rules[tenant.id],
            channel=channel.name,
            created_at=notification.created_at,
            now=now,
        )
        if not decision.send:
            outcomes.append(withheld_outcome(delivery=delivery, decision=decision))
            continue
        try:
            content = context.content_for(delivery=delivery, channel=channel.name)
        except Exception as error:  # noqa: BLE001 - any rendering error, including a template's
            # The pinned version renders the same way on every attempt: retrying cannot help.
            logger.exception("rendering delivery %s failed", delivery.id, extra={"delivery_id": str(delivery.id)})
            outcomes.append(
                SendOutcome(delivery_id=delivery.id, failure=FailureKind.PERMANENT, reason=f"template error: {error}")
            )
            continue
        # Caps and budgets last: only a send that is really going out may count against them.
        decision = cap_verdict(delivery=delivery, category=category, tenant=tenant, created_at=notification.created_at)
        if decision.send:
            cost = channel.cost_of(content=content)
            decision = budget_verdict(
                tenant=tenant, category=category, channel=channel.name, cost=cost, delivery_id=delivery.id
            )
        if not decision.send:
            outcomes.append(withheld_outcome(delivery=delivery, decision=decision))
            continue
        links = {}
        if channel.wants_links and category.kind != CategoryKind.CRITICAL:
            links = email_links(recipient_id=recipient.id, category_key=category.key, channel=channel.name)
        providers = context.providers[notification.tenant_id]
        providers_key = tuple(p.pk for p in providers)
        providers_by_key[providers_key] = providers
        messages_by_providers[providers_key].append(
            OutboundMessage(
                delivery_id=delivery.id,
                notification_id=notification.id,
                resend_round=delivery.resend_round,
                address=address,
                content=content,
                category_key=category.key,
                **links,
            )
        )
    for providers_key, messages in messages_by_providers.items():
        try:
            outcomes.extend(
                providers_send(
                    channel=channel,
                    messages=messages,
                    providers=providers_by_key[providers_key],
                    channel_for=channel_for_provider,
                )
            )
        except Exception as error:  # noqa: BLE001 - a channel must not strand a leased chunk
            logger.exception("the %s channel raised while sending %d messages", channel.name, len(messages))
            channel.reset()
            reason = f"channel error: {type(error).__name__}: {error}"[:400]
            outcomes.extend(
                SendOutcome(delivery_id=m.delivery_id, failure=FailureKind.TRANSIENT, reason=reason) for m in messages
            )
    return outcomes
