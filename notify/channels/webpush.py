"""Web push through pywebpush with VAPID: the only module that touches pywebpush.

A delivery goes to every active subscription of its recipient. A 404 or 410 from the push
service means the browser dropped the subscription, which is then deactivated.

Endpoints are the tenant's choice, so every request goes through the SSRF guard
(notify/resilience/outbound.py), checked again at each send: an endpoint it refuses, or one
that answers with a redirect (never followed), is deactivated. A push service's answer is kept
as its status and reason phrase only, never its body."""

import base64
import hashlib
import json
import re
import time
from contextlib import suppress
from uuid import UUID

import requests
from cryptography.hazmat.primitives import serialization
from django.conf import settings
from py_vapid import Vapid, VapidException
from py_vapid.utils import b64urlencode
from pywebpush import WebPushException, webpush

from apps.recipients.models import WebPushSubscription
from notify.channels.base import OutboundMessage, RegistryChannel, SendOutcome, timed_outcome
from notify.observability.logs import message_scoped
from notify.resilience.failures import FailureKind, failure_from_status
from notify.resilience.outbound import HostUnresolved, OutboundRefused, OutboundSession

GONE_STATUSES = frozenset({404, 410})
REASON_LIMIT = 200
# RFC 8030 5.4: a Topic is at most 32 characters of the URL-safe base64 alphabet.
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")


def vapid_application_server_key() -> str:
    """The public half of WEBPUSH_VAPID_PRIVATE_KEY, as browsers take it in subscribe()."""
    vapid = Vapid.from_string(settings.WEBPUSH_VAPID_PRIVATE_KEY)
    public = vapid.public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return b64urlencode(public)


def webpush_topic(*, key: str) -> str:
    """The collapse key as a push service takes it for a Topic: a key that conforms, itself;
    a delivery id, its 32 hex digits; any other, 32 characters of its SHA-256 in URL-safe base64."""
    if TOPIC_PATTERN.fullmatch(key):
        return key
    with suppress(ValueError):
        if str(UUID(key)) == key:
            return UUID(key).hex
    return base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()).decode()[:32]


# Web push messages sent between two records of their outcomes.
WEBPUSH_RECORD_SLICE = 50


class WebPushChannel(RegistryChannel):
    name = "webpush"
    registry = WebPushSubscription
    repeats_collapse = True  # the delivery's Topic and notification tag replace a repeat

    def messages_per_request(self) -> int:
        # A message is a request a subscription, but a repeat replaces the one shown (the
        # Topic and tag), so outcomes are recorded a slice at a time, as FCM's are.
        return WEBPUSH_RECORD_SLICE

    def __init__(self) -> None:
        self._session: requests.Session | None = None

    def reset(self) -> None:
        self._session = None

    def send_batch(self, *, messages: list[OutboundMessage]) -> list[SendOutcome]:
        if self._session is None:
            # Keep-alive to the push services, through the guard.
            self._session = OutboundSession(
                allowed_hosts=settings.NOTIFY_WEBPUSH_ALLOWED_HOSTS,
                connect_timeout=settings.NOTIFY_WEBPUSH_CONNECT_TIMEOUT_SECONDS,
            )
        subscriptions = self.endpoints_for(messages=messages)
        return [self._send_one(message=m, subscriptions=subscriptions[m.address]) for m in messages]

    @message_scoped
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
                # The service worker shows it with this tag, so a repeat or a newer message
                # with the same key replaces the notification shown.
                "tag": message.collapse_key,
            }
        )
        # The push service keeps only the newest undelivered message with one Topic.
        headers = {"Topic": webpush_topic(key=message.collapse_key)}
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
                    headers=headers,
                    timeout=settings.NOTIFY_WEBPUSH_TIMEOUT_SECONDS,
                    requests_session=self._session,
                )
                accepted += 1
            except WebPushException as error:
                status = error.response.status_code if error.response is not None else None
                # pywebpush's message carries the response body: only the status line is kept.
                phrase = (error.response.reason or "") if error.response is not None else error.message
                reason = f"HTTP {status} {phrase}".strip()[:REASON_LIMIT]
                if status in GONE_STATUSES:
                    _deactivate(subscription, reason=f"the push service answered {status}")
                    failures.append((FailureKind.PERMANENT, reason))
                elif status is not None and 300 <= status < 400:
                    _deactivate(subscription, reason=f"the endpoint redirects ({status}); redirects are not followed")
                    failures.append((FailureKind.PERMANENT, f"{reason}: redirects are not followed"))
                else:
                    failures.append((failure_from_status(status), reason))
            except VapidException as error:
                if "'aud'" not in str(error):
                    raise  # our key is at fault, not this subscription
                # py_vapid cannot sign for the endpoint's origin (an IPv6 literal, say): no
                # push service has one, and no send to it can ever work.
                _deactivate(subscription, reason="endpoint refused: VAPID cannot sign for its origin")
                failures.append((FailureKind.PERMANENT, "endpoint refused: VAPID cannot sign for its origin"))
            except HostUnresolved as error:
                failures.append((FailureKind.TRANSIENT, error.reason[:REASON_LIMIT]))
            except OutboundRefused as error:
                _deactivate(subscription, reason=f"endpoint refused: {error.reason}")
                failures.append((FailureKind.PERMANENT, f"endpoint refused: {error.reason}"[:REASON_LIMIT]))
            except requests.RequestException as error:
                self.reset()
                failures.append((FailureKind.TRANSIENT, _request_error_reason(error)))
        if accepted:
            return timed_outcome(message, started, provider_status=f"webpush:accepted {accepted}/{len(subscriptions)}")
        transient = any(kind is FailureKind.TRANSIENT for kind, _ in failures)
        reason = "; ".join(text for _, text in failures)
        return timed_outcome(
            message, started, failure=FailureKind.TRANSIENT if transient else FailureKind.PERMANENT, reason=reason
        )


def _deactivate(subscription: WebPushSubscription, *, reason: str) -> None:
    WebPushSubscription.objects.filter(pk=subscription.pk).update(
        active=False, deactivated_reason=reason[:REASON_LIMIT]
    )


def _request_error_reason(error: requests.RequestException) -> str:
    """What went wrong, without the URL (which holds the subscription's secret path)."""
    if isinstance(error, requests.ConnectTimeout):
        return "the push service did not accept a connection in time"
    if isinstance(error, requests.Timeout):
        return "the push service did not answer in time"
    if isinstance(error, requests.ConnectionError):
        return "no connection to the push service"
    return f"the request failed ({type(error).__name__})"
