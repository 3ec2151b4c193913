"""One error shape for the whole API:
{"error": {"code": ..., "message": ..., "fields": {"dotted.path": ["what is wrong"]}}}"""

from typing import Any

from django.core.exceptions import RequestDataTooBig
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler


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
