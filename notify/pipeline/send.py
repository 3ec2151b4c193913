"""Send: claim a batch of deliveries atomically, render and send them, record outcomes.

A duplicate task (a republish, a redelivery) finds nothing left to claim, so the same
delivery is never sent by two workers at once."""

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from uuid import UUID

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from apps.catalog.models import Category, CategoryKind
from apps.deliveries.models import CLAIMABLE_STATUSES, Delivery, DeliveryStatus, Event, Notification, Provider
from apps.recipients.models import Recipient
from apps.recipients.tokens import email_links
from apps.tenants.models import Tenant
from notify.channels import channel_for_provider, channel_get
from notify.channels.base import Channel, OutboundMessage, RenderedContent, SendOutcome
from notify.observability import metrics
from notify.observability.tracing import send_span_annotate
from notify.pipeline.bulk import PrimaryKeyPath, retry_lock_conflicts
from notify.pipeline.dispatch import holds_read, lease_expiry, lease_length, recorded_publish
from notify.pipeline.ordering import held_behind_earlier, ordered_category_ids, successors_publish
from notify.pipeline.plan import (
    content_render,
    content_sealed,
    secure_notice_render,
    variant_mentions_recipient,
    variant_resolve,
)
from notify.pipeline.reconcile import in_doubt_reconcile
from notify.pipeline.record import deliveries_held, outcomes_record
from notify.pipeline.routing import chains_advance
from notify.policy.caps import budget_verdict, cap_verdict
from notify.policy.preferences import category_rules, recipient_rules_many, tenant_rules
from notify.policy.rules import CategoryRules, TenantRules, Verdict, verdict
from notify.policy.suppression import suppressed_addresses
from notify.resilience.failures import FailureKind
from notify.resilience.providers import providers_for_tenants, providers_send

logger = logging.getLogger(__name__)

# Deliveries are sent and recorded in chunks of at most one provider request (a Postmark
# batch is one request for a whole chunk; Twilio takes one message a request): bulk writes
# for throughput, while a worker killed mid-batch leaves at most one request in doubt, which
# is reconciled with the provider before it is sent again (notify/pipeline/reconcile.py).
# The lease is renewed between chunks once half of it has passed, so it must only outlast
# two chunks' sending.
RECORD_CHUNK = 250


SEND_FIELDS = (
    "id",
    "channel",
    "priority",
    "attempt_count",
    "resend_round",
    "in_doubt_since",
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
    if ordered := ordered_category_ids():
        # Only when some category is ordered (rarely), and still within the one statement.
        claimable = claimable.filter(~held_behind_earlier(category_ids=ordered, now=now))
    claimed = (
        # What a kill switch (the installation's or a tenant's) or the runaway-send guard
        # holds stays queued, untouched, until it resumes.
        holds_read()
        .exclude_from(claimable)
        .update(
            status=DeliveryStatus.SENDING,
            attempt_count=F("attempt_count") + 1,
            lease_token=token,
            lease_expires_at=lease_expiry(now=now),
            # Empty while this attempt runs, so that a provider id found on a leased row is
            # this attempt's note (LeasedBatch.taken_note), never an earlier send's.
            provider_message_id="",
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
        Event.objects.filter(id__in={n.event_id for n in notifications}).values_list(
            "id", "data", "traceparent", "replace_key"
        )
    )
    # The task's span names its deliveries and links to the requests their events came from.
    send_span_annotate(delivery_ids=[d.id for d in deliveries], traceparents={tp for _, _, tp, _ in events if tp})
    context = BatchContext(
        event_data={event_id: data for event_id, data, _, _ in events},
        replace_keys={event_id: key for event_id, _, _, key in events if key},
        categories=Category.objects.in_bulk({n.category_id for n in notifications}),
        tenants=Tenant.objects.in_bulk(tenant_ids),
        # A batch can hold several tenants' deliveries (the sweeper's, a resume's): each
        # tenant sends through its own providers, all read in one query.
        providers=providers_for_tenants(channel=deliveries[0].channel, tenant_ids=tenant_ids),
    )
    metrics.labels_learn(tenants=context.tenants.values(), categories=context.categories.values())
    batch = LeasedBatch(lease_token=token, deliveries={d.id: d for d in deliveries}, context=context)
    channel = channel_get(name=deliveries[0].channel)
    per_request = channel.messages_per_request()
    for start in range(0, len(deliveries), RECORD_CHUNK):
        chunk = batch.still_held(deliveries=deliveries[start : start + RECORD_CHUNK])
        if not chunk:
            continue
        prepared = _chunk_prepare(channel=channel, deliveries=chunk, context=context)
        batch.record(outcomes=prepared.outcomes)
        batch.variants_note(variants=prepared.variants)
        # Each provider request's outcomes are recorded as soon as it returns. A request of
        # one message (a text) gets a one-row note of what the provider took instead, and the
        # chunk is recorded in full once: a transaction a message would cost most of the rate.
        noted: list[SendOutcome] = []
        for providers, messages in prepared.sends:
            for part_start in range(0, len(messages), per_request):
                part = messages[part_start : part_start + per_request]
                held = {d.id for d in batch.still_held(deliveries=[batch.deliveries[m.delivery_id] for m in part])}
                part = [m for m in part if m.delivery_id in held]
                if not part:
                    continue
                outcomes = _messages_send(channel=channel, messages=part, providers=providers)
                if per_request == 1:
                    batch.taken_note(outcomes=outcomes)
                    noted.extend(outcomes)
                else:
                    batch.record(outcomes=outcomes)
        batch.record(outcomes=noted)
    return len(deliveries)


@dataclass
class LeasedBatch:
    """A claimed batch as it is sent: its lease, renewed as it goes, and how outcomes are
    recorded and acted on."""

    lease_token: UUID
    deliveries: dict[UUID, Delivery]
    context: "BatchContext"
    renew_every: timedelta = field(init=False)
    renew_after: datetime = field(init=False)

    def __post_init__(self) -> None:
        # The shortest lease among the batch's priorities sets when it is renewed.
        self.renew_every = min(lease_length(priority=d.priority) for d in self.deliveries.values()) / 2
        self.renew_after = timezone.now() + self.renew_every

    def still_held(self, *, deliveries: list[Delivery]) -> list[Delivery]:
        """Once half the lease is gone, extend it before sending more, and keep only the
        deliveries still held (the others were re-queued and are another worker's now)."""
        if timezone.now() <= self.renew_after:
            return deliveries
        self.renew_after = timezone.now() + self.renew_every
        return _lease_renew(lease_token=self.lease_token, deliveries=deliveries)

    def taken_note(self, *, outcomes: list[SendOutcome]) -> None:
        """Note on each delivery the provider took the id it gave, in one single-row statement
        as the answer comes back: should this worker die before the chunk is recorded, the
        sweeper finds the note and records the send (dispatch._leases_expire)."""
        taken = [o for o in outcomes if o.ok and o.provider_message_id]
        if not taken:
            return
        # A note is taken for every text, so it is one statement and one round trip rather
        # than a transaction of four. It commits without waiting for the disk (set_config is
        # local to the statement's own transaction): a database crash that loses the note
        # also ends the worker's session, and the send is then reconciled with the provider.
        with connection.cursor() as cursor:
            for outcome in taken:
                cursor.execute(
                    "WITH commit_mode AS (SELECT set_config('synchronous_commit', 'off', true))"
                    f" UPDATE {Delivery._meta.db_table} SET provider_message_id = %s"
                    " FROM commit_mode WHERE id = %s AND lease_token = %s",
                    [outcome.provider_message_id[:255], outcome.delivery_id, self.lease_token],
                )

    def variants_note(self, *, variants: dict[UUID, str]) -> None:
        """Note the A/B variant each delivery is about to be sent with, before it is sent, so
        that its sending and its feedback are counted under it. A statement per variant, and
        none for content that tests nothing."""
        by_variant: dict[str, list[UUID]] = defaultdict(list)
        for delivery_id, variant in variants.items():
            by_variant[variant].append(delivery_id)
        for variant, delivery_ids in by_variant.items():
            deliveries_held(delivery_ids=delivery_ids, lease_token=self.lease_token).update(variant=variant)

    def record(self, *, outcomes: list[SendOutcome]) -> None:
        """The ledger records; what follows from it is published with the record, and the
        fallback chains of its steps move on (or stop) once it is committed."""
        if not outcomes:
            return
        with transaction.atomic():
            recorded = outcomes_record(lease_token=self.lease_token, deliveries=self.deliveries, outcomes=outcomes)
            recorded_publish(recorded=recorded)
        metrics.outcomes_count(
            recorded=recorded.history, deliveries=self.deliveries, outcomes=outcomes, now=timezone.now()
        )
        chains_advance(notification_ids=recorded.chains)
        # What finished lets the next of each ordered scope go, without waiting for the sweeper.
        successors_publish(
            deliveries=[self.deliveries[o.delivery_id] for o in outcomes],
            ordered_category_ids=self.context.ordered_category_ids,
        )


def _lease_renew(*, lease_token: UUID, deliveries: list[Delivery]) -> list[Delivery]:
    """Extend the lease on the deliveries still held and return them. Any whose lease
    expired were re-queued by the sweeper and are another worker's now: not sent here."""
    now = timezone.now()
    held = deliveries_held(delivery_ids=[d.id for d in deliveries], lease_token=lease_token)
    renewed = held.update(lease_expires_at=lease_expiry(now=now), updated_at=now)
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
    # Events that replace older ones by key: the key is their messages' collapse key.
    replace_keys: dict[UUID, str] = field(default_factory=dict)
    shared_content: dict[tuple, RenderedContent] = field(default_factory=dict)

    # The policy's view of each category and tenant, built once per batch, not per delivery.
    @cached_property
    def category_rules(self) -> dict[int, CategoryRules]:
        return {pk: category_rules(category=category) for pk, category in self.categories.items()}

    @cached_property
    def ordered_category_ids(self) -> set[int]:
        return {pk for pk, category in self.categories.items() if category.ordered}

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
            recipient_id=recipient.id,
        )
        locale = notification.locale or tenant.default_locale
        shared_key = None
        if not variant_mentions_recipient(variant=variant):
            # The variant's own row (so its A/B variant too) is part of the key.
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


@dataclass(frozen=True)
class PreparedChunk:
    outcomes: list[SendOutcome]  # of what is not sent: withheld, failed before sending, reconciled
    sends: list[tuple[list[Provider], list[OutboundMessage]]]  # the messages to send, by provider accounts
    variants: dict[UUID, str]  # the A/B variant of each delivery to send whose content tests one


def _chunk_prepare(*, channel: Channel, deliveries: list[Delivery], context: BatchContext) -> PreparedChunk:
    """Apply the policy to a chunk, render it, and reconcile what is in doubt: what is left to
    send, grouped by the provider accounts it goes through."""
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
    categories_by_delivery: dict[UUID, Category] = {}
    variants: dict[UUID, str] = {}
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
        categories_by_delivery[delivery.id] = category
        if content.variant:
            variants[delivery.id] = content.variant
        providers = context.providers[notification.tenant_id]
        providers_key = tuple(p.pk for p in providers)
        providers_by_key[providers_key] = providers
        messages_by_providers[providers_key].append(
            OutboundMessage(
                delivery_id=delivery.id,
                notification_id=notification.id,
                event_id=notification.event_id,
                resend_round=delivery.resend_round,
                in_doubt_since=delivery.in_doubt_since,
                address=address,
                content=content,
                category_key=category.key,
                collapse_key=context.replace_keys.get(notification.event_id, ""),
                **links,
            )
        )
    sends = []
    for providers_key, messages in messages_by_providers.items():
        in_doubt = [m for m in messages if m.in_doubt_since is not None]
        if in_doubt:
            reconciled = in_doubt_reconcile(
                channel=channel,
                messages=in_doubt,
                providers=providers_by_key[providers_key],
                channel_for=channel_for_provider,
                categories=categories_by_delivery,
                now=now,
            )
            outcomes.extend(reconciled.outcomes)
            messages = [m for m in messages if m.in_doubt_since is None] + reconciled.to_send
        if messages:
            sends.append((providers_by_key[providers_key], messages))
    return PreparedChunk(outcomes=outcomes, sends=sends, variants=variants)


def _messages_send(
    *, channel: Channel, messages: list[OutboundMessage], providers: list[Provider]
) -> list[SendOutcome]:
    try:
        return providers_send(channel=channel, messages=messages, providers=providers, channel_for=channel_for_provider)
    except Exception as error:  # noqa: BLE001 - a channel must not strand a leased chunk
        logger.exception("the %s channel raised while sending %d messages", channel.name, len(messages))
        channel.reset()
        reason = f"channel error: {type(error).__name__}: {error}"[:400]
        # What the provider took before the error is unknown: in doubt.
        return [
            SendOutcome(delivery_id=m.delivery_id, failure=FailureKind.TRANSIENT, reason=reason, in_doubt=True)
            for m in messages
        ]
