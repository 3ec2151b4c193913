"""Email through django-anymail: the only module that touches anymail.

One message goes through anymail's ordinary send. A batch for Postmark goes to Postmark's
batch endpoint (up to 500 different messages in one request): anymail builds the payload of
the first message, and the next messages of the same shape get a copy of it with their own
parts put in (_PayloadTemplate); other ESPs send a batch message by message on one connection."""

import json
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from html import escape
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import requests
from anymail.backends.base_requests import AnymailRequestsBackend
from anymail.backends.postmark import EmailBackend as PostmarkBackend
from anymail.backends.postmark import PostmarkPayload
from anymail.exceptions import (
    AnymailError,
    AnymailInvalidAddress,
    AnymailRecipientsRefused,
    AnymailRequestsAPIError,
)
from anymail.signals import AnymailTrackingEvent, tracking
from anymail.utils import EmailAddress, parse_address_list
from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection
from django.dispatch import receiver
from django.utils import timezone

from apps.recipients.models import Recipient
from notify.channels.base import Channel, OutboundMessage, SendOutcome, request_never_reached, timed_outcome
from notify.observability.logs import message_scoped
from notify.pipeline.feedback import feedback_receive
from notify.pipeline.record import Feedback
from notify.resilience.failures import FailureKind, failure_from_status
from notify.resilience.outbound import OutboundRefused, OutboundSession

POSTMARK_BATCH_LIMIT = 500
# Postmark's search reads times in US Eastern time. It looks back a little further than the
# doubt began, for clocks that disagree.
POSTMARK_TIMEZONE = ZoneInfo("America/New_York")
SEARCH_MARGIN = timedelta(minutes=5)


class EmailChannel(Channel):
    name = "email"
    wants_links = True

    def address_for(self, *, recipient: Recipient) -> str:
        return recipient.email

    def address_sql(self, *, recipient: str) -> str | None:
        return f"{recipient}.email"

    def __init__(self, *, overrides: dict[str, Any] | None = None) -> None:
        # A provider account's own settings (api_url, server_token), over the configured ones,
        # and the address it sends as (from_email, else DEFAULT_FROM_EMAIL).
        self._overrides = {name: value for name, value in (overrides or {}).items() if name != "from_email"}
        self._from_email: str = (overrides or {}).get("from_email") or ""
        self._connection: Any = None

    @property
    def from_email(self) -> str:
        return self._from_email or settings.DEFAULT_FROM_EMAIL

    def send_batch(self, *, messages: list[OutboundMessage]) -> list[SendOutcome]:
        connection = self._open_connection()
        if len(messages) > 1 and isinstance(connection, PostmarkBackend):
            outcomes = []
            for start in range(0, len(messages), POSTMARK_BATCH_LIMIT):
                chunk = messages[start : start + POSTMARK_BATCH_LIMIT]
                outcomes.extend(_postmark_batch_send(connection=connection, messages=chunk, from_email=self.from_email))
        else:
            outcomes = [
                _send_one(connection=connection, message=message, from_email=self.from_email) for message in messages
            ]
        if any(o.failure is FailureKind.TRANSIENT for o in outcomes):
            self.reset()  # a fresh connection next time, in case this one is broken
        return outcomes

    def messages_per_request(self) -> int:
        return POSTMARK_BATCH_LIMIT if isinstance(self._open_connection(), PostmarkBackend) else 1

    def reconcile(self, *, messages: list[OutboundMessage]) -> dict[UUID, str] | None:
        """Postmark's outbound message search, by recipient, time and the delivery id carried
        in each message's metadata. Other ESPs' searches are not wired: None."""
        connection = self._open_connection()
        if not isinstance(connection, PostmarkBackend):
            return None
        found = {}
        for message in messages:
            since = (message.in_doubt_since or timezone.now()) - SEARCH_MARGIN
            response = connection.session.get(
                f"{connection.api_url}messages/outbound",
                params={
                    "count": 50,
                    "offset": 0,
                    "recipient": message.address,
                    "fromdate": since.astimezone(POSTMARK_TIMEZONE).strftime("%Y-%m-%dT%H:%M:%S"),
                    "metadata_delivery_id": str(message.delivery_id),
                },
                headers={"Accept": "application/json", "X-Postmark-Server-Token": connection.server_token},
                timeout=connection.timeout,
            )
            response.raise_for_status()
            for sent in response.json().get("Messages", []):
                if str((sent.get("Metadata") or {}).get("round", "0")) == str(message.resend_round):
                    found[message.delivery_id] = str(sent.get("MessageID", ""))
                    break
        return found

    def _open_connection(self) -> Any:
        """One open backend per worker process, so its HTTP keep-alive connection to the
        provider outlives a batch. Worker processes send from one thread at a time."""
        if self._connection is None:
            connection = get_connection(fail_silently=False, **self._overrides)
            if self._overrides.get("api_url") and isinstance(connection, AnymailRequestsBackend):
                # A provider account's own address is set by the tenant's staff: through the
                # guard. The configured one is the operator's and needs none.
                session = OutboundSession(allowed_hosts=settings.NOTIFY_PROVIDER_ALLOWED_HOSTS)
                session.headers.update(connection.create_session().headers)  # anymail's User-Agent
                connection.session = session  # open() keeps a session already there
            connection.open()
            self._connection = connection
        return self._connection

    def reset(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None


@dataclass(frozen=True)
class _EmailParts:
    """What differs from one message of a batch to the next."""

    subject: str
    body: str
    html: str
    headers: dict[str, str]
    metadata: dict[str, str]
    tag: str


def _email_parts(*, message: OutboundMessage) -> _EmailParts:
    content = message.content
    headers: dict[str, str] = {}
    body, html = content.body, content.html
    if message.unsubscribe_url:
        # RFC 8058 one-click: the mail client POSTs "List-Unsubscribe=One-Click" to the URL.
        headers["List-Unsubscribe"] = f"<{message.unsubscribe_url}>"
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        body, html = _with_footer(message=message, body=body, html=html)
    metadata = {"delivery_id": str(message.delivery_id), "round": str(message.resend_round)}
    return _EmailParts(
        subject=content.subject, body=body, html=html, headers=headers, metadata=metadata, tag=message.category_key
    )


def _email(*, message: OutboundMessage, connection: Any, from_email: str) -> EmailMultiAlternatives:
    parts = _email_parts(message=message)
    email = EmailMultiAlternatives(
        subject=parts.subject,
        body=parts.body,
        from_email=from_email,
        to=[message.address],
        headers=parts.headers,
        connection=connection,
    )
    if parts.html:
        email.attach_alternative(parts.html, "text/html")
    email.metadata = parts.metadata  # type: ignore[attr-defined]
    email.tags = [parts.tag]  # type: ignore[attr-defined]
    return email


def _with_footer(*, message: OutboundMessage, body: str, html: str) -> tuple[str, str]:
    """The unsubscribe and preference links, after the content in each part."""
    body = f"{body}\n\n--\nUnsubscribe: {message.unsubscribe_url}\nYour preferences: {message.preferences_url}"
    if html:
        footer = (
            f'<p style="font-size:12px;color:#666"><a href="{escape(message.unsubscribe_url)}">Unsubscribe</a> · '
            f'<a href="{escape(message.preferences_url)}">Your preferences</a></p>'
        )
        head, closing, tail = html.rpartition("</body>")
        html = f"{head}{footer}{closing}{tail}" if closing else f"{html}{footer}"
    return body, html


@message_scoped
def _send_one(*, connection: Any, message: OutboundMessage, from_email: str) -> SendOutcome:
    started = time.perf_counter()
    email = _email(message=message, connection=connection, from_email=from_email)
    try:
        email.send()
    except (AnymailRecipientsRefused, AnymailInvalidAddress) as error:
        return timed_outcome(message, started, failure=FailureKind.PERMANENT, reason=_reason(error))
    except AnymailRequestsAPIError as error:
        failure, reason = failure_from_status(error.status_code), _reason(error)
        # An error answer, or (anymail's error is also the requests one) no connection at all.
        unsent = error.status_code is not None or request_never_reached(error)
        return timed_outcome(message, started, failure=failure, reason=reason, unsent=unsent, in_doubt=not unsent)
    except (AnymailError, OSError) as error:
        # No HTTP status: the request never completed (connection refused, timeout).
        failure, reason, unsent = failure_from_status(None), _reason(error), request_never_reached(error)
        return timed_outcome(message, started, failure=failure, reason=reason, unsent=unsent, in_doubt=not unsent)
    else:
        return timed_outcome(message, started, provider_message_id=_provider_id(email))


def _provider_id(email: EmailMultiAlternatives) -> str:
    status = getattr(email, "anymail_status", None)
    return status.message_id if status is not None and isinstance(status.message_id, str) else ""


@lru_cache(maxsize=16)
def _from_parsed(from_email: str) -> tuple[EmailAddress, ...]:
    return tuple(parse_address_list([from_email], field="from_email"))


def _from_list(from_email: Any) -> list[EmailAddress]:
    """The converter anymail applies to a message's from_email, with the parsing cached."""
    return list(_from_parsed(str(from_email)))


# A dot-atom address (RFC 5322) in ASCII, as the recipient API's validation accepts most
# addresses: it needs no quoting, so its parts are the text on either side of the "@". The
# "=" and "?" that dot-atoms may hold are left out: "=?" opens an encoded word, which the
# header parser treats differently (anymail refuses such an address).
_DOT_ATOM_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/^_`{|}~-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)


def _to_list(to: Any) -> list[EmailAddress]:
    """The converter anymail applies to a message's to. A single dot-atom address (ours: one
    address a message, validated when the recipient was stored) is split at its "@" instead
    of going through the email package's header parser; anything else is parsed as anymail
    parses it."""
    if isinstance(to, list) and len(to) == 1 and isinstance(to[0], str) and _DOT_ATOM_ADDRESS.fullmatch(to[0]):
        username, domain = to[0].split("@")
        return [EmailAddress(username=username, domain=domain)]
    return parse_address_list(to, field="to")


_CHEAPER_CONVERTERS = {"from_email": _from_list, "to": _to_list}


class _BatchPayload(PostmarkPayload):
    """Anymail's Postmark payload, with cheaper address handling: the From address is parsed
    once per process instead of once per message (every message of a batch has the same
    one), and a plain To address is not re-parsed. Anymail's address parsing was a quarter
    of a bulk worker's time. Everything else is anymail's."""

    base_message_attrs = tuple(
        (attr, combiner, _CHEAPER_CONVERTERS.get(attr, converter))
        for attr, combiner, converter in PostmarkPayload.base_message_attrs
    )


class _PayloadTemplate:
    """Anymail's Postmark payload for one message of a batch, made again for the next messages
    of the same shape by putting in their own parts. Anymail's handling of each attribute of
    each message was a quarter of a bulk worker's time for email; the parts it varies are
    these, each set as anymail sets it (tests/notify/test_send.py holds the payloads equal)."""

    def __init__(self, *, data: dict[str, Any], parts: _EmailParts) -> None:
        self.data, self.shape = data, self._shape(parts)

    @staticmethod
    def _shape(parts: _EmailParts) -> tuple[bool, tuple[str, ...], str]:
        return bool(parts.html), tuple(parts.headers), parts.tag

    @staticmethod
    def usable(*, connection: PostmarkBackend, message: OutboundMessage) -> bool:
        # Defaults (anymail's SEND_DEFAULTS) would be merged into each message's own parts,
        # and an address other than a plain dot-atom is anymail's to format or refuse.
        return not connection.send_defaults and _DOT_ATOM_ADDRESS.fullmatch(message.address) is not None

    def payload_for(self, *, message: OutboundMessage, parts: _EmailParts) -> dict[str, Any] | None:
        if self._shape(parts) != self.shape or not _DOT_ATOM_ADDRESS.fullmatch(message.address):
            return None
        data = dict(self.data)
        data.update(To=message.address, Subject=parts.subject, TextBody=parts.body, Metadata=parts.metadata)
        if parts.html:
            data["HtmlBody"] = parts.html
        if parts.headers:
            data["Headers"] = [{"Name": name, "Value": value} for name, value in parts.headers.items()]
        return data


def _postmark_payloads(
    *, connection: PostmarkBackend, messages: list[OutboundMessage], from_email: str, started: float
) -> tuple[list[dict[str, Any]], dict[int, SendOutcome]]:
    """Each message's Postmark payload, and the outcomes of those anymail refused, by index."""
    refused: dict[int, SendOutcome] = {}
    payloads = []
    template: _PayloadTemplate | None = None
    for index, message in enumerate(messages):
        parts = _email_parts(message=message)
        data = template.payload_for(message=message, parts=parts) if template is not None else None
        if data is None:
            try:
                email = _email(message=message, connection=connection, from_email=from_email)
                data = _BatchPayload(email, connection.send_defaults, connection).data
            except AnymailError as error:  # an address or content anymail cannot encode
                refused[index] = timed_outcome(message, started, failure=FailureKind.PERMANENT, reason=_reason(error))
                continue
            if template is None and _PayloadTemplate.usable(connection=connection, message=message):
                template = _PayloadTemplate(data=data, parts=parts)
        payloads.append(data)
    return payloads, refused


def _postmark_batch_send(
    *, connection: PostmarkBackend, messages: list[OutboundMessage], from_email: str
) -> list[SendOutcome]:
    """POST /email/batch: one request, one result per message, in order."""
    started = time.perf_counter()
    payloads, refused = _postmark_payloads(
        connection=connection, messages=messages, from_email=from_email, started=started
    )
    sendable = [m for index, m in enumerate(messages) if index not in refused]
    outcomes = iter(_postmark_batch_post(connection=connection, messages=sendable, payloads=payloads, started=started))
    return [refused[index] if index in refused else next(outcomes) for index in range(len(messages))]


def _postmark_batch_post(
    *, connection: PostmarkBackend, messages: list[OutboundMessage], payloads: list[dict], started: float
) -> list[SendOutcome]:
    if not messages:
        return []
    try:
        response = connection.session.post(
            f"{connection.api_url}email/batch",
            data=json.dumps(payloads),
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                "X-Postmark-Server-Token": connection.server_token,
            },
            timeout=connection.timeout,
        )
    except requests.RequestException as error:
        unsent = request_never_reached(error)
        failure, reason = failure_from_status(None), _reason(error)
        return [
            timed_outcome(m, started, failure=failure, reason=reason, unsent=unsent, in_doubt=not unsent)
            for m in messages
        ]
    if response.status_code != 200:
        failure, reason = failure_from_status(response.status_code), _reason_from_response(response)
        return [timed_outcome(m, started, failure=failure, reason=reason, unsent=True) for m in messages]
    try:
        results = response.json()
        if not isinstance(results, list) or len(results) != len(messages):
            raise ValueError(f"expected {len(messages)} results")
    except ValueError as error:
        # The provider's answer is unreadable: what it took is in doubt, so it is asked first.
        reason = f"unreadable batch response: {error}"
        return [
            timed_outcome(m, started, failure=FailureKind.TRANSIENT, reason=reason, in_doubt=True) for m in messages
        ]
    outcomes = []
    for message, result in zip(messages, results, strict=True):
        if result.get("ErrorCode", 0) == 0:
            outcomes.append(timed_outcome(message, started, provider_message_id=result.get("MessageID", "")))
        else:
            # Per-message errors in a batch are about the message itself (bad or inactive
            # address, rejected content), so they are permanent.
            reason = f"Postmark error {result.get('ErrorCode')}: {result.get('Message', '')}"
            outcomes.append(timed_outcome(message, started, failure=FailureKind.PERMANENT, reason=reason))
    return outcomes


def _reason_from_response(response: requests.Response) -> str:
    try:
        provider_message = response.json().get("Message")
    except (ValueError, AttributeError):
        provider_message = None
    # The provider's one-line message from its JSON answer, else the status line's phrase:
    # never the body itself.
    if not isinstance(provider_message, str):
        provider_message = None
    return f"HTTP {response.status_code}: {(provider_message or response.reason or '')[:200]}"


def _reason(error: Exception) -> str:
    """The provider's own words when it sent any, else the first line of the error."""
    response = getattr(error, "response", None)
    if response is not None:
        return _reason_from_response(response)
    # anymail raises its own error from the guard's refusal (the refusal is its cause).
    refused = error.__cause__ if isinstance(error.__cause__, OutboundRefused) else error
    if isinstance(refused, OutboundRefused):
        return f"the provider's address is refused: {refused}"[:400]
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:400]


# anymail's normalized event types -> the feedback vocabulary shared by every channel.
ANYMAIL_FEEDBACK = {
    "delivered": "delivered",
    "opened": "opened",
    "clicked": "clicked",
    "bounced": "bounced",
    "complained": "complained",
    "deferred": "deferred",  # the provider is still retrying: history only
    "rejected": "failed",
    "failed": "failed",
}
# Postmark's bounce that anymail reports as "bounced" but that is temporary at the receiving
# end and that Postmark does not retry itself: we send again.
SOFT_BOUNCE_TYPES = frozenset({"SoftBounce"})


@receiver(tracking, dispatch_uid="notify.channels.email.tracking")
def email_tracking_received(sender: Any, event: AnymailTrackingEvent, esp_name: str, **kwargs: Any) -> None:
    """anymail's verified tracking webhooks -> delivery feedback. Raising (feedback that
    arrived early) answers 500, and the provider sends the webhook again later."""
    metadata = event.metadata or {}
    delivery_id = metadata.get("delivery_id")
    normalized = ANYMAIL_FEEDBACK.get(event.event_type)
    if not delivery_id or normalized is None:
        return
    raw = event.esp_event if isinstance(event.esp_event, dict) else {}
    raw_status = raw.get("RecordType", event.event_type)
    if raw.get("Type"):
        raw_status = f"{raw_status}/{raw['Type']}"
    if normalized == "bounced" and raw.get("Type") in SOFT_BOUNCE_TYPES:
        normalized = "soft_bounced"
    feedback_receive(
        feedback=Feedback(
            delivery_id=delivery_id,
            normalized_status=normalized,
            provider_status=f"{esp_name.lower()}:{raw_status}",
            resend_round=int(metadata.get("round") or 0) if str(metadata.get("round") or "0").isdigit() else 0,
            occurred_at=event.timestamp,
            reason=(event.description or "")[:400] if normalized != "delivered" else "",
            address=event.recipient or "",
            channel="email",
        ),
        address_for=EmailChannel().address_for,
    )
