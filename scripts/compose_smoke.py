"""Send one notification on every channel to a running demo stack and wait until each is
delivered or sent; print what the API and the sandbox saw. Exits 1 when one falls short.
The standard library only: it runs on the machine that runs Docker, outside the images.

    python3 scripts/compose_smoke.py --web http://127.0.0.1:61800 --sandbox http://127.0.0.1:61825
"""

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

DEMO_API_KEY = "ntf_demo_0123456789abcdefDEMO"  # docker/compose.demo.yaml's published key
# One event per channel on the demo workspace's categories (apps/tenants/demo.py), and the
# status each reaches with the sandbox: email and SMS hear back from the provider (a delivery
# webhook, a status callback); FCM and web push report nothing after accepting a message; the
# inbox stores it.
SENDS = (
    (
        "email",
        {"category": "welcome", "recipient": {"external_id": "grace", "email": "grace@example.com"}, "data": {}},
        "delivered",
    ),
    (
        "sms",
        {"category": "otp", "recipient": {"external_id": "grace", "phone": "+14155550123"}, "data": {"code": "4829"}},
        "delivered",
    ),
    ("push", {"category": "alert", "recipient": "ada", "data": {"text": "Your build finished."}}, "sent"),
    ("webpush", {"category": "browser-alert", "recipient": "ada", "data": {"text": "Your export is ready."}}, "sent"),
    ("inapp", {"category": "mention", "recipient": "ada", "data": {"who": "Grace", "text": "Review?"}}, "sent"),
)
# A delivery at or past its goal counts; these come after "sent" and "delivered".
LATER = {"sent": {"sent", "delivered", "opened", "clicked"}, "delivered": {"delivered", "opened", "clicked"}}


def call(url: str, *, body: dict[str, Any] | None = None, token: str = "") -> Any:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--web", required=True, help="the web service's address, e.g. http://127.0.0.1:61800")
    parser.add_argument("--sandbox", required=True, help="the sandbox's address, e.g. http://127.0.0.1:61825")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every channel")
    args = parser.parse_args()

    waiting: dict[str, tuple[str, str]] = {}
    for channel, event, goal in SENDS:
        try:
            accepted = call(f"{args.web}/api/v1/events", body=event, token=DEMO_API_KEY)
        except urllib.error.HTTPError as error:
            print(f"{channel:8} refused: HTTP {error.code} {error.read().decode()[:300]}")
            return 1
        waiting[channel] = (accepted["notification_ids"][0], goal)
        print(f"{channel:8} accepted as notification {waiting[channel][0]}")

    seen: dict[str, str] = {}
    deadline = time.monotonic() + args.timeout
    while waiting and time.monotonic() < deadline:
        for channel, (notification_id, goal) in list(waiting.items()):
            notification = call(f"{args.web}/api/v1/notifications/{notification_id}", token=DEMO_API_KEY)
            statuses = {d["channel"]: d["status"] for d in notification["deliveries"]}
            seen[channel] = statuses.get(channel, "no delivery yet")
            if seen[channel] in LATER[goal]:
                print(f"{channel:8} {seen[channel]} after {args.timeout - (deadline - time.monotonic()):.1f} s")
                del waiting[channel]
        time.sleep(0.5)
    for channel, (notification_id, goal) in waiting.items():
        print(f"{channel:8} still {seen.get(channel)!r} after {args.timeout:.0f} s, wanted {goal}: {notification_id}")

    stats = call(f"{args.sandbox}/_sandbox/stats")
    print("sandbox  " + json.dumps(stats, sort_keys=True))
    return 1 if waiting else 0


if __name__ == "__main__":
    sys.exit(main())
