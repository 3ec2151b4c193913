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

# Missing system packages. As root on Debian or Ubuntu they are installed with apt-get, as
# Chromium is for the browser tests; elsewhere the error names the one command that installs them.
package_manager() {
    if [ "$(uname -s)" = Darwin ]; then echo brew; return; fi
    local ids
    ids="$( . /etc/os-release 2>/dev/null; echo "${ID:-} ${ID_LIKE:-}")"
    case " $ids " in
        *" debian "* | *" ubuntu "*) echo apt-get ;;
        *" fedora "* | *" rhel "* | *" centos "*) echo dnf ;;
        *" alpine "*) echo apk ;;
        *" arch "*) echo pacman ;;
        *" suse "* | *" opensuse "*) echo zypper ;;
        *) echo unknown ;;
    esac
}

package_name() {
    # The package that provides part $1 (redis, postgresql, rabbitmq, chromium, curl, iproute2) for manager $2.
    case "$1:$2" in
        iproute2:dnf) echo iproute ;;
        redis:apt-get) echo redis-server ;;
        postgresql:brew) echo postgresql@16 ;;
        postgresql:dnf | postgresql:zypper) echo postgresql-server ;;
        rabbitmq:apt-get | rabbitmq:dnf | rabbitmq:apk) echo rabbitmq-server ;;
        *) echo "$1" ;;
    esac
}

install_command() {
    # The one command that installs part $1 on this machine.
    local manager sudo="sudo "
    manager="$(package_manager)"
    [ "$(id -u)" = 0 ] && sudo=""
    local package
    package="$(package_name "$1" "$manager")"
    case "$manager" in
        apt-get) echo "${sudo}apt-get install -y $package" ;;
        dnf) echo "${sudo}dnf install -y $package" ;;
        apk) echo "${sudo}apk add $package" ;;
        pacman) echo "${sudo}pacman -S --noconfirm $package" ;;
        zypper) echo "${sudo}zypper install -y $package" ;;
        brew) echo "brew install $package" ;;
        *) echo "install $1 with your system's package manager" ;;
    esac
}

can_apt_install() {
    [ "$(id -u)" = 0 ] && [ "$(package_manager)" = apt-get ] && command -v apt-get >/dev/null
}

apt_install() {
    # Install Debian packages quietly; the package lists are refreshed only when they are stale.
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$@" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; } \
        || die "apt-get could not install $*; install it by hand (apt-get install $*)."
}

package_ensure() {
    # Install part $1, needed for $2, or stop with the command that installs it.
    local package
    package="$(package_name "$1" apt-get)"
    if can_apt_install; then
        say "installing $1 for $2 (apt-get install $package)"
        apt_install "$package"
        return
    fi
    die "$1 is needed for $2 and is not installed. Install it: $(install_command "$1")"
}

url_address() {
    # "host port" of URL $1 ($2: the default port); a URL without a host means this machine.
    "$PY" -c 'import sys; from urllib.parse import urlsplit; u = urlsplit(sys.argv[1]); print(u.hostname or "127.0.0.1", u.port or sys.argv[2])' "$1" "$2"
}

is_loopback() { case "$1" in 127.* | localhost | ::1) return 0 ;; *) return 1 ;; esac; }

port_open() {
    "$PY" -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()' "$1" "$2" 2>/dev/null
}

curl_ensure() {
    # The run command checks its own endpoints with curl, and prints curl lines to try.
    command -v curl >/dev/null || package_ensure curl "the run command"
}

redis_ensure() {
    local url="${CELERY_BROKER_URL:-redis://127.0.0.1:6379/0}" host port
    redis_up() { "$PY" -c "import redis; redis.Redis.from_url('$url', socket_connect_timeout=1).ping()" 2>/dev/null; }
    redis_up && return
    read -r host port <<<"$(url_address "$url" 6379)"
    is_loopback "$host" || die "Redis is not reachable at $url. Start it there, or set CELERY_BROKER_URL to a running Redis."
    if ! command -v redis-server >/dev/null; then
        package_ensure redis "the broker, caps and limits"
        # The package may have started its own server on the default port.
        redis_up && return
    fi
    say "starting Redis on 127.0.0.1:$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no >/dev/null || true
    for _ in $(seq 50); do
        redis_up && return
        sleep 0.1
    done
    die "Redis is not reachable at $url, and redis-server did not start on port $port. Start it, or set CELERY_BROKER_URL to a running Redis."
}

postgres_ensure() {
    local url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/notify}" host port user version installed=0
    read -r host port <<<"$(url_address "$url" 5432)"
    port_open "$host" "$port" && return
    is_loopback "$host" || die "PostgreSQL is not reachable at $host:$port. Start it there, or set DATABASE_URL."
    if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || ! command -v pg_ctlcluster >/dev/null; then
        # Installed the way of another system: starting it is that system's business.
        if command -v postgres >/dev/null || command -v pg_ctl >/dev/null; then
            die "PostgreSQL is installed but not running on port $port. Start it, with trust auth for user postgres on 127.0.0.1, or set DATABASE_URL."
        fi
        package_ensure postgresql "the database"
        installed=1
    fi
    version="$(ls /usr/lib/postgresql | sort -V | tail -1)"
    [ "$(id -u)" = 0 ] || die "PostgreSQL $version is installed but not running on port $port. Start it: sudo pg_ctlcluster $version main start"
    [ -d "/etc/postgresql/$version/main" ] || pg_createcluster "$version" main --port "$port" >/dev/null
    if [ "$installed" = 1 ]; then
        # A new cluster, ours to set up: its superuser logs in over loopback without a password, as
        # the default DATABASE_URL does (a development machine's database, never a server's).
        user="$("$PY" -c 'import sys; from urllib.parse import urlsplit; print(urlsplit(sys.argv[1]).username or "postgres")' "$url")"
        local hba="/etc/postgresql/$version/main/pg_hba.conf"
        { printf '# The development database: %s logs in over loopback without a password.\n' "$user"
          printf 'host all %s 127.0.0.1/32 trust\nhost all %s ::1/128 trust\n' "$user" "$user"
          cat "$hba"; } >"$hba.new" && mv "$hba.new" "$hba" && chown postgres:postgres "$hba"
    fi
    if pg_ctlcluster "$version" main status >/dev/null 2>&1; then
        pg_ctlcluster "$version" main reload >/dev/null
    else
        say "starting PostgreSQL $version on port $port"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    fi
    for _ in $(seq 50); do
        port_open "$host" "$port" && break
        sleep 0.2
    done
    port_open "$host" "$port" || die "PostgreSQL $version did not start on port $port; see /var/log/postgresql/. Or set DATABASE_URL to a running PostgreSQL."
    if [ "$installed" = 1 ] && [ "$user" != postgres ]; then
        runuser -u postgres -- psql -q -p "$port" -c "create role \"$user\" superuser login" >/dev/null
    fi
    return 0
}

rabbitmq_ensure() {
    # The broker tests also run the service on RabbitMQ (tests/e2e/test_rabbitmq.py).
    local address="${TEST_RABBITMQ_ADDRESS:-guest:guest@127.0.0.1:5672}"
    local port="${address##*:}"
    port_open 127.0.0.1 "$port" && return
    command -v rabbitmq-server >/dev/null || package_ensure rabbitmq "the broker tests"
    say "starting RabbitMQ on 127.0.0.1:$port"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 120); do
        port_open 127.0.0.1 "$port" && return
        sleep 0.5
    done
    die "RabbitMQ is not reachable on 127.0.0.1:$port. Start it (rabbitmq-server -detached), or set TEST_RABBITMQ_ADDRESS=user:password@host:port."
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
    advice = ""
    if "password" in str(error):
        # A packaged PostgreSQL asks for passwords over TCP; the default URL has none.
        advice = (f"\nLet {url.username} log in over loopback: put 'host all {url.username} 127.0.0.1/32 trust'"
                  " first in pg_hba.conf and reload PostgreSQL, or give DATABASE_URL a password.")
    sys.exit(f"error: cannot connect to PostgreSQL at {url.hostname}:{url.port}: {str(error).strip()}{advice}")
except psycopg.Error as error:
    sys.exit(f"error: cannot create the database {name} as {url.username}: {str(error).strip()}")
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

optional_package_ensure() {
    # Part $1, which only $2 need: installed as root on Debian; otherwise a warning says what
    # $2 miss ($3) and how to install it, and the set-up goes on (those tests say so too).
    if can_apt_install; then
        package_ensure "$1" "$2"
        return
    fi
    printf '\033[33mwarning:\033[0m %s need %s. Install it: %s\n' "$2" "$3" "$(install_command "$1")" >&2
}

iproute2_ensure() {
    # The multi-host test builds its hosts with iproute2's `ip` (as root); it skips without it.
    command -v ip >/dev/null || optional_package_ensure iproute2 "the multi-host tests" "iproute2's ip"
}

chromium_ensure() {
    # The browser tests drive Debian's Chromium through Playwright (which cannot download a
    # browser here). As root on Debian it is installed; otherwise say how, and go on: only
    # the browser tests need it, and they fail with the same advice.
    [ -x /usr/bin/chromium ] || optional_package_ensure chromium "the browser tests" "Chromium at /usr/bin/chromium"
}
