#!/bin/sh
# As the official image's entrypoint: flags alone mean redis-server's, and the server runs
# as the redis user with its data in /data.
set -e
case "$1" in -*|*.conf) set -- redis-server "$@" ;; esac
if [ "$1" = redis-server ]; then
    shift
    # The official image is built with protected mode off, so that other containers may
    # connect without a password; later arguments may still turn it on.
    set -- redis-server --protected-mode no "$@"
    if [ "$(id -u)" = 0 ]; then
        chown -R redis:redis /data
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
