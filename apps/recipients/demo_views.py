"""The demo pages: the in-app inbox widget, and web push with its service worker and a
demo-only subscribe endpoint. They exist only with DJANGO_DEBUG on (the run command's demo):
in a real application its own server asks for inbox tokens and saves subscriptions with an
API key, which a browser must never hold."""

from django.conf import settings
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from apps.api.parsers import json_loads_bounded
from apps.recipients.models import Recipient
from apps.recipients.services import webpush_subscribe
from apps.recipients.tokens import INBOX, recipient_token_issue
from notify.channels.webpush import vapid_application_server_key

DEMO_RECIPIENT = "ada"


def _demo_recipient() -> Recipient:
    if not settings.DEBUG:
        raise Http404
    recipient = (
        Recipient.objects.filter(tenant__slug="demo", external_id=DEMO_RECIPIENT).select_related("tenant").first()
    )
    if recipient is None:
        raise Http404("Run manage.py demo_setup first.")
    return recipient


def inbox_page(request: HttpRequest) -> HttpResponse:
    recipient = _demo_recipient()
    return render(
        request,
        "demo/inbox.html",
        {"recipient": recipient.external_id, "token": recipient_token_issue(purpose=INBOX, recipient_id=recipient.id)},
    )


def inbox_token(request: HttpRequest) -> HttpResponse:
    """A fresh inbox token for the widget's getToken, as an application's own server makes one
    for the signed-in person when the last one expires."""
    recipient = _demo_recipient()
    return HttpResponse(recipient_token_issue(purpose=INBOX, recipient_id=recipient.id), content_type="text/plain")


def webpush_page(request: HttpRequest) -> HttpResponse:
    recipient = _demo_recipient()
    return render(
        request,
        "demo/webpush.html",
        {"recipient": recipient.external_id, "application_server_key": vapid_application_server_key()},
    )


def webpush_service_worker(request: HttpRequest) -> HttpResponse:
    _demo_recipient()
    return render(request, "demo/webpush-sw.js", content_type="application/javascript")


@csrf_exempt
@require_POST
def webpush_subscribe_demo(request: HttpRequest) -> HttpResponse:
    recipient = _demo_recipient()
    try:
        subscription = json_loads_bounded(request.body)
        endpoint, keys = subscription["endpoint"], subscription["keys"]
        saved, created = webpush_subscribe(
            tenant=recipient.tenant, recipient=recipient, endpoint=endpoint, p256dh=keys["p256dh"], auth=keys["auth"]
        )
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"error": "Send the browser's PushSubscription JSON."}, status=400)
    except ValidationError as error:
        return JsonResponse({"error": " ".join(error.messages)}, status=400)
    return JsonResponse({"id": saved.id, "created": created}, status=201 if created else 200)
