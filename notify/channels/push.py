"""Mobile push through firebase-admin (FCM HTTP v1; iOS through FCM's APNs block): the only
module that touches firebase-admin.

A delivery goes to every active device of its recipient. Tokens that FCM proves dead are
deactivated; a payload error never deactivates a device."""

import hashlib
import json
import time
import warnings
from collections import defaultdict
from typing import Any
from uuid import UUID

import firebase_admin
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.conf import settings
from firebase_admin import credentials, exceptions, messaging

from apps.recipients.models import Device
from notify.channels.base import OutboundMessage, RegistryChannel, SendOutcome
from notify.resilience.failures import FailureKind

FCM_HOST = "https://fcm.googleapis.com"
# Where google-auth looks up a service account's allowed regions after each new token.
IAM_HOST = "https://iamcredentials.googleapis.com"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
# FCM refuses messages over 4 KB; the body is shortened, with an ellipsis, to fit.
PAYLOAD_LIMIT_BYTES = 4096
# firebase-admin's send_each starts one thread per message: send in slices.
SEND_SLICE = 50
# Errors that prove a token dead: only these deactivate a device.
DEAD_TOKEN_ERRORS = (messaging.UnregisteredError, messaging.SenderIdMismatchError)
# APNs refuses an apns-collapse-id over 64 bytes.
APNS_COLLAPSE_ID_LIMIT = 64
TRANSIENT_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "UNKNOWN"})


def push_payload_fit(*, title: str, body: str, data: dict[str, str]) -> str:
    """The body, shortened with an ellipsis until the notification fits FCM's limit. The
    payload is always built as JSON from parts, so shortening never breaks it."""

    def size(text: str) -> int:
        return len(json.dumps({"notification": {"title": title, "body": text}, "data": data}).encode())

    if size(body) <= PAYLOAD_LIMIT_BYTES:
        return body
    low, high = 0, len(body)
    while low < high:  # the longest prefix that fits with its ellipsis
        middle = (low + high + 1) // 2
        if size(body[:middle] + "…") <= PAYLOAD_LIMIT_BYTES:
            low = middle
        else:
            high = middle - 1
    return body[:low] + "…"


class _ConfiguredHostAdapter(requests.adapters.HTTPAdapter):
    """Sends a Google host's requests to FCM_API_BASE instead, so the real SDK code path runs
    against the sandbox in tests and the demo."""

    # What pickling and deepcopy keep: google-auth copies the token session for its thread.
    __attrs__ = [*requests.adapters.HTTPAdapter.__attrs__, "host"]

    def __init__(self, *, host: str) -> None:
        super().__init__()
        self.host = host

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        if request.url and request.url.startswith(self.host):
            request.url = settings.FCM_API_BASE.rstrip("/") + request.url[len(self.host) :]
        return super().send(request, *args, **kwargs)


def _credentials(*, overrides: dict[str, Any]) -> credentials.Certificate:
    if overrides.get("credentials"):  # a push Provider's own service account key (its JSON)
        return credentials.Certificate(overrides["credentials"])
    if settings.FCM_CREDENTIALS_FILE:
        return credentials.Certificate(settings.FCM_CREDENTIALS_FILE)
    if settings.FCM_TOKEN_URI == GOOGLE_TOKEN_URI:
        raise RuntimeError(
            'Set FCM_CREDENTIALS_FILE (or a push provider\'s "credentials") to a Firebase service account key '
            "to send mobile push."
        )
    # A throwaway key for a sandbox token endpoint: the OAuth exchange still really runs.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return credentials.Certificate(
        {
            "type": "service_account",
            "project_id": overrides.get("project_id") or settings.FCM_PROJECT_ID or "notify-sandbox",
            "private_key_id": "sandbox",
            "private_key": pem.decode(),
            "client_email": "notify@sandbox.iam.gserviceaccount.com",
            "client_id": "0",
            "token_uri": settings.FCM_TOKEN_URI,
        }
    )


class PushChannel(RegistryChannel):
    name = "push"
    registry = Device
    repeats_collapse = True  # the delivery's collapse key and notification tag replace a repeat

    def messages_per_request(self) -> int:
        return SEND_SLICE  # one send_each() call

    def __init__(self, *, overrides: dict[str, Any] | None = None) -> None:
        # A push Provider's own Firebase app: {"project_id": ..., "credentials": {key JSON}}.
        self._overrides = overrides or {}
        self._app: firebase_admin.App | None = None

    def reset(self) -> None:
        if self._app is not None:
            firebase_admin.delete_app(self._app)
        self._app = None

    def _app_get(self) -> firebase_admin.App:
        if self._app is None:
            cert = _credentials(overrides=self._overrides)
            options = {
                "projectId": self._overrides.get("project_id") or settings.FCM_PROJECT_ID or cert.project_id,
                "httpTimeout": settings.NOTIFY_PUSH_TIMEOUT_SECONDS,
            }
            self._app = firebase_admin.initialize_app(cert, options=options, name=f"notify-{id(self)}")
            # firebase-admin has no setting for its FCM host; its session is where it sends.
            service = messaging._get_messaging_service(self._app)
            service._client.session.mount(FCM_HOST, _ConfiguredHostAdapter(host=FCM_HOST))
            if settings.FCM_API_BASE.rstrip("/") != FCM_HOST:
                # Against the sandbox, google-auth's region lookup (made on the session that
                # fetches tokens) goes there too: nothing of the sandbox's leaves the machine.
                service._client.session._auth_request_session.mount(IAM_HOST, _ConfiguredHostAdapter(host=IAM_HOST))
        return self._app

    def send_batch(self, *, messages: list[OutboundMessage]) -> list[SendOutcome]:
        started = time.perf_counter()
        devices = self.endpoints_for(messages=messages)
        sends: list[tuple[OutboundMessage, Device, messaging.Message]] = []
        for message in messages:
            for device in devices[message.address]:
                sends.append((message, device, _fcm_message(message=message, device=device)))
        results: dict[UUID, list[tuple[Device, Any]]] = defaultdict(list)
        for start in range(0, len(sends), SEND_SLICE):
            batch = sends[start : start + SEND_SLICE]
            response = messaging.send_each([fcm for _, _, fcm in batch], app=self._app_get())
            for (message, device, _), answer in zip(batch, response.responses, strict=True):
                results[message.delivery_id].append((device, answer))
        dead = [device for answers in results.values() for device, answer in answers if _is_dead_token(answer)]
        for device in dead:
            Device.objects.filter(pk=device.pk).update(
                active=False, deactivated_reason=_error_text(device, answer=None, dead=True)
            )
        return [_delivery_outcome(message=m, answers=results[m.delivery_id], started=started) for m in messages]


def _fcm_message(*, message: OutboundMessage, device: Device) -> messaging.Message:
    content = message.content
    data = {str(k): str(v) for k, v in (content.data or {}).items()}
    data["delivery_id"] = str(message.delivery_id)
    if content.link:
        data["link"] = content.link
    body = push_payload_fit(title=content.title, body=content.body, data=data)
    with warnings.catch_warnings():
        # firebase-admin 7 prefers installation ids (fid); apps still register FCM
        # registration tokens, which FCM v1 takes as "token".
        warnings.filterwarnings("ignore", message="Message.token is deprecated", category=DeprecationWarning)
        return messaging.Message(
            token=device.token,
            notification=messaging.Notification(title=content.title, body=body),
            data=data,
            # A repeat (a send in doubt sent again) or a newer message with the same key
            # replaces the one shown instead of adding a second: collapse_key while FCM holds
            # it, the tag once Android shows it, apns-collapse-id on iOS.
            android=messaging.AndroidConfig(
                priority="high",
                collapse_key=message.collapse_key,
                notification=messaging.AndroidNotification(tag=message.collapse_key),
            ),
            apns=messaging.APNSConfig(
                headers={"apns-priority": "10", "apns-collapse-id": apns_collapse_id(key=message.collapse_key)}
            ),
        )


def apns_collapse_id(*, key: str) -> str:
    """The key as APNs takes it: itself when it fits in 64 bytes, else its SHA-256 in hex."""
    if len(key.encode()) <= APNS_COLLAPSE_ID_LIMIT:
        return key
    return hashlib.sha256(key.encode()).hexdigest()


def _is_dead_token(answer: Any) -> bool:
    error = answer.exception
    if isinstance(error, DEAD_TOKEN_ERRORS):
        return True
    # FCM reports a malformed token as INVALID_ARGUMENT about the registration token; any
    # other INVALID_ARGUMENT is about our payload and must not cost the device.
    return isinstance(error, exceptions.InvalidArgumentError) and "registration token" in str(error).lower()


def _error_text(device: Device, *, answer: Any, dead: bool) -> str:
    if dead:
        return "FCM reported the token dead"
    # FCM's own error message when its answer parsed; firebase-admin appends the raw body of
    # an answer that did not, which the history never keeps.
    message = str(answer.exception).partition("; body:")[0]
    return f"{device.platform} device: {type(answer.exception).__name__}: {message}"[:300]


def _delivery_outcome(*, message: OutboundMessage, answers: list[tuple[Device, Any]], started: float) -> SendOutcome:
    elapsed_ms = (time.perf_counter() - started) * 1000
    if not answers:
        return SendOutcome(
            delivery_id=message.delivery_id,
            failure=FailureKind.PERMANENT,
            reason="the recipient has no active push device",
            elapsed_ms=elapsed_ms,
        )
    accepted = [answer.message_id for _, answer in answers if answer.success]
    if accepted:  # one device that got it is a delivery; the rest are in the device list
        return SendOutcome(
            delivery_id=message.delivery_id,
            provider_message_id=accepted[0],
            provider_status=f"fcm:accepted {len(accepted)}/{len(answers)} devices",
            elapsed_ms=elapsed_ms,
        )
    transient = [answer for _, answer in answers if getattr(answer.exception, "code", "") in TRANSIENT_CODES]
    reason = "; ".join(_error_text(device, answer=answer, dead=_is_dead_token(answer)) for device, answer in answers)
    return SendOutcome(
        delivery_id=message.delivery_id,
        failure=FailureKind.TRANSIENT if transient else FailureKind.PERMANENT,
        reason=reason[:400],
        elapsed_ms=elapsed_ms,
    )
