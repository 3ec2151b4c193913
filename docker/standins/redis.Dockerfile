# A local stand-in for redis:7, from Debian bookworm's redis-server (7.0): `redis-server` with
# arguments, `redis-cli`, data in /data, run as the redis user.
FROM notify-standin-base:bookworm
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
EXPOSE 6379
LABEL org.opencontainers.image.description="Local stand-in for redis:7, built from Debian bookworm packages"
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
