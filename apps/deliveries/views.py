"""Provider webhooks that anymail does not already receive."""

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from notify.channels.sms import BadSignature, sms_inbound, sms_status_callback


@csrf_exempt
@require_POST
def twilio_status_callback(request: HttpRequest) -> HttpResponse:
    """Twilio's signed message status callback; an unsigned or forged one gets 403."""
    try:
        sms_status_callback(
            path=request.get_full_path(),
            params=request.POST.dict(),
            signature=request.headers.get("X-Twilio-Signature", ""),
        )
    except BadSignature:
        return HttpResponse("invalid X-Twilio-Signature", status=403, content_type="text/plain")
    return HttpResponse(status=204)


@csrf_exempt
@require_POST
def twilio_inbound(request: HttpRequest) -> HttpResponse:
    """Twilio's signed messaging webhook for texts people send us: STOP and START opt the
    number out of SMS and back in. The empty TwiML reply leaves the confirmation text to
    Twilio, which sends its own for these keywords."""
    try:
        sms_inbound(
            path=request.get_full_path(),
            params=request.POST.dict(),
            signature=request.headers.get("X-Twilio-Signature", ""),
        )
    except BadSignature:
        return HttpResponse("invalid X-Twilio-Signature", status=403, content_type="text/plain")
    return HttpResponse("<Response/>", content_type="text/xml")
