"""A loopback imitation of the providers' HTTP APIs, with a request log and fault injection.

It is a plain ASGI application with no Django in it, so it starts in a blink and stays out
of the way of what it measures. Tests, the demo and the benchmark all talk to it:

  POST /postmark/email          Postmark's send API, as anymail's Postmark backend calls it
  POST /postmark/email/batch    Postmark's batch API: up to 500 different messages
  POST /webpush/{subscription}  a web push service (RFC 8030, VAPID); faults by subscription id
  POST /google/token            Google's OAuth token endpoint (service-account JWT assertions)
  POST /fcm/v1/projects/{project}/messages:send
                                FCM HTTP v1; faults by token: 404 UNREGISTERED, 403 SENDER_ID_MISMATCH,
                                400 invalid token, 413 payload too big, 429 quota, 503
  POST /twilio/2010-04-01/Accounts/{sid}/Messages.json
                                Twilio's Messages API, then its signed status callbacks
  GET  /_sandbox/requests       the log (?provider=postmark&after=<seq>): the newest --log-size
                                requests (100,000 by default), so that a long run's memory stays flat
  GET  /_sandbox/stats          counts per provider and outcome, of every request
  POST /_sandbox/faults         {"provider": "postmark", "latency_ms": 50, "error_rate": 0.1,
                                 "error_status": 503, "fail_next": [503, 503],
                                 "address_status": {"x@example.com": 422},
                                 "redirect_to": "http://169.254.169.254/", "error_body": "<html>…"}
                                an injected 3xx carries redirect_to as its Location (the same
                                path's /redirected twin by default); error_body, when set, is the
                                raw body of every error answer (an HTML error page, say)
  POST /_sandbox/webhooks       {"postmark": "http://127.0.0.1:8000/anymail/postmark/tracking/"}
  POST /_sandbox/reset          forget the log, every fault and webhooks set since start
  GET  /                        the log as a page, newest first

With a webhook URL for a provider, each accepted message is followed, after a short
delay, by the provider's "delivered" webhook, retried like a real provider retries it.

Each logged request names the account that sent it ("account": Postmark's server token,
Twilio's account sid, FCM's project) and, for email and SMS, the sender ("from").

  GET  /postmark/messages/outbound
                                Postmark's outbound message search: recipient, fromdate and todate
                                (US Eastern time, as Postmark reads them), metadata_<name>, tag,
                                count (at most 500) and offset (count + offset at most 10,000)
  GET  /twilio/2010-04-01/Accounts/{sid}/Messages.json
                                Twilio's message list: To, From, DateSent (and DateSent< / DateSent>),
                                PageSize, Page; newest first

The sandbox is never kinder than the real provider. None of these providers has an idempotency
key: each accepts the same message twice and sends it twice, and so does the sandbox. What it
adds is counting: a repeated send of the same delivery (by the delivery id in its metadata or
push data, else by recipient plus body) is reported under `duplicates` in /_sandbox/stats, and
under `visible_duplicates` unless it carries the same collapse key as the send before it (FCM's
notification tag or APNs collapse id, a web push notification's tag), which makes the device
replace what it shows instead of adding to it. The web push service decrypts what it receives
with the sandbox browser's key (browser_subscription_keys), as the browser would, to see it.

Message search answers what was accepted, after `search_lag_ms` (a real search index lags)."""

import asyncio
import base64
import email.utils
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse
from zoneinfo import ZoneInfo

import http_ece
import requests

from notify.sandbox.client import browser_private_key
from notify.sandbox.sent import STORE_SIZE, Sent

Scope = dict[str, Any]
PROVIDERS = ("postmark", "twilio", "fcm", "webpush")
FCM_SEND = re.compile(r"^/fcm/v1/projects/(?P<project>[^/]+)/messages:send$")
# google-auth's lookup of a service account's allowed regions (iamcredentials.googleapis.com),
# which the push channel sends to the sandbox with FCM's own requests.
IAM_ALLOWED_LOCATIONS = re.compile(r"^/fcm/v1/projects/-/serviceAccounts/(?P<account>[^/]+)/allowedLocations$")
# FCM's error statuses and the FcmError code it names for each injected HTTP status.
FCM_ERRORS = {
    400: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token"),
    403: ("PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"),
    404: ("NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
    413: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "Message is too big"),
    429: ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "Quota exceeded for sending messages."),
    500: ("INTERNAL", "INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable."),
}
WEBPUSH_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
TWILIO_MESSAGES = re.compile(r"^/twilio/2010-04-01/Accounts/(?P<account>[^/]+)/Messages\.json$")
TWILIO_CALLBACK_DELAY_SECONDS = 0.2
WEBHOOK_DELAY_SECONDS = 0.5
WEBHOOK_ATTEMPTS = 6
logger = logging.getLogger("notify.sandbox")


@dataclass
class Faults:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    fail_next: list[int] = field(default_factory=list)
    address_status: dict[str, int] = field(default_factory=dict)
    # The final status the provider reports back for an accepted message (Twilio callbacks).
    final_status: str = "delivered"
    # The Location of an injected redirect, and a raw body for every error answer.
    redirect_to: str = ""
    error_body: str = ""
    # Latency spikes: this share of requests waits spike_ms more (past a client's timeout,
    # the provider takes the message all the same, as a real one does).
    spike_rate: float = 0.0
    spike_ms: float = 0.0
    # How long an accepted message takes to show in the provider's search.
    search_lag_ms: float = 0.0

    async def delay(self) -> None:
        """The injected latency, before the provider answers."""
        latency = self.latency_ms
        if self.spike_rate and random.random() < self.spike_rate:
            latency += self.spike_ms
        if latency:
            await asyncio.sleep(latency / 1000)

    def request_status(self) -> int | None:
        """An injected HTTP status for the whole request, or None to behave normally."""
        if self.fail_next:
            return self.fail_next.pop(0)
        if self.error_rate and random.random() < self.error_rate:
            return self.error_status
        return None

    def address_rule(self, *, address: str) -> int | None:
        """An injected status for one recipient address (exact, or "@domain" for email)."""
        address = address.lower()
        if address in self.address_status:
            return self.address_status[address]
        return self.address_status.get("@" + address.rpartition("@")[2]) if "@" in address else None


# Requests the log keeps by default: the newest ones; the counts cover every request. A
# million-message benchmark would otherwise hold gigabytes of log in the sandbox.
LOG_SIZE = 100_000


@dataclass
class SandboxState:
    log_size: int = LOG_SIZE
    log: deque[dict[str, Any]] = field(init=False)
    recorded: int = 0  # every request since the start or the last reset, kept in the log or not
    iam_lookups: int = 0  # google-auth's allowed-regions lookups (not messages: not in the log)
    counts: Counter[str] = field(default_factory=Counter)  # by "provider.outcome"
    faults: dict[str, Faults] = field(default_factory=lambda: {p: Faults() for p in PROVIDERS})
    store_size: int = STORE_SIZE
    sent: Sent = field(init=False)

    def __post_init__(self) -> None:
        self.log = deque(maxlen=self.log_size)
        self.sent = Sent(size=self.store_size)
        for provider in PROVIDERS:
            self.sent.of(provider)

    def record(self, **entry: Any) -> dict[str, Any]:
        self.recorded += 1
        entry["seq"] = self.recorded
        entry["at"] = time.time()
        self.log.append(entry)
        self.counts[f"{entry['provider']}.{entry['outcome']}"] += 1
        return entry

    def entries_after(self, *, seq: int) -> Iterator[dict[str, Any]]:
        """The kept entries numbered above `seq`, oldest first."""
        first_kept = self.recorded - len(self.log) + 1
        return itertools.islice(self.log, max(seq - first_kept + 1, 0), None)


class Sandbox:
    def __init__(
        self,
        *,
        faults: dict[str, dict[str, Any]] | None = None,
        webhooks: dict[str, str] | None = None,
        log_size: int = LOG_SIZE,
        store_size: int = STORE_SIZE,
        callback_networks: tuple[str, ...] = (),
    ) -> None:
        self.log_size, self.store_size = log_size, store_size
        # Private networks, besides loopback, that callbacks may go to: the service's hosts in
        # a test that runs them in network namespaces of its own.
        self.callback_networks = tuple(callback_network_parse(network) for network in callback_networks)
        self.initial_webhooks = webhooks or {}
        self.webhooks = dict(self.initial_webhooks)
        self.state = self._fresh_state()
        for provider, settings in (faults or {}).items():
            self.state.faults[provider] = Faults(**settings)

    def _fresh_state(self) -> SandboxState:
        return SandboxState(log_size=self.log_size, store_size=self.store_size)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method, path = scope["method"], scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        if method == "POST" and path.rstrip("/") == "/postmark/email":
            status, payload = await self.postmark_email(headers=headers, body=body)
        elif method == "POST" and path.rstrip("/") == "/postmark/email/batch":
            status, payload = await self.postmark_batch(headers=headers, body=body)
        elif method == "POST" and path.startswith("/webpush/"):
            status, payload = await self.webpush_receive(
                subscription=path.removeprefix("/webpush/"), headers=headers, body=body
            )
        elif method == "GET" and path.rstrip("/") == "/postmark/messages/outbound":
            status, payload = self.postmark_search(headers=headers, query=query)
        elif method == "GET" and (match := TWILIO_MESSAGES.match(path)):
            status, payload = self.twilio_list(account=match["account"], headers=headers, query=query)
        elif method == "POST" and path == "/google/token":
            status, payload = self.google_token(body=body)
        elif method == "GET" and (match := IAM_ALLOWED_LOCATIONS.match(path)):
            status, payload = self.iam_allowed_locations(account=match["account"])
        elif method == "POST" and (match := FCM_SEND.match(path)):
            status, payload = await self.fcm_send(project=match["project"], headers=headers, body=body)
        elif method == "POST" and (match := TWILIO_MESSAGES.match(path)):
            status, payload = await self.twilio_message(account=match["account"], headers=headers, body=body)
        elif method == "GET" and path == "/_sandbox/requests":
            status, payload = 200, self.requests_list(query=query)
        elif method == "GET" and path == "/_sandbox/stats":
            status, payload = 200, self.stats()
        elif method == "POST" and path == "/_sandbox/faults":
            status, payload = self.faults_set(body=body)
        elif method == "POST" and path == "/_sandbox/webhooks":
            status, payload = self.webhooks_set(body=body)
        elif method == "POST" and path == "/_sandbox/reset":
            self.state = self._fresh_state()
            self.webhooks = dict(self.initial_webhooks)
            status, payload = 200, {"reset": True}
        elif method == "GET" and path == "/":
            await _respond(send, 200, self.log_page().encode(), content_type=b"text/html; charset=utf-8")
            return
        else:
            status, payload = 404, {"error": f"no sandbox route for {method} {path}"}
        faults = self.state.faults.get("fcm" if path.startswith("/google/") else path.split("/")[1])
        extra_headers: list[tuple[bytes, bytes]] = []
        if faults is not None and 300 <= status < 400:
            extra_headers.append((b"location", (faults.redirect_to or f"{path}/redirected").encode()))
        if faults is not None and status >= 300 and faults.error_body:
            await _respond(send, status, faults.error_body.encode(), b"text/html; charset=utf-8", extra_headers)
            return
        await _respond(send, status, json.dumps(payload).encode(), extra_headers=extra_headers)

    async def postmark_email(self, *, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        """POST /email: one message."""
        return await self._postmark(headers=headers, body=body, batch=False)

    async def postmark_batch(self, *, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        """POST /email/batch: up to 500 messages, one result each, in order."""
        return await self._postmark(headers=headers, body=body, batch=True)

    async def _postmark(self, *, headers: dict[str, str], body: bytes, batch: bool) -> tuple[int, Any]:
        faults = self.state.faults["postmark"]
        await faults.delay()
        if not headers.get("x-postmark-server-token"):
            return 401, {
                "ErrorCode": 10,
                "Message": "No Account or Server API tokens were supplied in the HTTP headers.",
            }
        try:
            messages = json.loads(body)
        except ValueError:
            return 422, {"ErrorCode": 402, "Message": "Received invalid JSON input."}
        if not batch:
            messages = [messages]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages) or len(messages) > 500:
            return 422, {"ErrorCode": 402, "Message": "Send a JSON array of at most 500 messages."}
        token = headers["x-postmark-server-token"]
        entries = [self._entry(message, server_token=token) for message in messages]
        # A server-side failure fails the whole request, as a real provider's outage does.
        rules = [faults.address_rule(address=e["to"]) for e in entries]
        injected = faults.request_status() or next((r for r in rules if r and (r >= 500 or r == 429)), None)
        if injected is not None:
            for entry in entries:
                self.state.record(**entry, status=injected, outcome="error")
            return injected, {"ErrorCode": 100, "Message": "Injected sandbox failure."}
        results = [
            self._postmark_one(message=m, entry=e, rule=r) for m, e, r in zip(messages, entries, rules, strict=True)
        ]
        if batch:
            return 200, results
        result = results[0]
        return (200 if result["ErrorCode"] == 0 else 422), result

    @staticmethod
    def _entry(message: dict[str, Any], *, server_token: str) -> dict[str, Any]:
        headers = {h.get("Name", ""): h.get("Value", "") for h in message.get("Headers", [])}
        metadata = message.get("Metadata") or {}
        return {
            "provider": "postmark",
            # Which account sent it (the server token), and as whom.
            "account": server_token,
            "from": str(message.get("From", "")),
            "to": str(message.get("To", "")),
            "subject": message.get("Subject", ""),
            "text": (message.get("TextBody") or "")[:500],
            "html": (message.get("HtmlBody") or "")[:2000],
            "headers": {name: value for name, value in headers.items() if name.lower().startswith("list-")},
            "delivery_id": str(metadata.get("delivery_id", "")),
            "metadata": metadata,
        }

    def _postmark_one(self, *, message: dict[str, Any], entry: dict[str, Any], rule: int | None) -> dict[str, Any]:
        to = entry["to"]
        if rule is not None or "@" not in to:
            self.state.record(**entry, status=rule or 422, outcome="error")
            if rule == 406:
                return {
                    "ErrorCode": 406,
                    "Message": f"You tried to send to recipient(s) that have been marked as inactive. Found inactive addresses: {to}.",
                    "To": to,
                }
            return {"ErrorCode": 300, "Message": f"Invalid 'To' address: '{to}'.", "To": to}
        response = {
            "To": to,
            "SubmittedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "MessageID": str(uuid.uuid4()),
            "ErrorCode": 0,
            "Message": "OK",
        }
        sent = self.state.sent.of("postmark")
        metadata = entry["metadata"]
        identity = (
            (str(metadata["delivery_id"]), str(metadata.get("round", "")))
            if metadata.get("delivery_id")
            else (to.lower(), entry["subject"], entry["text"])
        )
        repeat = sent.count_send(identity=identity)
        # Kept small (what the search answers is built from it), and indexed by the two
        # filters reconciliation uses.
        sent.add(
            message={
                "MessageID": response["MessageID"],
                "To": to,
                "From": entry["from"],
                "Subject": entry["subject"][:200],
                "Tag": message.get("Tag", ""),
                "Metadata": metadata,
                "_at": time.time(),
                "_account": entry["account"],
            },
            indexes={"recipient": to.lower(), "metadata_delivery_id": str(metadata.get("delivery_id", ""))},
        )
        self.state.record(**entry, status=200, outcome="accepted", message_id=response["MessageID"], repeat=repeat)
        if "postmark" in self.webhooks:
            events = _postmark_feedback(
                final_status=self.state.faults["postmark"].final_status, message=message, response=response
            )
            asyncio.get_running_loop().create_task(
                self.webhooks_send_in_order(url=self.webhooks["postmark"], events=events)
            )
        return response

    def postmark_search(self, *, headers: dict[str, str], query: dict[str, str]) -> tuple[int, Any]:
        """GET /messages/outbound: the server's sent messages, newest first, filtered as
        Postmark filters them; a message shows only once the search index has it."""
        token = headers.get("x-postmark-server-token")
        if not token:
            return 401, {
                "ErrorCode": 10,
                "Message": "No Account or Server API tokens were supplied in the HTTP headers.",
            }
        if injected := self.state.faults["postmark"].request_status():  # a provider that is down
            return injected, {"ErrorCode": 100, "Message": "Injected sandbox failure."}
        try:
            count, offset = int(query["count"]), int(query.get("offset", "0"))
            since = _postmark_filter_time(query["fromdate"]) if query.get("fromdate") else None
            until = _postmark_filter_time(query["todate"]) if query.get("todate") else None
        except (KeyError, ValueError) as error:
            return 422, {"ErrorCode": 1101, "Message": f"Invalid search parameters: {error}"}
        if not 0 < count <= 500 or offset < 0 or count + offset > 10_000:
            return 422, {"ErrorCode": 1101, "Message": "count must be 1-500, and count + offset at most 10,000."}
        sent = self.state.sent.of("postmark")
        metadata = {name: value for name, value in query.items() if name.startswith("metadata_")}
        recipient = query.get("recipient", "").lower()
        if "metadata_delivery_id" in metadata:
            candidates: Any = sent.found(index="metadata_delivery_id", value=metadata["metadata_delivery_id"])
        elif recipient:
            candidates = sent.found(index="recipient", value=recipient)
        else:
            candidates = sent.messages
        indexed_before = time.time() - self.state.faults["postmark"].search_lag_ms / 1000
        matches = [
            m
            for m in reversed(candidates)
            if m["_account"] == token
            and m["_at"] <= indexed_before
            and (since is None or m["_at"] >= since)
            and (until is None or m["_at"] <= until)
            and (not recipient or recipient == m["To"].lower())
            and (not query.get("tag") or m["Tag"] == query["tag"])
            and all(str(m["Metadata"].get(name.removeprefix("metadata_"))) == value for name, value in metadata.items())
        ]
        page = [
            {
                **{k: v for k, v in m.items() if not k.startswith("_")},
                "To": [{"Email": m["To"], "Name": None}],
                "Recipients": [m["To"]],
                "Status": "Sent",
                "MessageStream": "outbound",
                "ReceivedAt": _postmark_time(m["_at"]),
            }
            for m in matches[offset : offset + count]
        ]
        return 200, {"TotalCount": len(matches), "Messages": page}

    async def webhooks_send_in_order(self, *, url: str, events: list[dict[str, Any]]) -> None:
        for event in events:
            await self.webhook_send(url=url, json_body=event)

    async def webpush_receive(self, *, subscription: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        """A browser vendor's push service (RFC 8030): an encrypted message for one subscription,
        with a VAPID Authorization header; 201 Created, or 404/410 for a dropped subscription."""
        faults = self.state.faults["webpush"]
        await faults.delay()
        entry = {
            "provider": "webpush",
            "to": subscription,
            "subject": "",
            "text": f"{len(body)} encrypted bytes",
            "delivery_id": "",  # known once decrypted
            "metadata": {
                "ttl": headers.get("ttl", ""),
                "content_encoding": headers.get("content-encoding", ""),
                "vapid": headers.get("authorization", "").split(" ", 1)[0],
                # The sender's public key (RFC 8292's k=), which the browser subscribed with.
                "vapid_key": _vapid_public_key(headers.get("authorization", "")),
                "plaintext_visible": b"delivery_id" in body,
            },
            # RFC 8030: the service keeps only the newest undelivered message with one Topic.
            "collapse_key": headers.get("topic", ""),
        }
        if not headers.get("authorization", "").startswith("vapid t=") or "ttl" not in headers:
            self.state.record(**entry, status=401, outcome="error")
            return 401, {"error": "a VAPID Authorization header and a TTL header are required"}
        if "topic" in headers and not WEBPUSH_TOPIC.fullmatch(headers["topic"]):
            self.state.record(**entry, status=400, outcome="error")
            return 400, {"error": "a Topic is at most 32 characters of the URL-safe base64 alphabet"}
        injected = faults.request_status() or faults.address_rule(address=subscription)
        if injected is not None:
            self.state.record(**entry, status=injected, outcome="error")
            return injected, {"error": "Injected sandbox failure."}
        message_id = uuid.uuid4().hex
        shown = _webpush_decrypt(headers=headers, body=body)
        repeat = False
        entry["delivery_id"] = str((shown or {}).get("delivery_id", ""))
        if shown is not None:
            # What the sandbox browser shows, and where its service worker reports a click.
            entry["shown"] = {key: shown.get(key) for key in ("title", "body", "tag", "link", "click_url")}
            # The browser shows what it decrypts; a notification with the same tag replaces it.
            identity = (str(shown.get("delivery_id") or shown.get("body", "")), subscription)
            repeat = self.state.sent.of("webpush").count_send(
                identity=identity, collapse_key=str(shown.get("tag") or "")
            )
        self.state.record(**entry, status=201, outcome="accepted", message_id=message_id, repeat=repeat)
        return 201, {"id": message_id}

    def google_token(self, *, body: bytes) -> tuple[int, Any]:
        """Google's OAuth token endpoint for a service account's signed JWT assertion."""
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or not form.get("assertion"):
            return 400, {"error": "invalid_grant", "error_description": "Expected a JWT bearer assertion."}
        return 200, {"access_token": "sandbox-" + uuid.uuid4().hex, "expires_in": 3600, "token_type": "Bearer"}

    def iam_allowed_locations(self, *, account: str) -> tuple[int, Any]:
        """The sandbox's service accounts exist nowhere at Google, which answers a lookup of an
        unknown account with 404; google-auth then sends without the regions header."""
        self.state.iam_lookups += 1
        return 404, {"error": {"code": 404, "message": f"Service account {account} not found.", "status": "NOT_FOUND"}}

    async def fcm_send(self, *, project: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        """FCM HTTP v1: POST /v1/projects/{project}/messages:send with a bearer token."""
        faults = self.state.faults["fcm"]
        await faults.delay()
        if not headers.get("authorization", "").startswith("Bearer sandbox-"):
            return 401, {
                "error": {
                    "code": 401,
                    "message": "Request had invalid authentication credentials.",
                    "status": "UNAUTHENTICATED",
                }
            }
        try:
            message = json.loads(body)["message"]
        except (ValueError, KeyError, TypeError):
            return 400, {
                "error": {"code": 400, "message": "Invalid JSON payload received.", "status": "INVALID_ARGUMENT"}
            }
        token = str(message.get("token", ""))
        notification = message.get("notification", {})
        entry = {
            "provider": "fcm",
            "account": project,
            "to": token,
            "subject": notification.get("title", ""),
            "text": notification.get("body", "")[:500],
            "delivery_id": str(message.get("data", {}).get("delivery_id", "")),
            "metadata": message.get("data", {}),
            **_fcm_collapse(message),
        }
        if len(entry["collapse"]["apns_collapse_id"].encode()) > 64:  # APNs' BadCollapseId, through FCM
            self.state.record(**entry, status=400, outcome="error")
            text = "Invalid APNs header apns-collapse-id: at most 64 bytes"
            return 400, {"error": {"code": 400, "message": text, "status": "INVALID_ARGUMENT"}}
        injected = faults.request_status() or faults.address_rule(address=token)
        if injected is None and len(json.dumps({k: message.get(k) for k in ("notification", "data")}).encode()) > 4096:
            injected = 413
        if injected is not None:
            self.state.record(**entry, status=injected, outcome="error")
            status, error_code, text = FCM_ERRORS.get(injected, FCM_ERRORS[500])
            detail = {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}
            http_status = 400 if injected == 413 else injected
            return http_status, {"error": {"code": http_status, "message": text, "status": status, "details": [detail]}}
        name = f"projects/{project}/messages/{uuid.uuid4().int % 10**16}"
        # A device replaces the notification it shows by its tag (else the APNs collapse id);
        # the Android collapse_key only merges messages still waiting at FCM.
        repeat = self.state.sent.of("fcm").count_send(
            identity=(entry["delivery_id"] or entry["subject"] + entry["text"], token),
            collapse_key=entry["collapse"]["android_tag"] or entry["collapse"]["apns_collapse_id"],
        )
        self.state.record(**entry, status=200, outcome="accepted", message_id=name, repeat=repeat)
        return 200, {"name": name}

    async def twilio_message(self, *, account: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        """POST /2010-04-01/Accounts/{sid}/Messages.json, form-encoded, with basic auth."""
        faults = self.state.faults["twilio"]
        await faults.delay()
        username, _, auth_token = _basic_auth(headers.get("authorization", ""))
        if username != account or not auth_token:
            return 401, _twilio_error(20003, "Authenticate", 401)
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        to, text = form.get("To", ""), form.get("Body", "")
        entry: dict[str, Any] = {
            "provider": "twilio",
            "account": account,
            "from": form.get("From", ""),
            "to": to,
            "subject": "",
            "text": text[:500],
            "delivery_id": _query_param(form.get("StatusCallback", ""), "delivery"),
            "metadata": {},
        }
        injected = faults.request_status() or faults.address_rule(address=to)
        if injected is None and not re.fullmatch(r"\+[1-9][0-9]{7,14}", to):
            injected = 400
        if injected is not None:
            self.state.record(**entry, status=400 if injected >= 10000 else injected, outcome="error")
            if injected >= 10000:  # a Twilio error code, e.g. 21610 for a number that replied STOP
                return 400, _twilio_error(injected, "Injected Twilio error.", 400)
            if injected == 400:
                return 400, _twilio_error(21211, f"The 'To' number {to} is not a valid phone number.", 400)
            return injected, _twilio_error(20500 if injected >= 500 else 20429, "Injected sandbox failure.", injected)
        sid = "SM" + uuid.uuid4().hex
        sent = self.state.sent.of("twilio")
        repeat = sent.count_send(identity=(to, text))
        self.state.record(**entry, status=201, outcome="accepted", message_id=sid, repeat=repeat)
        callback = form.get("StatusCallback")
        if callback and self.callback_allowed(callback):
            asyncio.get_running_loop().create_task(
                self.twilio_callbacks(url=callback, auth_token=auth_token, sid=sid, account=account, form=form)
            )
        message = {
            "sid": sid,
            "account_sid": account,
            "to": to,
            "from": form.get("From", ""),
            "body": text,
            "status": "queued",
            "num_segments": "1",
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "error_code": None,
            "error_message": None,
            "date_created": _rfc2822(time.time()),
            "date_sent": None,
        }
        sent.add(message={**message, "_at": time.time(), "_account": account}, indexes={"to": to})
        return 201, message

    def twilio_list(self, *, account: str, headers: dict[str, str], query: dict[str, str]) -> tuple[int, Any]:
        """GET /Accounts/{sid}/Messages.json: the account's messages, newest first, a page at a
        time. A message has a DateSent only once it left Twilio's queue, so a DateSent filter
        never finds one still queued."""
        username, _, auth_token = _basic_auth(headers.get("authorization", ""))
        if username != account or not auth_token:
            return 401, _twilio_error(20003, "Authenticate", 401)
        if injected := self.state.faults["twilio"].request_status():  # a provider that is down
            return injected, _twilio_error(20500, "Injected sandbox failure.", injected)
        try:
            page_size = min(int(query.get("PageSize", "50")), 1000)
            page = int(query.get("Page", "0"))
            sent_filters = [
                (operator, _twilio_filter_date(query[f"DateSent{operator}"]))
                for operator in ("", "<", ">")
                if query.get(f"DateSent{operator}")
            ]
        except ValueError as error:
            return 400, _twilio_error(20001, f"Invalid parameter: {error}", 400)
        sent = self.state.sent.of("twilio")
        to = query.get("To", "")
        candidates: Any = sent.found(index="to", value=to) if to else sent.messages
        now = time.time()
        matches = []
        for message in reversed(candidates):
            # Twilio dates a message sent once its status callback says so.
            sent_at = message["_at"] + TWILIO_CALLBACK_DELAY_SECONDS
            if message["_account"] != account or (query.get("From") and message["from"] != query["From"]):
                continue
            if sent_filters and (sent_at > now or not all(_date_matches(sent_at, op, day) for op, day in sent_filters)):
                continue
            shown = {k: v for k, v in message.items() if not k.startswith("_")}
            if sent_at <= now:
                shown.update(date_sent=_rfc2822(sent_at), status="sent")
            matches.append(shown)
        uri = f"/2010-04-01/Accounts/{account}/Messages.json"
        params = {k: v for k, v in query.items() if k not in ("Page", "PageToken")}
        start = page * page_size
        has_next = start + page_size < len(matches)
        return 200, {
            "messages": matches[start : start + page_size],
            "page": page,
            "page_size": page_size,
            "start": start,
            "end": min(start + page_size, len(matches)) - 1,
            "uri": f"{uri}?{urlencode({**params, 'PageSize': page_size, 'Page': page})}",
            "first_page_uri": f"{uri}?{urlencode({**params, 'PageSize': page_size, 'Page': 0})}",
            "previous_page_uri": None,
            "next_page_uri": f"{uri}?{urlencode({**params, 'PageSize': page_size, 'Page': page + 1})}"
            if has_next
            else None,
        }

    async def twilio_callbacks(
        self, *, url: str, auth_token: str, sid: str, account: str, form: dict[str, str]
    ) -> None:
        """Twilio's status callbacks, signed the way Twilio signs them: "sent", then the final
        status ("delivered", or e.g. "undelivered:30005" with its error code). Like Twilio by
        default, an HTTP error answer is not retried; only a failed connection is."""
        final, _, error_code = self.state.faults["twilio"].final_status.partition(":")
        for status in ("sent", final):
            params = {
                "MessageSid": sid,
                "SmsSid": sid,
                "AccountSid": account,
                "MessageStatus": status,
                "SmsStatus": status,
                "To": form.get("To", ""),
                "From": form.get("From", ""),
                "ApiVersion": "2010-04-01",
            }
            if status in ("undelivered", "failed"):
                params["ErrorCode"] = error_code or "30007"
            signature = _twilio_signature(auth_token=auth_token, url=url, params=params)
            await self.webhook_send(
                url=url,
                form=params,
                headers={"X-Twilio-Signature": signature},
                delay=TWILIO_CALLBACK_DELAY_SECONDS,
                retry_http_errors=False,
            )

    def callback_allowed(self, url: str) -> bool:
        """Whether a callback or webhook may go to this URL: loopback, or an address in one of
        the private networks given with --callback-network."""
        if is_loopback_url(url):
            return True
        try:
            address = ipaddress.ip_address(urlparse(url).hostname or "")
        except ValueError:
            return False
        return any(address in network for network in self.callback_networks)

    async def webhook_send(
        self,
        *,
        url: str,
        json_body: dict[str, Any] | None = None,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        delay: float = WEBHOOK_DELAY_SECONDS,
        retry_http_errors: bool = True,
    ) -> None:
        """POST a webhook the way providers do: later, and again until it is taken."""
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            await asyncio.sleep(delay * attempt)
            try:
                response = await asyncio.to_thread(
                    requests.post, url, json=json_body, data=form, headers=headers, timeout=10
                )
                if response.status_code < 300 or not retry_http_errors:
                    return
            except requests.RequestException as error:
                logger.warning("webhook to %s failed: %s", url, error)
        logger.warning("gave up on a webhook to %s after %d attempts", url, WEBHOOK_ATTEMPTS)

    def requests_list(self, *, query: dict[str, str]) -> dict[str, Any]:
        after = int(query.get("after", 0))
        provider = query.get("provider")
        entries = [e for e in self.state.entries_after(seq=after) if provider is None or e["provider"] == provider]
        return {"requests": entries, "last_seq": self.state.recorded}

    def stats(self) -> dict[str, Any]:
        return {
            "total": self.state.recorded,
            "by_outcome": dict(self.state.counts),
            "iam_lookups": self.state.iam_lookups,
            **self.state.sent.stats(),
        }

    def faults_set(self, *, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            settings = json.loads(body or b"{}")
            provider = settings.pop("provider", "postmark")
            if provider not in PROVIDERS:
                return 400, {"error": f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}"}
            self.state.faults[provider] = Faults(**settings)
        except (ValueError, TypeError) as error:
            return 400, {"error": f"bad fault settings: {error}"}
        return 200, {"provider": provider, "faults": self.state.faults[provider].__dict__}

    def webhooks_set(self, *, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            webhooks = json.loads(body or b"{}")
        except ValueError as error:
            return 400, {"error": f"bad webhook settings: {error}"}
        unknown = set(webhooks) - set(PROVIDERS)
        if unknown or not all(self.callback_allowed(url) for url in webhooks.values()):
            return 400, {"error": "give {provider: url} with known providers and loopback URLs only"}
        self.webhooks.update(webhooks)
        return 200, {"webhooks": self.webhooks}

    def log_page(self) -> str:
        rows = "".join(
            f"<tr><td>{e['seq']}</td><td>{time.strftime('%H:%M:%S', time.localtime(e['at']))}</td>"
            f"<td>{escape(e['provider'])}</td><td>{escape(e['outcome'])}</td><td>{e['status']}</td>"
            f"<td>{escape(e['to'])}</td><td>{escape(str(e['subject']))}</td></tr>"
            for e in itertools.islice(reversed(self.state.log), 200)
        )
        return (
            "<!doctype html><meta charset=utf-8><title>Provider sandbox</title>"
            "<style>body{font:14px system-ui;margin:2em}td,th{padding:4px 8px;border-bottom:1px solid #ddd}</style>"
            "<h1>Provider sandbox</h1><p>Every request the fake providers received, newest first.</p>"
            "<table><tr><th>#</th><th>At</th><th>Provider</th><th>Outcome</th><th>HTTP</th><th>To</th>"
            f"<th>Subject</th></tr>{rows}</table>"
        )


# What a Postmark account reports after accepting a message, by the sandbox's final_status.
POSTMARK_FEEDBACK: dict[str, list[tuple[str, str | None]]] = {
    "delivered": [("Delivery", None)],
    "hard_bounce": [("Bounce", "HardBounce")],
    "soft_bounce": [("Bounce", "SoftBounce")],
    "complained": [("Delivery", None), ("SpamComplaint", "SpamComplaint")],
    "opened": [("Delivery", None), ("Open", None)],
    "clicked": [("Delivery", None), ("Open", None), ("Click", None)],
}


def _postmark_feedback(*, final_status: str, message: dict[str, Any], response: dict[str, Any]) -> list[dict[str, Any]]:
    """Postmark's webhook payloads for one accepted message, in the order Postmark sends them."""
    events = []
    for record_type, bounce_type in POSTMARK_FEEDBACK.get(final_status, POSTMARK_FEEDBACK["delivered"]):
        event: dict[str, Any] = {
            "RecordType": record_type,
            "ServerID": 1,
            "MessageStream": "outbound",
            "MessageID": response["MessageID"],
            "Recipient": response["To"],
            "Tag": message.get("Tag", ""),
            "Metadata": message.get("Metadata", {}),
        }
        if record_type == "Delivery":
            event.update(DeliveredAt=response["SubmittedAt"], Details="Delivered by the sandbox")
        elif bounce_type is not None:
            event.update(
                Type=bounce_type,
                TypeCode=1 if bounce_type == "HardBounce" else 4096,
                Email=response["To"],
                BouncedAt=response["SubmittedAt"],
                Description=f"Sandbox {bounce_type}",
                Details="smtp;550 5.1.1 sandbox" if bounce_type == "HardBounce" else "smtp;452 mailbox full",
            )
        else:
            event.update(ReceivedAt=response["SubmittedAt"], Platform="Desktop", OriginalLink="https://example.com")
        events.append(event)
    return events


# Postmark's API reads and writes times in US Eastern time.
POSTMARK_TIMEZONE = ZoneInfo("America/New_York")


def _postmark_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, POSTMARK_TIMEZONE).isoformat()


def _postmark_filter_time(text: str) -> float:
    """A search filter's date or date and time, read as Eastern time when it has no offset."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=POSTMARK_TIMEZONE)
    return moment.timestamp()


def _query_param(url: str, name: str) -> str:
    return parse_qs(urlparse(url).query).get(name, [""])[0]


def _webpush_decrypt(*, headers: dict[str, str], body: bytes) -> dict[str, Any] | None:
    """The notification a browser would show, decrypted with the sandbox browser's key (RFC
    8291); None when it was encrypted for another key or in another way."""
    if headers.get("content-encoding") != "aes128gcm":
        return None
    private_key, auth_secret = browser_private_key()
    try:
        plaintext = http_ece.decrypt(body, private_key=private_key, auth_secret=auth_secret, version="aes128gcm")
        shown = json.loads(plaintext)
    except Exception:  # noqa: BLE001 - anything undecryptable is someone else's message
        return None
    return shown if isinstance(shown, dict) else None


def _vapid_public_key(authorization: str) -> str:
    """The k= parameter of a VAPID Authorization header ("vapid t=<jwt>,k=<key>"), or ""."""
    _, _, parameters = authorization.partition(" ")
    for parameter in parameters.split(","):
        name, _, value = parameter.strip().partition("=")
        if name == "k":
            return value
    return ""


def _rfc2822(epoch: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(epoch, UTC))


def _twilio_filter_date(text: str) -> datetime:
    """A DateSent filter: a date (YYYY-MM-DD), or the date and time twilio-python sends."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _date_matches(epoch: float, operator: str, moment: datetime) -> bool:
    """Twilio's DateSent filters: "" the same day, "<" on or before, ">" on or after."""
    sent = datetime.fromtimestamp(epoch, UTC)
    if operator == "":
        return sent.date() == moment.date()
    has_time = moment.time() != datetime.min.time()
    if operator == "<":
        return sent <= moment if has_time else sent.date() <= moment.date()
    return sent >= moment if has_time else sent.date() >= moment.date()


def _fcm_collapse(message: dict[str, Any]) -> dict[str, Any]:
    """What a message says a repeat or a newer message replaces: the collapse key (the
    Android tag, which decides what is shown, else the APNs collapse id, else the Android
    collapse key) and each of those fields."""
    android = message.get("android") or {}
    fields = {
        "android_collapse_key": str(android.get("collapse_key", "")),
        "android_tag": str((android.get("notification") or {}).get("tag", "")),
        "apns_collapse_id": str(((message.get("apns") or {}).get("headers") or {}).get("apns-collapse-id", "")),
    }
    key = fields["android_tag"] or fields["apns_collapse_id"] or fields["android_collapse_key"]
    return {"collapse_key": key, "collapse": fields}


def _basic_auth(header: str) -> tuple[str, str, str]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return "", "", ""
    try:
        return base64.b64decode(encoded).decode().partition(":")
    except ValueError:
        return "", "", ""


def _twilio_error(code: int, message: str, status: int) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _twilio_signature(*, auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's documented scheme: HMAC-SHA1 of the URL followed by each POST parameter's
    name and value in name order, base64-encoded, keyed with the account's auth token."""
    payload = url + "".join(name + params[name] for name in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()).decode()


def is_loopback_url(url: str) -> bool:
    """The sandbox never sends traffic off this machine."""
    host = urlparse(url).hostname or ""
    return host.startswith("127.") or host in ("localhost", "::1")


def callback_network_parse(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A private network callbacks may go to, e.g. 10.231.7.0/24; ValueError for any other."""
    network = ipaddress.ip_network(text, strict=False)
    if not network.is_private:
        raise ValueError(f"{text} is not a private network")
    return network


async def _respond(
    send: Any,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})
