"""Signed, short-lived recipient tokens: the producer API issues them so that a browser can
read its own inbox without ever holding an API key."""

from datetime import timedelta
from uuid import UUID

from django.conf import settings
from django.core import signing

SALT = "notify.inbox.recipient"


class InboxTokenInvalid(Exception):
    def __init__(self, *, expired: bool) -> None:
        super().__init__("the inbox token has expired" if expired else "the inbox token is not valid")
        self.expired = expired


def inbox_token_issue(*, recipient_id: UUID) -> str:
    return signing.dumps({"r": str(recipient_id)}, salt=SALT)


def inbox_token_lifetime() -> timedelta:
    return timedelta(seconds=settings.NOTIFY_INBOX_TOKEN_SECONDS)


def inbox_token_read(*, token: str) -> UUID:
    """The recipient the token was issued for; raises InboxTokenInvalid when it is tampered
    with or older than its lifetime."""
    try:
        payload = signing.loads(token, salt=SALT, max_age=inbox_token_lifetime())
    except signing.SignatureExpired as error:
        raise InboxTokenInvalid(expired=True) from error
    except signing.BadSignature as error:
        raise InboxTokenInvalid(expired=False) from error
    return UUID(payload["r"])
