"""Settings. Everything that varies between deployments is read from the environment here,
and only here. A missing required setting fails loudly at start-up."""

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured

from notify.observability.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()

SECRET_KEY = env("DJANGO_SECRET_KEY")
# Rotating the key: put the old one here (comma-separated, newest first) and a new one in
# DJANGO_SECRET_KEY. Everything is signed with the new key; signed links and sessions made
# under an old one keep working until it is removed from this list.
SECRET_KEY_FALLBACKS = [key for key in env.list("DJANGO_SECRET_KEY_FALLBACKS", default=[]) if key]
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# Outside DEBUG the service is served over https: cookies only travel on it, and browsers
# are told to use nothing else. Behind a TLS-terminating proxy, name the header it sets
# (e.g. "HTTP_X_FORWARDED_PROTO,https"); unset means requests reach Django directly.
if not DEBUG:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=365 * 86400)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
    SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=False)
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=False)
    _proxy_ssl_header = env.list("DJANGO_SECURE_PROXY_SSL_HEADER", default=[])
    if _proxy_ssl_header:
        if len(_proxy_ssl_header) != 2 or not _proxy_ssl_header[0].startswith("HTTP_"):
            raise ImproperlyConfigured(
                "DJANGO_SECURE_PROXY_SSL_HEADER is the header the proxy sets and its https value, "
                'e.g. "HTTP_X_FORWARDED_PROTO,https".'
            )
        SECURE_PROXY_SSL_HEADER = (_proxy_ssl_header[0], _proxy_ssl_header[1])

INSTALLED_APPS = [
    "apps.tenants.apps.NotifyAdminConfig",  # Django's admin on the control panel's site
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "anymail",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "axes",
    "apps.tenants",
    "apps.recipients",
    "apps.catalog",
    "apps.deliveries",
    "apps.audiences",
    "apps.inbox",
    "apps.api",
    "apps.ops",
    "apps.webhooks",
]

MIDDLEWARE = [
    # Before all others, so that every response carries the request's X-Request-ID.
    "notify.observability.logs.CorrelationIdMiddleware",
    # Next: probes call the container's own address, which host validation would refuse.
    "apps.api.health.ProbeMiddleware",
    # Answers /metrics (ahead of host validation, as the probes), and counts every request.
    "apps.api.metrics.MetricsMiddleware",
    "apps.api.middleware.WebPoolMiddleware",
    "apps.api.middleware.RequestBodyLimitMiddleware",
    "apps.api.middleware.DatabaseUnavailableMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    # After authentication: audit entries name the request's staff user or API key.
    "apps.ops.audit.AuditActorMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into its lockout response.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Without DATABASE_URL the demo runs on an embedded SQLite file; tests and benchmarks
# always set a PostgreSQL URL.
DATABASES = {"default": env.db_url("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'var' / 'demo.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several worker processes write at once: WAL plus IMMEDIATE transactions make
    # SQLite wait for the write lock instead of failing with "database is locked".
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
elif env.bool("DATABASE_POOL", default=False):
    # The ASGI server turns this on (config/asgi.py): it runs each request in a thread context
    # of its own, so a persistent connection would be a new PostgreSQL connection per request,
    # left open until garbage-collected. Its requests share a pool of connections instead.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 2,
        "max_size": env.int("DATABASE_POOL_MAX_SIZE", default=20),
        # How long a request waits for a connection (all in use, or the database unreachable)
        # before it is answered 503 with a Retry-After: shorter than clients wait for an answer.
        "timeout": env.float("DATABASE_POOL_TIMEOUT_SECONDS", default=10.0),
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # a pool and persistent connections do not mix
    # The pool checks a connection before handing it out: one the server dropped (a restart,
    # an idle timeout) is replaced instead of failing the request.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's backend, with timestamps parsed in C (config/postgresql/base.py).
    DATABASES["default"]["ENGINE"] = "config.postgresql"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# --- Admin login --------------------------------------------------------------------------
# The first admin login, made by `manage.py admin_ensure` (the compose stack's migrate step)
# when no user of that name exists yet.
NOTIFY_ADMIN_USERNAME = env("NOTIFY_ADMIN_USERNAME", default="")
NOTIFY_ADMIN_EMAIL = env("NOTIFY_ADMIN_EMAIL", default="")
NOTIFY_ADMIN_PASSWORD = env("NOTIFY_ADMIN_PASSWORD", default="")
# django-axes checks every login first and refuses one for a username from an address after
# too many failures, even with the right password, until the cool-off has passed.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env.int("NOTIFY_ADMIN_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("NOTIFY_ADMIN_LOGIN_COOLOFF_MINUTES", default=15.0))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# Behind reverse proxies the client's address is the one this many proxies from the right of
# X-Forwarded-For; without any, the connection's own address (a client sets the header freely).
NOTIFY_TRUSTED_PROXY_COUNT = env.int("NOTIFY_TRUSTED_PROXY_COUNT", default=0)
if NOTIFY_TRUSTED_PROXY_COUNT:
    AXES_IPWARE_PROXY_COUNT = NOTIFY_TRUSTED_PROXY_COUNT
    AXES_IPWARE_PROXY_ORDER = "right-most"  # the entries our proxies appended, not the client's
    AXES_IPWARE_META_PRECEDENCE_ORDER = ["HTTP_X_FORWARDED_FOR", "REMOTE_ADDR"]
else:
    AXES_IPWARE_META_PRECEDENCE_ORDER = ["REMOTE_ADDR"]
# "required": every staff user verifies a TOTP code to use the admin, and one without a device
# enrols on signing in; "optional": only those who enrolled one.
NOTIFY_ADMIN_2FA = env.str("NOTIFY_ADMIN_2FA", default="optional")
if NOTIFY_ADMIN_2FA not in ("optional", "required"):
    raise ImproperlyConfigured(f"NOTIFY_ADMIN_2FA is 'optional' or 'required', not '{NOTIFY_ADMIN_2FA}'.")
OTP_TOTP_ISSUER = "Notify"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "staticfiles"

# Plain lines by default; "json": one JSON object a line. Either way each line carries the
# request's or task's correlation id and is masked (notify/observability/logs.py).
LOG_FORMAT = env.str("LOG_FORMAT", default="plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT is 'plain' or 'json', not '{LOG_FORMAT}'.")
LOGGING = logging_config(log_format=LOG_FORMAT, level=env("LOG_LEVEL", default="INFO"))

# --- Producer API -----------------------------------------------------------------------
# The most bytes a request body may have, on every path (apps/api/middleware.py).
# "critical": this web process serves only critical events, as its own pool that bulk
# ingest, imports and broadcasts never share (docs/operations.md, "A web pool for critical
# traffic"); "all": everything (the default).
NOTIFY_WEB_POOL = env.str("NOTIFY_WEB_POOL", default="all")
if NOTIFY_WEB_POOL not in ("all", "critical"):
    raise ImproperlyConfigured("NOTIFY_WEB_POOL is 'all' or 'critical'.")
NOTIFY_MAX_REQUEST_BYTES = env.int("NOTIFY_MAX_REQUEST_BYTES", default=256 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = NOTIFY_MAX_REQUEST_BYTES
# Bulk recipient import (POST /api/v1/recipients/import): its own body limit, since a file
# of a million recipients is far over the API's; the upload is streamed, never held whole.
NOTIFY_IMPORT_MAX_BYTES = env.int("NOTIFY_IMPORT_MAX_BYTES", default=1024**3)
# Other limits for paths that need them, by path prefix. A view given more than
# DATA_UPLOAD_MAX_MEMORY_SIZE must read request.stream (Django caps request.body at that size).
NOTIFY_MAX_REQUEST_BYTES_BY_PATH: dict[str, int] = {"/api/v1/recipients/import": NOTIFY_IMPORT_MAX_BYTES}
# Lines a worker validates and upserts in one transaction (with its cursor).
NOTIFY_IMPORT_CHUNK = env.int("NOTIFY_IMPORT_CHUNK", default=20_000)
# Workers that take chunks of one import side by side (each a task on the import queue).
NOTIFY_IMPORT_WORKERS = env.int("NOTIFY_IMPORT_WORKERS", default=2)
# Refused lines listed with their reason per import; the rest are only counted.
NOTIFY_IMPORT_REFUSALS_KEPT = env.int("NOTIFY_IMPORT_REFUSALS_KEPT", default=1000)
# An unfinished import whose worker has not finished a chunk for this long is published again.
NOTIFY_IMPORT_STALL_SECONDS = env.float("NOTIFY_IMPORT_STALL_SECONDS", default=60.0)
# Requests per API key unless the key sets its own, e.g. "200 per second"; empty: no limit.
NOTIFY_API_RATE_LIMIT = env("NOTIFY_API_RATE_LIMIT", default="")
# Events for one recipient, e.g. "30 per minute"; empty: no limit.
NOTIFY_RECIPIENT_RATE_LIMIT = env("NOTIFY_RECIPIENT_RATE_LIMIT", default="")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["apps.tenants.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["apps.api.scopes.HasRequiredScope"],
    "DEFAULT_PARSER_CLASSES": ["apps.api.parsers.JSONParser"],
    "DEFAULT_THROTTLE_CLASSES": ["apps.api.throttling.ApiKeyRateThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "apps.api.schema.ScopedAutoSchema",
    "EXCEPTION_HANDLER": "apps.api.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Notify producer API",
    "DESCRIPTION": "Trigger notifications, manage recipients and follow every delivery.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "apps.api.errors.errors_document"],
    "ENUM_NAME_OVERRIDES": {
        "DeliveryStatusEnum": "apps.deliveries.models.DeliveryStatus",
        "ChannelEnum": "apps.catalog.models.Channel",
        "PriorityEnum": "apps.catalog.models.Priority",
        "NotificationStatusEnum": "apps.deliveries.selectors.NOTIFICATION_STATUSES",
    },
}

# --- Celery -----------------------------------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0")
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "maintenance"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {"visibility_timeout": 3600}
# RabbitMQ as a durable broker (amqp://): every queue a quorum queue, which RabbitMQ keeps on
# disk and replicates, and publisher confirms, so that a task the broker acknowledged survives
# a broker restart. Redis stays for caps, limits, circuits and the inbox's channel layer.
BROKER_IS_AMQP = CELERY_BROKER_URL.startswith(("amqp://", "amqps://", "pyamqp://"))
if BROKER_IS_AMQP:
    CELERY_TASK_DEFAULT_QUEUE_TYPE = "quorum"
    CELERY_TASK_CREATE_MISSING_QUEUE_TYPE = "quorum"
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
# Celery's Django fixup closes the database connection around every task unless this is set,
# so each critical send paid for a new PostgreSQL connection. Workers keep theirs, and check
# it around each task as Django does around a request (config/celery.py).
CELERY_DB_REUSE_MAX = 1_000_000
# How often beat computes the gauges that need the database (notify/observability/gauges.py).
NOTIFY_GAUGES_INTERVAL_SECONDS = env.float("NOTIFY_GAUGES_INTERVAL_SECONDS", default=15.0)
if NOTIFY_GAUGES_INTERVAL_SECONDS < 2:
    raise ImproperlyConfigured("NOTIFY_GAUGES_INTERVAL_SECONDS is at least 2.")
# django-celery-beat's DatabaseScheduler, with a heartbeat for the `beat_health` probe.
CELERY_BEAT_SCHEDULER = "config.beat:HeartbeatScheduler"


def periodic_task(*, task: str, seconds: float, queue: str = "maintenance") -> dict[str, Any]:
    """A beat entry. A run still queued when the next is due (or after 30 s) expires: the
    next run does the same work."""
    return {
        "task": task,
        "schedule": timedelta(seconds=seconds),
        "options": {"queue": queue, "expires": max(seconds, 30.0)},
    }


# Defined in code; django-celery-beat's DatabaseScheduler copies it into its tables.
CELERY_BEAT_SCHEDULE = {
    "notify-sweep": {
        "task": "notify.sweep",
        "schedule": timedelta(seconds=env.float("NOTIFY_SWEEP_INTERVAL_SECONDS", default=5.0)),
        "options": {"queue": "maintenance", "expires": 30},
    },
    "notify-metrics-gauges": {
        "task": "notify.metrics_gauges",
        "schedule": timedelta(seconds=NOTIFY_GAUGES_INTERVAL_SECONDS),
        "options": {"queue": "maintenance", "expires": NOTIFY_GAUGES_INTERVAL_SECONDS},
    },
}

# --- Synthetic canary (notify/observability/canary.py) -----------------------------------
# Every this many seconds a canary notification goes through the whole pipeline on each
# channel whose probe address is set, to the system tenant's probe recipient. 0: off.
NOTIFY_CANARY_INTERVAL_SECONDS = env.float("NOTIFY_CANARY_INTERVAL_SECONDS", default=0.0)
# A run that has not reached its success state by then is late (and the canary alert fires).
NOTIFY_CANARY_DEADLINE_SECONDS = env.float("NOTIFY_CANARY_DEADLINE_SECONDS", default=120.0)
NOTIFY_CANARY_EMAIL = env("NOTIFY_CANARY_EMAIL", default="")
NOTIFY_CANARY_PHONE = env("NOTIFY_CANARY_PHONE", default="")
NOTIFY_CANARY_PUSH_TOKEN = env("NOTIFY_CANARY_PUSH_TOKEN", default="")
# A browser's PushSubscription as JSON: {"endpoint": ..., "keys": {"p256dh": ..., "auth": ...}}.
NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION: dict | None = None
if _canary_subscription := env("NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION", default=""):
    try:
        _subscription = json.loads(_canary_subscription)
        NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION = {
            "endpoint": str(_subscription["endpoint"]),
            "p256dh": str(_subscription["keys"]["p256dh"]),
            "auth": str(_subscription["keys"]["auth"]),
        }
    except (ValueError, TypeError, KeyError) as error:
        raise ImproperlyConfigured(
            "NOTIFY_CANARY_WEBPUSH_SUBSCRIPTION is a browser's PushSubscription as JSON: "
            '{"endpoint": "https://...", "keys": {"p256dh": "...", "auth": "..."}}'
        ) from error
NOTIFY_CANARY_INAPP = env.bool("NOTIFY_CANARY_INAPP", default=False)
# Channels whose provider reports delivery back (webhooks, status callbacks): their canary
# succeeds when delivered; every other channel's when sent.
NOTIFY_CANARY_DELIVERED_CHANNELS = env.list("NOTIFY_CANARY_DELIVERED_CHANNELS", default=["email", "sms"])
# Runs, and the canary's notifications, are kept this long.
NOTIFY_CANARY_KEEP_DAYS = env.float("NOTIFY_CANARY_KEEP_DAYS", default=7.0)
if NOTIFY_CANARY_INTERVAL_SECONDS:
    CELERY_BEAT_SCHEDULE["notify-canary"] = periodic_task(task="notify.canary", seconds=NOTIFY_CANARY_INTERVAL_SECONDS)

# --- Alerts (notify/observability/alerts.py; the rules are kept in the admin) ---------------
# How often beat evaluates the alert rules. 0: never.
NOTIFY_ALERT_INTERVAL_SECONDS = env.float("NOTIFY_ALERT_INTERVAL_SECONDS", default=60.0)
# The operator webhook: each alert is POSTed there as JSON, signed per the Standard Webhooks
# specification with the secret (base64, optionally "whsec_"-prefixed), which must be set
# whenever the URL is (outside DEBUG the service refuses to start without it).
NOTIFY_ALERT_WEBHOOK_URL = env("NOTIFY_ALERT_WEBHOOK_URL", default="")
NOTIFY_ALERT_WEBHOOK_SECRET = env("NOTIFY_ALERT_WEBHOOK_SECRET", default="")
# The webhook passes the outbound guard: https to public addresses only, unless its host is here.
NOTIFY_ALERT_WEBHOOK_ALLOWED_HOSTS = env.list("NOTIFY_ALERT_WEBHOOK_ALLOWED_HOSTS", default=[])
NOTIFY_ALERT_WEBHOOK_TIMEOUT_SECONDS = env.float("NOTIFY_ALERT_WEBHOOK_TIMEOUT_SECONDS", default=5.0)
if NOTIFY_ALERT_INTERVAL_SECONDS:
    CELERY_BEAT_SCHEDULE["notify-alerts"] = periodic_task(task="notify.alerts", seconds=NOTIFY_ALERT_INTERVAL_SECONDS)

# --- Compliance: audit log, data rights, retention (docs/compliance.md) --------------------
# The key of the keyed hash (HMAC-SHA256) an erased person's suppressed addresses are kept as,
# so that they stay suppressed. Required outside DEBUG; changing it forgets those addresses.
NOTIFY_ERASURE_HASH_KEY = env("NOTIFY_ERASURE_HASH_KEY", default="") or (SECRET_KEY if DEBUG else "")
# A person's export lists their newest notifications up to this many (the rest: the
# notifications list, filtered by recipient, page by page).
NOTIFY_EXPORT_MAX_NOTIFICATIONS = env.int("NOTIFY_EXPORT_MAX_NOTIFICATIONS", default=1000)
# How many days a tenant's events, notifications, deliveries, history and inbox items are kept
# when its retention policy says nothing; empty: forever.
NOTIFY_RETENTION_DAYS = env.int("NOTIFY_RETENTION_DAYS", default=None)
# The purge deletes this many notifications (with their deliveries and history) a transaction,
# pausing this long between two, for at most the run's budget; the next run goes on.
NOTIFY_RETENTION_BATCH = env.int("NOTIFY_RETENTION_BATCH", default=1000)
NOTIFY_RETENTION_PAUSE_SECONDS = env.float("NOTIFY_RETENTION_PAUSE_SECONDS", default=0.2)
NOTIFY_RETENTION_RUN_SECONDS = env.float("NOTIFY_RETENTION_RUN_SECONDS", default=240.0)
# How often beat runs the purge. 0: never.
NOTIFY_RETENTION_INTERVAL_SECONDS = env.float("NOTIFY_RETENTION_INTERVAL_SECONDS", default=300.0)
if NOTIFY_RETENTION_INTERVAL_SECONDS:
    CELERY_BEAT_SCHEDULE["notify-retention"] = periodic_task(
        task="notify.retention_purge", seconds=NOTIFY_RETENTION_INTERVAL_SECONDS
    )

# --- Partitioned tables (apps/deliveries/partitions.py) -----------------------------------
# Notifications, deliveries and their history are partitioned by month; beat makes sure this
# month's partitions and the next ones exist, so that rows never wait on a missing partition.
NOTIFY_PARTITION_MONTHS_AHEAD = env.int("NOTIFY_PARTITION_MONTHS_AHEAD", default=3)
NOTIFY_PARTITION_INTERVAL_SECONDS = env.float("NOTIFY_PARTITION_INTERVAL_SECONDS", default=21600.0)
if NOTIFY_PARTITION_INTERVAL_SECONDS:
    CELERY_BEAT_SCHEDULE["notify-partitions"] = periodic_task(
        task="notify.partitions_ensure", seconds=NOTIFY_PARTITION_INTERVAL_SECONDS
    )

# --- Rollups and the dashboard (notify/observability/rollups.py) ---------------------------
# How often beat counts the new delivery history into the per-minute and per-hour rollups.
NOTIFY_ROLLUP_INTERVAL_SECONDS = env.float("NOTIFY_ROLLUP_INTERVAL_SECONDS", default=30.0)
# How far the rollups trail the clock: longer than any transaction that writes delivery history
# takes to commit (and any clock skew between the workers), so that none is skipped.
NOTIFY_ROLLUP_SETTLE_SECONDS = env.float("NOTIFY_ROLLUP_SETTLE_SECONDS", default=60.0)
if NOTIFY_ROLLUP_INTERVAL_SECONDS:
    CELERY_BEAT_SCHEDULE["notify-rollups"] = periodic_task(
        task="notify.rollups", seconds=NOTIFY_ROLLUP_INTERVAL_SECONDS
    )

# --- Delivery engine --------------------------------------------------------------------
NOTIFY_BATCH_SIZE = {
    "critical": 1,
    "normal": env.int("NOTIFY_NORMAL_BATCH_SIZE", default=50),
    "bulk": env.int("NOTIFY_BULK_BATCH_SIZE", default=500),
}
# A claimed delivery whose worker has not recorded an outcome by then is re-queued.
NOTIFY_LEASE_SECONDS = env.float("NOTIFY_LEASE_SECONDS", default=300.0)
# Critical work (one delivery a batch) has a shorter lease: an OTP whose worker died is
# re-queued within this, not the bulk lease. It only needs to outlast one provider request;
# one that lapses mid-request costs a reconciliation, never a duplicate.
NOTIFY_CRITICAL_LEASE_SECONDS = env.float("NOTIFY_CRITICAL_LEASE_SECONDS", default=min(30.0, NOTIFY_LEASE_SECONDS))
# An in-doubt delivery is looked for at its provider no sooner than this after the doubt
# began, since a provider's message search shows a message a little after it took it.
NOTIFY_RECONCILE_AFTER_SECONDS = env.float("NOTIFY_RECONCILE_AFTER_SECONDS", default=10.0)
# A queued delivery published this long ago and still unclaimed is published again.
NOTIFY_REPUBLISH_AFTER_SECONDS = env.float("NOTIFY_REPUBLISH_AFTER_SECONDS", default=120.0)
# Retries due sooner than this ride a Celery countdown; later ones wait in the database
# for the sweeper, because Redis redelivers long ETA tasks after its visibility timeout.
# On RabbitMQ every delay waits in the database: a quorum queue would need the broker's
# delayed-delivery topology for a countdown, and the sweeper already publishes what is due.
NOTIFY_COUNTDOWN_MAX_SECONDS = env.float("NOTIFY_COUNTDOWN_MAX_SECONDS", default=0.0 if BROKER_IS_AMQP else 300.0)
NOTIFY_SWEEP_CHUNK = env.int("NOTIFY_SWEEP_CHUNK", default=5000)
# Broadcast fan-out turns this many recipients into notifications per transaction.
NOTIFY_BROADCAST_CHUNK = env.int("NOTIFY_BROADCAST_CHUNK", default=5000)
# Fan-out tasks a broadcast starts, each planning a chunk at a time: the chunks' statements
# run on that many database connections at once. Worth the maintenance worker's concurrency.
NOTIFY_BROADCAST_FAN_OUT_TASKS = max(1, env.int("NOTIFY_BROADCAST_FAN_OUT_TASKS", default=3))
# A fan-out whose worker has not finished a chunk by then is started again by the sweeper.
NOTIFY_BROADCAST_LEASE_SECONDS = env.float("NOTIFY_BROADCAST_LEASE_SECONDS", default=30.0)
NOTIFY_RETRY_POLICY = {
    channel: {
        "max_attempts": env.int(f"NOTIFY_{channel.upper()}_MAX_ATTEMPTS", default=5),
        "base_seconds": env.float(f"NOTIFY_{channel.upper()}_RETRY_BASE_SECONDS", default=10.0),
        "cap_seconds": env.float(f"NOTIFY_{channel.upper()}_RETRY_CAP_SECONDS", default=3600.0),
    }
    for channel in ("email", "sms", "push", "webpush", "inapp")
}
# Backpressure: past this many task messages waiting in a channel's bulk queue (each holds up
# to a bulk batch of deliveries), new bulk events are refused with a Retry-After ("reject")
# or accepted to be sent that much later ("defer"). Critical and normal events always pass.
NOTIFY_BULK_BACKLOG_LIMIT = env.int("NOTIFY_BULK_BACKLOG_LIMIT", default=1000)
NOTIFY_BACKPRESSURE = env.str("NOTIFY_BACKPRESSURE", default="reject")
if NOTIFY_BACKPRESSURE not in ("reject", "defer"):
    raise ImproperlyConfigured(f"NOTIFY_BACKPRESSURE is 'reject' or 'defer', not '{NOTIFY_BACKPRESSURE}'.")
NOTIFY_BACKPRESSURE_RETRY_SECONDS = env.int("NOTIFY_BACKPRESSURE_RETRY_SECONDS", default=30)
# Runaway-send guard (notify/resilience/runaway.py): a tenant that accepts more than this many
# times max(its recipients, the floor) notifications within the window is paused for normal
# and bulk work (critical still flows) until a person resumes it in the admin. 0: off.
NOTIFY_RUNAWAY_MULTIPLE = env.int("NOTIFY_RUNAWAY_MULTIPLE", default=20)
NOTIFY_RUNAWAY_WINDOW_SECONDS = env.int("NOTIFY_RUNAWAY_WINDOW_SECONDS", default=900)
NOTIFY_RUNAWAY_RECIPIENT_FLOOR = env.int("NOTIFY_RUNAWAY_RECIPIENT_FLOOR", default=1000)
if NOTIFY_RUNAWAY_MULTIPLE < 0 or NOTIFY_RUNAWAY_WINDOW_SECONDS < 60 or NOTIFY_RUNAWAY_RECIPIENT_FLOOR < 1:
    raise ImproperlyConfigured(
        "NOTIFY_RUNAWAY_MULTIPLE is 0 (off) or more, NOTIFY_RUNAWAY_WINDOW_SECONDS at least 60 and "
        "NOTIFY_RUNAWAY_RECIPIENT_FLOOR at least 1."
    )
# Operators alerted by email (a comma-separated list) when the guard pauses a tenant.
NOTIFY_OPS_EMAILS = env.list("NOTIFY_OPS_EMAILS", default=[])
# Where alerts are emailed (a comma-separated list); NOTIFY_OPS_EMAILS unless set.
NOTIFY_ALERT_EMAILS = env.list("NOTIFY_ALERT_EMAILS", default=NOTIFY_OPS_EMAILS)
NOTIFY_DEFAULT_LOCALE = env("NOTIFY_DEFAULT_LOCALE", default="en")

# --- Preferences --------------------------------------------------------------------------
# Redis for the frequency-cap windows, budgets and rate limits, and Django's cache (the
# broker's unless told otherwise).
NOTIFY_REDIS_URL = env("NOTIFY_REDIS_URL", default="" if BROKER_IS_AMQP else CELERY_BROKER_URL)
if not NOTIFY_REDIS_URL:
    raise ImproperlyConfigured(
        "With RabbitMQ as the broker, set NOTIFY_REDIS_URL to the Redis that keeps caps, limits, "
        "circuits and the inbox's channel layer, e.g. redis://127.0.0.1:6379/0."
    )
CACHES = {
    "default": {
        "BACKEND": "config.cache.SharedPoolRedisCache",
        "LOCATION": NOTIFY_REDIS_URL,
        "KEY_PREFIX": "notify",
    }
}

# How long links in emails stay valid: the preference center's, and one-click unsubscribe's
# (mail clients may follow that one weeks after the email arrived).
NOTIFY_PREFERENCE_LINK_SECONDS = env.int("NOTIFY_PREFERENCE_LINK_SECONDS", default=60 * 86400)
NOTIFY_UNSUBSCRIBE_LINK_SECONDS = env.int("NOTIFY_UNSUBSCRIBE_LINK_SECONDS", default=365 * 86400)
# How long after a web push is sent its click is still counted.
NOTIFY_WEBPUSH_CLICK_LINK_SECONDS = env.int("NOTIFY_WEBPUSH_CLICK_LINK_SECONDS", default=30 * 86400)

# --- In-app inbox -----------------------------------------------------------------------
# Live updates go through Redis pub/sub (the broker's Redis unless told otherwise): one
# message a batch of items, one subscription a web process (apps/inbox/hub.py). No channel
# layer: a consumer with one would hold a Redis read of its own.
NOTIFY_INBOX_LIVE_URL = env("NOTIFY_INBOX_LIVE_URL", default=NOTIFY_REDIS_URL)
# How long a recipient token from POST /api/v1/inbox-tokens stays valid.
NOTIFY_INBOX_TOKEN_SECONDS = env.int("NOTIFY_INBOX_TOKEN_SECONDS", default=3600)
NOTIFY_INBOX_PING_SECONDS = env.float("NOTIFY_INBOX_PING_SECONDS", default=25.0)
# A WebSocket that has not sent its token (first message) by then is closed.
NOTIFY_INBOX_AUTH_SECONDS = env.float("NOTIFY_INBOX_AUTH_SECONDS", default=5.0)
# Open WebSockets per recipient across all web processes (counted in NOTIFY_REDIS_URL's Redis);
# one more is refused with close code 4029. 0: no cap.
NOTIFY_INBOX_MAX_SOCKETS_PER_RECIPIENT = env.int("NOTIFY_INBOX_MAX_SOCKETS_PER_RECIPIENT", default=10)
# Frames waiting to be sent to one socket whose client reads too slowly: past this many, the
# socket is closed (4013) and its client reconnects and catches up from the database, so a
# stalled client never holds an unbounded queue in the web process.
NOTIFY_INBOX_SEND_QUEUE_FRAMES = env.int("NOTIFY_INBOX_SEND_QUEUE_FRAMES", default=1000)
# Unread and unseen counts stop at this many plus one (shown "99+"), so they stay cheap however
# many items a recipient holds.
NOTIFY_INBOX_COUNT_LIMIT = env.int("NOTIFY_INBOX_COUNT_LIMIT", default=99)
# Expired items are no longer shown; the sweeper deletes them this long after they expired.
NOTIFY_INBOX_EXPIRED_KEEP_SECONDS = env.int("NOTIFY_INBOX_EXPIRED_KEEP_SECONDS", default=86400)
# The recipient-facing inbox API is called from the pages that embed the widget, on any origin.
# It is authorised by a bearer token, never a cookie, so allowing every origin exposes nothing.
CORS_URLS_REGEX = r"^/inbox/v1/.*$"
CORS_ALLOW_ALL_ORIGINS = True

# --- Email ------------------------------------------------------------------------------
EMAIL_BACKEND = env("EMAIL_BACKEND", default="anymail.backends.postmark.EmailBackend")
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="Notify <notify@example.com>")
ANYMAIL = {
    "POSTMARK_SERVER_TOKEN": env("POSTMARK_SERVER_TOKEN", default=""),
    "POSTMARK_API_URL": env("POSTMARK_API_URL", default="https://api.postmarkapp.com/"),
    "WEBHOOK_SECRET": env("ANYMAIL_WEBHOOK_SECRET", default=""),
    "REQUESTS_TIMEOUT": env.float("NOTIFY_EMAIL_TIMEOUT_SECONDS", default=10.0),
}

# --- SMS (Twilio) -----------------------------------------------------------------------
TWILIO_ACCOUNT_SID = env("TWILIO_ACCOUNT_SID", default="")
TWILIO_AUTH_TOKEN = env("TWILIO_AUTH_TOKEN", default="")
TWILIO_FROM_NUMBER = env("TWILIO_FROM_NUMBER", default="")
# Twilio's API host; point it at the sandbox to test.
TWILIO_API_BASE = env("TWILIO_API_BASE", default="https://api.twilio.com")
NOTIFY_SMS_MAX_SEGMENTS = env.int("NOTIFY_SMS_MAX_SEGMENTS", default=10)
# What one SMS segment costs, in the currency of the tenants' daily SMS budgets.
NOTIFY_SMS_SEGMENT_PRICE = env.str("NOTIFY_SMS_SEGMENT_PRICE", default="0.0079")
NOTIFY_SMS_TIMEOUT_SECONDS = env.float("NOTIFY_SMS_TIMEOUT_SECONDS", default=10.0)
# Where providers and people reach this service: status callbacks, links in messages. Outside
# DEBUG it must be set (a system check refuses to start without it).
NOTIFY_PUBLIC_URL = env("NOTIFY_PUBLIC_URL", default="http://127.0.0.1:8000" if DEBUG else "").rstrip("/")

# --- Encryption at rest and sensitive categories (apps/tenants/encryption.py) -------------
# Fernet keys, comma-separated, newest first: the newest encrypts provider credentials and the
# content of tenants with encrypt_content, every one decrypts. Outside DEBUG the service
# refuses to start without them. Rotate: put a new key first, then `manage.py secrets_reencrypt`.
NOTIFY_ENCRYPTION_KEYS = env.list("NOTIFY_ENCRYPTION_KEYS", default=[])
# What a sensitive category sends on email, SMS, push and web push instead of its content,
# unless the category or its tenant says otherwise, and the link it adds (the inbox or the app).
NOTIFY_SECURE_MESSAGE_TEXT = env("NOTIFY_SECURE_MESSAGE_TEXT", default="You have a new secure message")
NOTIFY_SECURE_MESSAGE_URL = env("NOTIFY_SECURE_MESSAGE_URL", default=NOTIFY_PUBLIC_URL)

# --- Mobile push (Firebase Cloud Messaging, HTTP v1) -------------------------------------
FCM_PROJECT_ID = env("FCM_PROJECT_ID", default="")
# A service account key file; without one, and with the token endpoint not Google's (the
# sandbox), an ephemeral key is made so that the real OAuth code path still runs.
FCM_CREDENTIALS_FILE = env("FCM_CREDENTIALS_FILE", default="")
FCM_API_BASE = env("FCM_API_BASE", default="https://fcm.googleapis.com")
FCM_TOKEN_URI = env("FCM_TOKEN_URI", default="https://oauth2.googleapis.com/token")
NOTIFY_PUSH_TIMEOUT_SECONDS = env.float("NOTIFY_PUSH_TIMEOUT_SECONDS", default=10.0)

# --- Web push (VAPID) ---------------------------------------------------------------------
# `manage.py vapid_keys` makes a key pair: the private key (base64url DER) goes here, the
# public key to the browsers that subscribe.
WEBPUSH_VAPID_PRIVATE_KEY = env("WEBPUSH_VAPID_PRIVATE_KEY", default="")
WEBPUSH_VAPID_SUBJECT = env("WEBPUSH_VAPID_SUBJECT", default="mailto:notifications@example.com")
WEBPUSH_TTL_SECONDS = env.int("WEBPUSH_TTL_SECONDS", default=86400)
NOTIFY_WEBPUSH_TIMEOUT_SECONDS = env.float("NOTIFY_WEBPUSH_TIMEOUT_SECONDS", default=10.0)
# How long a push service may take to accept the connection, so that a recipient's
# black-holed endpoints cannot hold a batch past its lease.
NOTIFY_WEBPUSH_CONNECT_TIMEOUT_SECONDS = env.float("NOTIFY_WEBPUSH_CONNECT_TIMEOUT_SECONDS", default=3.0)
# Active subscriptions a recipient may have; a new one past it replaces their oldest.
NOTIFY_WEBPUSH_MAX_SUBSCRIPTIONS_PER_RECIPIENT = env.int("NOTIFY_WEBPUSH_MAX_SUBSCRIPTIONS_PER_RECIPIENT", default=20)

# --- Outbound requests to tenant-chosen URLs (notify/resilience/outbound.py) -------------
# Such URLs must be https on public addresses, unless their host is named here ("host" or
# "host:port"): then http, private and loopback addresses are allowed too (the sandbox).
NOTIFY_WEBPUSH_ALLOWED_HOSTS = env.list("NOTIFY_WEBPUSH_ALLOWED_HOSTS", default=[])
# For the API URLs set on tenants' Provider accounts (Postmark's api_url, Twilio's api_base).
NOTIFY_PROVIDER_ALLOWED_HOSTS = env.list("NOTIFY_PROVIDER_ALLOWED_HOSTS", default=[])
# For producers' webhook endpoints (apps/webhooks; tests and the demo name loopback hosts).
NOTIFY_WEBHOOK_ALLOWED_HOSTS = env.list("NOTIFY_WEBHOOK_ALLOWED_HOSTS", default=[])

# --- Webhooks to producers (apps/webhooks/services.py, docs/webhooks.md) --------------------
# How long the worker waits for an endpoint's answer (and for the connection).
NOTIFY_WEBHOOK_TIMEOUT_SECONDS = env.float("NOTIFY_WEBHOOK_TIMEOUT_SECONDS", default=5.0)
# Most events in one POST when an endpoint has a backlog.
NOTIFY_WEBHOOK_BATCH_SIZE = env.int("NOTIFY_WEBHOOK_BATCH_SIZE", default=50)
# Retries back off exponentially from base to cap: by default 14 attempts over about 24 h.
NOTIFY_WEBHOOK_MAX_ATTEMPTS = env.int("NOTIFY_WEBHOOK_MAX_ATTEMPTS", default=14)
NOTIFY_WEBHOOK_RETRY_BASE_SECONDS = env.float("NOTIFY_WEBHOOK_RETRY_BASE_SECONDS", default=30.0)
NOTIFY_WEBHOOK_RETRY_CAP_SECONDS = env.float("NOTIFY_WEBHOOK_RETRY_CAP_SECONDS", default=14400.0)
# An endpoint's circuit opens after this many failed POSTs in a row and tries again after the cooldown.
NOTIFY_WEBHOOK_CIRCUIT_FAILURES = env.int("NOTIFY_WEBHOOK_CIRCUIT_FAILURES", default=5)
NOTIFY_WEBHOOK_CIRCUIT_COOLDOWN_SECONDS = env.float("NOTIFY_WEBHOOK_CIRCUIT_COOLDOWN_SECONDS", default=60.0)
# How often beat hands due webhook messages to the worker (new ones are handed over at once).
NOTIFY_WEBHOOK_INTERVAL_SECONDS = env.float("NOTIFY_WEBHOOK_INTERVAL_SECONDS", default=5.0)
CELERY_BEAT_SCHEDULE["notify-webhooks"] = periodic_task(
    task="notify.webhooks_dispatch", seconds=NOTIFY_WEBHOOK_INTERVAL_SECONDS, queue="webhooks"
)

# --- Metrics (notify/observability; docs/operations.md, "Metrics") -----------------------
# Off: every counting call returns at once (the benchmark's baseline); /metrics still answers.
NOTIFY_METRICS_ENABLED = env.bool("NOTIFY_METRICS_ENABLED", default=True)
# The bearer token /metrics asks for. Unset: /metrics answers 404 outside DEBUG, and is open
# in DEBUG (the demo and the tests).
NOTIFY_METRICS_TOKEN = env("NOTIFY_METRICS_TOKEN", default="")
# Off: the tenant label is "all", for installations with many tenants.
NOTIFY_METRICS_TENANT_LABEL = env.bool("NOTIFY_METRICS_TENANT_LABEL", default=True)
# Set: each worker's main process serves its own processes' metrics on this port.
NOTIFY_WORKER_METRICS_PORT = env.int("NOTIFY_WORKER_METRICS_PORT", default=0)
NOTIFY_WORKER_METRICS_ADDRESS = env("NOTIFY_WORKER_METRICS_ADDRESS", default="127.0.0.1")
# The backlog gauges count at most this many deliveries per status (a bounded query).
NOTIFY_GAUGES_COUNT_CAP = env.int("NOTIFY_GAUGES_COUNT_CAP", default=1_000_000)

# --- Demo and sandbox -------------------------------------------------------------------
NOTIFY_DEMO_API_KEY = env("NOTIFY_DEMO_API_KEY", default="")

SENTRY_DSN = env("SENTRY_DSN", default="")
if SENTRY_DSN:
    from config.sentry import sentry_init

    sentry_init(dsn=SENTRY_DSN, traces_sample_rate=env.float("SENTRY_TRACES", default=0.0))
