"""Admin login hardening through the real login form: password rules, lockout after repeated
failures (django-axes), and TOTP two-factor login (django-otp) with codes computed from the
device's key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice

from tests.factories import StaffUserFactory

LOGIN = "/admin/login/"
ROOT = Path(__file__).resolve().parents[2]


def code_of(device: TOTPDevice) -> str:
    """The code an authenticator app would show now."""
    return f"{totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits):0{device.digits}d}"


def login(client: Client, user: User, *, password: str | None = None, token: str = "", **extra: str):  # type: ignore[no-untyped-def]
    form = {"username": user.username, "password": password or user.raw_password, "otp_token": token}  # type: ignore[attr-defined]
    return client.post(LOGIN, {**form, "next": "/admin/"}, **extra)


def signed_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def test_the_admin_refuses_a_weak_password(admin_client):
    form = {"username": "newstaff", "usable_password": "true", "password1": "12345678", "password2": "12345678"}
    response = admin_client.post(reverse("admin:auth_user_add"), form)
    assert response.status_code == 200
    errors = " ".join(response.context["adminform"].form.errors["password2"])
    assert "too short" in errors and "at least 12 characters" in errors
    assert "too common" in errors and "entirely numeric" in errors
    assert not User.objects.filter(username="newstaff").exists()


def test_the_sixth_login_after_five_failures_is_refused_even_with_the_right_password(db):
    staff = StaffUserFactory()
    client = Client()
    for attempt in range(1, 6):
        failed = login(client, staff, password="wrong password!")
        assert failed.status_code == (429 if attempt == 5 else 200) and not signed_in(client)
    refused = login(client, staff)
    assert refused.status_code == 429
    assert not signed_in(client)
    assert client.get("/admin/").status_code == 302


def test_a_lockout_is_for_one_username_from_one_address(db):
    staff, colleague = StaffUserFactory(), StaffUserFactory()
    for _ in range(5):
        login(Client(), staff, password="wrong password!")
    assert login(Client(), colleague).status_code == 302  # another user, same address
    elsewhere = Client(REMOTE_ADDR="192.0.2.7")  # only a value in the request: nothing is sent there
    assert login(elsewhere, staff).status_code == 302
    assert signed_in(elsewhere)


def test_a_forged_forwarded_for_header_does_not_escape_the_lockout(db):
    staff = StaffUserFactory()
    for attempt in range(5):
        login(Client(), staff, password="wrong password!", HTTP_X_FORWARDED_FOR=f"198.51.100.{attempt}")
    client = Client()
    assert login(client, staff, HTTP_X_FORWARDED_FOR="203.0.113.99").status_code == 429
    assert not signed_in(client)


def test_with_a_device_the_password_alone_does_not_sign_in(db):
    staff = StaffUserFactory()
    device = TOTPDevice.objects.create(user=staff, name="phone", confirmed=True)
    client = Client()
    without = login(client, staff)
    assert without.status_code == 200 and not signed_in(client)
    assert login(client, staff, token=code_of(device)).status_code == 302
    assert client.get("/admin/").status_code == 200


def wrong_code(device: TOTPDevice) -> str:
    return "000000" if code_of(device) != "000000" else "111111"


def test_a_wrong_code_is_refused_and_holds_off_the_next_try(db, settings):
    # django-otp's throttle: after a failure even the right code waits (the factor, doubling);
    # a minute here, so that a slow machine's second try still falls within it.
    settings.OTP_TOTP_THROTTLE_FACTOR = 60
    staff = StaffUserFactory()
    device = TOTPDevice.objects.create(user=staff, name="phone", confirmed=True)
    client = Client()
    assert login(client, staff, token=wrong_code(device)).status_code == 200
    held_off = login(client, staff, token=code_of(device))
    assert held_off.status_code == 200 and not signed_in(client)
    assert b"Verification temporarily disabled" in held_off.content


def test_a_session_without_the_code_is_sent_back_to_log_in_when_the_user_has_a_device(db):
    staff = StaffUserFactory()
    TOTPDevice.objects.create(user=staff, name="phone", confirmed=True)
    client = Client()
    client.force_login(staff)  # the password, but no code
    assert client.get("/admin/").status_code == 302
    # Nor can it enrol a second device to get around the first.
    client.get(reverse("admin:two_factor_enrol"))
    assert TOTPDevice.objects.filter(user=staff).count() == 1


def test_two_factor_is_optional_by_default(db):
    client = Client()
    assert b'name="otp_token"' in client.get(LOGIN).content
    assert login(client, StaffUserFactory()).status_code == 302
    assert client.get("/admin/").status_code == 200


@pytest.fixture
def two_factor_required(settings):  # type: ignore[no-untyped-def]
    settings.NOTIFY_ADMIN_2FA = "required"


def test_when_required_a_staff_user_without_a_device_enrols_before_using_the_admin(db, two_factor_required):
    staff = StaffUserFactory()
    client = Client()
    signed = login(client, staff)
    assert signed.status_code == 302 and signed_in(client)
    # Every admin page sends them to log in, and the login page on to enrolment.
    assert client.get(reverse("admin:deliveries_notification_changelist")).status_code == 302
    assert client.get(LOGIN)["Location"] == reverse("admin:two_factor_enrol")

    page = client.get(reverse("admin:two_factor_enrol"))
    device = TOTPDevice.objects.get(user=staff, confirmed=False)
    assert page.status_code == 200
    assert device.config_url in page.content.decode().replace("&amp;", "&")
    assert b"<svg" in page.content
    confirmed = client.post(reverse("admin:two_factor_enrol"), {"token": code_of(device)})
    assert confirmed["Location"] == reverse("admin:index")
    assert TOTPDevice.objects.get(pk=device.pk).confirmed
    assert client.get("/admin/").status_code == 200


def test_when_required_the_next_login_asks_for_the_code(db, two_factor_required):
    staff = StaffUserFactory()
    device = TOTPDevice.objects.create(user=staff, name="phone", confirmed=True)
    client = Client()
    assert login(client, staff).status_code == 200 and not signed_in(client)
    assert login(client, staff, token=code_of(device)).status_code == 302
    assert client.get("/admin/").status_code == 200


def test_a_wrong_code_does_not_confirm_the_device(db, two_factor_required):
    staff = StaffUserFactory()
    client = Client()
    client.force_login(staff)
    client.get(reverse("admin:two_factor_enrol"))
    device = TOTPDevice.objects.get(user=staff)
    wrong = client.post(reverse("admin:two_factor_enrol"), {"token": wrong_code(device)})
    assert wrong.status_code == 200 and b"not right" in wrong.content
    assert not TOTPDevice.objects.get(pk=device.pk).confirmed
    assert client.get("/admin/").status_code == 302


def test_the_enrolment_page_needs_a_signed_in_staff_user(db):
    assert Client().get(reverse("admin:two_factor_enrol")).status_code == 302
    assert not TOTPDevice.objects.exists()


def test_an_unknown_two_factor_policy_stops_start_up_with_how_to_fix_it():
    env = {**os.environ, "NOTIFY_ADMIN_2FA": "sometimes"}
    started = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode != 0
    assert "NOTIFY_ADMIN_2FA is 'optional' or 'required', not 'sometimes'" in started.stderr
