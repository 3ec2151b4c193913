"""Provider webhooks that anymail does not already receive."""

from collections.abc import Callable, Mapping
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from notify.channels.sms import BadSignature, sms_inbound, sms_status_callback


def _twilio_signed(request: HttpRequest, *, handler: Callable[..., Any], answer: HttpResponse) -> HttpResponse:
    """Pass a Twilio webhook to its handler, which checks X-Twilio-Signature; a forged or
    unsigned one gets 403."""
    params: Mapping[str, str] = request.POST.dict()
    try:
        handler(path=request.get_full_path(), params=params, signature=request.headers.get("X-Twilio-Signature", ""))
    except BadSignature:
        return HttpResponse("invalid X-Twilio-Signature", status=403, content_type="text/plain")
    return answer


@csrf_exempt
@require_POST
def twilio_status_callback(request: HttpRequest) -> HttpResponse:
    """Twilio's message status callback."""
    return _twilio_signed(request, handler=sms_status_callback, answer=HttpResponse(status=204))


@csrf_exempt
@require_POST
def twilio_inbound(request: HttpRequest) -> HttpResponse:
    """Twilio's messaging webhook for texts people send us: STOP and START opt the number out
    of SMS and back in. The empty TwiML reply leaves the confirmation text to Twilio, which
    sends its own for these keywords."""
    return _twilio_signed(request, handler=sms_inbound, answer=HttpResponse("<Response/>", content_type="text/xml"))
