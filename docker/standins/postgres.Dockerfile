# A local stand-in for postgres:15, from Debian bookworm's postgresql-15: the server and its
# tools on the PATH, a cluster made at first start from POSTGRES_USER, POSTGRES_PASSWORD and
# POSTGRES_DB in PGDATA (a volume), served as the postgres user on every address.
FROM notify-standin-base:bookworm
RUN mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf \
    && apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
LABEL org.opencontainers.image.description="Local stand-in for postgres:15, built from Debian bookworm packages"
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
