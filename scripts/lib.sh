# Shared set-up for the run, test and bench commands. Sourced, not executed.
# Creates the virtualenv, installs the pinned requirements, and checks (or starts) the
# services a command needs, with a clear message when one is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
cd "$ROOT"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

venv_ensure() {
    local python="${PYTHON:-python3}"
    command -v "$python" >/dev/null || die "Python 3.11 or newer is needed. Install it (apt-get install python3 python3-venv) or set PYTHON=/path/to/python3."
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "Python 3.11 or newer is needed; $python is $("$python" -V 2>&1). Set PYTHON=/path/to/python3.11."
    if [ ! -x "$PY" ]; then
        say "creating the virtualenv in .venv"
        "$python" -m venv "$VENV" || die "could not create a virtualenv. On Debian/Ubuntu: apt-get install python3-venv"
    fi
    local wanted stamp="$VENV/.requirements.sha256"
    wanted="$(cat requirements/*.txt | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
        say "installing the pinned requirements"
        "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
        "$PY" -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt -c requirements/constraints.txt
        echo "$wanted" >"$stamp"
    fi
}

redis_ensure() {
    local url="${CELERY_BROKER_URL:-redis://127.0.0.1:6379/0}"
    if "$PY" -c "import redis,sys; redis.Redis.from_url('$url', socket_connect_timeout=1).ping()" 2>/dev/null; then
        return
    fi
    if command -v redis-server >/dev/null; then
        say "starting Redis on 127.0.0.1:6379"
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
        for _ in $(seq 50); do
            "$PY" -c "import redis; redis.Redis.from_url('$url').ping()" 2>/dev/null && return
            sleep 0.1
        done
    fi
    die "Redis is not reachable at $url. Install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) and start it, or set CELERY_BROKER_URL to a running Redis."
}

postgres_ensure() {
    if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
        return
    fi
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        say "starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
        for _ in $(seq 50); do
            pg_isready -q -h 127.0.0.1 -p 5432 && return
            sleep 0.2
        done
    fi
    die "PostgreSQL is not reachable on 127.0.0.1:5432. Install it (Debian/Ubuntu: apt-get install postgresql) and start it, with trust auth for user postgres on 127.0.0.1, or set DATABASE_URL."
}

rabbitmq_ensure() {
    # The broker tests also run the service on RabbitMQ (tests/e2e/test_rabbitmq.py).
    local address="${TEST_RABBITMQ_ADDRESS:-guest:guest@127.0.0.1:5672}"
    local port="${address##*:}"
    rabbitmq_up() { "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $port), timeout=1).close()" 2>/dev/null; }
    rabbitmq_up && return
    if ! command -v rabbitmq-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing RabbitMQ for the broker tests (apt-get install rabbitmq-server)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q rabbitmq-server >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q rabbitmq-server >/dev/null; } \
            || die "apt-get could not install rabbitmq-server; install it by hand (apt-get install rabbitmq-server)."
    fi
    if command -v rabbitmq-server >/dev/null; then
        say "starting RabbitMQ on 127.0.0.1:$port"
        rabbitmq-server -detached >/dev/null 2>&1 || true
        for _ in $(seq 120); do
            rabbitmq_up && return
            sleep 0.5
        done
    fi
    die "RabbitMQ is not reachable on 127.0.0.1:$port. Install and start it (Debian/Ubuntu: apt-get install rabbitmq-server; then rabbitmq-server -detached), or set TEST_RABBITMQ_ADDRESS=user:password@host:port."
}

database_create() {
    # Create the database named in DATABASE_URL if it does not exist yet.
    "$PY" - <<'PYEOF'
import os, sys
import psycopg
from urllib.parse import urlparse
url = urlparse(os.environ["DATABASE_URL"])
name = url.path.lstrip("/")
admin = url._replace(path="/postgres").geturl()
try:
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
        if not conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone():
            conn.execute(f'create database "{name}"')
except psycopg.OperationalError as error:
    sys.exit(f"error: cannot connect to PostgreSQL at {url.hostname}:{url.port}: {error}".strip())
PYEOF
}

sandbox_credentials() {
    # The sandbox's stand-in provider credentials, unless real ones are set.
    export POSTMARK_SERVER_TOKEN="${POSTMARK_SERVER_TOKEN:-sandbox-token}"
    export ANYMAIL_WEBHOOK_SECRET="${ANYMAIL_WEBHOOK_SECRET:-sandbox:sandbox-webhook-secret}"
    export TWILIO_ACCOUNT_SID="${TWILIO_ACCOUNT_SID:-ACsandbox00000000000000000000000000}"
    export TWILIO_AUTH_TOKEN="${TWILIO_AUTH_TOKEN:-sandbox-twilio-auth-token}"
    export TWILIO_FROM_NUMBER="${TWILIO_FROM_NUMBER:-+15005550006}"
    export FCM_PROJECT_ID="${FCM_PROJECT_ID:-notify-sandbox}"
}

load_run_prepare() {
    # The environment, services and database of a load run through the whole pipeline (bench,
    # soak). $1 names the run: its database is notify_$1 unless <RUN>_DATABASE_URL is set; $2 is
    # its Redis database unless <RUN>_BROKER_URL is set. Redis' database is emptied.
    local run="$1" upper
    upper="$(echo "$1" | tr '[:lower:]' '[:upper:]')"
    local database_url="${upper}_DATABASE_URL" broker_url="${upper}_BROKER_URL"
    export DJANGO_SECRET_KEY="${DJANGO_SECRET_KEY:-bench-only-secret-key}"
    export NOTIFY_ENCRYPTION_KEYS="${NOTIFY_ENCRYPTION_KEYS:-YmVuY2gtb25seS1pbnNlY3VyZS1mZXJuZXQta2V5Li4=}"
    export DATABASE_URL="${!database_url:-postgres://postgres@127.0.0.1:5432/notify_$run}"
    export CELERY_BROKER_URL="${!broker_url:-redis://127.0.0.1:6379/$2}"
    export NOTIFY_DEMO_API_KEY="${NOTIFY_DEMO_API_KEY:-ntf_bench_0123456789abcdefBENCH}"
    # The sandbox's published credentials are allowed only with DEBUG on. Its cost here is
    # Django's log of the last 9000 queries per connection.
    export DJANGO_DEBUG=1
    sandbox_credentials
    # The metrics of this run's processes (prometheus-client's multiprocess mode), from zero.
    export PROMETHEUS_MULTIPROC_DIR="$ROOT/var/metrics-$run"
    rm -rf "$PROMETHEUS_MULTIPROC_DIR"

    venv_ensure
    postgres_ensure
    redis_ensure
    database_create
    "$PY" manage.py migrate --no-input -v 0
    vapid_key_ensure
    "$PY" -c "import redis; redis.Redis.from_url('$CELERY_BROKER_URL').flushdb()"
}

vapid_key_ensure() {
    # A VAPID key for web push, made by the project's own command; kept in $1 when given,
    # so that browsers that subscribed stay subscribed across runs.
    [ -n "${WEBPUSH_VAPID_PRIVATE_KEY:-}" ] && return
    local keys
    if [ -n "${1:-}" ]; then
        [ -s "$1" ] || "$PY" manage.py vapid_keys >"$1"
        keys="$(cat "$1")"
    else
        keys="$("$PY" manage.py vapid_keys)"
    fi
    export WEBPUSH_VAPID_PRIVATE_KEY="$(echo "$keys" | sed -n 's/^WEBPUSH_VAPID_PRIVATE_KEY=//p')"
}

chromium_ensure() {
    # The browser tests drive Debian's Chromium through Playwright (which cannot download a
    # browser here). As root on Debian it is installed; otherwise say how, and go on: only
    # the browser tests need it, and they fail with the same advice.
    [ -x /usr/bin/chromium ] && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing Chromium for the browser tests (apt-get install chromium)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
            || die "apt-get could not install chromium; install it by hand (apt-get install chromium)."
        return
    fi
    printf '\033[33mwarning:\033[0m the browser tests need Chromium at /usr/bin/chromium. Install it: sudo apt-get install chromium\n' >&2
}
