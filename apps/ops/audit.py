"""The tamper-evident audit log: every change made through the admin or the API.

Hooked centrally: `AuditActorMiddleware` keeps the request in a context variable, and model
signals on the audited models record each save and delete made while a staff user or an API
key is that request's actor (DRF puts the key on the Django request as `auth`). Admin actions
that change rows in bulk are recorded by the admin's shared bases (apps/tenants/admin_site.py),
and services that change rows in bulk (erase, replay) call `audit_record` themselves. Changes
made by workers and beat have no actor and are not audit entries: they are the pipeline's own
history. Entries are chained by hash per tenant; `audit_chain_verify` walks a chain.

Hand-written rather than django-auditlog or django-simple-history: neither chains entries by
hash, and a chain needs every append to go through one function that holds the chain's lock;
what they would add (signal wiring and a diff) is the few lines below."""

import hashlib
import json
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.db import models, transaction
from django.db.models.signals import post_delete, post_save, pre_delete, pre_save
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from apps.ops.models import GENESIS_HASH, INSTALLATION_CHAIN, AuditChainHead, AuditEntry
from notify.observability import metrics

REDACTED = "[redacted]"
# Fields whose values never enter the log, in any audited model: keys, digests, credentials.
SECRET_FIELD_MARKERS = (
    "secret",
    "password",
    "digest",
    "token",
    "credential",
    "private",
    "config",
    "auth",
    "p256dh",
)
# The audited models (app_label.ModelName), each with the attribute path to its tenant's id
# (None: the row has a nullable `tenant`, or is the tenant itself).
AUDITED_MODELS: dict[str, str | None] = {
    "tenants.Tenant": "pk",
    "tenants.ApiKey": "tenant_id",
    "deliveries.Provider": "tenant_id",
    "deliveries.ChannelSwitch": "tenant_id",
    "deliveries.DeadLetter": "delivery.notification.tenant_id",
    "deliveries.RecurringSend": "tenant_id",
    "catalog.Category": "tenant_id",
    "catalog.Template": "tenant_id",
    "catalog.TemplateVersion": "template.tenant_id",
    "catalog.TemplateVariant": "version.template.tenant_id",
    "recipients.PreferenceSet": "recipient.tenant_id",
    "recipients.Consent": "tenant_id",
    "audiences.Topic": "tenant_id",
    "audiences.Segment": "tenant_id",
    "audiences.Broadcast": "tenant_id",
    "ops.AlertRule": None,
    "ops.RetentionPolicy": "tenant_id",
}
VERIFY_CHUNK = 1000

_request: ContextVar[HttpRequest | None] = ContextVar("audit_request", default=None)


@dataclass(frozen=True)
class Actor:
    type: str
    id: str
    label: str


def actor_of(*, request: HttpRequest | None) -> Actor | None:
    """Who made the request: its API key, else its staff user; None for anyone else."""
    if request is None:
        return None
    from apps.tenants.models import ApiKey

    key = getattr(request, "auth", None)
    if isinstance(key, ApiKey):
        return Actor(type="api_key", id=str(key.pk), label=f"{key.name} ({key.lookup})")
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated and user.is_staff:
        return Actor(type="staff", id=str(user.pk), label=user.get_username())
    return None


def actor_current() -> Actor | None:
    """The actor of the request being served, if any."""
    return actor_of(request=_request.get())


class AuditActorMiddleware:
    """Makes the request's actor known to the audit signals for the request's duration."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        token = _request.set(request)
        try:
            return self.get_response(request)
        finally:
            _request.reset(token)


def _canonical(value: Any) -> Any:
    """The value as JSON keeps it, so the hash of what is stored is the hash of what was hashed."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def entry_hash(*, entry: AuditEntry) -> str:
    """sha256 of the previous hash and the entry's canonical JSON."""
    body = {
        "chain": entry.chain,
        "tenant": str(entry.tenant_id) if entry.tenant_id else None,
        "created_at": entry.created_at.isoformat(),
        "actor": [entry.actor_type, entry.actor_id, entry.actor_label],
        "action": entry.action,
        "object": [entry.object_type, entry.object_id],
        "changes": entry.changes,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256((entry.prev_hash + canonical).encode()).hexdigest()


def audit_record(
    *,
    actor: Actor,
    tenant_id: UUID | None,
    action: str,
    object_type: str,
    object_id: str,
    changes: dict[str, Any],
) -> AuditEntry:
    """Append one entry to its tenant's chain, in the caller's transaction."""
    chain = str(tenant_id) if tenant_id else INSTALLATION_CHAIN
    with transaction.atomic():
        AuditChainHead.objects.bulk_create([AuditChainHead(chain=chain)], ignore_conflicts=True)
        # The head's row lock orders concurrent appends to one chain; other chains go on.
        head = AuditChainHead.objects.select_for_update().get(chain=chain)
        # Microseconds as PostgreSQL keeps them, so the stored time hashes the same.
        entry = AuditEntry(
            chain=chain,
            tenant_id=tenant_id,
            created_at=timezone.now(),
            actor_type=actor.type,
            actor_id=actor.id,
            actor_label=actor.label[:200],
            action=action[:100],
            object_type=object_type[:100],
            object_id=object_id[:100],
            changes=_canonical(changes),
            prev_hash=head.head_hash,
        )
        entry.hash = entry_hash(entry=entry)
        entry.save()
        AuditChainHead.objects.filter(chain=chain).update(head_hash=entry.hash, entries=models.F("entries") + 1)
    metrics.audit_entries.labels(actor=actor.type).inc()
    return entry


# --- Recording model changes --------------------------------------------------------------


def _secret(name: str) -> bool:
    return any(marker in name for marker in SECRET_FIELD_MARKERS)


def _field_values(*, instance: models.Model) -> dict[str, Any]:
    return {field.attname: _canonical(field.value_from_object(instance)) for field in instance._meta.concrete_fields}


def _redacted(*, name: str, value: Any) -> Any:
    # A secret's change is shown (that it changed), never its value.
    return REDACTED if _secret(name) and value not in ("", None) else value


def _diff(*, before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, list[Any]]:
    names = list((after or before or {}).keys())
    changes = {}
    for name in names:
        old, new = (before or {}).get(name), (after or {}).get(name)
        if before is None or after is None or old != new:
            changes[name] = [_redacted(name=name, value=old), _redacted(name=name, value=new)]
    return changes


def _tenant_id(*, instance: models.Model, path: str | None) -> UUID | None:
    value: Any = instance
    for attribute in (path or "tenant_id").split("."):
        value = getattr(value, attribute, None)
        if value is None:
            return None
    return value


def _label(instance: models.Model) -> str:
    return instance._meta.label


def _before_save(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    if actor_current() is None or instance.pk is None or instance._state.adding:
        return
    stored = sender._base_manager.filter(pk=instance.pk).first()
    instance._audit_before = _field_values(instance=stored) if stored is not None else None  # type: ignore[attr-defined]


def _after_save(sender: type[models.Model], instance: models.Model, created: bool, **kwargs: Any) -> None:
    actor = actor_current()
    if actor is None:
        return
    before = None if created else getattr(instance, "_audit_before", None)
    changes = _diff(before=before, after=_field_values(instance=instance))
    if not changes:
        return
    audit_record(
        actor=actor,
        tenant_id=_tenant_id(instance=instance, path=AUDITED_MODELS[_label(instance)]),
        action="create" if created else "update",
        object_type=_label(instance),
        object_id=str(instance.pk),
        changes=changes,
    )


def _before_delete(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    if actor_current() is not None:
        # Read now: the path to the tenant may go through rows the delete cascades to.
        instance._audit_tenant_id = _tenant_id(instance=instance, path=AUDITED_MODELS[_label(instance)])  # type: ignore[attr-defined]


def _after_delete(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    actor = actor_current()
    if actor is None:
        return
    audit_record(
        actor=actor,
        tenant_id=getattr(instance, "_audit_tenant_id", None),
        action="delete",
        object_type=_label(instance),
        object_id=str(instance.pk),
        changes=_diff(before=_field_values(instance=instance), after=None),
    )


def audit_signals_connect() -> None:
    """Record saves and deletes of the audited models (called once, from OpsConfig.ready)."""
    from django.apps import apps

    for label in AUDITED_MODELS:
        model = apps.get_model(label)
        uid = f"audit:{label}"
        pre_save.connect(_before_save, sender=model, dispatch_uid=uid)
        post_save.connect(_after_save, sender=model, dispatch_uid=uid)
        pre_delete.connect(_before_delete, sender=model, dispatch_uid=uid)
        post_delete.connect(_after_delete, sender=model, dispatch_uid=uid)


def audit_admin_action(*, request: HttpRequest, action: str, objects: list[models.Model]) -> None:
    """Record an admin action on the selected rows (bulk updates send no model signals)."""
    actor = actor_of(request=request)
    if actor is None:
        return
    for instance in objects:
        label = _label(instance)
        path = AUDITED_MODELS.get(label, "tenant_id")
        audit_record(
            actor=actor,
            tenant_id=_tenant_id(instance=instance, path=path),
            action=action,
            object_type=label,
            object_id=str(instance.pk),
            changes={},
        )


# --- Verifying ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokenLink:
    chain: str
    entry_id: int | None
    problem: str
    expected: str
    found: str

    def __str__(self) -> str:
        where = f"entry {self.entry_id}" if self.entry_id is not None else "chain head"
        return f"chain {self.chain}: {where}: {self.problem}: expected {self.expected}, found {self.found}"


def _entries(*, chain: str) -> Iterator[AuditEntry]:
    # Keyset pages by id: memory stays at one chunk whatever the chain's length.
    last_id = 0
    while True:
        chunk = list(AuditEntry.objects.filter(chain=chain, id__gt=last_id).order_by("id")[:VERIFY_CHUNK])
        if not chunk:
            return
        yield from chunk
        last_id = chunk[-1].id


def audit_chain_verify(*, chain: str) -> tuple[int, BrokenLink | None]:
    """Walk one chain: how many entries it holds, and its first broken link (None: intact)."""
    expected_prev = GENESIS_HASH
    count = 0
    for entry in _entries(chain=chain):
        if entry.prev_hash != expected_prev:
            return count, BrokenLink(
                chain,
                entry.id,
                "prev_hash (an entry before it was changed or deleted)",
                expected_prev,
                entry.prev_hash,
            )
        recomputed = entry_hash(entry=entry)
        if recomputed != entry.hash:
            return count, BrokenLink(chain, entry.id, "hash (this entry was changed)", recomputed, entry.hash)
        expected_prev = entry.hash
        count += 1
    head = AuditChainHead.objects.filter(chain=chain).first()
    if head is not None and (head.head_hash != expected_prev or head.entries != count):
        return count, BrokenLink(
            chain,
            None,
            "last entries (deleted after the last intact one)",
            f"{head.entries} entries ending {head.head_hash}",
            f"{count} ending {expected_prev}",
        )
    return count, None


def audit_chains(*, tenant_slug: str | None = None) -> list[str]:
    """The chains to verify: one tenant's, or every chain (the installation's too)."""
    if tenant_slug is not None:
        from apps.tenants.models import Tenant

        return [str(Tenant.objects.get(slug=tenant_slug).pk)]
    heads = set(AuditChainHead.objects.values_list("chain", flat=True))
    return sorted(heads | set(AuditEntry.objects.values_list("chain", flat=True).distinct()))
