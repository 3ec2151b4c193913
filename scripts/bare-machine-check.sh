#!/usr/bin/env bash
# The two commands on a bare machine: a minimal Debian bookworm (python3, python3-venv, git and
# make; no Redis, no PostgreSQL) gets a clean clone of the repository's committed HEAD and runs
# `make run` until /readyz answers, then `make test` with a few tests that use PostgreSQL, Redis,
# RabbitMQ and Celery workers. Each command must install what it misses.
#
# The machine is a Debian root in network, mount and PID namespaces of its own: its loopback is
# private (this machine's PostgreSQL and Redis are out of its sight), its only way out is a
# proxy to the package registries (scripts/registry_proxy.py, on the host end of a veth pair),
# and everything it starts or mounts ends with it. Needs root and debootstrap.
#
#   scripts/bare-machine-check.sh [--rebuild] [--cold] [-- pytest arguments]
#
# --rebuild builds the Debian root again (kept in var/bare-machine/root); --cold also starts
# without the downloaded packages and wheels kept from earlier runs (var/bare-machine/cache).
# The output is kept in var/bare-machine/last-run.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$ROOT/var/bare-machine"
BASE="$WORK/root"
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
PACKAGES=python3,python3-venv,git,make
# The veth pair's /30: the host end is .1 (the proxy), the machine's end .2.
SUBNET="${BARE_MACHINE_SUBNET:-10.201.16}"
PROXY="http://$SUBNET.1:3128"
TESTS=(
    "tests/e2e/test_delivery_guarantees.py::test_an_event_is_delivered_and_the_providers_feedback_recorded"
    "tests/e2e/test_delivery_guarantees.py::test_a_redis_flush_mid_run_still_completes_every_delivery"
    "tests/e2e/test_rabbitmq.py::test_a_worker_killed_mid_batch_on_rabbitmq_loses_and_duplicates_nothing"
    "tests/test_setup_scripts.py"
)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

if [ "${1:-}" = --inside ]; then
    # Second stage, in the new namespaces: mount the machine, then run the commands in it.
    MERGED="$2" UPPER="$3"
    shift 3
    # What the machine writes stays in memory, and goes with the mount namespace.
    mount -t tmpfs -o mode=755 machine "$UPPER"
    mkdir -p "$UPPER/upper" "$UPPER/work" "$MERGED"
    mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$UPPER/upper,workdir=$UPPER/work" "$MERGED"
    mount -t proc proc "$MERGED/proc"
    mount -t sysfs sysfs "$MERGED/sys" 2>/dev/null || true
    mount -t tmpfs -o mode=1777 tmp "$MERGED/tmp"
    mount -t tmpfs -o mode=755 dev "$MERGED/dev"
    for node in null zero full random urandom tty; do
        touch "$MERGED/dev/$node"
        mount --bind "/dev/$node" "$MERGED/dev/$node"
    done
    mkdir "$MERGED/dev/pts" "$MERGED/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666 devpts "$MERGED/dev/pts"
    mount -t tmpfs -o mode=1777 shm "$MERGED/dev/shm"
    ln -s pts/ptmx "$MERGED/dev/ptmx"
    ln -s /proc/self/fd "$MERGED/dev/fd"
    for cache in apt pip; do
        [ -d "$WORK/cache/$cache" ] || continue
        target="$MERGED/var/cache/apt/archives"
        [ "$cache" = pip ] && target="$MERGED/root/.cache/pip"
        mkdir -p "$target"
        mount --bind "$WORK/cache/$cache" "$target"
    done
    # The way out: apt and pip through the proxy; pip trusts the same authorities as this machine's.
    cat >"$MERGED/etc/apt/apt.conf.d/01registry-proxy" <<EOF
Acquire::http::Proxy "$PROXY";
Acquire::https::Proxy "$PROXY";
Acquire::http::Pipeline-Depth "0";
Binary::apt::APT::Keep-Downloaded-Packages "true";
EOF
    cp "$CA_BUNDLE" "$MERGED/etc/registry-ca.crt"
    printf '[global]\nproxy = %s\ncert = /etc/registry-ca.crt\n' "$PROXY" >"$MERGED/etc/pip.conf"
    git clone --quiet "$ROOT" "$MERGED/root/notify"
    # Its root becomes this mount namespace's root, as in a container (a chroot could not make
    # user namespaces, which the set-up tests use); this machine's file system is let go.
    mkdir -p "$MERGED/.host"
    cd "$MERGED"
    pivot_root . .host
    cd /
    umount -l /.host
    rmdir /.host
    exec /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TERM=dumb bash -s -- "$@" <<'MACHINE'
set -euo pipefail
cd /root/notify
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
for tool in redis-server psql pg_ctlcluster rabbitmq-server curl chromium; do
    ! command -v "$tool" >/dev/null || { echo "the machine is not bare: $tool is installed"; exit 1; }
done
python3 -c "import socket; socket.create_connection(('127.0.0.1', 5432), timeout=1)" 2>/dev/null \
    && { echo "the machine sees a PostgreSQL on 127.0.0.1:5432"; exit 1; }
say "bare machine: $(. /etc/os-release; echo "$PRETTY_NAME"), $(python3 -V); git HEAD $(git rev-parse --short HEAD)"

started=$(date +%s)
say "make run, until /readyz answers"
setsid make run >/tmp/run.log 2>&1 &
run_pid=$!
ready=""
for _ in $(seq 900); do
    if ready="$(curl -sf http://127.0.0.1:8000/readyz 2>/dev/null)"; then break; fi
    kill -0 "$run_pid" 2>/dev/null || break
    ready=""
    sleep 1
done
cat /tmp/run.log
kill -TERM -- "-$run_pid" 2>/dev/null || true
wait "$run_pid" 2>/dev/null || true
[ -n "$ready" ] || { echo "make run: /readyz did not answer"; exit 1; }
echo "/readyz: $ready"
say "make run answered /readyz after $(($(date +%s) - started)) s"

started=$(date +%s)
say "make test ARGS=\"$*\""
make test ARGS="$*"
say "make test passed after $(($(date +%s) - started)) s"
MACHINE
fi

[ "$(id -u)" = 0 ] || die "the check builds a machine in namespaces of its own, which needs root: sudo $0"
for tool in ip unshare pivot_root; do command -v "$tool" >/dev/null || die "the check needs $tool (apt-get install iproute2 util-linux)."; done
if ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || die "the check needs debootstrap, which builds the Debian root."
    say "installing debootstrap (apt-get install debootstrap)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
fi
ip -o addr | grep " $SUBNET\." >/dev/null && die "$SUBNET.0/30 is in use here; set BARE_MACHINE_SUBNET to another a.b.c prefix."

REBUILD=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rebuild) REBUILD=1 ;;
        --cold) REBUILD=1; rm -rf "$WORK/cache" ;;
        --) shift; break ;;
        *) die "unknown option $1. Usage: $0 [--rebuild] [--cold] [-- pytest arguments]" ;;
    esac
    shift
done
[ $# -gt 0 ] || set -- "${TESTS[@]}"

mkdir -p "$WORK/cache/apt/partial" "$WORK/cache/pip"
exec > >(tee "$WORK/last-run.log") 2>&1
STARTED=$(date +%s)

STAMP="$SUITE $MIRROR $PACKAGES"
if [ "$REBUILD" = 1 ] || [ "$(cat "$BASE.stamp" 2>/dev/null)" != "$STAMP" ]; then
    say "building a Debian $SUITE root with $PACKAGES only"
    rm -rf "$BASE" "$BASE.building" "$BASE.stamp"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$BASE.building" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $WORK/debootstrap.log"
    # What any Debian machine has besides: its package sources, and a name for loopback.
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
        "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" >"$BASE.building/etc/apt/sources.list"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$BASE.building/etc/hosts"
    mv "$BASE.building" "$BASE"
    echo "$STAMP" >"$BASE.stamp"
    say "built in $(($(date +%s) - STARTED)) s"
else
    say "using the Debian root built before (--rebuild builds it again)"
fi

NAMESPACE="notify-bare-$$"
HOST_END="nb$$h"
RUN="$WORK/run-$$"
PROXY_PID=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null
    ip link del "$HOST_END" 2>/dev/null || true
    ip netns del "$NAMESPACE" 2>/dev/null || true
    rm -rf "$RUN"
    say "wall time: $(($(date +%s) - STARTED)) s; output in ${WORK#"$ROOT"/}/last-run.log"
    exit "$status"
}
trap cleanup EXIT INT TERM

ip netns add "$NAMESPACE"
ip link add "$HOST_END" type veth peer name eth0 netns "$NAMESPACE"
ip addr add "$SUBNET.1/30" dev "$HOST_END"
ip link set "$HOST_END" up
ip -n "$NAMESPACE" link set lo up
ip -n "$NAMESPACE" addr add "$SUBNET.2/30" dev eth0
ip -n "$NAMESPACE" link set eth0 up

python3 "$ROOT/scripts/registry_proxy.py" --listen "$SUBNET.1:3128" 2>"$WORK/proxy.log" &
PROXY_PID=$!
for _ in $(seq 50); do
    python3 -c "import socket; socket.create_connection(('$SUBNET.1', 3128), timeout=1)" 2>/dev/null && break
    sleep 0.1
done

CA_BUNDLE="${PIP_CERT:-$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)')}"
export CA_BUNDLE
say "the machine: namespace $NAMESPACE, $SUBNET.2, out only through $PROXY"
# PID 1 of the new PID namespace is the machine's shell: when it ends, all it started ends, and
# the mount namespace with the machine's mounts goes with it.
mkdir -p "$RUN"
ip netns exec "$NAMESPACE" unshare --mount --pid --fork --kill-child --propagation private \
    bash "$0" --inside "$RUN/merged" "$RUN" "$@"
say "bare machine check passed; the proxy forwarded $(grep -c '^GET\|^CONNECT' "$WORK/proxy.log") requests and tunnels to the registries, refused $(grep -c '^refused' "$WORK/proxy.log" || true)"
