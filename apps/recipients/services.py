from typing import Any

from django.db import transaction

from apps.recipients.models import Recipient
from apps.tenants.models import Tenant


def recipient_upsert(*, tenant: Tenant, external_id: str, fields: dict[str, Any]) -> tuple[Recipient, bool]:
    """Create the recipient, or update only the given fields of the existing one."""
    with transaction.atomic():
        return Recipient.objects.update_or_create(tenant=tenant, external_id=external_id, defaults=fields)
