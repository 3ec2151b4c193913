"""Recipients' preferences and consents, read through a Redis cache for planning and sending.

Each recipient has a generation number in the cache, and their cached settings live under a
key that includes it. A change bumps the generation once its transaction commits, so the
very next read misses and loads from the database. A reader that loaded the old settings
just before the change can only write them under the old generation, which nobody reads
again: no race can put stale settings back."""

import logging
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import redis
from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from apps.catalog.models import Category
from apps.recipients.models import Consent, PreferenceSet, Recipient
from apps.recipients.services import consents_standing
from apps.tenants.models import Tenant
from notify.policy.rules import CategoryRules, RecipientRules, TenantRules

logger = logging.getLogger(__name__)
CACHE_SECONDS = 3600


def recipient_rules_many(*, recipients: Iterable[Recipient]) -> dict[UUID, RecipientRules]:
    """Each recipient's settings and consents, from the cache where it has them."""
    by_id = {recipient.id: recipient for recipient in recipients}
    try:
        generations = cache.get_many([_generation_key(rid) for rid in by_id])
        keys = {rid: _settings_key(rid, generations.get(_generation_key(rid), 0)) for rid in by_id}
        found = cache.get_many(list(keys.values()))
    except redis.RedisError:  # the cache is a shortcut: without it, read the database
        logger.warning("preference cache unreadable; reading preferences from the database", exc_info=True)
        loaded = _settings_load(recipient_ids=list(by_id))
        return {rid: RecipientRules(**loaded[rid], timezone=by_id[rid].timezone) for rid in by_id}
    missing = [rid for rid, key in keys.items() if key not in found]
    if missing:
        loaded = _settings_load(recipient_ids=missing)
        found.update({keys[rid]: loaded[rid] for rid in missing})
        try:
            cache.set_many({keys[rid]: loaded[rid] for rid in missing}, CACHE_SECONDS)
        except redis.RedisError:
            logger.warning("preference cache not written", exc_info=True)
    return {rid: RecipientRules(**found[keys[rid]], timezone=by_id[rid].timezone) for rid in by_id}


def category_rules(*, category: Category) -> CategoryRules:
    return CategoryRules(
        key=category.key,
        kind=category.kind,
        channel_defaults=category.channel_defaults,
        expire_after=category.expire_after,
    )


def tenant_rules(*, tenant: Tenant) -> TenantRules:
    return TenantRules(channel_defaults=tenant.channel_defaults, quiet_hours=tenant.quiet_hours)


def preferences_changed(*, recipient_id: UUID) -> None:
    """Make the next read of this recipient's settings come from the database."""
    key = _generation_key(recipient_id)

    def bump() -> None:
        try:
            try:
                cache.incr(key)
            except ValueError:  # no generation yet
                if not cache.add(key, 1, timeout=None):
                    cache.incr(key)
        except redis.RedisError:
            # The change is saved; only the cache may be stale, for up to CACHE_SECONDS.
            logger.error("preference cache not invalidated for %s", recipient_id, exc_info=True)

    transaction.on_commit(bump)


@receiver([post_save, post_delete], sender=PreferenceSet)
@receiver([post_save, post_delete], sender=Consent)
def _invalidate_on_change(sender: type, instance: PreferenceSet | Consent, **kwargs: Any) -> None:
    # Every write path (the API, the preference center, the admin) goes through here.
    preferences_changed(recipient_id=instance.recipient_id)


def _generation_key(recipient_id: UUID) -> str:
    return f"prefs-generation:{recipient_id}"


def _settings_key(recipient_id: UUID, generation: int) -> str:
    return f"prefs:{recipient_id}:{generation}"


def _settings_load(*, recipient_ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
    settings: dict[UUID, dict[str, Any]] = {rid: {"consents": {}} for rid in recipient_ids}
    for preferences in PreferenceSet.objects.filter(recipient_id__in=recipient_ids):
        settings[preferences.recipient_id].update(
            paused=preferences.paused,
            paused_until=preferences.paused_until,
            channels=preferences.channels,
            categories=preferences.categories,
            quiet_hours=preferences.quiet_hours,
        )
    for recipient_id, consents in consents_standing(recipient_ids=recipient_ids).items():
        settings[recipient_id]["consents"] = {channel: c.granted for channel, c in consents.items()}
    return settings
