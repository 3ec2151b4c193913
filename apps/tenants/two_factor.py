"""TOTP two-factor login for staff (django-otp): enrolment and the site's policy."""

from base64 import b32encode

import segno
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django_otp import user_has_device
from django_otp.plugins.otp_totp.models import TOTPDevice


def two_factor_satisfied(*, user: AbstractBaseUser | AnonymousUser) -> bool:
    """Whether this session may use the admin as far as two-factor login goes."""
    if user.is_verified():  # type: ignore[union-attr]  # django-otp's middleware adds it
        return True
    if settings.NOTIFY_ADMIN_2FA == "required":
        return False
    # Optional: whoever enrolled a device must use it.
    return not user_has_device(user, confirmed=True)


def two_factor_enrolment_needed(*, user: AbstractBaseUser | AnonymousUser) -> bool:
    """Whether a signed-in staff user must enrol a device before using the admin."""
    return (
        settings.NOTIFY_ADMIN_2FA == "required"
        and user.is_authenticated
        and bool(getattr(user, "is_staff", False))
        and not user_has_device(user, confirmed=True)
    )


def totp_device_pending(*, user: AbstractBaseUser) -> TOTPDevice:
    """The user's unconfirmed TOTP device, made on first call; it counts once confirmed."""
    device = TOTPDevice.objects.filter(user=user, confirmed=False).order_by("id").first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name="authenticator app", confirmed=False)
    return device


def totp_device_confirmed(*, user: AbstractBaseUser) -> TOTPDevice | None:
    """The user's TOTP device, once enrolment confirmed it."""
    return TOTPDevice.objects.filter(user=user, confirmed=True).order_by("id").first()


def totp_device_confirm(*, device: TOTPDevice, token: str) -> bool:
    """Confirm a pending device with a code from the authenticator app; False if it is wrong."""
    if not device.verify_token(token.strip()):
        return False
    device.confirmed = True
    device.save(update_fields=["confirmed"])
    return True


def totp_secret(*, device: TOTPDevice) -> str:
    """The device key as authenticator apps take it when typed in (base32)."""
    return b32encode(device.bin_key).decode()


def totp_qr_svg(*, device: TOTPDevice) -> str:
    """The otpauth:// URI as an inline SVG QR code."""
    return segno.make(device.config_url, error="m").svg_inline(scale=4)
