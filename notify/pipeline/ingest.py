"""Ingest: accept producer events exactly once and turn them into planned, published work.

Everything one request asks for is written in one transaction, so a bad request leaves no
partial write, and tasks are published only after that transaction commits."""

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from psycopg.types.json import Jsonb
from uuid6 import uuid7

from apps.catalog.models import Category, Priority
from apps.deliveries.models import Event
from apps.inbox.services import inbox_event_options_save
from apps.recipients.models import Recipient
from apps.tenants.encryption import content_seal
from apps.tenants.models import ApiKey, Tenant
from notify.observability import metrics
from notify.observability.tracing import event_origin, ingest_span_annotate
from notify.pipeline.bulk import retry_lock_conflicts
from notify.pipeline.digest import digest_collect
from notify.pipeline.plan import LocalSendTime, PlanError, deliveries_supersede, notifications_plan, plan_save
from notify.resilience.backpressure import bulk_admission, recipients_admission
from notify.resilience.runaway import runaway_count

RECIPIENT_FIELDS = ("email", "phone", "locale", "timezone", "attributes")
# What planning reads of a recipient (the send stage loads the rest itself).
PLANNED_RECIPIENT_FIELDS = ("id", "tenant_id", "external_id", "email", "phone", "locale", "timezone")


class IngestError(Exception):
    """A request the engine refuses; `field` names the request field at fault."""

    def __init__(self, *, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class CategoryNotAllowed(IngestError):
    """The producer's key is limited to other categories."""

    def __init__(self, *, field: str, category_key: str) -> None:
        super().__init__(field=field, message=f"This API key may not use the category '{category_key}'.")


class IdempotencyConflict(Exception):
    def __init__(self, *, key: str) -> None:
        super().__init__(
            f"Idempotency key '{key}' was already used with a different request body. "
            "Use a new key for a different request."
        )
        self.key = key


@dataclass
class RecipientRef:
    """A recipient named by external id, with the fields to upsert when given inline."""

    external_id: str
    fields: dict[str, Any] | None = None


@dataclass
class EventRequest:
    category_key: str
    recipients: list[RecipientRef]
    data: dict[str, Any] = field(default_factory=dict)
    priority: str | None = None
    channels: list[str] | None = None
    idempotency_key: str | None = None
    # A newer event with the same key replaces this one for each recipient (plan.deliveries_supersede).
    replace_key: str | None = None
    send_at: datetime | None = None
    send_at_local: LocalSendTime | None = None
    # The request body as the producer sent it, to recognise a reused idempotency key.
    body: dict[str, Any] = field(default_factory=dict)
    # What its in-app items carry (apps/inbox).
    inbox_tags: list[str] = field(default_factory=list)
    inbox_severity: str = ""
    inbox_group_key: str = ""
    inbox_actor: str = ""
    inbox_expires_at: datetime | None = None


@dataclass
class IngestResult:
    response: dict[str, Any]
    replayed: bool


def request_digest(*, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


# Concurrent upserts of overlapping recipients can deadlock; PostgreSQL aborts one of them.
@retry_lock_conflicts
def events_ingest(
    *, events: list[EventRequest], api_key: ApiKey | None = None, tenant: Tenant | None = None
) -> list[IngestResult]:
    """Ingest a list of events atomically; an event whose idempotency key was seen before
    returns its original response instead of being ingested again. The tenant is the API
    key's, or given when the service itself triggers the events (a recurring send)."""
    if tenant is None:
        assert api_key is not None, "give the producer's API key, or the tenant"
        tenant = api_key.tenant
    categories = _categories_resolve(tenant=tenant, events=events, api_key=api_key)
    _web_pool_admit(events=events, categories=categories)
    results: list[IngestResult] = []
    # What each new event made, by category: counted once the transaction has committed.
    counted: list[tuple[Category, list]] = []
    now = timezone.now()
    # Limits count new events only: a retry of an accepted one gets its stored answer.
    seen_keys = set(
        Event.objects.filter(
            tenant=tenant, idempotency_key__in=[r.idempotency_key for r in events if r.idempotency_key]
        ).values_list("idempotency_key", flat=True)
    )
    for request in events:
        if request.idempotency_key in seen_keys:
            continue
        _admit(request=request, category=categories[request.category_key], now=now)
        recipients_admission(tenant_id=tenant.id, external_ids=[ref.external_id for ref in request.recipients])
    with transaction.atomic():
        for index, request in enumerate(events):
            prefix = f"events[{index}]." if len(events) > 1 else ""
            digest = request_digest(body=request.body)
            event = Event(
                tenant=tenant,
                api_key=api_key,
                category=categories[request.category_key],
                idempotency_key=request.idempotency_key,
                request_digest=digest,
                replace_key=request.replace_key,
                data=content_seal(encrypt=tenant.encrypt_content, value=request.data),
                **event_origin(),
            )
            try:
                # A savepoint only where a key can collide; without a key there is no conflict.
                with transaction.atomic(savepoint=request.idempotency_key is not None):
                    event.save(force_insert=True)
            except IntegrityError:
                # Another request holds this key. The unique index made us wait for it to
                # commit, so its event and response are visible now.
                existing = Event.objects.get(tenant=tenant, idempotency_key=request.idempotency_key)
                if existing.request_digest != digest:
                    raise IdempotencyConflict(key=request.idempotency_key or "")
                results.append(IngestResult(response=existing.response, replayed=True))
                continue
            inbox_event_options_save(
                event_id=event.id,
                tags=request.inbox_tags,
                severity=request.inbox_severity,
                group_key=request.inbox_group_key,
                actor=request.inbox_actor,
                expires_at=request.inbox_expires_at,
            )
            recipients = _recipients_upsert(tenant=tenant, refs=request.recipients, field_prefix=prefix)
            category = categories[request.category_key]
            digest_ids: list[str] = []
            try:
                if category.digest_window is not None:
                    # Collected into each recipient's digest; a digest that fills up is sent now.
                    collected = digest_collect(event=event, category=category, recipients=recipients, now=now)
                    digest_ids = [str(digest_id) for digest_id in collected.digest_ids]
                    notifications = collected.notifications
                else:
                    plan = notifications_plan(
                        event=event,
                        category=category,
                        recipients=recipients,
                        priority_override=request.priority,
                        channels_override=request.channels,
                        send_at=request.send_at,
                        send_at_local=request.send_at_local,
                        now=now,
                    )
                    deliveries_supersede(event=event, recipient_ids=[r.id for r in recipients], now=now)
                    plan_save(plan=plan, now=now)
                    notifications = plan.notifications
            except PlanError as error:
                raise IngestError(field=prefix + error.field, message=error.message) from error
            event.response = {
                "event_id": str(event.id),
                "idempotency_key": request.idempotency_key,
                "notification_ids": [str(n.id) for n in notifications],
                **({"digest_ids": digest_ids} if digest_ids else {}),
            }
            event.save(update_fields=["response"])
            results.append(IngestResult(response=event.response, replayed=False))
            counted.append((category, notifications))
    # Once the work is committed: what this call accepted counts towards the runaway guard.
    accepted = sum(
        len(r.response.get("notification_ids", [])) + len(r.response.get("digest_ids", []))
        for r in results
        if not r.replayed
    )
    runaway_count(tenant=tenant, accepted=accepted)
    ingest_span_annotate(responses=[r.response for r in results])
    metrics.events_accepted_count(tenant=tenant, accepted=counted)
    return results


def _admit(*, request: EventRequest, category: Category, now: datetime) -> None:
    """Backpressure for bulk events: raises Overloaded, or moves the send later."""
    if (request.priority or category.default_priority) != Priority.BULK:
        return
    admission = bulk_admission(channels=request.channels or list(category.default_channels), now=now)
    later = admission.send_after
    if later is not None and request.send_at_local is None and (request.send_at is None or request.send_at < later):
        request.send_at = later


def _web_pool_admit(*, events: list[EventRequest], categories: dict[str, Category]) -> None:
    """A web pool kept for critical traffic refuses any other event, so that a bulk producer
    pointed at it by mistake cannot slow the OTPs it is there for."""
    if settings.NOTIFY_WEB_POOL != "critical":
        return
    for index, request in enumerate(events):
        priority = request.priority or categories[request.category_key].default_priority
        if priority != Priority.CRITICAL:
            prefix = f"events[{index}]." if len(events) > 1 else ""
            raise IngestError(
                field=f"{prefix}priority",
                message=f"This address takes critical events only; this one is {priority}. Use the main API address.",
            )


def _categories_resolve(*, tenant: Tenant, events: list[EventRequest], api_key: ApiKey | None) -> dict[str, Category]:
    """The events' categories by key. A key limited to categories gets the whole request
    refused for the first other one, before anything reveals which categories exist."""
    prefixes = [f"events[{index}]." if len(events) > 1 else "" for index in range(len(events))]
    if api_key is not None:
        for prefix, request in zip(prefixes, events, strict=True):
            if not api_key.allows_category(request.category_key):
                raise CategoryNotAllowed(field=f"{prefix}category", category_key=request.category_key)
    keys = {request.category_key for request in events}
    categories = {c.key: c for c in Category.objects.filter(tenant=tenant, key__in=keys).select_related("template")}
    for prefix, request in zip(prefixes, events, strict=True):
        if request.category_key not in categories:
            valid = [
                key
                for key in sorted(Category.objects.filter(tenant=tenant).values_list("key", flat=True))
                if api_key is None or api_key.allows_category(key)
            ]
            raise IngestError(
                field=f"{prefix}category",
                message=f"Unknown category '{request.category_key}'. Valid keys: {', '.join(valid) or '(none yet)'}.",
            )
    return categories


def recipients_resolve(*, tenant: Tenant, refs: list[RecipientRef], field_prefix: str = "") -> list[Recipient]:
    """Upsert the inline recipients and look up the ones named by id, as an event does;
    raises IngestError naming the first unknown one."""
    return _recipients_upsert(tenant=tenant, refs=refs, field_prefix=field_prefix)


def _recipients_upsert(*, tenant: Tenant, refs: list[RecipientRef], field_prefix: str) -> list[Recipient]:
    """Upsert inline recipients and look up the ones named by id, in the order given."""
    inline: dict[str, RecipientRef] = {ref.external_id: ref for ref in refs if ref.fields is not None}
    # Group by the set of fields given, so an upsert only overwrites what was sent.
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for external_id, ref in inline.items():
        given = ref.fields or {}
        field_names = tuple(sorted(name for name in RECIPIENT_FIELDS if name in given))
        groups.setdefault(field_names, []).append(
            # A time-ordered id (see Notification.id), used only if the row is new.
            {"id": str(uuid7()), "external_id": external_id, **{name: given[name] for name in field_names}}
        )
    by_external_id: dict[str, Recipient] = {}
    for field_names, rows in groups.items():
        if connection.vendor == "postgresql":
            by_external_id.update(_recipients_upsert_returning(tenant=tenant, field_names=field_names, rows=rows))
        else:  # the demo's SQLite
            Recipient.objects.bulk_create(
                [Recipient(tenant=tenant, **row) for row in sorted(rows, key=itemgetter("external_id"))],
                update_conflicts=True,
                unique_fields=["tenant", "external_id"],
                update_fields=[*field_names, "updated_at"],
            )
    # Read back the rest: recipients named by id, and upserted ones that had not changed.
    unread = {ref.external_id for ref in refs} - by_external_id.keys()
    if unread:
        by_external_id.update(
            (r.external_id, r)
            for r in Recipient.objects.filter(tenant=tenant, external_id__in=unread).only(*PLANNED_RECIPIENT_FIELDS)
        )
    missing = [ref.external_id for ref in refs if ref.external_id not in by_external_id]
    if missing:
        index = next(i for i, ref in enumerate(refs) if ref.external_id == missing[0])
        raise IngestError(
            field=f"{field_prefix}recipients[{index}]",
            message=f"Unknown recipient '{missing[0]}'. Pass an object with external_id and fields to create it.",
        )
    # A recipient named twice in one event is notified once.
    ordered = dict.fromkeys(ref.external_id for ref in refs)
    return [by_external_id[external_id] for external_id in ordered]


def recipients_upsert_statement(
    *, tenant_id: UUID, field_names: tuple[str, ...], rows: list[dict[str, Any]], returning: str, now: datetime
) -> tuple[str, list[Any]]:
    """One INSERT ... ON CONFLICT that inserts new recipients and updates the given fields of
    existing ones, with its parameters. The rows travel as one JSON parameter, which the
    database unpacks; a row whose given fields are unchanged is not rewritten (no new row
    version), and so is not returned."""
    defaults = {f.name: f.get_default() for f in Recipient._meta.concrete_fields if f.name in RECIPIENT_FIELDS}
    column_types = {"id": "uuid", "attributes": "jsonb"}
    record = ", ".join(f"{name} {column_types.get(name, 'text')}" for name in ("id", "external_id", *field_names))
    values = [f"x.{name}" if name in field_names else "%s" for name in RECIPIENT_FIELDS]
    default_params = [
        Jsonb(defaults[n]) if column_types.get(n) == "jsonb" else defaults[n]
        for n in RECIPIENT_FIELDS
        if n not in field_names
    ]
    updates = ", ".join(f"{name} = EXCLUDED.{name}" for name in field_names)
    changed = " OR ".join(f"r.{name} IS DISTINCT FROM EXCLUDED.{name}" for name in field_names)
    conflict = f"UPDATE SET {updates}, updated_at = EXCLUDED.updated_at WHERE {changed}" if field_names else "NOTHING"
    sql = f"""
        INSERT INTO recipients_recipient AS r
            (id, tenant_id, external_id, {", ".join(RECIPIENT_FIELDS)}, created_at, updated_at)
        SELECT x.id, %s, x.external_id, {", ".join(values)}, %s, %s
        FROM jsonb_to_recordset(%s) AS x({record})
        -- Concurrent upserts of overlapping recipients lock rows in one order.
        ORDER BY x.external_id
        ON CONFLICT (tenant_id, external_id) DO {conflict}
        RETURNING {returning}
    """
    return sql, [tenant_id, *default_params, now, now, Jsonb(rows)]


def _recipients_upsert_returning(
    *, tenant: Tenant, field_names: tuple[str, ...], rows: list[dict[str, Any]]
) -> dict[str, Recipient]:
    """Upsert the recipients in one statement that returns what planning reads (bulk_create()
    built a model instance and adapted every value in Python, then a second query read the
    rows back). Rows left unchanged are not returned: the caller reads them back."""
    now = timezone.now()
    sql, params = recipients_upsert_statement(
        tenant_id=tenant.id,
        field_names=field_names,
        rows=rows,
        returning=", ".join(PLANNED_RECIPIENT_FIELDS),
        now=now,
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        returned = cursor.fetchall()
    return {row[2]: Recipient.from_db(connection.alias, PLANNED_RECIPIENT_FIELDS, row) for row in returned}
