"""Fail-closed configuration: outside DEBUG every process refuses to start on the sandbox's
or the demo's published secrets, without a webhook secret or a public URL; a correctly
configured production environment passes Django's deployment checks."""

import os
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import psycopg
import pytest
import yaml
from cryptography.fernet import Fernet
from django.core.checks import run_checks
from django.db import connection

from apps.deliveries.checks import TAG
from apps.deliveries.models import Provider
from apps.tenants.demo import demo_workspace_ensure
from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
# The demo compose stack's published VAPID key.
DEMO_VAPID_KEY = yaml.safe_load((ROOT / "docker" / "compose.demo.yaml").read_text())["x-demo-env"][
    "WEBPUSH_VAPID_PRIVATE_KEY"
]
SANDBOX_ENV = (
    "POSTMARK_SERVER_TOKEN",
    "POSTMARK_API_URL",
    "ANYMAIL_WEBHOOK_SECRET",
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "TWILIO_FROM_NUMBER",
    "TWILIO_API_BASE",
    "FCM_PROJECT_ID",
    "FCM_API_BASE",
    "FCM_TOKEN_URI",
    "NOTIFY_DEMO_API_KEY",
    "NOTIFY_PUBLIC_URL",
    "DJANGO_SECRET_KEY",
    "DJANGO_DEBUG",
)


def database_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def production_env(**overrides: str) -> dict[str, str]:
    """A correctly configured production environment on this test's database: own secrets,
    the providers' real URLs (nothing here calls them), https everywhere."""
    env = {name: value for name, value in os.environ.items() if name not in SANDBOX_ENV}
    env.update(
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        NOTIFY_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        NOTIFY_ERASURE_HASH_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="notify.example.com",
        DATABASE_URL=database_url(),
        NOTIFY_PUBLIC_URL="https://notify.example.com",
        POSTMARK_SERVER_TOKEN=secrets.token_hex(16),
        ANYMAIL_WEBHOOK_SECRET=f"postmark:{secrets.token_urlsafe(24)}",
        TWILIO_ACCOUNT_SID="AC" + secrets.token_hex(16),
        TWILIO_AUTH_TOKEN=secrets.token_hex(16),
        TWILIO_FROM_NUMBER="+14155550100",
        DJANGO_SECURE_SSL_REDIRECT="1",
        DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS="1",
        DJANGO_SECURE_HSTS_PRELOAD="1",
        DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
    )
    env.update(overrides)
    return env


def sandbox_env() -> dict[str, str]:
    """The suite's own environment (the sandbox's published credentials) with DEBUG off."""
    return {**os.environ, "DATABASE_URL": database_url(), "DJANGO_DEBUG": "0"}


def run(command: list[str], *, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_ids() -> set[str]:
    return {message.id for message in run_checks(tags=[TAG]) if message.is_serious()}  # type: ignore[misc]


STARTS = {
    "uvicorn": [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", "0"],
    "wsgi": [sys.executable, "-c", "import config.wsgi"],
    "celery worker": [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo", "-Q", "refusal"],
    "celery beat": [sys.executable, "-m", "celery", "-A", "config", "beat", "--pidfile="],
    "manage.py": [sys.executable, "manage.py", "migrate", "--plan"],
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("process", list(STARTS))
def test_every_process_refuses_to_start_on_the_sandbox_credentials_outside_debug(process):
    result = run(STARTS[process], env=sandbox_env())
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "(notify.E002) Outside DEBUG (DJANGO_DEBUG is off), TWILIO_AUTH_TOKEN is the sandbox's" in output
    assert "(notify.E007)" in output  # the suite's published secret key
    assert "Uvicorn running" not in output and " ready." not in output


@pytest.mark.django_db(transaction=True)
def test_a_correct_production_environment_passes_the_deployment_checks():
    result = run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], env=production_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("processes", [1, 2])
def test_the_web_server_starts_in_a_correct_production_environment(tmp_path, processes):
    """With one process, and with several as the Dockerfile runs it (uvicorn imports the
    application inside each worker's event loop, where the start-up checks must still run)."""
    port = free_port()
    log = tmp_path / "web.log"
    command = [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(processes)] if processes > 1 else []
    process = subprocess.Popen(command, cwd=ROOT, env=production_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: log.read_text().count("Application startup complete") == processes or process.poll() is not None,
            what="every web process to start",
        )
        assert process.poll() is None, log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_production_settings_are_secure_outside_debug():
    code = (
        "from django.conf import settings as s; "
        "print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, s.SECURE_PROXY_SSL_HEADER, "
        "s.SECURE_SSL_REDIRECT)"
    )
    env = production_env(DJANGO_SECURE_SSL_REDIRECT="0", DJANGO_SETTINGS_MODULE="config.settings")
    result = run([sys.executable, "-c", "import django; django.setup(); " + code], env=env)
    assert result.stdout.split() == ["True", "True", "31536000", "('HTTP_X_FORWARDED_PROTO',", "'https')", "False"]
    env.pop("DJANGO_SECURE_PROXY_SSL_HEADER")
    result = run([sys.executable, "-c", "import django; django.setup(); " + code], env=env)
    assert result.stdout.split()[3] == "None"  # not behind a proxy: X-Forwarded-Proto is not trusted


def test_a_malformed_proxy_header_setting_is_refused_with_how_to_fix_it():
    env = production_env(DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto", DJANGO_SETTINGS_MODULE="config.settings")
    result = run([sys.executable, "-c", "import django; django.setup()"], env=env)
    assert result.returncode != 0
    assert 'e.g. "HTTP_X_FORWARDED_PROTO,https"' in result.stderr


def test_migrate_on_an_empty_database_is_not_broken_by_the_checks():
    url = urlparse(database_url())
    name = f"{url.path.lstrip('/')}_empty"
    admin = url._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}"')
        conn.execute(f'create database "{name}"')
    try:
        env = production_env(DATABASE_URL=url._replace(path=f"/{name}").geturl())
        result = run([sys.executable, "manage.py", "migrate", "--plan"], env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}"')


# The checks one at a time, in this process, with DEBUG off.


@pytest.fixture
def production(settings, db):  # type: ignore[no-untyped-def]
    """This process's settings as production_env() configures them."""
    settings.DEBUG = False
    settings.SECRET_KEY = secrets.token_urlsafe(50)
    settings.NOTIFY_ERASURE_HASH_KEY = secrets.token_urlsafe(50)
    settings.NOTIFY_PUBLIC_URL = "https://notify.example.com"
    settings.ANYMAIL = {"POSTMARK_SERVER_TOKEN": "real-token", "WEBHOOK_SECRET": "postmark:long-random"}
    settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN = "AC" + "1" * 32, "real-twilio-token"
    settings.TWILIO_API_BASE, settings.FCM_API_BASE = "https://api.twilio.com", "https://fcm.googleapis.com"
    settings.FCM_PROJECT_ID, settings.FCM_TOKEN_URI = "my-project", "https://oauth2.googleapis.com/token"
    settings.NOTIFY_DEMO_API_KEY = ""
    settings.NOTIFY_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    settings.EMAIL_BACKEND = "anymail.backends.postmark.EmailBackend"  # the test runner's is in memory
    return settings


def test_a_production_configuration_passes(production):
    assert check_ids() == set()


def test_debug_allows_the_sandbox(production):
    production.DEBUG = True
    production.ANYMAIL = {
        "POSTMARK_SERVER_TOKEN": "sandbox-token",
        "POSTMARK_API_URL": "http://127.0.0.1:8025/postmark/",
    }
    production.NOTIFY_PUBLIC_URL = ""
    assert check_ids() == set()


def test_email_without_a_webhook_secret_is_refused(production):
    production.ANYMAIL = {"POSTMARK_SERVER_TOKEN": "real-token", "WEBHOOK_SECRET": ""}
    assert check_ids() == {"notify.E001"}


def test_an_email_provider_row_without_a_webhook_secret_is_refused(production):
    production.ANYMAIL = {"POSTMARK_SERVER_TOKEN": "", "WEBHOOK_SECRET": ""}
    assert check_ids() == set()  # no email at all: nothing to forge feedback for
    Provider.objects.create(name="postmark-b", channel="email", config={"server_token": "real-b"})
    assert check_ids() == {"notify.E001"}


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("POSTMARK_API_URL", "http://sandbox:8025/postmark/"),
        ("TWILIO_API_BASE", "http://127.0.0.1:8025/twilio"),
        ("FCM_API_BASE", "http://localhost:8025/fcm"),
        ("FCM_TOKEN_URI", "http://[::1]:8025/google/token"),
    ],
)
def test_a_provider_url_on_the_sandbox_is_refused(production, setting, value):
    if setting == "POSTMARK_API_URL":
        production.ANYMAIL = {**production.ANYMAIL, setting: value}
    else:
        setattr(production, setting, value)
    assert check_ids() == {"notify.E003"}


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("POSTMARK_SERVER_TOKEN", "sandbox-token"),
        ("ANYMAIL_WEBHOOK_SECRET", "sandbox:sandbox-webhook-secret"),
        ("TWILIO_ACCOUNT_SID", "ACsandbox00000000000000000000000000"),
        ("TWILIO_AUTH_TOKEN", "sandbox-twilio-auth-token"),
        ("FCM_PROJECT_ID", "notify-sandbox"),
        ("NOTIFY_DEMO_API_KEY", "ntf_demo_0123456789abcdefDEMO"),
        ("WEBPUSH_VAPID_PRIVATE_KEY", DEMO_VAPID_KEY),
    ],
)
def test_a_published_credential_is_refused(production, setting, value):
    if setting == "POSTMARK_SERVER_TOKEN":
        production.ANYMAIL = {**production.ANYMAIL, setting: value}
    elif setting == "ANYMAIL_WEBHOOK_SECRET":
        production.ANYMAIL = {**production.ANYMAIL, "WEBHOOK_SECRET": value}
    else:
        setattr(production, setting, value)
    assert check_ids() == {"notify.E002"}


def test_a_provider_row_with_sandbox_settings_is_refused(production):
    Provider.objects.create(name="twilio-b", channel="sms", config={"api_base": "http://sandbox:8025/twilio"})
    assert check_ids() == {"notify.E004"}


def test_the_demo_api_key_stored_in_the_database_is_refused(production):
    demo_workspace_ensure(api_key="ntf_demo_0123456789abcdefDEMO")
    assert check_ids() == {"notify.E005"}


@pytest.mark.parametrize("public_url", ["", "notify.example.com"])
def test_an_unset_public_url_is_refused(production, public_url):
    production.NOTIFY_PUBLIC_URL = public_url
    assert check_ids() == {"notify.E006"}


@pytest.mark.parametrize("secret_key", ["test-only-secret-key", "demo-only-insecure-secret-key", "django-insecure-x"])
def test_a_published_secret_key_is_refused(production, secret_key):
    production.SECRET_KEY = secret_key
    assert check_ids() == {"notify.E007"}


@pytest.mark.parametrize("key", ["", "short", "demo-only-insecure-erasure-hash-key"])
def test_an_unset_short_or_published_erasure_hash_key_is_refused(production, key):
    production.NOTIFY_ERASURE_HASH_KEY = key
    assert check_ids() == {"notify.E011"}


@pytest.mark.parametrize("secret", ["", "whsec_not base64!"])
def test_an_alert_webhook_without_a_signing_secret_is_refused(production, secret):
    production.NOTIFY_ALERT_WEBHOOK_URL = "https://ops.example.com/alerts"
    production.NOTIFY_ALERT_WEBHOOK_SECRET = secret
    assert check_ids() == {"notify.E008"}
    production.NOTIFY_ALERT_WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert check_ids() == set()


def test_the_demo_set_up_refuses_to_run_outside_debug(production):
    from django.core.management import CommandError, call_command

    production.NOTIFY_DEMO_API_KEY = "ntf_mine_0123456789abcdef"
    with pytest.raises(CommandError, match="DJANGO_DEBUG=1"):
        call_command("demo_setup")


def test_no_process_starts_without_encryption_keys_outside_debug():
    result = run([sys.executable, "manage.py", "migrate", "--plan"], env=production_env(NOTIFY_ENCRYPTION_KEYS=""))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "(notify.E009) Outside DEBUG (DJANGO_DEBUG is off), NOTIFY_ENCRYPTION_KEYS cannot encrypt" in output


def test_encryption_keys_must_be_the_operators_own_and_read_what_is_stored(production):
    production.NOTIFY_ENCRYPTION_KEYS = []
    assert check_ids() == {"notify.E009"}
    production.NOTIFY_ENCRYPTION_KEYS = ["not-a-key"]
    assert check_ids() == {"notify.E009"}
    production.NOTIFY_ENCRYPTION_KEYS = ["dGVzdC1vbmx5LWluc2VjdXJlLWZlcm5ldC1rZXkuLi4="]  # the suite's, published
    assert check_ids() == {"notify.E009"}
    old = Fernet.generate_key().decode()
    production.NOTIFY_ENCRYPTION_KEYS = [old]
    Provider.objects.create(name="pm", channel="email", config={"server_token": "own-token"})
    production.NOTIFY_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]  # the old key was dropped too soon
    assert check_ids() == {"notify.E010"}
    production.NOTIFY_ENCRYPTION_KEYS = [Fernet.generate_key().decode(), old]
    assert check_ids() == set()
