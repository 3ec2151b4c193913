#!/usr/bin/env bash
# Run a steady mixed load through the whole pipeline and watch every process for leaks.
# Arguments go to scripts/soak.py, for example: scripts/soak.sh --minutes 60 --rate 30
# Its database is notify_soak (SOAK_DATABASE_URL), its Redis database 12 (SOAK_BROKER_URL).
source "$(dirname "$0")/lib.sh"

load_run_prepare soak 12
exec "$PY" -u scripts/soak.py "$@"
