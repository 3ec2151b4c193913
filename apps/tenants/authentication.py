from datetime import datetime, timedelta

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from apps.tenants.models import ApiKey

LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer ntf_<lookup>_<secret>`; request.auth becomes the ApiKey."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[None, ApiKey] | None:
        header = authentication.get_authorization_header(request).decode(errors="replace")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme != self.keyword or not raw_key.strip():
            raise exceptions.AuthenticationFailed("Use the header 'Authorization: Bearer <API key>'.")
        parts = ApiKey.split(raw_key.strip())
        if parts is None:
            raise exceptions.AuthenticationFailed("Unknown or revoked API key.")
        lookup, secret = parts
        key = ApiKey.objects.select_related("tenant").filter(lookup=lookup).first()
        matched = None if key is None else key.secret_matches(secret=secret)
        if key is None or matched is None:
            raise exceptions.AuthenticationFailed("Unknown or revoked API key.")
        now = timezone.now()
        # Only a caller holding a secret learns why its key no longer works.
        if key.revoked_at is not None:
            raise exceptions.AuthenticationFailed(f"This API key was revoked on {_moment(key.revoked_at)}.")
        if key.is_expired(now=now):
            raise exceptions.AuthenticationFailed(f"This API key expired on {_moment(key.expires_at)}.")
        if not matched and (key.previous_expires_at is None or key.previous_expires_at <= now):
            raise exceptions.AuthenticationFailed(
                f"This API key was rotated; its previous secret stopped working on {_moment(key.previous_expires_at)}. "
                "Use the new key."
            )
        # Record use at a coarse resolution so that every request does not write a row.
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return None, key

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


def _moment(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds").replace("+00:00", "Z") if at else "an earlier date"


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = ApiKeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema):  # type: ignore[no-untyped-def]
        return {"type": "http", "scheme": "bearer", "description": "A tenant API key."}
