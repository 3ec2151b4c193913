"""Log lines: each carries the correlation id of the request or task it is about (and the
task and delivery ids when known), is one JSON object with LOG_FORMAT=json, and holds no
secret, token, email address or phone number in clear.

The correlation id is the producer's X-Request-ID (or one made for the request). It is kept
in a context variable for the request's lines, stored on the Event row (every notification
and delivery reaches it through its event), and travels with every Celery task the request
publishes, in the message's headers."""

import logging
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache, wraps
from typing import Any, TypeVar
from urllib.parse import unquote
from uuid import UUID

import sentry_sdk
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from config.sentry import CREDENTIAL_PATTERNS, EMAIL_PATTERN, MASK, PHONE_PATTERN

T = TypeVar("T")
REQUEST_ID_HEADER = "X-Request-ID"
# The Celery message header that carries the correlation id from publisher to worker (not
# "correlation_id": Celery sets that message property to the task id).
CORRELATION_HEADER = "notify_correlation_id"
REQUEST_ID_MAX_LENGTH = 128
# Printable ASCII without spaces: what a producer's request id may be, so that it cannot
# forge log lines or headers. Anything else is replaced by an id of our own.
_SANE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,%d}" % REQUEST_ID_MAX_LENGTH)

correlation_id_var: ContextVar[str | None] = ContextVar("correlation_id", default=None)
task_id_var: ContextVar[str | None] = ContextVar("task_id", default=None)
delivery_id_var: ContextVar[UUID | str | None] = ContextVar("delivery_id", default=None)
notification_id_var: ContextVar[UUID | str | None] = ContextVar("notification_id", default=None)


def correlation_id_accept(*, offered: str | None) -> str:
    """The producer's request id when it is sane (printable, at most 128 characters), else a new one."""
    if offered and _SANE_REQUEST_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


def correlation_id_current() -> str | None:
    """The correlation id of the request or task being served, if any."""
    return correlation_id_var.get()


@contextmanager
def delivery_scope(*, delivery_id: UUID | str, notification_id: UUID | str | None = None) -> Iterator[None]:
    """Lines logged (and provider calls traced) inside are about this one delivery."""
    delivery_token = delivery_id_var.set(delivery_id)
    notification_token = notification_id_var.set(notification_id)
    try:
        yield
    finally:
        notification_id_var.reset(notification_token)
        delivery_id_var.reset(delivery_token)


def message_scoped(send_one: Callable[..., T]) -> Callable[..., T]:
    """For a channel's per-message send (called with message=): its log lines and provider
    call span are about that message's delivery."""

    @wraps(send_one)
    def send(*args: Any, message: Any, **kwargs: Any) -> T:
        with delivery_scope(delivery_id=message.delivery_id, notification_id=message.notification_id):
            return send_one(*args, message=message, **kwargs)

    return send


class CorrelationIdMiddleware:
    """Give every request a correlation id, for its log lines and rows, and return it in the
    X-Request-ID response header (errors included)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        correlation_id = correlation_id_accept(offered=request.headers.get(REQUEST_ID_HEADER))
        # Left set when the response leaves: Django logs an error response after the
        # middleware returned, and the server its access line later still. The next request
        # in this context sets its own.
        correlation_id_var.set(correlation_id)
        # On the request's span (a no-op without tracing) and its Sentry events.
        trace.get_current_span().set_attribute("notify.correlation_id", correlation_id)
        if sentry_sdk.get_client().is_active():
            sentry_sdk.set_tag("correlation_id", correlation_id)
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = correlation_id
        return response


def task_publish_annotate(*, headers: dict[str, Any]) -> None:
    """Put the current correlation id in a task message's headers (before_task_publish)."""
    correlation_id = correlation_id_var.get()
    if correlation_id is not None:
        headers.setdefault(CORRELATION_HEADER, correlation_id)


def task_context_enter(*, task_id: str, request: Any) -> None:
    """Take the correlation id a task's message carries (its own id when it has none, as a
    beat-published task) for the lines it logs (task_prerun)."""
    correlation_id = getattr(request, CORRELATION_HEADER, None) or (request.headers or {}).get(CORRELATION_HEADER)
    correlation_id_var.set(correlation_id or task_id)
    task_id_var.set(task_id)
    if sentry_sdk.get_client().is_active():
        sentry_sdk.set_tag("correlation_id", correlation_id or task_id)


def task_context_leave() -> None:
    """Forget the finished task's ids (task_postrun): a worker process serves many tasks."""
    correlation_id_var.set(None)
    task_id_var.set(None)
    delivery_id_var.set(None)
    notification_id_var.set(None)


class ContextFilter(logging.Filter):
    """Adds correlation_id, task_id and delivery_id to every record (None when unknown); a
    delivery id given with `extra` wins over the one in context."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = correlation_id_var.get()
        record.task_id = task_id_var.get()
        if getattr(record, "delivery_id", None) is None:
            delivery_id = delivery_id_var.get()
            record.delivery_id = str(delivery_id) if delivery_id is not None else None
        return True


def _email_mask(match: re.Match[str]) -> str:
    local, _, domain = match.group(0).rpartition("@")
    # A path before the address ("/recipients/ada@...") is matched as part of it: kept.
    path, slash, local = local.rpartition("/")
    return f"{path}{slash}{local[:1]}***@{domain}"


def _phone_mask(match: re.Match[str]) -> str:
    digits = [c for c in match.group(0) if c.isdigit()]
    return "+" + digits[0] + "*" * (len(digits) - 5) + "".join(digits[-4:])


@cache
def _configured_secrets() -> re.Pattern[str] | None:
    # The provider credentials and keys this installation was given, matched as literals:
    # they have no recognisable form. Read once, after settings are loaded.
    from apps.deliveries.checks import CREDENTIAL_SETTINGS, credential_setting

    values = [credential_setting(name) for name in CREDENTIAL_SETTINGS]
    values += [settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS, settings.WEBPUSH_VAPID_PRIVATE_KEY]
    values += [value for name, value in settings.ANYMAIL.items() if "SECRET" in name or "TOKEN" in name]
    # Short values (a sandbox's project id) would mask ordinary words.
    literal = sorted({str(v) for v in values if v and len(str(v)) >= 8}, key=len, reverse=True)
    return re.compile("|".join(re.escape(value) for value in literal)) if literal else None


# "Authorization: Basic ..." and the like in a dumped header, whatever the scheme.
_AUTHORIZATION = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?:[A-Za-z]+\s+)?[^\s'\",}]+")


def log_text_mask(text: str) -> str:
    """The text with credentials, keys and tokens replaced by [Filtered], and email addresses
    and phone numbers partly masked (j***@example.com, +1******0006)."""
    if "%" in text:  # an address or a key in a URL is percent-encoded
        text = unquote(text)
    configured = _configured_secrets()
    if configured is not None:
        text = configured.sub(MASK, text)
    text = _AUTHORIZATION.sub(lambda m: m.group(1) + MASK, text)
    for pattern in CREDENTIAL_PATTERNS:
        text = pattern.sub(MASK, text)
    text = EMAIL_PATTERN.sub(_email_mask, text)
    return PHONE_PATTERN.sub(_phone_mask, text)


class MaskingFilter(logging.Filter):
    """Masks the message, with its interpolated arguments, and the exception text of every
    record before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = log_text_mask(record.getMessage())
        record.args = None
        if record.exc_info:
            # Formatted and masked here; formatters print exc_text when it is set.
            record.exc_text = log_text_mask(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = log_text_mask(record.stack_info)
        return True


class JsonLineFormatter(JsonFormatter):
    """One JSON object a line: the known fields only, without those unknown for this line.
    A record's other attributes are left out: Django's `request`, for one, would print the
    whole URL, unmasked."""

    FIELDS = (
        *("timestamp", "level", "logger", "message", "correlation_id", "task_id", "delivery_id", "status_code"),
        *("exc_info", "stack_info"),
    )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {key: log_data[key] for key in self.FIELDS if log_data.get(key) is not None}


def logging_config(*, log_format: str, level: str) -> dict[str, Any]:
    """The LOGGING setting: plain lines or JSON ones ("json"), both with ids and masking."""
    if log_format not in ("plain", "json"):
        raise ValueError(f"LOG_FORMAT is 'plain' or 'json', not '{log_format}'.")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "context": {"()": "notify.observability.logs.ContextFilter"},
            "mask": {"()": "notify.observability.logs.MaskingFilter"},
        },
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s"},
            "json": {
                "()": "notify.observability.logs.JsonLineFormatter",
                "fmt": "%(levelname)s %(name)s %(message)s %(correlation_id)s %(task_id)s %(delivery_id)s",
                "rename_fields": {"levelname": "level", "name": "logger"},
                # ISO 8601 in UTC, as log collectors read it.
                "timestamp": True,
            },
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": log_format, "filters": ["context", "mask"]}
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # Django's and Uvicorn's own handlers (Django's prints in DEBUG; Uvicorn's access
            # log holds every path and query string) are replaced by this one, so that their
            # lines are masked and formatted alike.
            **{name: {"handlers": [], "propagate": True, "level": level} for name in ("django", "django.server")},
            **{name: {"handlers": ["console"], "propagate": False} for name in ("uvicorn", "uvicorn.access")},
        },
    }
