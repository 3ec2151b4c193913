#!/usr/bin/env bash
# The fault campaign (scripts/chaos.py): the whole pipeline under load while a fixed schedule
# of faults is injected, on a Redis and a PostgreSQL cluster of its own. Arguments go to
# scripts/chaos.py, for example: scripts/chaos.sh --notifications 100000
# or on RabbitMQ (its broker fault restarts the whole local node): scripts/chaos.sh --broker rabbitmq
source "$(dirname "$0")/lib.sh"

export DJANGO_SECRET_KEY="${DJANGO_SECRET_KEY:-bench-only-secret-key}"
export NOTIFY_ENCRYPTION_KEYS="${NOTIFY_ENCRYPTION_KEYS:-YmVuY2gtb25seS1pbnNlY3VyZS1mZXJuZXQta2V5Li4=}"
export NOTIFY_DEMO_API_KEY="${NOTIFY_DEMO_API_KEY:-ntf_bench_0123456789abcdefBENCH}"
# The sandbox's published credentials are allowed only with DEBUG on.
export DJANGO_DEBUG=1
# Set by scripts/chaos.py once its own PostgreSQL and Redis run; these only let the settings load.
export DATABASE_URL="postgres://postgres@127.0.0.1:1/unused"
export CELERY_BROKER_URL="redis://127.0.0.1:1/0"
sandbox_credentials
export PROMETHEUS_MULTIPROC_DIR="$ROOT/var/metrics-chaos"
rm -rf "$PROMETHEUS_MULTIPROC_DIR"

venv_ensure
if [[ " $* " == *" --broker rabbitmq "* ]]; then
    rabbitmq_ensure
fi
vapid_key_ensure
exec "$PY" -u scripts/chaos.py "$@"
