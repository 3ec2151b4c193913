"""The suppression list: addresses a tenant must not send to again on a channel."""

from collections.abc import Iterable
from uuid import UUID

from apps.recipients.models import Suppression, address_hashed
from apps.recipients.phone import e164


def address_canonical(*, channel: str, address: str) -> str:
    """The one form an address is suppressed and looked up in: lower-case email, E.164 phone."""
    address = address.strip()
    if channel == "sms":
        return e164(number=address) or address
    return address.lower()


def suppression_add(*, tenant_id: UUID, channel: str, address: str, reason: str, source: str) -> bool:
    """Suppress the address; return False when it already was."""
    _, created = Suppression.objects.get_or_create(
        tenant_id=tenant_id,
        channel=channel,
        address=address_canonical(channel=channel, address=address),
        defaults={"reason": reason[:500], "source": source[:100]},
    )
    return created


def suppressed_addresses(*, tenant_id: UUID, channel: str, addresses: Iterable[str]) -> dict[str, str]:
    """The suppressed ones among the addresses (keyed as given), each with its reason."""
    suppressions = Suppression.objects.filter(tenant_id=tenant_id, channel=channel)
    # Most tenants suppress few addresses on a channel, often none: check that cheaply first.
    if not suppressions.exists():
        return {}
    canonical = {address: address_canonical(channel=channel, address=address) for address in addresses if address}
    if not canonical:
        return {}
    # An erased person's suppressions keep only a keyed hash of the address (privacy.py).
    hashed = {form: address_hashed(address=form) for form in set(canonical.values())}
    reasons = dict(suppressions.filter(address__in={*hashed, *hashed.values()}).values_list("address", "reason"))
    reasons.update({form: reasons[digest] for form, digest in hashed.items() if digest in reasons})
    return {given: reasons[form] for given, form in canonical.items() if form in reasons}
