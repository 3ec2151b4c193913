"""Recipients' preferences and consents, as the send stage applies them.

The send stage loads each recipient's preferences in the same query that loads its claimed
deliveries (a join on the one-to-one row), so what it applies is what the database holds at
that moment: there is no cache to invalidate, and nothing can serve a stale opt-out. Consents
decide marketing categories only, so only their recipients' consents are read."""

from collections.abc import Collection, Iterable
from typing import cast
from uuid import UUID

from apps.catalog.models import Category
from apps.recipients.models import PreferenceSet, Recipient
from apps.recipients.services import consents_standing
from apps.tenants.models import Tenant
from notify.policy.rules import CategoryRules, RecipientRules, TenantRules

# Loaded with the recipient by select_related("...recipient__preferences"), or not yet.
_PREFERENCES = Recipient.preferences.related  # type: ignore[attr-defined]


def recipient_rules_many(
    *, recipients: Iterable[Recipient], with_consents: Collection[UUID] = ()
) -> dict[UUID, RecipientRules]:
    """Each recipient's settings; the consents of those in `with_consents` (the recipients of
    marketing categories) too. Preferences not loaded with the recipients are read now."""
    recipients = list(recipients)
    unloaded = {r.id for r in recipients if not _PREFERENCES.is_cached(r)}
    read_now: dict[UUID, PreferenceSet] = PreferenceSet.objects.in_bulk(list(unloaded)) if unloaded else {}
    consents = consents_standing(recipient_ids=list(with_consents)) if with_consents else {}
    rules: dict[UUID, RecipientRules] = {}
    for recipient in recipients:
        preferences = cast(
            PreferenceSet | None,
            read_now.get(recipient.id) if recipient.id in unloaded else _PREFERENCES.get_cached_value(recipient),
        )
        standing = {channel: consent.granted for channel, consent in consents.get(recipient.id, {}).items()}
        if preferences is None:
            rules[recipient.id] = RecipientRules(consents=standing, timezone=recipient.timezone)
            continue
        rules[recipient.id] = RecipientRules(
            paused=preferences.paused,
            paused_until=preferences.paused_until,
            channels=preferences.channels,
            categories=preferences.categories,
            quiet_hours=preferences.quiet_hours,
            consents=standing,
            timezone=recipient.timezone,
        )
    return rules


def category_rules(*, category: Category) -> CategoryRules:
    return CategoryRules(
        key=category.key,
        kind=category.kind,
        channel_defaults=category.channel_defaults,
        expire_after=category.expire_after,
    )


def tenant_rules(*, tenant: Tenant) -> TenantRules:
    return TenantRules(channel_defaults=tenant.channel_defaults, quiet_hours=tenant.quiet_hours)
