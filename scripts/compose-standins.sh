#!/usr/bin/env bash
# Build local stand-ins for the compose stack's base images (python:3.11-slim, postgres:15,
# redis:7) from Debian bookworm packages, for a machine that reaches no image registry.
# Each is tagged with the official name, so docker/Dockerfile and docker/compose.yaml run
# unchanged; docker/standins/ says how each behaves. Needs root, debootstrap and a Debian mirror.
#   scripts/compose-standins.sh [python:3.11-slim] [postgres:15] [redis:7]   (default: all three)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STANDINS="$ROOT/docker/standins"
BASE=notify-standin-base:bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

base_ensure() {
    # A minimal bookworm root file system, imported as an image the stand-ins start from.
    docker image inspect "$BASE" >/dev/null 2>&1 && return
    [ "$(id -u)" = 0 ] || die "debootstrap needs root: run this as root (sudo $0)."
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
    local rootfs
    rootfs="$(mktemp -d /var/tmp/notify-standin-rootfs.XXXXXX)"
    # shellcheck disable=SC2064  # the path is fixed now, on purpose
    trap "rm -rf '$rootfs'" EXIT
    say "debootstrap: a minimal Debian bookworm from $MIRROR"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap failed (above)."; }
    rm -f "$rootfs.log"
    cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SOURCES
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # The certificate authorities this machine added itself (a TLS-inspecting proxy's, say),
    # so that the stand-ins reach PyPI as the host does; ca-certificates takes them in.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        mkdir -p "$rootfs/usr/local/share/ca-certificates"
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    fi
    tar -C "$rootfs" --numeric-owner -c . \
        | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
}

standin_build() {
    local image="$1" recipe
    case "$image" in
        python:3.11-slim) recipe=python ;;
        postgres:15) recipe=postgres ;;
        redis:7) recipe=redis ;;
        *) die "no stand-in for $image; there are python:3.11-slim, postgres:15 and redis:7." ;;
    esac
    base_ensure
    say "building a stand-in for $image from Debian packages"
    # Host networking: the build reaches the Debian mirror whatever the daemon's bridge is.
    docker build --network host -q -t "$image" -f "$STANDINS/$recipe.Dockerfile" "$STANDINS" >/dev/null
}

[ $# -gt 0 ] || set -- python:3.11-slim postgres:15 redis:7
for image in "$@"; do
    standin_build "$image"
done
