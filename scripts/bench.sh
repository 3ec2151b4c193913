#!/usr/bin/env bash
# Benchmark the whole pipeline on PostgreSQL and Redis. Arguments go to scripts/bench.py,
# for example: scripts/bench.sh --bulk 100000 --critical 200 --sink sandbox
source "$(dirname "$0")/lib.sh"

export DJANGO_SECRET_KEY="${DJANGO_SECRET_KEY:-bench-only-secret-key}"
export DATABASE_URL="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/notify_bench}"
export CELERY_BROKER_URL="${BENCH_BROKER_URL:-redis://127.0.0.1:6379/13}"
export NOTIFY_DEMO_API_KEY="${NOTIFY_DEMO_API_KEY:-ntf_bench_0123456789abcdefBENCH}"
export POSTMARK_SERVER_TOKEN="sandbox-token"
export TWILIO_ACCOUNT_SID="ACsandbox00000000000000000000000000"
export TWILIO_AUTH_TOKEN="sandbox-twilio-auth-token"
export TWILIO_FROM_NUMBER="+15005550006"
export FCM_PROJECT_ID="notify-sandbox"

venv_ensure
postgres_ensure
redis_ensure
database_create
"$PY" manage.py migrate --no-input -v 0
export WEBPUSH_VAPID_PRIVATE_KEY="$("$PY" manage.py vapid_keys | sed -n 's/^WEBPUSH_VAPID_PRIVATE_KEY=//p')"
"$PY" -c "import redis; redis.Redis.from_url('$CELERY_BROKER_URL').flushdb()"
exec "$PY" -u scripts/bench.py "$@"
