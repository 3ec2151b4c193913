from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

# Not imported from apps.api.imports: the middleware loads before the URLconf and its views.
IMPORT_PATH = "/api/v1/recipients/import"


class RequestBodyLimitMiddleware:
    """Refuse an API request body over the limit with 413 before anything reads it. The bulk
    import has its own, larger limit: it streams its body instead of parsing it whole."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        is_import = request.path == IMPORT_PATH
        limit = settings.NOTIFY_IMPORT_MAX_BYTES if is_import else settings.NOTIFY_MAX_REQUEST_BYTES
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if request.path.startswith("/api/") and length > limit:
            return JsonResponse(
                {
                    "error": {
                        "code": "request_too_large",
                        "message": f"The request body is {length} bytes; the limit is {limit} bytes."
                        + ("" if is_import else " Split large sends into several requests."),
                    }
                },
                status=413,
            )
        return self.get_response(request)
