"""The one small interface every channel implements, and the values that cross it."""

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar
from uuid import UUID

import requests

from apps.recipients.models import Device, Recipient, WebPushSubscription
from notify.resilience.failures import FailureKind


@dataclass(frozen=True)
class RenderedContent:
    subject: str = ""
    title: str = ""
    body: str = ""
    html: str = ""
    link: str = ""
    data: dict = field(default_factory=dict)
    # The A/B variant it was rendered from (TemplateVariant.key); empty: no test.
    variant: str = ""


@dataclass(frozen=True)
class OutboundMessage:
    delivery_id: UUID
    address: str
    content: RenderedContent
    category_key: str
    # Which send of the delivery this is; providers echo it back with their feedback.
    resend_round: int = 0
    # For a channel that carries them (Channel.wants_links), on non-critical messages.
    unsubscribe_url: str = ""
    preferences_url: str = ""
    # For the provider call's trace span and log lines.
    notification_id: UUID | None = None
    # The event it comes from: the in-app channel reads the event's inbox options by it.
    event_id: UUID | None = None
    # Set when an earlier attempt may have reached the provider: from when to look for it.
    in_doubt_since: datetime | None = None
    # What a repeat or a newer message replaces on the device rather than adds to: the
    # event's replace_key when it has one, else the delivery id (the default).
    collapse_key: str = ""

    def __post_init__(self) -> None:
        if not self.collapse_key:
            object.__setattr__(self, "collapse_key", str(self.delivery_id))

    @property
    def replaces(self) -> bool:
        """Whether the collapse key is the event's replace key (not the delivery's own id)."""
        return self.collapse_key != str(self.delivery_id)


@dataclass(frozen=True)
class SendOutcome:
    delivery_id: UUID
    failure: FailureKind | None = None
    reason: str = ""
    provider_message_id: str = ""
    # The provider's own word for the outcome, kept next to ours ("twilio:queued").
    provider_status: str = ""
    segments: int | None = None
    # Not sent, by our own decision rather than a failure: the status the delivery takes
    # instead (suppressed, deferred or expired), with `until` for a deferral.
    withheld: str = ""
    until: datetime | None = None
    # The provider says this address must not be sent to again (an opted-out number).
    suppress_address: str = ""
    # The provider certainly did not take the message (no connection, or an error answer),
    # so another provider may send it without risking a duplicate. A timeout is not this.
    unsent: bool = False
    # The request may have reached the provider, but no answer came (a timeout, an unreadable
    # answer): the provider is asked before the message is sent again.
    in_doubt: bool = False
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.withheld


def request_never_reached(error: BaseException) -> bool:
    """Whether the error proves the request never reached the provider (refused, or no
    connection made), as opposed to a timeout after it may have been taken."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, requests.ReadTimeout):
            return False
        if isinstance(seen, (requests.ConnectionError, ConnectionRefusedError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def timed_outcome(message: OutboundMessage, started: float, **fields: Any) -> SendOutcome:
    """An outcome for the message, timed from `started` (a time.perf_counter() reading)."""
    return SendOutcome(delivery_id=message.delivery_id, elapsed_ms=(time.perf_counter() - started) * 1000, **fields)


class Channel(ABC):
    name: ClassVar[str]
    # Whether its messages carry unsubscribe and preference links (made per message, so
    # only where they are shown).
    wants_links: ClassVar[bool] = False
    # Whether a repeated message replaces the one shown (a collapse key or notification tag,
    # an in-app item per delivery) rather than reaching the person twice.
    repeats_collapse: ClassVar[bool] = False

    @abstractmethod
    def address_for(self, *, recipient: Recipient) -> str:
        """Where this recipient is reached on this channel, or "" when they cannot be."""

    def cost_of(self, *, content: RenderedContent) -> Decimal | None:
        """What sending this content costs, for channels billed per message (None: not priced)."""
        return None

    def address_sql(self, *, recipient: str) -> str | None:
        """address_for() as a PostgreSQL expression over the recipients row aliased `recipient`,
        for a fan-out planned in the database; None when the channel cannot say it in SQL."""
        return None

    def addresses_for(self, *, recipients: list[Recipient]) -> dict[UUID, str]:
        """address_for() for many recipients at once (a channel that must query overrides it)."""
        return {recipient.id: self.address_for(recipient=recipient) for recipient in recipients}

    @abstractmethod
    def send_batch(self, *, messages: list[OutboundMessage]) -> list[SendOutcome]:
        """Send each message once; return one outcome per message, never raise for one."""

    def reset(self) -> None:
        """Drop any provider connection kept open between batches."""

    def messages_per_request(self) -> int:
        """How many messages go in one provider request. The send stage records outcomes after
        each request, so that a worker that dies leaves at most one request's messages in doubt."""
        return 1

    def reconcile(self, *, messages: list[OutboundMessage]) -> dict[UUID, str] | None:
        """Ask the provider which of these in-doubt messages it already took: their provider
        message ids by delivery. None when this provider cannot be asked; raises when it
        could be but did not answer."""
        return None


class RegistryChannel(Channel):
    """A channel that reaches a recipient through registered endpoints (devices, browser
    subscriptions) rather than one address: the "address" is the recipient's id, and only
    active endpoints count."""

    registry: ClassVar[type[Device] | type[WebPushSubscription]]

    def address_for(self, *, recipient: Recipient) -> str:
        return str(recipient.id)

    def address_sql(self, *, recipient: str) -> str | None:
        table = self.registry._meta.db_table
        return (
            f"CASE WHEN EXISTS (SELECT 1 FROM {table} endpoint WHERE endpoint.recipient_id = {recipient}.id"
            f" AND endpoint.active) THEN {recipient}.id::text ELSE '' END"
        )

    def addresses_for(self, *, recipients: list[Recipient]) -> dict[UUID, str]:
        registered = set(
            self.registry._default_manager.filter(recipient__in=recipients, active=True).values_list(
                "recipient_id", flat=True
            )
        )
        return {r.id: str(r.id) if r.id in registered else "" for r in recipients}

    def endpoints_for(self, *, messages: list[OutboundMessage]) -> dict[str, list[Any]]:
        """Each message's recipient's active endpoints, in one query, keyed by address."""
        endpoints: dict[str, list[Any]] = defaultdict(list)
        for endpoint in self.registry._default_manager.filter(
            recipient_id__in=[m.address for m in messages], active=True
        ):
            endpoints[str(endpoint.recipient_id)].append(endpoint)
        return endpoints
