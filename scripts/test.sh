#!/usr/bin/env bash
# Set up and run the whole suite against PostgreSQL and Redis. Extra arguments go to pytest.
source "$(dirname "$0")/lib.sh"

export DJANGO_SECRET_KEY="${DJANGO_SECRET_KEY:-test-only-secret-key}"
# Published, so refused outside DEBUG (apps/deliveries/checks.py KNOWN_ENCRYPTION_KEYS).
export NOTIFY_ENCRYPTION_KEYS="${NOTIFY_ENCRYPTION_KEYS:-dGVzdC1vbmx5LWluc2VjdXJlLWZlcm5ldC1rZXkuLi4=}"
# The suite and the processes it starts run on the sandbox's published credentials, which
# only DEBUG allows; the tests of that refusal start their processes with DEBUG off.
export DJANGO_DEBUG=1
export DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/notify}"
export CELERY_BROKER_URL="${TEST_BROKER_URL:-redis://127.0.0.1:6379/15}"
sandbox_credentials
# Short clocks so that retries, leases and the sweeper act within a test's patience.
for channel in EMAIL SMS PUSH WEBPUSH; do
    export "NOTIFY_${channel}_MAX_ATTEMPTS=3" "NOTIFY_${channel}_RETRY_BASE_SECONDS=0.2" "NOTIFY_${channel}_RETRY_CAP_SECONDS=1"
done
export NOTIFY_LEASE_SECONDS=4
export NOTIFY_REPUBLISH_AFTER_SECONDS=2
export NOTIFY_RECONCILE_AFTER_SECONDS=0.5
export NOTIFY_BULK_BATCH_SIZE=50
export LOG_LEVEL=WARNING
# The metrics of this run's own processes (prometheus-client's multiprocess mode), from zero.
export PROMETHEUS_MULTIPROC_DIR="$ROOT/var/metrics-test"
rm -rf "$PROMETHEUS_MULTIPROC_DIR"
# Empty, whatever the caller's environment says: the tests put the sandbox, on its random
# port, on the outbound guard's allow lists themselves (tests/helpers.py provider_settings).
export NOTIFY_WEBPUSH_ALLOWED_HOSTS="" NOTIFY_PROVIDER_ALLOWED_HOSTS=""

venv_ensure
postgres_ensure
redis_ensure
rabbitmq_ensure
database_create
vapid_key_ensure
chromium_ensure
iproute2_ensure
curl_ensure

# Two processes by default, one per core; each has its own database and Redis database
# (tests/processes.py), which also picks the order: test by test, except the modules that
# restart RabbitMQ, which run whole in one process. TEST_PROCESSES=0 runs all in this process.
exec "$PY" -m pytest -n "${TEST_PROCESSES:-2}" "$@"
