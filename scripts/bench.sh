#!/usr/bin/env bash
# Benchmark the whole pipeline on PostgreSQL and Redis. Arguments go to scripts/bench.py,
# for example: scripts/bench.sh --bulk 100000 --critical 200 --sink sandbox
# or, the drain rate with the metrics off and on: scripts/bench.sh --bulk 30000 --metrics-compare
# or, for the recipient import: scripts/bench.sh --import 1000000
# or, for a broadcast to an imported audience: scripts/bench.sh --broadcast 1000000
# or, for the inbox's live connections: scripts/bench.sh --inbox-connections 20000
# or, for workers on one host against two (as root): scripts/bench.sh --hosts 2 --provider-latency-ms 50
# or, for the retention purge of a month of history: scripts/bench.sh --partition-purge 10000000
source "$(dirname "$0")/lib.sh"

# NOTIFY_METRICS_ENABLED=false runs it with the metrics off; --metrics-compare runs both.
load_run_prepare bench 13
# `--import N` benchmarks the bulk recipient import instead (scripts/bench_import.py).
if [ "${1:-}" = "--import" ]; then
    exec "$PY" -u scripts/bench_import.py "$@"
fi
# `--broadcast N` benchmarks an audience import and a broadcast to it (scripts/bench_broadcast.py).
if [ "${1:-}" = "--broadcast" ]; then
    exec "$PY" -u scripts/bench_broadcast.py "$@"
fi
# `--partition-purge N` benchmarks purging a month of N history rows: batches against dropping
# the month's partitions (scripts/bench_partition_purge.py).
if [ "${1:-}" = "--partition-purge" ]; then
    exec "$PY" -u scripts/bench_partition_purge.py "$@"
fi
# `--inbox-connections N` benchmarks N inbox WebSockets (scripts/bench_inbox.py).
if [ "${1:-}" = "--inbox-connections" ]; then
    exec "$PY" -u scripts/bench_inbox.py "$@"
fi
# `--hosts N` compares the drain of 1 and N worker hosts (scripts/bench_hosts.py).
if [ "${1:-}" = "--hosts" ]; then
    exec "$PY" -u scripts/bench_hosts.py "$@"
fi
exec "$PY" -u scripts/bench.py "$@"
