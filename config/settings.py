"""Settings. Everything that varies between deployments is read from the environment here,
and only here. A missing required setting fails loudly at start-up."""

from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()

SECRET_KEY = env("DJANGO_SECRET_KEY")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
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
    "apps.tenants",
    "apps.recipients",
    "apps.catalog",
    "apps.deliveries",
    "apps.audiences",
    "apps.inbox",
    "apps.api",
]

MIDDLEWARE = [
    "apps.api.middleware.RequestBodyLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
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
        "timeout": 30,
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # a pool and persistent connections do not mix
    # The pool checks a connection before handing it out: one the server dropped (a restart,
    # an idle timeout) is replaced instead of failing the request.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS: list[dict[str, str]] = []
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "staticfiles"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
}

# --- Producer API -----------------------------------------------------------------------
NOTIFY_MAX_REQUEST_BYTES = env.int("NOTIFY_MAX_REQUEST_BYTES", default=256 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = NOTIFY_MAX_REQUEST_BYTES
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
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
# Celery's Django fixup closes the database connection around every task unless this is set,
# so each critical send paid for a new PostgreSQL connection. Workers keep theirs, and check
# it around each task as Django does around a request (config/celery.py).
CELERY_DB_REUSE_MAX = 1_000_000
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Defined in code; django-celery-beat's DatabaseScheduler copies it into its tables.
CELERY_BEAT_SCHEDULE = {
    "notify-sweep": {
        "task": "notify.sweep",
        "schedule": timedelta(seconds=env.float("NOTIFY_SWEEP_INTERVAL_SECONDS", default=5.0)),
        "options": {"queue": "maintenance", "expires": 30},
    },
}

# --- Delivery engine --------------------------------------------------------------------
NOTIFY_BATCH_SIZE = {
    "critical": 1,
    "normal": env.int("NOTIFY_NORMAL_BATCH_SIZE", default=50),
    "bulk": env.int("NOTIFY_BULK_BATCH_SIZE", default=500),
}
# A claimed delivery whose worker has not recorded an outcome by then is re-queued.
NOTIFY_LEASE_SECONDS = env.float("NOTIFY_LEASE_SECONDS", default=300.0)
# A queued delivery published this long ago and still unclaimed is published again.
NOTIFY_REPUBLISH_AFTER_SECONDS = env.float("NOTIFY_REPUBLISH_AFTER_SECONDS", default=120.0)
# Retries due sooner than this ride a Celery countdown; later ones wait in the database
# for the sweeper, because Redis redelivers long ETA tasks after its visibility timeout.
NOTIFY_COUNTDOWN_MAX_SECONDS = env.float("NOTIFY_COUNTDOWN_MAX_SECONDS", default=300.0)
NOTIFY_SWEEP_CHUNK = env.int("NOTIFY_SWEEP_CHUNK", default=5000)
# Broadcast fan-out turns this many recipients into notifications per transaction.
NOTIFY_BROADCAST_CHUNK = env.int("NOTIFY_BROADCAST_CHUNK", default=2000)
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
NOTIFY_DEFAULT_LOCALE = env("NOTIFY_DEFAULT_LOCALE", default="en")

# --- Preferences --------------------------------------------------------------------------
# Redis for the frequency-cap windows, budgets and rate limits, and Django's cache (the
# broker's unless told otherwise).
NOTIFY_REDIS_URL = env("NOTIFY_REDIS_URL", default=CELERY_BROKER_URL)
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": NOTIFY_REDIS_URL,
        "KEY_PREFIX": "notify",
    }
}

# How long links in emails stay valid: the preference center's, and one-click unsubscribe's
# (mail clients may follow that one weeks after the email arrived).
NOTIFY_PREFERENCE_LINK_SECONDS = env.int("NOTIFY_PREFERENCE_LINK_SECONDS", default=60 * 86400)
NOTIFY_UNSUBSCRIBE_LINK_SECONDS = env.int("NOTIFY_UNSUBSCRIBE_LINK_SECONDS", default=365 * 86400)

# --- In-app inbox -----------------------------------------------------------------------
# Live updates go through a Redis channel layer (the broker's Redis unless told otherwise).
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [env("CHANNEL_LAYER_URL", default=CELERY_BROKER_URL)], "prefix": "notify-inbox"},
    }
}
# How long a recipient token from POST /api/v1/inbox-tokens stays valid.
NOTIFY_INBOX_TOKEN_SECONDS = env.int("NOTIFY_INBOX_TOKEN_SECONDS", default=3600)
NOTIFY_INBOX_PING_SECONDS = env.float("NOTIFY_INBOX_PING_SECONDS", default=25.0)
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
# Where providers reach this service for status callbacks (no trailing slash).
NOTIFY_PUBLIC_URL = env("NOTIFY_PUBLIC_URL", default="http://127.0.0.1:8000")

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

# --- Demo and sandbox -------------------------------------------------------------------
NOTIFY_DEMO_API_KEY = env("NOTIFY_DEMO_API_KEY", default="")

SENTRY_DSN = env("SENTRY_DSN", default="")
if SENTRY_DSN:
    import sentry_sdk

    sentry_sdk.init(dsn=SENTRY_DSN, traces_sample_rate=env.float("SENTRY_TRACES", default=0.0))
