#!/usr/bin/env bash
# Set up and run the whole suite against PostgreSQL and Redis. Extra arguments go to pytest.
source "$(dirname "$0")/lib.sh"

export DJANGO_SECRET_KEY="${DJANGO_SECRET_KEY:-test-only-secret-key}"
export DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/notify}"
export CELERY_BROKER_URL="${TEST_BROKER_URL:-redis://127.0.0.1:6379/15}"
export POSTMARK_SERVER_TOKEN="sandbox-token"
export ANYMAIL_WEBHOOK_SECRET="sandbox:sandbox-webhook-secret"
# Short clocks so that retries, leases and the sweeper act within a test's patience.
export NOTIFY_EMAIL_MAX_ATTEMPTS=3
export NOTIFY_EMAIL_RETRY_BASE_SECONDS=0.2
export NOTIFY_EMAIL_RETRY_CAP_SECONDS=1
export NOTIFY_LEASE_SECONDS=4
export NOTIFY_REPUBLISH_AFTER_SECONDS=2
export NOTIFY_BULK_BATCH_SIZE=50
export LOG_LEVEL=WARNING

venv_ensure
postgres_ensure
redis_ensure
database_create

exec "$PY" -m pytest "$@"
