"""One error shape for the whole API:
{"error": {"code": ..., "message": ..., "fields": {"dotted.path": ["what is wrong"]}}}"""

import logging
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

logger = logging.getLogger(__name__)

# Django raises these when the database cannot be reached or a connection broke (a restart, a
# failover), and when the connection pool has none to give within its timeout (a PoolTimeout
# becomes an OperationalError). A client may retry: the answer is 503, not a 500.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)
DATABASE_RETRY_AFTER_SECONDS = 5


def database_unavailable_error(exc: Exception) -> dict[str, Any]:
    """The error body for a request the database could not serve; logs the cause."""
    logger.error("database unavailable: %s", exc, exc_info=exc)
    return {
        "error": {
            "code": "database_unavailable",
            "message": "The database is unreachable or has no connection free; "
            f"retry after {DATABASE_RETRY_AFTER_SECONDS} seconds.",
        }
    }


# Paths whose clients read JSON, even when no view matched.
JSON_PATH_PREFIXES = ("/api/v1/", "/inbox/v1/")


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's 404 handler: the API's error body under the API's paths, the HTML page elsewhere."""
    if request.path.startswith(JSON_PATH_PREFIXES):
        return JsonResponse({"error": {"code": "not_found", "message": "Not found."}}, status=404)
    return defaults.page_not_found(request, exception)


def _flatten(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    if isinstance(detail, dict):
        flat: dict[str, list[str]] = {}
        for key, value in detail.items():
            if isinstance(key, int):  # DRF reports list items by index
                path = f"{prefix}[{key}]"
            elif key == "non_field_errors" and prefix:
                path = prefix
            else:
                path = f"{prefix}.{key}" if prefix else key
            flat.update(_flatten(value, path))
        return flat
    if isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            return {prefix or "non_field_errors": [str(item) for item in detail]}
        flat = {}
        for index, item in enumerate(detail):
            if item:
                flat.update(_flatten(item, f"{prefix}[{index}]"))
        return flat
    return {prefix or "non_field_errors": [str(detail)]}


def error_response(
    *, status_code: int, code: str, message: str, fields: dict[str, list[str]] | None = None
) -> Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    return Response({"error": body}, status=status_code)


def field_error(*, field: str, message: str, status_code: int = status.HTTP_400_BAD_REQUEST) -> Response:
    return error_response(status_code=status_code, code="invalid", message=message, fields={field: [message]})


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, RequestDataTooBig):
        return error_response(status_code=413, code="request_too_large", message="The request body is too large.")
    if isinstance(exc, DATABASE_UNAVAILABLE):
        unavailable = Response(database_unavailable_error(exc), status=status.HTTP_503_SERVICE_UNAVAILABLE)
        unavailable["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return unavailable
    response = exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        fields = _flatten(exc.detail)
        first_field, messages = next(iter(fields.items()))
        return error_response(
            status_code=response.status_code, code="invalid", message=f"{first_field}: {messages[0]}", fields=fields
        )
    if isinstance(exc, exceptions.ParseError):
        return error_response(status_code=400, code="malformed_json", message=str(exc.detail))
    detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
    code = exc.default_code if isinstance(exc, exceptions.APIException) else "error"
    body: dict[str, Any] = {"code": code, "message": str(detail)}
    # An exception may name the request fields at fault, or add a detail such as a missing scope.
    if getattr(exc, "fields", None):
        body["fields"] = exc.fields  # type: ignore[attr-defined]
    body.update(getattr(exc, "error_extra", {}))
    response.data = {"error": body}
    return response


RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}}


def _error(description: str, *, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        response["headers"] = headers
    return response


def _errors_for(operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    security = {name for requirement in operation.get("security", []) for name in requirement}
    producer = "apiKey" in security
    errors = {"400": _error("Bad input, or a query parameter this operation does not take; `fields` names each.")}
    if security:
        errors["401"] = _error("Missing, unknown or expired credentials.")
    if producer:
        errors["403"] = _error("The API key may not do this (a scope or category it lacks).")
    if any(parameter["in"] == "path" for parameter in operation.get("parameters", [])):
        errors["404"] = _error("Nothing of that id here.")
    if "requestBody" in operation:
        errors["413"] = _error("Request body over the size limit.")
        errors["415"] = _error("Send the body as application/json.")
    if producer:
        errors["429"] = _error("Over the API key's rate limit; see Retry-After.", headers=RETRY_AFTER)
    errors["503"] = _error("The database is unreachable for now; see Retry-After.", headers=RETRY_AFTER)
    return errors


def errors_document(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """A drf-spectacular postprocessing hook: every operation documents the errors any
    request may get (bad input, authentication, size, rate limit, database), with this
    module's error body, besides those its view documents."""
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            for code, response in _errors_for(operation).items():
                operation["responses"].setdefault(code, response)
            operation["responses"] = dict(sorted(operation["responses"].items()))
    return result
