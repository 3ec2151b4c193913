"""SMS through Twilio's Messages API: the only module that touches the twilio SDK.

Numbers are checked as E.164 before sending, segments are counted (GSM-7 or UCS-2) and
capped, and Twilio's signed status callbacks are verified and turned into feedback."""

import math
import time
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID

import gsm0338  # noqa: F401 - registers the "gsm03.38" codec
from django.conf import settings
from django.utils import timezone
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from apps.recipients.models import Recipient, Suppression, address_hashed
from apps.recipients.phone import e164
from apps.tenants.models import Tenant
from notify.channels.base import (
    Channel,
    OutboundMessage,
    RenderedContent,
    SendOutcome,
    request_never_reached,
    timed_outcome,
)
from notify.observability.logs import message_scoped
from notify.pipeline.feedback import feedback_receive
from notify.pipeline.record import Feedback, delivery_sender, delivery_tenant_id
from notify.resilience.failures import FailureKind, failure_from_status
from notify.resilience.outbound import OutboundSession

TWILIO_HOST = "https://api.twilio.com"
# Twilio error codes that mean the number itself cannot receive: retrying cannot help.
PERMANENT_TWILIO_CODES = frozenset({21211, 21214, 21408, 21610, 21612, 21614})
# The recipient replied STOP: the number is suppressed, not just this message failed.
OPTED_OUT_TWILIO_CODE = 21610
# Reconciliation reads a number's newest messages, back to a little before the doubt began
# (for clocks that disagree), and no further than RECONCILE_LIMIT of them.
RECONCILE_MARGIN = timedelta(minutes=5)
RECONCILE_PAGE = 50
RECONCILE_LIMIT = 500


def sms_segments(*, text: str) -> int:
    """How many segments a carrier bills: GSM-7 when every character has a GSM 03.38 code
    (an extension character takes two septets), otherwise UCS-2 in UTF-16 code units."""
    try:
        units, single, multi = len(text.encode("gsm03.38")), 160, 153
    except UnicodeEncodeError:
        units, single, multi = len(text.encode("utf-16-le")) // 2, 70, 67
    if units <= single:
        return 1
    return math.ceil(units / multi)


class _ConfiguredHostHttpClient(TwilioHttpClient):
    """Twilio's own HTTP client, sending to the configured API base instead of api.twilio.com,
    so the real SDK code path runs against the sandbox in tests and the demo."""

    def __init__(self, *, api_base: str, timeout: float, guarded: bool) -> None:
        super().__init__(timeout=timeout)
        self.api_base = api_base.rstrip("/")
        if guarded:
            # A provider account's own address is set by the tenant's staff: through the
            # guard. The configured one is the operator's and needs none.
            self.session = OutboundSession(allowed_hosts=settings.NOTIFY_PROVIDER_ALLOWED_HOSTS)

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        if url.startswith(TWILIO_HOST):
            url = self.api_base + url[len(TWILIO_HOST) :]
        return super().request(method, url, *args, **kwargs)


class SmsChannel(Channel):
    name = "sms"

    def __init__(self, *, overrides: dict[str, Any] | None = None) -> None:
        # A provider account's own settings (api_base, account_sid, auth_token, from_number).
        self._overrides = overrides or {}
        self._client: Client | None = None

    def _setting(self, name: str) -> Any:
        return self._overrides.get(name) or getattr(settings, f"TWILIO_{name.upper()}")

    def address_for(self, *, recipient: Recipient) -> str:
        return recipient.phone

    def address_sql(self, *, recipient: str) -> str | None:
        return f"{recipient}.phone"

    def cost_of(self, *, content: RenderedContent) -> Decimal | None:
        return sms_segments(text=content.body) * Decimal(settings.NOTIFY_SMS_SEGMENT_PRICE)

    def send_batch(self, *, messages: list[OutboundMessage]) -> list[SendOutcome]:
        # Twilio has no batch send: one request per message, on one keep-alive session.
        return [self._send_one(message=message) for message in messages]

    def reset(self) -> None:
        self._client = None

    def reconcile(self, *, messages: list[OutboundMessage]) -> dict[UUID, str] | None:
        """Twilio's message list, newest first, for each number: a message with the same body
        created since the doubt began is the one sent. (No date filter: Twilio dates a message
        sent only once it leaves its queue, and one still queued counts too.)"""
        found = {}
        for message in messages:
            number = e164(number=message.address)
            if number is None:
                continue
            since = (message.in_doubt_since or timezone.now()) - RECONCILE_MARGIN
            for sent in self._client_get().messages.stream(
                to=number, from_=self._setting("from_number"), limit=RECONCILE_LIMIT, page_size=RECONCILE_PAGE
            ):
                if sent.date_created is not None and sent.date_created < since:
                    break  # newest first: everything after is older still
                if sent.body == message.content.body and sent.sid:
                    found[message.delivery_id] = sent.sid
                    break
        return found

    def _client_get(self) -> Client:
        if self._client is None:
            self._client = Client(
                self._setting("account_sid"),
                self._setting("auth_token"),
                http_client=_ConfiguredHostHttpClient(
                    api_base=self._setting("api_base"),
                    timeout=settings.NOTIFY_SMS_TIMEOUT_SECONDS,
                    guarded=bool(self._overrides.get("api_base")),
                ),
            )
        return self._client

    @message_scoped
    def _send_one(self, *, message: OutboundMessage) -> SendOutcome:
        started = time.perf_counter()
        number = e164(number=message.address)
        if number is None:
            return timed_outcome(
                message,
                started,
                failure=FailureKind.PERMANENT,
                reason=f"'{message.address}' is not a valid E.164 number",
            )
        segments = sms_segments(text=message.content.body)
        if segments > settings.NOTIFY_SMS_MAX_SEGMENTS:
            reason = f"{segments} segments is over the limit of {settings.NOTIFY_SMS_MAX_SEGMENTS}"
            return timed_outcome(message, started, failure=FailureKind.PERMANENT, reason=reason, segments=segments)
        callback = (
            f"{settings.NOTIFY_PUBLIC_URL}/webhooks/twilio/status"
            f"?delivery={message.delivery_id}&round={message.resend_round}"
        )
        try:
            sent = self._client_get().messages.create(
                to=number, from_=self._setting("from_number"), body=message.content.body, status_callback=callback
            )
        except TwilioRestException as error:
            failure = (
                FailureKind.PERMANENT if error.code in PERMANENT_TWILIO_CODES else failure_from_status(error.status)
            )
            reason = f"HTTP {error.status}: Twilio error {error.code}: {error.msg}"
            opted_out = number if error.code == OPTED_OUT_TWILIO_CODE else ""
            return timed_outcome(
                message,
                started,
                failure=failure,
                reason=reason,
                segments=segments,
                provider_status=f"twilio:error-{error.code}",
                suppress_address=opted_out,
                unsent=True,  # Twilio answered with an error: it did not take the message
            )
        except (TwilioException, OSError) as error:
            # No answer from Twilio (connection refused, timeout).
            self.reset()
            unsent = request_never_reached(error)
            return timed_outcome(
                message,
                started,
                failure=FailureKind.TRANSIENT,
                reason=f"{type(error).__name__}: {error}",
                unsent=unsent,
                in_doubt=not unsent,
            )
        # Twilio sends no callback for the first status, so it is kept with the send.
        return timed_outcome(
            message,
            started,
            provider_message_id=sent.sid or "",
            provider_status=f"twilio:{sent.status}",
            segments=segments,
        )


# Twilio's final message statuses -> the feedback vocabulary shared by every channel, refined
# by the error code: some failures are temporary at the carrier, some prove the number dead.
TWILIO_FEEDBACK = {"delivered": "delivered", "undelivered": "failed", "failed": "failed"}
TWILIO_TEMPORARY_ERRORS = frozenset({"30001", "30003", "30008"})  # queue overflow, unreachable, unknown
TWILIO_DEAD_NUMBER_ERRORS = frozenset({"30005", "30006"})  # unknown destination, landline
TWILIO_OPTED_OUT_ERRORS = frozenset({"21610", "30004"})  # STOP, blocked by the recipient


class BadSignature(Exception):
    pass


def _accounts(*, tenant_id: UUID | None) -> dict[str, tuple[str, str]]:
    """The SMS accounts a tenant's texts go out through, chosen as sending chooses them (its own
    Providers, else the installation's; names are unique only within one of those), with the
    configured default: name ("" for the default) -> (auth token, from number), each unset key
    falling back to settings as sending does. Without a tenant: every account, keyed uniquely."""
    from apps.deliveries.models import Provider  # a model the channel registry must not import early

    providers = Provider.objects.filter(channel="sms")
    if tenant_id is not None:
        rows = list(providers.filter(tenant_id=tenant_id).values_list("tenant_id", "name", "config"))
        rows = rows or list(providers.filter(tenant__isnull=True).values_list("tenant_id", "name", "config"))
    else:
        rows = list(providers.values_list("tenant_id", "name", "config"))
    accounts = {"": (settings.TWILIO_AUTH_TOKEN, settings.TWILIO_FROM_NUMBER)}
    for owner, name, config in rows:
        key = name if tenant_id is not None else f"{owner or ''}/{name}"
        accounts[key] = (
            config.get("auth_token") or settings.TWILIO_AUTH_TOKEN,
            config.get("from_number") or settings.TWILIO_FROM_NUMBER,
        )
    return accounts


def _signature_verify(
    *, path: str, params: Mapping[str, str], signature: str, accounts: dict[str, str]
) -> tuple[str, ...]:
    """The names of the accounts (among name -> auth token) whose token signed the request
    (more than one when Providers share the configured token); raises BadSignature unless
    one did."""
    url = settings.NOTIFY_PUBLIC_URL + path
    signers = tuple(
        name
        for name, token in accounts.items()
        if token and RequestValidator(token).validate(url, dict(params), signature)
    )
    if not signers:
        raise BadSignature("X-Twilio-Signature does not match")
    return signers


# The keywords carriers and Twilio treat as opting out of, or back into, a sender's texts;
# the whole message must be the keyword.
OPT_OUT_KEYWORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN_KEYWORDS = frozenset({"START", "YES", "UNSTOP"})
OPTED_OUT_REASON = "opted out"


def sms_inbound(*, path: str, params: Mapping[str, str], signature: str) -> str:
    """Verify an incoming text (Twilio's messaging webhook) and act on an opt-out or opt-in
    keyword; return "opted-out", "opted-in" or "ignored". Raises BadSignature.

    Tenants share the sending numbers, so a STOP to any of them stops them all: the number
    is suppressed for SMS in every tenant, and START lifts those opt-outs again (and only
    them: a number suppressed for another reason stays suppressed). Only the account that
    owns the receiving number (`To`) may sign it."""
    receiver = e164(number=params.get("To", ""))
    owners = {
        name: token
        for name, (token, number) in _accounts(tenant_id=None).items()
        if receiver and e164(number=number) == receiver
    }
    _signature_verify(path=path, params=params, signature=signature, accounts=owners)
    number = e164(number=params.get("From", ""))
    keyword = params.get("Body", "").strip().upper()
    if number is None or keyword not in OPT_OUT_KEYWORDS | OPT_IN_KEYWORDS:
        return "ignored"
    if keyword in OPT_OUT_KEYWORDS:
        Suppression.objects.bulk_create(
            [
                Suppression(
                    tenant_id=tenant_id,
                    channel="sms",
                    address=number,
                    reason=f"{OPTED_OUT_REASON} (replied {keyword})",
                    source="twilio:inbound",
                )
                for tenant_id in Tenant.objects.values_list("id", flat=True)
            ],
            ignore_conflicts=True,
        )
        return "opted-out"
    # An erased person's opt-out is kept as a keyed hash of the number (apps/recipients/privacy.py).
    numbers = [number, address_hashed(address=number)]
    Suppression.objects.filter(channel="sms", address__in=numbers, reason__startswith=OPTED_OUT_REASON).delete()
    return "opted-in"


def sms_status_callback(*, path: str, params: Mapping[str, str], signature: str) -> bool:
    """Verify a Twilio status callback and apply it; return False when it changes nothing.

    `path` is the request's path and query string: the signed URL is rebuilt from
    NOTIFY_PUBLIC_URL, the base the callback URL was made from, so a TLS-terminating proxy in
    front of us does not break the signature. Only the account that sent the delivery may
    sign it; while its send is not recorded yet (a callback can overtake it), any account's
    signature parks the feedback, which counts only if that account turns out to be the
    sender. Raises BadSignature for an unsigned or forged request, one signed by another
    account, and every request while no auth token is configured."""
    query = dict(parse_qsl(urlsplit(path).query))
    delivery_id = query.get("delivery", "")
    try:
        delivery_uuid: UUID | None = UUID(delivery_id)
    except ValueError:
        delivery_uuid = None
    sender = None if delivery_uuid is None else delivery_sender(delivery_id=delivery_uuid)
    tenant_id = None if delivery_uuid is None else delivery_tenant_id(delivery_id=delivery_uuid)
    accounts = {name: token for name, (token, _) in _accounts(tenant_id=tenant_id).items()}
    if sender is not None:
        accounts = {sender: accounts[sender]} if sender in accounts else {}
    signers = _signature_verify(path=path, params=params, signature=signature, accounts=accounts)
    status = params.get("MessageStatus", "")
    normalized = TWILIO_FEEDBACK.get(status)
    if normalized is None:
        return False
    error_code = params.get("ErrorCode", "")
    if normalized == "failed" and error_code in TWILIO_TEMPORARY_ERRORS:
        normalized = "soft_bounced"
    elif normalized == "failed" and error_code in TWILIO_DEAD_NUMBER_ERRORS:
        normalized = "bounced"
    elif normalized == "failed" and error_code in TWILIO_OPTED_OUT_ERRORS:
        normalized = "unsubscribed"
    round_text = query.get("round", "0")
    return feedback_receive(
        feedback=Feedback(
            delivery_id=delivery_id,
            normalized_status=normalized,
            provider_status=f"twilio:{status}" + (f"/{error_code}" if error_code else ""),
            resend_round=int(round_text) if round_text.isdigit() else 0,
            reason=f"Twilio error {error_code}" if error_code else "",
            address=params.get("To", ""),
            channel="sms",
            signers=signers,
        ),
        address_for=SmsChannel().address_for,
    )
