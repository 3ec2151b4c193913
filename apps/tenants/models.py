import hashlib
import hmac
import secrets
import uuid
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import slug_re
from django.db import models

from notify.policy.rules import validate_channel_switches, validate_frequency_cap, validate_quiet_hours

# A rate is written like a cap: N per window.
validate_rate = validate_frequency_cap


class Tenant(models.Model):
    """A producer's workspace: it owns API keys, categories, templates and recipients."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=200)
    default_locale = models.CharField(max_length=35, default="en")
    # Defaults for every recipient who has not said otherwise (docs/preferences.md).
    channel_defaults = models.JSONField(
        default=dict, blank=True, validators=[validate_channel_switches], help_text='e.g. {"sms": false}'
    )
    quiet_hours = models.JSONField(
        default=dict, blank=True, validators=[validate_quiet_hours], help_text='e.g. {"start": "22:00", "end": "07:00"}'
    )
    frequency_cap = models.CharField(
        max_length=50,
        blank=True,
        default="",
        validators=[validate_frequency_cap],
        help_text="Most non-critical notifications one recipient gets across all categories, e.g. '20 per day'.",
    )
    sms_daily_budget = models.DecimalField(
        max_digits=10,
        decimal_places=2,
        null=True,
        blank=True,
        help_text="Most to spend on SMS in a day (UTC), priced at NOTIFY_SMS_SEGMENT_PRICE a segment; empty: no cap.",
    )
    # Health or finance tenants: event data and inbox content stored encrypted (docs/compliance.md).
    encrypt_content = models.BooleanField(
        default=False, help_text="Store this tenant's event data and in-app content encrypted at rest."
    )
    secure_message_text = models.CharField(
        max_length=300,
        blank=True,
        default="",
        help_text="What sensitive categories send instead of their content; empty: the installation's.",
    )
    secure_message_url = models.URLField(
        max_length=2000,
        blank=True,
        default="",
        help_text="The link sent with it (your app or inbox); empty: NOTIFY_SECURE_MESSAGE_URL.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # Set by the runaway-send guard (notify/resilience/runaway.py): while set, the tenant's
    # normal and bulk deliveries wait unclaimed; critical ones still go. A person clears it.
    runaway_paused_at = models.DateTimeField(null=True, blank=True, editable=False)
    runaway_reason = models.CharField(max_length=500, blank=True, default="", editable=False)

    class Meta:
        permissions = [("resume_runaway_tenant", "Can resume a tenant paused by the runaway-send guard")]

    def __str__(self) -> str:
        return self.name


KEY_PREFIX = "ntf"


def api_key_digest(*, secret: str) -> str:
    """The stored form of a key's secret part. Keys are random, so a fast hash suffices."""
    return hashlib.sha256(secret.encode()).hexdigest()


class Scope(models.TextChoices):
    """What an API key may do; each API operation requires one (apps/api/scopes.py)."""

    EVENTS_SEND = "events:send", "Send events (and cancel their notifications)"
    NOTIFICATIONS_READ = "notifications:read", "Read notifications and their deliveries"
    RECIPIENTS_READ = "recipients:read", "Read recipients, preferences, consents, devices, subscriptions"
    RECIPIENTS_WRITE = "recipients:write", "Change recipients, preferences, consents, devices, subscriptions"
    INBOX_TOKENS = "inbox:tokens", "Issue inbox tokens for recipients' browsers"
    ADMIN = "admin", "Change configuration: recurring sends"
    ANALYTICS_READ = "analytics:read", "Read delivery and engagement analytics"
    WEBHOOKS_MANAGE = "webhooks:manage", "Register producer webhook endpoints and read their attempts"


ALL_SCOPES = [scope.value for scope in Scope]


def default_scopes() -> list[str]:
    """A key created without scopes may only send events: what most producers need, and nothing more."""
    return [Scope.EVENTS_SEND.value]


def validate_scopes(value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError("Give the scopes as a list of names.")
    unknown = [item for item in value if item not in ALL_SCOPES]
    if unknown:
        raise ValidationError(f"Unknown scope '{unknown[0]}'. Valid scopes: {', '.join(ALL_SCOPES)}.")
    if not value:
        raise ValidationError("Give the key at least one scope.")


def validate_category_keys(value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError("Give the categories as a list of category keys.")
    malformed = [item for item in value if not slug_re.fullmatch(item)]
    if malformed:
        raise ValidationError(f"'{malformed[0]}' is not a category key.")


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def active(self) -> "ApiKeyQuerySet":
        return self.filter(revoked_at__isnull=True)


class ApiKey(models.Model):
    """A tenant-scoped producer credential. Only a digest is stored; the key is shown once."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    # The public lookup part of the key ("ntf_<lookup>_<secret>"), safe to display.
    lookup = models.CharField(max_length=16, unique=True, editable=False)
    digest = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    rate_limit = models.CharField(
        max_length=50,
        blank=True,
        default="",
        validators=[validate_rate],
        help_text="Most requests this key may make, e.g. '100 per second'; empty: NOTIFY_API_RATE_LIMIT.",
    )
    scopes = models.JSONField(default=default_scopes, validators=[validate_scopes], help_text="What the key may do.")
    categories = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_category_keys],
        help_text="The only categories the key may send, cancel and read; empty: all.",
    )
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: never.")
    # The secret before the last rotation, accepted until previous_expires_at (grace period).
    previous_digest = models.CharField(max_length=64, blank=True, default="", editable=False)
    previous_expires_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        permissions = [("revoke_apikey", "Can revoke an API key"), ("rotate_apikey", "Can rotate an API key")]

    def __str__(self) -> str:
        return f"{self.name} ({KEY_PREFIX}_{self.lookup}_…)"

    @staticmethod
    def split(raw_key: str) -> tuple[str, str] | None:
        """(lookup, secret) of a raw key, or None when it is not shaped like one of ours."""
        parts = raw_key.split("_", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
            return None
        return parts[1], parts[2]

    def clean(self) -> None:
        """Every category the key is limited to must be one of its tenant's."""
        if self.tenant_id is None or not isinstance(self.categories, list):
            return
        known = set(self.tenant.categories.filter(key__in=self.categories).values_list("key", flat=True))
        unknown = [key for key in self.categories if key not in known]
        if unknown:
            valid = sorted(self.tenant.categories.values_list("key", flat=True))
            raise ValidationError(
                {"categories": f"Unknown category '{unknown[0]}'. Valid keys: {', '.join(valid) or '(none yet)'}."}
            )

    def secret_matches(self, *, secret: str) -> bool | None:
        """True for the current secret, False for the previous one (whether or not its grace
        period is over), None for neither; both comparisons take constant time."""
        digest = api_key_digest(secret=secret)
        if hmac.compare_digest(self.digest, digest):
            return True
        if self.previous_digest and hmac.compare_digest(self.previous_digest, digest):
            return False
        return None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def allows_category(self, category_key: str) -> bool:
        return not self.categories or category_key in self.categories

    def is_expired(self, *, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def assign_secret(self, *, raw_key: str | None = None) -> str:
        """Give the key a fresh (or the given) secret and return the raw key to show once."""
        if raw_key is None:
            raw_key = f"{KEY_PREFIX}_{secrets.token_hex(6)}_{secrets.token_urlsafe(24)}"
        parts = self.split(raw_key)
        if parts is None:
            raise ValueError(f"an API key looks like {KEY_PREFIX}_<lookup>_<secret>")
        self.lookup, secret = parts
        self.digest = api_key_digest(secret=secret)
        return raw_key


class StaffMembership(models.Model):
    """The tenant a staff user works for: in the admin they see and change only its rows.
    One tenant per user; superusers need none and see every tenant."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="staff_membership")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="staff_memberships")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.user} at {self.tenant}"
