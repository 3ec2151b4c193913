"""The channel registry: channel name -> its implementation."""

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


def channel_get(*, name: str) -> Channel:
    return _CHANNELS[name]


@receiver(setting_changed, dispatch_uid="notify.channels.settings")
def provider_settings_changed(setting: str, **kwargs: Any) -> None:
    """A changed provider setting (in tests) must not keep using the old connection."""
    if setting in ("EMAIL_BACKEND", "ANYMAIL") or setting.startswith(("TWILIO_", "FCM_", "WEBPUSH_")):
        for channel in _CHANNELS.values():
            channel.reset()
