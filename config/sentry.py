"""Error reporting to Sentry, without the people's data that passes through the service:
no request bodies, cookies or users, and email addresses, phone numbers, API keys and signed
tokens masked wherever they appear in an event or a breadcrumb.

The SDK's EventScrubber masks values by their key (Authorization, Cookie, ...); it cannot
recognise an address or one of our tokens inside a message, a URL or an SQL statement, so
before_send and before_breadcrumb mask those by their form."""

import re
from typing import Any
from urllib.parse import unquote

import sentry_sdk
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber

MASK = "[Filtered]"
# Keys whose values are credentials, on top of the SDK's list (which has authorization, cookie).
SECRET_KEYS = ["x-twilio-signature", "x_twilio_signature", "x-postmark-server-token", "server_token", "auth_token"]
CREDENTIAL_PATTERNS = [
    # API keys: ntf_<lookup>_<secret> (apps.tenants.models.ApiKey).
    re.compile(r"\bntf_[A-Za-z0-9]+_[A-Za-z0-9_-]+"),
    # Django's signed tokens (value:timestamp:signature), as recipient links carry them.
    re.compile(r"[A-Za-z0-9_-]+:[A-Za-z0-9_-]+:[A-Za-z0-9_-]{20,}"),
    # Bearer credentials in text ("Authorization: Bearer ...").
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"),
]
EMAIL_PATTERN = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
# Phone numbers, E.164 or nearly: a "+" and 8 to 15 digits, spaces or dashes between.
PHONE_PATTERN = re.compile(r"\+[1-9](?:[ -]?[0-9]){7,14}\b")
SECRET_PATTERNS = [*CREDENTIAL_PATTERNS, EMAIL_PATTERN, PHONE_PATTERN]


def text_scrub(text: str) -> str:
    """The text with every email address, phone number, API key and signed token masked
    (URL-encoded ones too: the text is decoded first)."""
    if "%" in text:
        text = unquote(text)
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(MASK, text)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return text_scrub(value)
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(item) for item in value]
    return value


def event_scrub(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sentry's before_send: drop the request's body, cookies and user, and mask what is left."""
    request = event.get("request")
    if isinstance(request, dict):
        for name in ("data", "cookies", "env"):
            request.pop(name, None)
    event.pop("user", None)
    return _scrub(event)


def breadcrumb_scrub(crumb: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sentry's before_breadcrumb: mask log messages, SQL and HTTP URLs alike."""
    return _scrub(crumb)


def sentry_init(*, dsn: str, traces_sample_rate: float, **options: Any) -> None:
    """Start error reporting with nothing personal attached (options: for tests, a transport)."""
    sentry_sdk.init(
        dsn=dsn,
        traces_sample_rate=traces_sample_rate,
        send_default_pii=False,
        max_request_body_size="never",
        include_local_variables=False,  # a frame's locals hold addresses and message bodies
        event_scrubber=EventScrubber(recursive=True, denylist=DEFAULT_DENYLIST + SECRET_KEYS),
        before_send=event_scrub,  # type: ignore[arg-type]
        before_send_transaction=event_scrub,  # type: ignore[arg-type]
        before_breadcrumb=breadcrumb_scrub,  # type: ignore[arg-type]
        **options,
    )
