"""The channel registry: channel name -> its implementation."""

import json
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver

from notify.channels.base import Channel
from notify.channels.email import EmailChannel
from notify.channels.inapp import InAppChannel
from notify.channels.push import PushChannel
from notify.channels.sms import SmsChannel
from notify.channels.webpush import WebPushChannel

_CHANNELS: dict[str, Channel] = {
    channel.name: channel for channel in (EmailChannel(), SmsChannel(), PushChannel(), WebPushChannel(), InAppChannel())
}


# One channel instance (and so one open connection) per provider account and its settings.
_PROVIDER_CHANNELS: dict[tuple[int, str], Channel] = {}
_PROVIDER_KINDS: dict[str, type[EmailChannel] | type[SmsChannel] | type[PushChannel]] = {
    "email": EmailChannel,
    "sms": SmsChannel,
    "push": PushChannel,
}


def channel_get(*, name: str) -> Channel:
    return _CHANNELS[name]


def channel_for_provider(provider: Any) -> Channel:
    """The channel sending through one Provider account (apps.deliveries.models.Provider)."""
    key = (provider.pk, json.dumps(provider.config, sort_keys=True))
    if key not in _PROVIDER_CHANNELS:
        _PROVIDER_CHANNELS[key] = _PROVIDER_KINDS[provider.channel](overrides=provider.config)
    return _PROVIDER_CHANNELS[key]


@receiver(setting_changed, dispatch_uid="notify.channels.settings")
def provider_settings_changed(setting: str, **kwargs: Any) -> None:
    """A changed provider setting (in tests) must not keep using the old connection."""
    if setting in ("EMAIL_BACKEND", "ANYMAIL") or setting.startswith(
        ("TWILIO_", "FCM_", "WEBPUSH_", "NOTIFY_WEBPUSH_", "NOTIFY_PROVIDER_", "NOTIFY_SMS_")
    ):
        for channel in _CHANNELS.values():
            channel.reset()
        _PROVIDER_CHANNELS.clear()
