"""Signed recipient tokens: they let a person's browser act for one recipient (read the
inbox, change preferences, unsubscribe) without an API key or a login. Each purpose has its
own salt, so a token made for one cannot be used for another, and its own lifetime."""

from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core import signing
from django.urls import reverse


@dataclass(frozen=True)
class Purpose:
    name: str  # also the salt
    noun: str  # how error messages call it
    lifetime_setting: str  # seconds
    route: str = ""  # the page a link for it opens


INBOX = Purpose("inbox", "inbox token", "NOTIFY_INBOX_TOKEN_SECONDS")
PREFERENCES = Purpose("preferences", "preferences link", "NOTIFY_PREFERENCE_LINK_SECONDS", "preference-center")
UNSUBSCRIBE = Purpose("unsubscribe", "unsubscribe link", "NOTIFY_UNSUBSCRIBE_LINK_SECONDS", "unsubscribe")


class RecipientTokenInvalid(Exception):
    def __init__(self, *, purpose: Purpose, expired: bool) -> None:
        super().__init__(f"the {purpose.noun} has expired" if expired else f"the {purpose.noun} is not valid")
        self.expired = expired


@dataclass(frozen=True)
class RecipientToken:
    recipient_id: UUID
    extra: dict[str, Any]


def recipient_token_issue(*, purpose: Purpose, recipient_id: UUID, **extra: str) -> str:
    return signing.dumps({"r": str(recipient_id), **extra}, salt=f"notify.{purpose.name}")


def recipient_link(*, purpose: Purpose, recipient_id: UUID, **extra: str) -> str:
    """An absolute link, for a message, to the purpose's page for this recipient. Every
    non-critical email carries two, so the route is reversed once, not per link."""
    token = recipient_token_issue(purpose=purpose, recipient_id=recipient_id, **extra)
    return f"{settings.NOTIFY_PUBLIC_URL}{_route_prefix(purpose.route)}{token}"


@lru_cache(maxsize=8)
def _route_prefix(route: str) -> str:
    return reverse(route, args=["-"])[:-1]


def recipient_token_lifetime(*, purpose: Purpose) -> timedelta:
    return timedelta(seconds=getattr(settings, purpose.lifetime_setting))


def recipient_token_read(*, purpose: Purpose, token: str) -> RecipientToken:
    """What the token was issued for; raises RecipientTokenInvalid when it was tampered with,
    made for another purpose, or is older than its lifetime."""
    try:
        payload = signing.loads(token, salt=f"notify.{purpose.name}", max_age=recipient_token_lifetime(purpose=purpose))
    except signing.SignatureExpired as error:
        raise RecipientTokenInvalid(purpose=purpose, expired=True) from error
    except signing.BadSignature as error:
        raise RecipientTokenInvalid(purpose=purpose, expired=False) from error
    recipient_id = payload.pop("r")
    return RecipientToken(recipient_id=UUID(recipient_id), extra=payload)
