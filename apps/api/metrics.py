"""The web /metrics page (Prometheus text format) and the count of answered requests.

/metrics fails closed: with NOTIFY_METRICS_TOKEN set it asks for it as a bearer token (401
without one, 403 for a wrong one); unset, it answers 404 outside DEBUG, as if it did not
exist, and is open in DEBUG (the demo and the tests). A 404 rather than a refusal to start:
metrics are optional, and an installation that does not scrape them should not need a
secret for them. It is answered ahead of host validation, like the probes, since Prometheus
scrapes each container by its own address."""

import hmac
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from notify.observability.gauges import web_metrics_text
from notify.observability.metrics import api_request_count

METRICS_PATH = "/metrics"


def _error(*, status: int, code: str, detail: str) -> JsonResponse:
    body: dict[str, object] = {"code": code, "message": detail}
    if status != 404:
        body["fields"] = {"Authorization": [detail]}
    return JsonResponse({"error": body}, status=status)


def metrics_page(request: HttpRequest) -> HttpResponse:
    """Every web process's metrics and the stored gauges, for a holder of the token."""
    token = settings.NOTIFY_METRICS_TOKEN
    if not token:
        if not settings.DEBUG:
            return _error(status=404, code="not_found", detail="Not found.")
    else:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            response = _error(
                status=401, code="not_authenticated", detail="Send the metrics token: Authorization: Bearer <token>."
            )
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
        if not hmac.compare_digest(given.encode(), token.encode()):
            return _error(status=403, code="permission_denied", detail="The metrics token is wrong.")
    body, content_type = web_metrics_text()
    return HttpResponse(body, content_type=content_type)


class MetricsMiddleware:
    """Answers /metrics, and counts every other answered request by its URL pattern."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == METRICS_PATH:
            return metrics_page(request)
        response = self.get_response(request)
        api_request_count(method=request.method or "", route=route_of(request), status=response.status_code)
        return response


def route_of(request: HttpRequest) -> str:
    """The URL pattern that answered, never the path: paths hold ids and tokens, and would
    not be bounded. A regular-expression pattern (the API router's) goes by its view's name."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unmatched"
    if not match.route or "^" in match.route or "(?P" in match.route:
        return match.view_name
    return match.route
