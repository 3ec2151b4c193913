#!/usr/bin/env bash
# Build the images, start the whole compose stack with the demo (sandbox) on the host's
# loopback, send one notification on every channel, wait until each is delivered or sent,
# and tear everything down, containers and volumes, also when something fails.
#   scripts/compose-smoke.sh        (or: make compose-smoke)
# Base images missing and no registry reachable: local stand-ins are built from Debian
# packages first (scripts/compose-standins.sh). Needs Docker, Compose (v2 plugin or v1) and
# python3; the ports are docker/compose.hostnet.yaml's (61432, 61379, 61800-61801, 61825).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PROJECT="${NOTIFY_SMOKE_PROJECT:-notify-smoke}"
WEB=http://127.0.0.1:61800
SANDBOX=http://127.0.0.1:61825
UP_TIMEOUT="${NOTIFY_SMOKE_UP_TIMEOUT:-600}"
BASE_IMAGES=(python:3.11-slim postgres:15 redis:7)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 is needed to drive the smoke test: apt-get install python3"
command -v docker >/dev/null || die "Docker is missing. On Debian: apt-get install docker.io docker-compose, then start dockerd."
docker info >/dev/null 2>&1 \
    || die "the Docker daemon does not answer. Start it (systemctl start docker, or: dockerd --iptables=false --bridge=none &) and run this again."
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    die "Docker Compose is missing. On Debian: apt-get install docker-compose (or install the compose plugin)."
fi
FILES=(--env-file docker/demo.env -f docker/compose.yaml -f docker/compose.demo.yaml -f docker/compose.hostnet.yaml)
for port in 61432 61379 61800 61801 61825; do
    if python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $port)) != 0)"; then
        die "port $port is in use on this machine; docker/compose.hostnet.yaml needs it. Stop what uses it (a stack left running: ${COMPOSE[*]} -p $PROJECT ${FILES[*]} down -v)."
    fi
done

STARTED=$SECONDS
RENDERED=""
teardown() {
    local status=$?
    trap - EXIT INT TERM
    if [ -s "$RENDERED" ]; then
        if [ "$status" != 0 ]; then
            say "failed: the services' state and their last log lines"
            "${COMPOSE[@]}" ps || true
            "${COMPOSE[@]}" logs --no-color --tail 30 || true
        fi
        say "tearing down (containers and volumes)"
        "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    rm -f "$RENDERED"
    say "$([ "$status" = 0 ] && echo passed || echo FAILED) in $((SECONDS - STARTED)) s"
    exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# The stack as one file with the published ports left out: they mean nothing on the host's
# network, and Compose v1 refuses them there, while an override file can only add to a list.
RENDERED="$(mktemp /tmp/notify-compose-smoke.XXXXXX.yaml)"
"${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" config \
    | awk '/^    ports:$/ {skip = 1; next} skip && (/^     / || /^    - /) {next} {skip = 0; print}' >"$RENDERED" \
    || { : >"$RENDERED"; die "docker compose could not read the compose files (above)."; }
COMPOSE+=(-p "$PROJECT" -f "$RENDERED")

for image in "${BASE_IMAGES[@]}"; do
    docker image inspect "$image" >/dev/null 2>&1 && continue
    say "pulling $image"
    if ! timeout 120 docker pull -q "$image" >/dev/null 2>&1; then
        say "$image cannot be pulled (no registry reachable): building a local stand-in"
        bash scripts/compose-standins.sh "$image"
    fi
done

say "building the images"
"${COMPOSE[@]}" build -q

say "starting the stack"
"${COMPOSE[@]}" up -d

# Up: the one-shot migrate step exited 0 and every other service reports healthy.
say "waiting until every service is healthy (at most $UP_TIMEOUT s)"
deadline=$((SECONDS + UP_TIMEOUT))
while :; do
    pending=()
    for id in $("${COMPOSE[@]}" ps -q); do
        read -r name state health exit_code < <(docker inspect -f \
            '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}}' "$id")
        case "$name" in
            *migrate*)
                [ "$state" = exited ] && [ "$exit_code" != 0 ] && die "the migrate step failed (exit $exit_code)"
                [ "$state" = exited ] || pending+=("${name#/}:$state")
                ;;
            *)
                [ "$state" = exited ] && die "${name#/} stopped (exit $exit_code)"
                [ "$health" = healthy ] || pending+=("${name#/}:$health")
                ;;
        esac
    done
    [ ${#pending[@]} = 0 ] && break
    [ "$SECONDS" -ge "$deadline" ] && die "not healthy after $UP_TIMEOUT s: ${pending[*]}"
    sleep 2
done
say "healthy after $((SECONDS - STARTED)) s:"
"${COMPOSE[@]}" ps

say "sending one notification on every channel"
python3 scripts/compose_smoke.py --web "$WEB" --sandbox "$SANDBOX"
