"""API key lifecycle: create, rotate (the raw key is returned once and never stored); and the
installation's first admin login."""

import secrets
from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.db import transaction
from django.utils import timezone

from apps.tenants.models import KEY_PREFIX, ApiKey, Tenant, api_key_digest

# How long the old secret keeps working after a rotation unless the caller says otherwise:
# long enough to roll a deploy, short enough that a forgotten copy soon stops working.
ROTATION_GRACE_DEFAULT = timedelta(hours=24)
ROTATION_GRACE_MAX = timedelta(days=7)


def api_key_create(
    *,
    tenant: Tenant,
    name: str,
    scopes: list[str] | None = None,
    categories: list[str] | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Validate and save a new key; returns it with the raw key to show once. Without scopes
    the key may only send events (ApiKey.scopes' default); raises ValidationError."""
    key = ApiKey(tenant=tenant, name=name, categories=categories or [], expires_at=expires_at)
    if scopes is not None:
        key.scopes = scopes
    raw_key = key.assign_secret()
    key.full_clean()
    key.save()
    return key, raw_key


def api_key_rotate(*, api_key: ApiKey, grace: timedelta = ROTATION_GRACE_DEFAULT) -> str:
    """Give the key a new secret and return the raw key to show once. The current secret keeps
    working for `grace` (zero: it stops now); a secret from an earlier rotation stops now.
    The lookup part stays, so the key keeps its identity, scopes and rate-limit window."""
    if not timedelta(0) <= grace <= ROTATION_GRACE_MAX:
        raise ValueError(f"the grace period is between 0 and {ROTATION_GRACE_MAX.days} days")
    now = timezone.now()
    secret = secrets.token_urlsafe(24)
    with transaction.atomic():
        # Locked so that two rotations at once cannot both keep the same old secret.
        locked = ApiKey.objects.select_for_update().get(pk=api_key.pk)
        locked.previous_digest = locked.digest if grace else ""
        locked.previous_expires_at = now + grace if grace else None
        locked.digest = api_key_digest(secret=secret)
        locked.save(update_fields=["digest", "previous_digest", "previous_expires_at"])
    api_key.digest, api_key.previous_digest = locked.digest, locked.previous_digest
    api_key.previous_expires_at = locked.previous_expires_at
    return f"{KEY_PREFIX}_{locked.lookup}_{secret}"


def admin_user_ensure(*, username: str, email: str, password: str) -> bool:
    """Create the installation's first admin login unless a user of that name exists; returns
    whether it was created. An existing user is left as it is, so that a password changed in the
    admin survives every later deploy. Raises ValidationError naming the weak password's faults."""
    User = get_user_model()
    if User.objects.filter(username=username).exists():
        return False
    candidate = User(username=username, email=email, is_staff=True, is_superuser=True)
    validate_password(password, user=candidate)
    User.objects.create_superuser(username=username, email=email, password=password)
    return True
