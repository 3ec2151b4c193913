#!/usr/bin/env bash
# Run the service with its demo: web (ASGI), workers per queue group, beat and the
# provider sandbox. Ctrl-C stops everything. `scripts/run.sh --smoke` starts it all,
# sends the demo notification, waits until it is delivered, then stops.
source "$(dirname "$0")/lib.sh"

SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1

WEB_PORT="${NOTIFY_WEB_PORT:-8000}"
SANDBOX_PORT="${NOTIFY_SANDBOX_PORT:-8025}"
export DJANGO_SECRET_KEY="${DJANGO_SECRET_KEY:-demo-only-insecure-secret-key}"
export NOTIFY_ENCRYPTION_KEYS="${NOTIFY_ENCRYPTION_KEYS:-ZGVtby1vbmx5LWluc2VjdXJlLWZlcm5ldC1rZXkuLi4=}"
export DJANGO_DEBUG="${DJANGO_DEBUG:-1}"
export NOTIFY_DEMO_API_KEY="${NOTIFY_DEMO_API_KEY:-ntf_demo_0123456789abcdefDEMO}"
export CELERY_BROKER_URL="${CELERY_BROKER_URL:-redis://127.0.0.1:6379/0}"
sandbox_credentials
export POSTMARK_API_URL="${POSTMARK_API_URL:-http://127.0.0.1:$SANDBOX_PORT/postmark/}"
export TWILIO_API_BASE="${TWILIO_API_BASE:-http://127.0.0.1:$SANDBOX_PORT/twilio}"
export FCM_API_BASE="${FCM_API_BASE:-http://127.0.0.1:$SANDBOX_PORT/fcm}"
export FCM_TOKEN_URI="${FCM_TOKEN_URI:-http://127.0.0.1:$SANDBOX_PORT/google/token}"
# The sandbox is on loopback over http: the outbound guard lets only allow-listed hosts be.
export NOTIFY_WEBPUSH_ALLOWED_HOSTS="${NOTIFY_WEBPUSH_ALLOWED_HOSTS:-127.0.0.1:$SANDBOX_PORT}"
export NOTIFY_PROVIDER_ALLOWED_HOSTS="${NOTIFY_PROVIDER_ALLOWED_HOSTS:-127.0.0.1:$SANDBOX_PORT}"
export NOTIFY_PUBLIC_URL="${NOTIFY_PUBLIC_URL:-http://127.0.0.1:$WEB_PORT}"
export NOTIFY_SWEEP_INTERVAL_SECONDS="${NOTIFY_SWEEP_INTERVAL_SECONDS:-5}"
# /metrics asks for this token; the demo's is published, so only DEBUG starts with it.
export NOTIFY_METRICS_TOKEN="${NOTIFY_METRICS_TOKEN:-demo-metrics-token}"
# One host: the web server and the workers count into one directory, emptied at each start,
# and the web /metrics serves them all (docs/operations.md, "Metrics").
export PROMETHEUS_MULTIPROC_DIR="$ROOT/var/metrics"
WEBHOOK_URL="http://${ANYMAIL_WEBHOOK_SECRET}@127.0.0.1:$WEB_PORT/anymail/postmark/tracking/"
# The synthetic canary, every minute on every channel, to the sandbox's probe addresses (its
# runs: Canary runs in the admin). The web push key is a stand-in: the sandbox decrypts nothing.
if [ "$SMOKE" = 1 ]; then
    # The smoke run checks exactly what the sandbox accepted; the canary would add to it.
    export NOTIFY_CANARY_INTERVAL_SECONDS="${NOTIFY_CANARY_INTERVAL_SECONDS:-0}"
fi
export NOTIFY_CANARY_INTERVAL_SECONDS="${NOTIFY_CANARY_INTERVAL_SECONDS:-60}"
export NOTIFY_CANARY_EMAIL="${NOTIFY_CANARY_EMAIL:-canary@example.com}"
export NOTIFY_CANARY_PHONE="${NOTIFY_CANARY_PHONE:-+14155550100}"
export NOTIFY_CANARY_PUSH_TOKEN="${NOTIFY_CANARY_PUSH_TOKEN:-canary-device-token}"
CANARY_P256DH="BBSqdRP1uJEu1nQaAwxsoelCpLtttR2D4DQI8P1GojUqv-HyHOvn9Q4CMNqaaUzSrjhmScm2TU0j4Lit5DsVC7E"
CANARY_SUBSCRIPTION="{\"endpoint\": \"http://127.0.0.1:$SANDBOX_PORT/webpush/canary-browser\", \"keys\": {\"p256dh\": \"$CANARY_P256DH\", \"auth\": \"MDEyMzQ1Njc4OWFiY2RlZg\"}}"
export NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION="${NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION:-$CANARY_SUBSCRIPTION}"
export NOTIFY_CANARY_INAPP="${NOTIFY_CANARY_INAPP:-1}"

venv_ensure
curl_ensure
redis_ensure
if [ -n "${DATABASE_URL:-}" ]; then
    case "$DATABASE_URL" in postgres*) postgres_ensure; database_create ;; esac
    say "database: $DATABASE_URL"
else
    say "database: embedded SQLite (var/demo.sqlite3); set DATABASE_URL for PostgreSQL"
fi
for port in "$WEB_PORT" "$SANDBOX_PORT"; do
    if "$PY" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $port)) != 0)"; then
        die "port $port is already in use. Stop what uses it, or set NOTIFY_WEB_PORT / NOTIFY_SANDBOX_PORT."
    fi
done

mkdir -p var/log
rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
vapid_key_ensure var/vapid.env
"$PY" manage.py migrate --no-input -v 0
# The demo recipient's browser subscription points at the sandbox's push service.
"$PY" manage.py demo_setup -v 0 --webpush-endpoint "http://127.0.0.1:$SANDBOX_PORT/webpush/demo-browser"

PIDS=()
stop_all() {
    trap - EXIT INT TERM
    [ ${#PIDS[@]} -gt 0 ] && kill "${PIDS[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap stop_all EXIT INT TERM
start() {
    local name="$1"; shift
    "$@" >"var/log/$name.log" 2>&1 &
    PIDS+=($!)
}

start sandbox "$PY" -m notify.sandbox --port "$SANDBOX_PORT" --webhook "postmark=$WEBHOOK_URL"
start web "$VENV/bin/uvicorn" config.asgi:application --host 127.0.0.1 --port "$WEB_PORT" --no-access-log
for group in critical normal bulk maintenance webhooks; do
    start "worker-$group" "$VENV/bin/celery" -A config worker --pool solo --without-mingle --without-gossip \
        -Q "$("$PY" -m config.queues "$group")" -n "$group@%h" -l info
done
start beat "$VENV/bin/celery" -A config beat -l info --pidfile=

for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$WEB_PORT/api/schema/" -o /dev/null && break
    sleep 0.2
done
curl -sf "http://127.0.0.1:$WEB_PORT/api/schema/" -o /dev/null || die "the web server did not start; see var/log/web.log"

# One demo request as a curl line: printed for people to run, and run by --smoke.
api_curl() {
    printf '%s' "curl -s -X POST http://127.0.0.1:$WEB_PORT/api/v1/$1 \\
  -H 'Authorization: Bearer $NOTIFY_DEMO_API_KEY' -H 'Content-Type: application/json' \\
  -d '$2'"
}
event_curl() { api_curl events "$1"; }
CURL="$(event_curl '{"category": "welcome", "recipient": {"external_id": "grace", "email": "grace@example.com"}, "data": {"name": "Grace"}}')"
PUSH_CURL="$(event_curl '{"category": "alert", "recipient": "ada", "data": {"text": "Your build finished."}}')"
SMS_CURL="$(event_curl '{"category": "otp", "recipient": {"external_id": "grace", "phone": "+14155550123"}, "data": {"code": "482913"}}')"
WEBPUSH_CURL="$(event_curl '{"category": "browser-alert", "recipient": "ada", "data": {"text": "Your export is ready."}}')"
BROADCAST_CURL="$(api_curl broadcasts '{"category": "announcement", "audience": {"topic": "product-news"}, "data": {"headline": "Version 2 is out"}}')"
INBOX_CURL="$(event_curl '{"category": "mention", "recipient": "ada", "data": {"who": "Grace", "text": "Can you review the launch plan?"}}')"

PREFERENCES_URL="$(curl -s -X POST "http://127.0.0.1:$WEB_PORT/api/v1/recipients/ada/preference-link" \
    -H "Authorization: Bearer $NOTIFY_DEMO_API_KEY" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["url"])')"

cat <<INFO

  Notify is running (logs in var/log/).

  Admin        http://127.0.0.1:$WEB_PORT/admin/        login: admin / admin
  API docs     http://127.0.0.1:$WEB_PORT/api/docs/
  Readiness    http://127.0.0.1:$WEB_PORT/readyz          database, Redis, broker and migrations (503 names what fails)
  Metrics      http://127.0.0.1:$WEB_PORT/metrics         Prometheus text; send the token:
               curl -H 'Authorization: Bearer $NOTIFY_METRICS_TOKEN' http://127.0.0.1:$WEB_PORT/metrics
  Sandbox log  http://127.0.0.1:$SANDBOX_PORT/         every request the fake providers received
  Canary       http://127.0.0.1:$WEB_PORT/admin/ops/canaryrun/  a synthetic send on every channel each minute
  Inbox        http://127.0.0.1:$WEB_PORT/demo/inbox/    the in-app inbox widget, updated live
  Preferences  $PREFERENCES_URL
               the demo recipient's preference center (a signed link, as an email carries it)
  Web push     http://127.0.0.1:$WEB_PORT/demo/webpush/  subscribe a browser (needs its vendor's push service)
  API key      $NOTIFY_DEMO_API_KEY

  Send a notification by email:

  $CURL

  Send a sign-in code by SMS:

  $SMS_CURL

  Send a mobile push to the demo recipient's device:

  $PUSH_CURL

  Send a web push to the demo recipient's browser subscriptions (the sandbox's, and yours):

  $WEBPUSH_CURL

  Send an in-app notification to the inbox page (open it first):

  $INBOX_CURL

  Broadcast to the product-news topic (its progress: Broadcasts in the admin):

  $BROADCAST_CURL

  Then open Notifications in the admin, or the sandbox log. Ctrl-C stops everything.

INFO

# Send one request, then wait until its notification reaches the status; print the outcome.
reaches() {
    local want="$2" response notification_id status=""
    response="$(eval "$1")"
    echo "$response"
    notification_id="$(echo "$response" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["notification_ids"][0])')"
    for _ in $(seq 150); do
        status="$(curl -s "http://127.0.0.1:$WEB_PORT/api/v1/notifications/$notification_id" \
            -H "Authorization: Bearer $NOTIFY_DEMO_API_KEY" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["status"])')"
        [ "$status" = "$want" ] && break
        sleep 0.2
    done
    echo "notification $notification_id: $status"
    [ "$status" = "$want" ]
}

# Start a broadcast, then wait until it completes; print its counts.
broadcasted() {
    local response broadcast_id state=""
    response="$(eval "$1")"
    echo "$response"
    broadcast_id="$(echo "$response" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
    for _ in $(seq 300); do
        response="$(curl -s "http://127.0.0.1:$WEB_PORT/api/v1/broadcasts/$broadcast_id" \
            -H "Authorization: Bearer $NOTIFY_DEMO_API_KEY")"
        state="$(echo "$response" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["state"])')"
        [ "$state" = completed ] && break
        sleep 0.2
    done
    echo "broadcast $broadcast_id: $state $(echo "$response" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["counts"])')"
    [ "$state" = completed ]
}

if [ "$SMOKE" = 1 ]; then
    reaches "$CURL" delivered || die "the demo email was not delivered; see var/log/"
    reaches "$SMS_CURL" delivered || die "the demo SMS was not delivered; see var/log/"
    # FCM reports nothing after accepting a message, so "sent" is as far as push goes.
    reaches "$PUSH_CURL" sent || die "the demo push was not sent; see var/log/"
    reaches "$WEBPUSH_CURL" sent || die "the demo web push was not sent; see var/log/"
    # Read whole, then searched: grep -q leaving a pipe early fails curl (and, with pipefail, the check).
    preferences_page="$(curl -sf "$PREFERENCES_URL")" || die "the preference center did not open"
    grep -q "Notification preferences" <<<"$preferences_page" || die "the preference center did not open"
    reaches "$INBOX_CURL" sent || die "the demo in-app notification was not stored; see var/log/"
    broadcasted "$BROADCAST_CURL" || die "the demo broadcast did not complete; see var/log/"
    curl -s "http://127.0.0.1:$SANDBOX_PORT/_sandbox/stats"; echo
    exit 0
fi
wait -n
die "a process stopped unexpectedly; see var/log/"
