"""Signed recipient tokens: they let a person's browser act for one recipient (read the
inbox, change preferences, unsubscribe) without an API key or a login. Each purpose has its
own salt, so a token made for one cannot be used for another, and its own lifetime."""

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core import signing
from django.urls import reverse
from django.utils.encoding import force_bytes


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
    expires_at: datetime


class _PurposeSigner(signing.TimestampSigner):
    """Django's timestamped signer, making exactly its tokens, with the HMAC key derived
    once instead of for every token: every non-critical email carries a token, and the key
    derivation was half of what making one cost."""

    def __init__(self, *, salt: str, key: str, fallback_keys: tuple[str, ...]) -> None:
        # Signs with the current key; reads with it and then each fallback (Signer.unsign),
        # so that links already sent outlive a key rotation.
        super().__init__(salt=salt, key=key, fallback_keys=list(fallback_keys))
        self._derived_keys: dict[Any, bytes] = {}

    def signature(self, value: Any, key: Any = None) -> str:
        key = key or self.key
        derived = self._derived_keys.get(key)
        if derived is None:  # as django.utils.crypto.salted_hmac derives it
            derived = self._derived_keys[key] = hashlib.sha256(
                force_bytes(self.salt) + b"signer" + force_bytes(key)
            ).digest()
        return signing.b64_encode(hmac.digest(derived, force_bytes(value), "sha256")).decode()


def _signer(purpose_name: str) -> _PurposeSigner:
    return _signer_for_keys(purpose_name, settings.SECRET_KEY, tuple(settings.SECRET_KEY_FALLBACKS))


@lru_cache(maxsize=8)
def _signer_for_keys(purpose_name: str, secret_key: str, fallback_keys: tuple[str, ...]) -> _PurposeSigner:
    # Keyed by the keys too, so changed keys (tests override them) get a new signer.
    return _PurposeSigner(salt=f"notify.{purpose_name}", key=secret_key, fallback_keys=fallback_keys)


def recipient_token_issue(*, purpose: Purpose, recipient_id: UUID, **extra: str) -> str:
    """What signing.dumps() makes of {"r": recipient_id, **extra}: compact JSON, base64, a
    timestamp and the signature. The JSON is put together here because the extras (a category
    and a channel) are the same for a whole batch, so their JSON is made once."""
    payload = f'{{"r":"{recipient_id}"{_extra_json(tuple(extra.items()))}}}'
    return _signer(purpose.name).sign(signing.b64_encode(payload.encode()).decode())


@lru_cache(maxsize=1024)
def _extra_json(extra: tuple[tuple[str, str], ...]) -> str:
    return "".join(f",{json.dumps(key)}:{json.dumps(value)}" for key, value in extra)


def recipient_link(*, purpose: Purpose, recipient_id: UUID, **extra: str) -> str:
    """An absolute link, for a message, to the purpose's page for this recipient. Every
    non-critical email carries one, so the route is reversed once, not per link."""
    token = recipient_token_issue(purpose=purpose, recipient_id=recipient_id, **extra)
    return f"{settings.NOTIFY_PUBLIC_URL}{_route_prefix(purpose.route)}{token}"


def email_links(*, recipient_id: UUID, category_key: str, channel: str) -> dict[str, str]:
    """A message's unsubscribe link, and its preferences link, which carries the same token
    and exchanges it for a preference-center link when opened: one token to sign for each
    message of a bulk send, not two. Both links arrive in the same message, so sharing
    the token gives its reader nothing more."""
    unsubscribe_url = recipient_link(purpose=UNSUBSCRIBE, recipient_id=recipient_id, c=category_key, ch=channel)
    return {"unsubscribe_url": unsubscribe_url, "preferences_url": f"{unsubscribe_url}/preferences"}


@lru_cache(maxsize=8)
def _route_prefix(route: str) -> str:
    return reverse(route, args=["-"])[:-1]


def recipient_token_lifetime(*, purpose: Purpose) -> timedelta:
    return timedelta(seconds=getattr(settings, purpose.lifetime_setting))


def recipient_token_read(*, purpose: Purpose, token: str) -> RecipientToken:
    """What the token was issued for; raises RecipientTokenInvalid when it was tampered with,
    made for another purpose, or is older than its lifetime."""
    lifetime = recipient_token_lifetime(purpose=purpose)
    try:
        payload = _signer(purpose.name).unsign_object(token, max_age=lifetime)
    except signing.SignatureExpired as error:
        raise RecipientTokenInvalid(purpose=purpose, expired=True) from error
    except signing.BadSignature as error:
        raise RecipientTokenInvalid(purpose=purpose, expired=False) from error
    # The signed timestamp, verified above, is the token's middle part (value:timestamp:signature).
    issued_at = datetime.fromtimestamp(signing.b62_decode(token.rsplit(":", 2)[1]), tz=UTC)
    recipient_id = payload.pop("r")
    return RecipientToken(recipient_id=UUID(recipient_id), extra=payload, expires_at=issued_at + lifetime)
