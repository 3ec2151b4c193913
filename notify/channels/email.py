"""Email through django-anymail: the only module that touches anymail's sending API."""
import time

from typing import Any

from anymail.exceptions import AnymailError, AnymailRecipientsRefused, AnymailRequestsAPIError
from anymail.signals import AnymailTrackingEvent, tracking
from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection
from django.dispatch import receiver

from apps.recipients.models import Recipient
from notify.channels.base import Channel, OutboundMessage, SendOutcome
from notify.pipeline.record import feedback_record
from notify.resilience.failures import failure_from_status

# Providers that honour it replay the first response for a repeated key, which turns our
# at-least-once sends into exactly-once deliveries. The delivery id is the key.
IDEMPOTENCY_HEADER = "X-Idempotency-Key"


class EmailChannel(Channel):
    name = "email"

    def address_for(self, *, recipient: Recipient) -> str:
        return recipient.email

    def send_batch(self, *, messages: list[OutboundMessage]) -> list[SendOutcome]:
        # One connection for the whole batch: anymail keeps its HTTP session alive.
        connection = get_connection(fail_silently=False)
        outcomes = []
        with connection:
            for message in messages:
                outcomes.append(self._send_one(connection=connection, message=message))
        return outcomes

    def _send_one(self, *, connection: object, message: OutboundMessage) -> SendOutcome:
        content = message.content
        email = EmailMultiAlternatives(
            subject=content.subject,
            body=content.body,
            from_email=settings.DEFAULT_FROM_EMAIL,
            to=[message.address],
            headers={IDEMPOTENCY_HEADER: str(message.delivery_id)},
            connection=connection,
        )
        if content.html:
            email.attach_alternative(content.html, "text/html")
        email.metadata = {"delivery_id": str(message.delivery_id)}  # type: ignore[attr-defined]
        email.tags = [message.category_key]  # type: ignore[attr-defined]
        started = time.perf_counter()
        try:
            email.send()
        except AnymailRecipientsRefused as error:
            return self._outcome(message, started, failure=failure_from_status(422), reason=_reason(error))
        except AnymailRequestsAPIError as error:
            status_code = error.status_code
            return self._outcome(
                message, started, failure=failure_from_status(status_code), reason=_reason(error)
            )
        except (AnymailError, OSError) as error:
            # No HTTP status: the request never completed (connection refused, timeout).
            return self._outcome(message, started, failure=failure_from_status(None), reason=_reason(error))
        status = getattr(email, "anymail_status", None)
        provider_id = status.message_id if status is not None and isinstance(status.message_id, str) else ""
        return self._outcome(message, started, provider_message_id=provider_id or "")

    @staticmethod
    def _outcome(message: OutboundMessage, started: float, **fields: object) -> SendOutcome:
        elapsed_ms = (time.perf_counter() - started) * 1000
        return SendOutcome(delivery_id=message.delivery_id, elapsed_ms=elapsed_ms, **fields)  # type: ignore[arg-type]


def _reason(error: Exception) -> str:
    """The provider's own words when it sent any, else the first line of the error."""
    response = getattr(error, "response", None)
    try:
        provider_message = response.json().get("Message") if response is not None else None
    except ValueError:
        provider_message = None
    status = f"HTTP {response.status_code}: " if response is not None else ""
    text = provider_message or (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{status}{text}"[:400]


@receiver(tracking, dispatch_uid="notify.channels.email.tracking")
def email_tracking_received(sender: Any, event: AnymailTrackingEvent, esp_name: str, **kwargs: Any) -> None:
    """anymail's verified tracking webhooks -> delivery feedback. Raising (feedback that
    arrived early) answers 500, and the provider sends the webhook again later."""
    delivery_id = (event.metadata or {}).get("delivery_id")
    if not delivery_id:
        return
    raw = event.esp_event.get("RecordType", event.event_type) if isinstance(event.esp_event, dict) else event.event_type
    feedback_record(
        delivery_id=delivery_id,
        provider_status=f"{esp_name.lower()}:{raw}",
        normalized_status=event.event_type,
        occurred_at=event.timestamp,
    )
