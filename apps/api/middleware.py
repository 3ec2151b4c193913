import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from apps.api.errors import DATABASE_RETRY_AFTER_SECONDS, DATABASE_UNAVAILABLE, database_unavailable_error
from notify.observability.logs import REQUEST_ID_HEADER, correlation_id_accept

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[..., Awaitable[None]]  # Django's handler types its arguments more narrowly


def request_body_limit(*, path: str) -> int:
    """The most bytes a request body to this path may have: NOTIFY_MAX_REQUEST_BYTES, unless
    a prefix in NOTIFY_MAX_REQUEST_BYTES_BY_PATH names the path."""
    # A path given more than DATA_UPLOAD_MAX_MEMORY_SIZE must read request.stream, not
    # request.body or request.data, which Django caps at that size.
    for prefix, limit in settings.NOTIFY_MAX_REQUEST_BYTES_BY_PATH.items():
        if path.startswith(prefix):
            return limit
    return settings.NOTIFY_MAX_REQUEST_BYTES


def request_too_large_error(*, limit: int, length: int | None = None) -> dict[str, Any]:
    """The API's error body for a request body over the limit."""
    size = f"The request body is {length} bytes" if length is not None else "The request body is over the limit"
    return {
        "error": {
            "code": "request_too_large",
            "message": f"{size}; the limit is {limit} bytes. Split large sends into several requests.",
        }
    }


class RequestBodyLimitMiddleware:
    """Under WSGI: refuse a declared body over the limit with 413 before anything reads it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = request_body_limit(path=request.path)
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > limit:
            return JsonResponse(request_too_large_error(limit=limit, length=length), status=413)
        return self.get_response(request)


# What a web pool kept for critical traffic answers (NOTIFY_WEB_POOL=critical, docs/operations.md).
CRITICAL_POOL_PATHS = ("/api/v1/events",)


class WebPoolMiddleware:
    """A web pool kept for critical traffic serves single events only: imports, broadcasts,
    batches, pages and the admin go to the main pool, so that nothing heavy shares its
    processes. (Ingest refuses a non-critical event there, once it knows the category.)"""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if settings.NOTIFY_WEB_POOL == "critical" and request.path.rstrip("/") not in CRITICAL_POOL_PATHS:
            message = "This address serves critical events only (POST /api/v1/events); use the main API address."
            return JsonResponse({"error": {"code": "critical_pool_only", "message": message}}, status=421)
        return self.get_response(request)


class DatabaseUnavailableMiddleware:
    """Views outside the API (pages, webhooks) answer 503 with a Retry-After, as the API does,
    when the database cannot be reached, instead of a 500."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, DATABASE_UNAVAILABLE):
            return None
        response = JsonResponse(database_unavailable_error(exception), status=503)
        response["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response


class _BodyOverLimit(Exception):
    pass


def _request_id(scope: Scope) -> bytes:
    # Answered before Django's middleware runs: the request id is given here, as it would be there.
    offered = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
    return correlation_id_accept(offered=offered.decode("latin-1")).encode()


async def _refuse(send: Send, scope: Scope, *, limit: int, length: int | None) -> None:
    body = json.dumps(request_too_large_error(limit=limit, length=length)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The server then closes instead of reading the rest of the body to reuse the
                # connection.
                (b"connection", b"close"),
                (REQUEST_ID_HEADER.lower().encode(), _request_id(scope)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class AsgiRequestBodyLimit:
    """Under ASGI, where Django reads the whole body (to a temporary file that spills to disk)
    before any middleware runs: count the body's bytes as the server receives them, on every
    path, and answer 413 once a declared length or the bytes so far pass the limit."""

    def __init__(self, app: AsgiApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = request_body_limit(path=scope["path"])
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, scope, limit=limit, length=declared)
            return
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyOverLimit
            return message

        try:
            await self.app(scope, receive_counted, send)
        except _BodyOverLimit:
            # Django reads the whole body before its handler answers, so nothing has been sent yet.
            await _refuse(send, scope, limit=limit, length=None)
