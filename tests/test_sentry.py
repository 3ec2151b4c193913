"""Error reports leave the process without request bodies, cookies, users, addresses, phone
numbers, API keys or signed tokens."""

import json
import subprocess
import sys
from pathlib import Path

from config.sentry import MASK, breadcrumb_scrub, event_scrub, text_scrub

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "eyJyIjoiMDE5MmYifQ:1tQx2b:Yk2m3X9q0vR8sT7uW6zA5bC4dE3fG2hH1iJ0kL9mN8o"


def test_text_scrub_masks_each_kind_of_personal_data():
    text = (
        "send to Ada.Lovelace+news@example.co.uk failed; sms +1 415-555-0123 and +447700900123; "
        f"key ntf_a1b2c3_SeCrEt-value; link https://notify.example.com/unsubscribe/{TOKEN}; "
        "Authorization: Bearer abc.def-ghi"
    )
    scrubbed = text_scrub(text)
    for secret in ("Lovelace", "415-555", "7700900123", "SeCrEt", "1tQx2b", "abc.def"):
        assert secret not in scrubbed
    assert scrubbed.count(MASK) == 6
    assert text_scrub("delivery 0192f3a4 failed at 10:30:15 after 3 attempts") == (
        "delivery 0192f3a4 failed at 10:30:15 after 3 attempts"
    )


def test_an_event_of_a_django_request_loses_its_body_cookies_and_user():
    # The shape sentry_sdk's Django integration gives an error in a view.
    event = {
        "level": "error",
        "request": {
            "url": f"https://notify.example.com/preferences/{TOKEN}",
            "method": "POST",
            "query_string": "email=grace%40example.com",
            "headers": {"Content-Type": "application/json", "User-Agent": "curl/8"},
            "data": {"recipient": {"email": "grace@example.com", "phone": "+14155550123"}},
            "cookies": {"sessionid": "abc"},
            "env": {"REMOTE_ADDR": "203.0.113.9"},
        },
        "user": {"id": "1", "email": "ops@example.com", "ip_address": "203.0.113.9"},
        "exception": {"values": [{"type": "ValueError", "value": "no such recipient grace@example.com"}]},
        "extra": {"to": ["+14155550123"]},
        "breadcrumbs": {"values": [{"category": "query", "message": "SELECT ... WHERE email = 'grace@example.com'"}]},
    }
    scrubbed = json.dumps(event_scrub(event, {}))
    assert "grace" not in scrubbed and "4155550123" not in scrubbed and "1tQx2b" not in scrubbed
    assert "sessionid" not in scrubbed and "203.0.113.9" not in scrubbed and "ops@" not in scrubbed
    assert '"Content-Type": "application/json"' in scrubbed
    assert '"ValueError"' in scrubbed


def test_a_breadcrumb_is_masked():
    crumb = {"category": "httplib", "data": {"url": "https://api.example.com/?to=%2B14155550123&to2=+14155550124"}}
    assert "4155550124" not in json.dumps(breadcrumb_scrub(crumb, {}))


# The SDK in a process of its own (it installs itself globally), with its real API for a
# custom transport recording the envelopes it would send: nothing goes on the network.
SENTRY_RUN = """
import json, logging, sys
import django
django.setup()
import sentry_sdk
from sentry_sdk.transport import Transport
from config.sentry import sentry_init

sent = []

class RecordingTransport(Transport):
    def capture_envelope(self, envelope):
        sent.extend(item.payload.json for item in envelope.items if item.payload.json)

sentry_init(dsn="https://public@sentry.invalid/1", traces_sample_rate=0.0, transport=RecordingTransport)
options = sentry_sdk.get_client().options
logging.getLogger("notify").warning("retrying ada@example.com with key ntf_ab12_topsecret")
sentry_sdk.set_user({"email": "ops@example.com"})
sentry_sdk.set_extra("auth_token", "twilio-real-token")
try:
    raise RuntimeError("bounce for +14155550123 at grace@example.com")
except RuntimeError:
    sentry_sdk.capture_exception()
sentry_sdk.flush()
print(json.dumps({"options": {k: options[k] for k in ("send_default_pii", "max_request_body_size")}, "sent": sent}))
"""


def test_sentry_is_started_without_personal_data_and_scrubs_what_it_sends():
    result = subprocess.run(
        [sys.executable, "-c", SENTRY_RUN], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["options"] == {"send_default_pii": False, "max_request_body_size": "never"}
    [event] = [item for item in report["sent"] if item.get("exception")]
    text = json.dumps(event)
    assert "RuntimeError" in text
    for secret in ("4155550123", "grace@", "ada@", "topsecret", "ops@", "twilio-real-token"):
        assert secret not in text
    assert "retrying" in text  # the log line is kept as a breadcrumb, masked
