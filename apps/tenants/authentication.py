import hmac
from datetime import timedelta

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request

from apps.tenants.models import ApiKey, api_key_digest

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
        key = ApiKey.objects.active().select_related("tenant").filter(lookup=lookup).first()
        if key is None or not hmac.compare_digest(key.digest, api_key_digest(secret=secret)):
            raise exceptions.AuthenticationFailed("Unknown or revoked API key.")
        now = timezone.now()
        # Record use at a coarse resolution so that every request does not write a row.
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return None, key

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = ApiKeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema):  # type: ignore[no-untyped-def]
        return {"type": "http", "scheme": "bearer", "description": "A tenant API key."}


class HasApiKey(permissions.BasePermission):
    """Producer endpoints require a tenant API key."""

    def has_permission(self, request: Request, view: object) -> bool:
        return isinstance(request.auth, ApiKey)
