"""Web push through pywebpush with VAPID: the only module that touches pywebpush.

A delivery goes to every active subscription of its recipient. A 404 or 410 from the push
service means the browser dropped the subscription, which is then deactivated."""

import json
import time

import requests
from cryptography.hazmat.primitives import serialization
from django.conf import settings
from py_vapid import Vapid
from py_vapid.utils import b64urlencode
from pywebpush import WebPushException, webpush

from apps.recipients.models import WebPushSubscription
from notify.channels.base import OutboundMessage, RegistryChannel, SendOutcome, timed_outcome
from notify.resilience.failures import FailureKind, failure_from_status

GONE_STATUSES = frozenset({404, 410})


def vapid_application_server_key() -> str:
    """The public half of WEBPUSH_VAPID_PRIVATE_KEY, as browsers take it in subscribe()."""
    vapid = Vapid.from_string(settings.WEBPUSH_VAPID_PRIVATE_KEY)
    public = vapid.public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return b64urlencode(public)


class WebPushChannel(RegistryChannel):
    name = "webpush"
    registry = WebPushSubscription

    def __init__(self) -> None:
        self._session: requests.Session | None = None

    def reset(self) -> None:
        self._session = None

    def send_batch(self, *, messages: list[OutboundMessage]) -> list[SendOutcome]:
        if self._session is None:
            self._session = requests.Session()  # keep-alive to the push services
        subscriptions = self.endpoints_for(messages=messages)
        return [self._send_one(message=m, subscriptions=subscriptions[m.address]) for m in messages]

    def _send_one(self, *, message: OutboundMessage, subscriptions: list[WebPushSubscription]) -> SendOutcome:
        started = time.perf_counter()
        if not subscriptions:
            return timed_outcome(
                message, started, failure=FailureKind.PERMANENT, reason="no active web push subscription"
            )
        content = message.content
        payload = json.dumps(
            {
                "title": content.title,
                "body": content.body,
                "link": content.link,
                "delivery_id": str(message.delivery_id),
            }
        )
        accepted, failures = 0, []
        for subscription in subscriptions:
            try:
                webpush(
                    subscription_info={
                        "endpoint": subscription.endpoint,
                        "keys": {"p256dh": subscription.p256dh, "auth": subscription.auth},
                    },
                    data=payload,
                    vapid_private_key=settings.WEBPUSH_VAPID_PRIVATE_KEY,
                    vapid_claims={"sub": settings.WEBPUSH_VAPID_SUBJECT},
                    ttl=settings.WEBPUSH_TTL_SECONDS,
                    timeout=settings.NOTIFY_WEBPUSH_TIMEOUT_SECONDS,
                    requests_session=self._session,
                )
                accepted += 1
            except WebPushException as error:
                status = error.response.status_code if error.response is not None else None
                if status in GONE_STATUSES:
                    WebPushSubscription.objects.filter(pk=subscription.pk).update(
                        active=False, deactivated_reason=f"the push service answered {status}"
                    )
                failures.append((failure_from_status(status), f"HTTP {status}: {error.message}"[:200]))
            except requests.RequestException as error:
                self.reset()
                failures.append((FailureKind.TRANSIENT, f"{type(error).__name__}: {error}"[:200]))
        if accepted:
            return timed_outcome(message, started, provider_status=f"webpush:accepted {accepted}/{len(subscriptions)}")
        transient = any(kind is FailureKind.TRANSIENT for kind, _ in failures)
        reason = "; ".join(text for _, text in failures)
        return timed_outcome(
            message, started, failure=FailureKind.TRANSIENT if transient else FailureKind.PERMANENT, reason=reason
        )
