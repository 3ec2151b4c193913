"""Error reporting to Sentry, without the people's data that passes through the service:
no request bodies, cookies or users, and email addresses, phone numbers, API keys and signed
tokens masked wherever they appear in an event or a breadcrumb.

Sentry's own server-side scrubbing is configured per project and does not know our key and
token formats, so the events are cleaned before they leave the process."""

import re
from typing import Any

import sentry_sdk

MASK = "[Filtered]"
# Headers that carry credentials; the rest of a request's headers are kept.
SECRET_HEADERS = frozenset({"authorization", "cookie", "set-cookie", "x-twilio-signature", "x-postmark-server-token"})
SECRET_PATTERNS = [
    # API keys: ntf_<lookup>_<secret> (apps.tenants.models.ApiKey).
    re.compile(r"\bntf_[A-Za-z0-9]+_[A-Za-z0-9_-]+"),
    # Django's signed tokens (value:timestamp:signature), as recipient links carry them.
    re.compile(r"[A-Za-z0-9_-]+:[A-Za-z0-9_-]+:[A-Za-z0-9_-]{20,}"),
    # Bearer credentials in text ("Authorization: Bearer ...").
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"),
    # Phone numbers, E.164 or nearly: a "+" and 8 to 15 digits, spaces or dashes between.
    re.compile(r"\+[1-9](?:[ -]?[0-9]){7,14}\b"),
]


def text_scrub(text: str) -> str:
    """The text with every email address, phone number, API key and signed token masked."""
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(MASK, text)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return text_scrub(value)
    if isinstance(value, dict):
        return {key: MASK if str(key).lower() in SECRET_HEADERS else _scrub(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(item) for item in value]
    return value


def event_scrub(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sentry's before_send: drop the request's body, cookies and user, and mask what is left."""
    request = event.get("request")
    if isinstance(request, dict):
        for name in ("data", "cookies", "env"):
            request.pop(name, None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            request["headers"] = {
                name: MASK if name.lower() in SECRET_HEADERS else value for name, value in headers.items()
            }
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
        before_send=event_scrub,  # type: ignore[arg-type]
        before_send_transaction=event_scrub,  # type: ignore[arg-type]
        before_breadcrumb=breadcrumb_scrub,  # type: ignore[arg-type]
        **options,
    )
