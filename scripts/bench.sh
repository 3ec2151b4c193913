#!/usr/bin/env bash
# Benchmark the whole pipeline on PostgreSQL and Redis. Arguments go to scripts/bench.py,
# for example: scripts/bench.sh --bulk 100000 --critical 200 --sink sandbox
# or, the drain rate with the metrics off and on: scripts/bench.sh --bulk 30000 --metrics-compare
# or, for the recipient import: scripts/bench.sh --import 1000000
# or, for a broadcast to an imported audience: scripts/bench.sh --broadcast 1000000
source "$(dirname "$0")/lib.sh"

export DJANGO_SECRET_KEY="${DJANGO_SECRET_KEY:-bench-only-secret-key}"
export NOTIFY_ENCRYPTION_KEYS="${NOTIFY_ENCRYPTION_KEYS:-YmVuY2gtb25seS1pbnNlY3VyZS1mZXJuZXQta2V5Li4=}"
export DATABASE_URL="${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/notify_bench}"
export CELERY_BROKER_URL="${BENCH_BROKER_URL:-redis://127.0.0.1:6379/13}"
export NOTIFY_DEMO_API_KEY="${NOTIFY_DEMO_API_KEY:-ntf_bench_0123456789abcdefBENCH}"
# The sandbox's published credentials are allowed only with DEBUG on. Its cost here is
# Django's log of the last 9000 queries per connection.
export DJANGO_DEBUG=1
sandbox_credentials

# The metrics of this run's processes (prometheus-client's multiprocess mode), from zero.
# NOTIFY_METRICS_ENABLED=false runs it with the metrics off; --metrics-compare runs both.
export PROMETHEUS_MULTIPROC_DIR="$ROOT/var/metrics-bench"
rm -rf "$PROMETHEUS_MULTIPROC_DIR"

venv_ensure
postgres_ensure
redis_ensure
database_create
"$PY" manage.py migrate --no-input -v 0
vapid_key_ensure
"$PY" -c "import redis; redis.Redis.from_url('$CELERY_BROKER_URL').flushdb()"
# `--import N` benchmarks the bulk recipient import instead (scripts/bench_import.py).
if [ "${1:-}" = "--import" ]; then
    exec "$PY" -u scripts/bench_import.py "$@"
fi
# `--broadcast N` benchmarks an audience import and a broadcast to it (scripts/bench_broadcast.py).
if [ "${1:-}" = "--broadcast" ]; then
    exec "$PY" -u scripts/bench_broadcast.py "$@"
fi
exec "$PY" -u scripts/bench.py "$@"
