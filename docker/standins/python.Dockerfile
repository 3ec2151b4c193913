# A local stand-in for python:3.11-slim, from Debian bookworm's python3.11: `python` and `pip`
# on the PATH, pip free to install into the system (as in the official image), C.UTF-8.
FROM notify-standin-base:bookworm
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3.11 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python3 \
    && ln -s /usr/bin/pip3 /usr/local/bin/pip
ENV LANG=C.UTF-8
LABEL org.opencontainers.image.description="Local stand-in for python:3.11-slim, built from Debian bookworm packages"
CMD ["python3"]
