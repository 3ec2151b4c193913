"""The suppression list: addresses a tenant must not send to again on a channel."""

from collections.abc import Iterable
from uuid import UUID

from apps.recipients.models import Suppression


def suppression_add(*, tenant_id: UUID, channel: str, address: str, reason: str, source: str) -> bool:
    """Suppress the address; return False when it already was."""
    _, created = Suppression.objects.get_or_create(
        tenant_id=tenant_id,
        channel=channel,
        address=address.lower(),
        defaults={"reason": reason[:500], "source": source[:100]},
    )
    return created


def suppressed_addresses(*, tenant_id: UUID, channel: str, addresses: Iterable[str]) -> dict[str, str]:
    """The suppressed ones among the addresses, each with the reason it was suppressed."""
    wanted = {address.lower() for address in addresses if address}
    if not wanted:
        return {}
    return dict(
        Suppression.objects.filter(tenant_id=tenant_id, channel=channel, address__in=wanted).values_list(
            "address", "reason"
        )
    )
