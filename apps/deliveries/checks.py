"""Start-up checks that keep a deployment from running on the demo's secrets.

Outside DEBUG a missing secret fails closed: the service refuses to start rather than accept
unsigned input or run on credentials that are published with the project. Django runs these
checks before its management commands; config/asgi.py, config/wsgi.py and config/celery.py
run them too (configuration_verify), so that no process serves with them failing."""

import asyncio
import ipaddress
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import CheckMessage, Error, register, run_checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections, transaction

from apps.tenants.encryption import SecretUnreadable, encryption_keys_problem

TAG = "notify_configuration"

# The sandbox's stand-in credentials and the demo's keys (scripts/lib.sh, scripts/*.sh,
# docker/compose.yaml): anyone can read them, so they authenticate nobody.
KNOWN_CREDENTIALS = frozenset(
    {
        "sandbox-token",
        "sandbox:sandbox-webhook-secret",
        "ACsandbox00000000000000000000000000",
        "sandbox-twilio-auth-token",
        "notify-sandbox",
        "ntf_demo_0123456789abcdefDEMO",
        "ntf_bench_0123456789abcdefBENCH",
        "demo-metrics-token",
        # docker/compose.demo.yaml's VAPID key for web push.
        "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgS4cbdNnphuAwBY7vX3OUR6px80cdKr3taU_2XpwmJjuhRANCAAR7D-jg1Je"
        "YChoxxmAkPuVIUkj3ySz-FIL2NoG0QYBQ0zc4n5QYRSiP5JjTcc9J-ctH5w2n52ZcxizNTZDwYhPZ",
    }
)
KNOWN_SECRET_KEYS = frozenset(
    {"demo-only-insecure-secret-key", "test-only-secret-key", "bench-only-secret-key", "build-only"}
)
# The demo's, the suite's and the benchmark's NOTIFY_ENCRYPTION_KEYS (scripts/*.sh, docker/demo.env).
KNOWN_ENCRYPTION_KEYS = frozenset(
    {
        "ZGVtby1vbmx5LWluc2VjdXJlLWZlcm5ldC1rZXkuLi4=",
        "dGVzdC1vbmx5LWluc2VjdXJlLWZlcm5ldC1rZXkuLi4=",
        "YmVuY2gtb25seS1pbnNlY3VyZS1mZXJuZXQta2V5Li4=",
    }
)
CREDENTIAL_SETTINGS = (
    "POSTMARK_SERVER_TOKEN",
    "ANYMAIL_WEBHOOK_SECRET",
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "FCM_PROJECT_ID",
    "NOTIFY_DEMO_API_KEY",
    "NOTIFY_METRICS_TOKEN",
    "WEBPUSH_VAPID_PRIVATE_KEY",
)
URL_SETTINGS = ("POSTMARK_API_URL", "TWILIO_API_BASE", "FCM_API_BASE", "FCM_TOKEN_URI")
# The fake providers' routes (notify/sandbox/server.py).
SANDBOX_PATHS = ("/postmark", "/twilio", "/fcm", "/google/token")
ANYMAIL_POSTMARK_BACKEND = "anymail.backends.postmark.EmailBackend"


def credential_setting(name: str) -> str:
    """A provider setting by its environment name (anymail's live in settings.ANYMAIL)."""
    if name in ("POSTMARK_SERVER_TOKEN", "POSTMARK_API_URL"):
        return str(settings.ANYMAIL.get(name, ""))
    if name == "ANYMAIL_WEBHOOK_SECRET":
        return str(settings.ANYMAIL.get("WEBHOOK_SECRET", ""))
    return str(getattr(settings, name, ""))


def is_known_credential(value: str) -> bool:
    """Whether the value is one of the sandbox's or the demo's published credentials."""
    return value in KNOWN_CREDENTIALS or value.startswith("ACsandbox")


def is_sandbox_url(url: str) -> bool:
    """Whether a provider URL points at the sandbox: one of its routes, on loopback or on a
    host named "sandbox" (docker/compose.yaml's demo service)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not parts.path.startswith(SANDBOX_PATHS):
        return False
    if host in ("sandbox", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _provider_rows() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, channel, config) of every Provider; empty while the table does not exist yet
    (`migrate` on a new database runs these checks too) or the database is unreachable."""
    from apps.deliveries.models import Provider  # models are not ready when this is imported

    try:
        with transaction.atomic():  # a failed query must not break a caller's transaction
            return list(Provider.objects.values_list("name", "channel", "config"))
    except (DatabaseError, SecretUnreadable, ImproperlyConfigured):
        return []  # unreadable credentials are encryption_keys_check's finding


def _demo_key_stored() -> bool:
    from apps.tenants.models import ApiKey

    demo = ApiKey()
    demo.assign_secret(raw_key="ntf_demo_0123456789abcdefDEMO")
    try:
        with transaction.atomic():
            return ApiKey.objects.active().filter(lookup=demo.lookup, digest=demo.digest).exists()
    except DatabaseError:
        return False


def _errors(messages: Iterable[tuple[str, str, str]]) -> list[CheckMessage]:
    return [Error(message, hint=hint, id=f"notify.{code}") for code, message, hint in messages]


OUTSIDE_DEBUG = "Outside DEBUG (DJANGO_DEBUG is off), "


@register(TAG)
def webhook_secret_check(**_: Any) -> list[CheckMessage]:
    """An email provider is configured but its tracking webhooks would accept anyone."""
    if settings.DEBUG or credential_setting("ANYMAIL_WEBHOOK_SECRET"):
        return []
    configured = (
        bool(credential_setting("POSTMARK_SERVER_TOKEN"))
        or settings.EMAIL_BACKEND != ANYMAIL_POSTMARK_BACKEND
        or any(channel == "email" for _, channel, _ in _provider_rows())
    )
    if not configured:
        return []
    return _errors(
        [
            (
                "E001",
                OUTSIDE_DEBUG + "email is configured but ANYMAIL_WEBHOOK_SECRET is empty: anyone could post "
                "forged bounces and complaints to /anymail/.../tracking/.",
                "Set ANYMAIL_WEBHOOK_SECRET to a random 'user:password' and give the same credentials in the "
                "provider's webhook URL (https://user:password@your-host/anymail/postmark/tracking/).",
            )
        ]
    )


def _sandbox_findings() -> Iterator[tuple[str, str, str]]:
    for name in CREDENTIAL_SETTINGS:
        if is_known_credential(credential_setting(name)):
            yield (
                "E002",
                OUTSIDE_DEBUG + f"{name} is the sandbox's or the demo's published value.",
                f"Set {name} to your own account's credential, or unset it.",
            )
    for name in URL_SETTINGS:
        if is_sandbox_url(credential_setting(name)):
            yield (
                "E003",
                OUTSIDE_DEBUG + f"{name} points at the provider sandbox ({credential_setting(name)}).",
                f"Unset {name} to use the provider itself, or run the demo with DJANGO_DEBUG=1.",
            )
    for provider, _, config in _provider_rows():
        for key, value in (config or {}).items():
            if isinstance(value, str) and (is_known_credential(value) or is_sandbox_url(value)):
                yield (
                    "E004",
                    OUTSIDE_DEBUG + f"provider '{provider}' has the sandbox's {key} in its config.",
                    "Give the provider its own account's settings in the admin (Providers), or delete it.",
                )
    if _demo_key_stored():
        yield (
            "E005",
            OUTSIDE_DEBUG + "the demo's published API key is stored and active.",
            "Revoke the 'demo' API key in the admin (API keys).",
        )


@register(TAG)
def sandbox_credentials_check(**_: Any) -> list[CheckMessage]:
    """The sandbox's or the demo's credentials, or the sandbox's URLs, in a real deployment."""
    if settings.DEBUG:
        return []
    return _errors(_sandbox_findings())


@register(TAG)
def deployment_settings_check(**_: Any) -> list[CheckMessage]:
    """Settings that have a demo default but must be chosen for a deployment."""
    if settings.DEBUG:
        return []
    findings = []
    public_url = urlsplit(settings.NOTIFY_PUBLIC_URL)
    if public_url.scheme not in ("http", "https") or not public_url.hostname:
        findings.append(
            (
                "E006",
                OUTSIDE_DEBUG + "NOTIFY_PUBLIC_URL must be set: providers' callbacks and the links in "
                "messages are made from it.",
                "Set NOTIFY_PUBLIC_URL to the address people and providers reach this service at, "
                "e.g. https://notify.example.com (no trailing slash).",
            )
        )
    if settings.SECRET_KEY in KNOWN_SECRET_KEYS or settings.SECRET_KEY.startswith("django-insecure-"):
        findings.append(
            (
                "E007",
                OUTSIDE_DEBUG + "DJANGO_SECRET_KEY is a published demo or test key: anyone could sign "
                "recipient links and sessions.",
                "Set DJANGO_SECRET_KEY to a long random value, e.g. from "
                "python -c 'import secrets; print(secrets.token_urlsafe(50))'.",
            )
        )
    return _errors(findings)


@register(TAG)
def alert_webhook_check(**_: Any) -> list[CheckMessage]:
    """The operator alert webhook is configured without a secret that can sign it."""
    if settings.DEBUG or not settings.NOTIFY_ALERT_WEBHOOK_URL:
        return []
    from notify.resilience.outbound import webhook_secret_problem

    problem = webhook_secret_problem(secret=settings.NOTIFY_ALERT_WEBHOOK_SECRET)
    if not problem:
        return []
    return _errors(
        [
            (
                "E008",
                OUTSIDE_DEBUG + f"NOTIFY_ALERT_WEBHOOK_URL is set but NOTIFY_ALERT_WEBHOOK_SECRET cannot sign "
                f"its alerts: {problem}.",
                "Set NOTIFY_ALERT_WEBHOOK_SECRET to a Standard Webhooks secret, e.g. from python -c "
                "'import base64, secrets; print(\"whsec_\" + base64.b64encode(secrets.token_bytes(32)).decode())'.",
            )
        ]
    )


def _encryption_findings() -> Iterator[tuple[str, str, str]]:
    keys = list(settings.NOTIFY_ENCRYPTION_KEYS)
    if problem := encryption_keys_problem(keys=keys):
        yield (
            "E009",
            OUTSIDE_DEBUG + f"NOTIFY_ENCRYPTION_KEYS cannot encrypt secrets at rest: {problem}.",
            "Set NOTIFY_ENCRYPTION_KEYS to one or more Fernet keys, newest first, e.g. from python -c "
            "'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'.",
        )
        return
    if KNOWN_ENCRYPTION_KEYS.intersection(keys):
        yield (
            "E009",
            OUTSIDE_DEBUG + "NOTIFY_ENCRYPTION_KEYS holds the demo's, the suite's or the benchmark's published key.",
            "Make a key of your own, put it first, run manage.py secrets_reencrypt, then drop the published one.",
        )
    from apps.deliveries.models import Provider  # models are not ready when this is imported

    try:
        with transaction.atomic():
            list(Provider.objects.values_list("config", flat=True))
    except DatabaseError:
        pass  # no table yet, or no database: other checks and the readiness probe say so
    except SecretUnreadable as error:
        yield (
            "E010",
            OUTSIDE_DEBUG + f"stored provider credentials cannot be read: {error}.",
            "Put the key they were written under back in NOTIFY_ENCRYPTION_KEYS, after the newest.",
        )


@register(TAG)
def encryption_keys_check(**_: Any) -> list[CheckMessage]:
    """Secrets at rest need keys of the operator's own that read what is stored."""
    if settings.DEBUG:
        return []
    return _errors(_encryption_findings())


# The demo's, published in docker/demo.env: never a production key.
PUBLISHED_ERASURE_HASH_KEYS = frozenset({"demo-only-insecure-erasure-hash-key"})


@register(TAG)
def erasure_hash_key_check(**_: Any) -> list[CheckMessage]:
    """Erased addresses are kept only as a keyed hash; the key must be the operator's own."""
    key = settings.NOTIFY_ERASURE_HASH_KEY
    if settings.DEBUG or (len(key) >= 32 and key not in PUBLISHED_ERASURE_HASH_KEYS):
        return []
    return _errors(
        [
            (
                "E011",
                OUTSIDE_DEBUG + "NOTIFY_ERASURE_HASH_KEY must be a key of your own (32 characters or more): an erased "
                "person's suppressed addresses are kept as a keyed hash made with it.",
                "Set NOTIFY_ERASURE_HASH_KEY to a long random value, e.g. from "
                "python -c 'import secrets; print(secrets.token_urlsafe(50))', and keep it: a new key "
                "forgets the erased addresses that were suppressed.",
            )
        ]
    )


def configuration_verify() -> None:
    """Exit with the checks' messages when any fails: for processes that Django's management
    commands do not start (the ASGI and WSGI servers, Celery workers and beat)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        _configuration_verify()
        return
    # `uvicorn --workers N` imports the application inside each worker's running event loop,
    # where Django refuses database work: the checks run on a thread of their own there.
    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(_configuration_verify).result()


def _configuration_verify() -> None:
    errors = [message for message in run_checks(tags=[TAG]) if message.is_serious() and not message.is_silenced()]
    # The checks' queries must not leave a connection open in a process that forks workers
    # or hands connections out from a pool.
    connections.close_all()
    if errors:
        lines = "\n".join(str(error) for error in errors)
        raise SystemExit(f"Refusing to start: the configuration is unsafe.\n{lines}")
