"""The first admin login, made from the environment by `manage.py admin_ensure`."""

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

STRONG_PASSWORD = "correct-horse-battery-staple-7"


def run_admin_ensure() -> str:
    out = io.StringIO()
    call_command("admin_ensure", stdout=out)
    return out.getvalue()


@pytest.fixture
def admin_environment(settings):  # type: ignore[no-untyped-def]
    settings.NOTIFY_ADMIN_USERNAME = "ops"
    settings.NOTIFY_ADMIN_EMAIL = "ops@example.com"
    settings.NOTIFY_ADMIN_PASSWORD = STRONG_PASSWORD
    return settings


@pytest.mark.django_db
def test_it_creates_a_superuser_who_can_sign_in_then_leaves_it_alone(admin_environment):
    assert "created" in run_admin_ensure()
    user = get_user_model().objects.get(username="ops")
    assert user.check_password(STRONG_PASSWORD)
    assert user.is_active and user.is_staff and user.is_superuser and user.email == "ops@example.com"

    # The operator changes the password in the admin; the next deploy keeps it.
    user.set_password("another-long-passphrase-9")
    user.save()
    admin_environment.NOTIFY_ADMIN_PASSWORD = "a-third-long-passphrase-4"
    assert "left unchanged" in run_admin_ensure()
    assert get_user_model().objects.filter(username="ops").count() == 1
    user.refresh_from_db()
    assert user.check_password("another-long-passphrase-9")


@pytest.mark.django_db
def test_a_missing_variable_is_named_and_nothing_is_created(admin_environment):
    admin_environment.NOTIFY_ADMIN_PASSWORD = ""
    admin_environment.NOTIFY_ADMIN_EMAIL = ""
    with pytest.raises(CommandError, match="Set NOTIFY_ADMIN_EMAIL, NOTIFY_ADMIN_PASSWORD in the environment"):
        run_admin_ensure()
    assert not get_user_model().objects.exists()


@pytest.mark.django_db
def test_a_weak_password_is_refused_with_the_reason(admin_environment):
    admin_environment.NOTIFY_ADMIN_PASSWORD = "12345678"
    with pytest.raises(CommandError, match=r"NOTIFY_ADMIN_PASSWORD: .*too short"):
        run_admin_ensure()
    assert not get_user_model().objects.exists()
