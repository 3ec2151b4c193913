"""The channel registry: channel name -> its implementation."""

from notify.channels.base import Channel
from notify.channels.email import EmailChannel

_CHANNELS: dict[str, Channel] = {channel.name: channel for channel in (EmailChannel(),)}


def channel_get(*, name: str) -> Channel:
    return _CHANNELS[name]
