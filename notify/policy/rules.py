"""What a person asked for, decided: may this notification go out on this channel now, or is it
suppressed, deferred or expired, and why.

Pure functions over plain data (no database, no cache), so that planning and sending apply
exactly the same rules. The order of precedence is documented in docs/preferences.md:

1. A critical category is always sent: no pause, opt-out, quiet hours or cap applies.
2. A notification older than its category's expiry is expired.
3. A paused recipient gets nothing until the pause ends.
4. A marketing category needs the recipient's consent on that channel.
5. Channel switches: the recipient's own setting, else the tenant's default, else on.
6. Category switches per channel: the recipient's own setting, else the category's default,
   else on. Both 5 and 6 must be on.
7. Quiet hours (the recipient's own, else the tenant's default) defer until they end, unless
   the category's expiry comes first.
8. Frequency caps (checked last, when sending: notify.policy.caps) suppress or defer."""

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import limits
from django.core.exceptions import ValidationError

from config.queues import CHANNELS

CRITICAL, TRANSACTIONAL, MARKETING = "critical", "transactional", "marketing"
SUPPRESSED, DEFERRED, EXPIRED = "suppressed", "deferred", "expired"


@dataclass(frozen=True)
class RecipientRules:
    """A recipient's own settings and consents, as read when sending (notify.policy.preferences)."""

    paused: bool = False
    paused_until: datetime | None = None
    channels: dict[str, bool] = field(default_factory=dict)
    categories: dict[str, dict[str, bool]] = field(default_factory=dict)
    quiet_hours: dict[str, Any] = field(default_factory=dict)
    consents: dict[str, bool] = field(default_factory=dict)  # marketing consent by channel
    timezone: str = "UTC"


@dataclass(frozen=True)
class CategoryRules:
    key: str
    kind: str
    channel_defaults: dict[str, bool] = field(default_factory=dict)
    expire_after: timedelta | None = None


@dataclass(frozen=True)
class TenantRules:
    channel_defaults: dict[str, bool] = field(default_factory=dict)
    quiet_hours: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """Empty `status`: send now. Otherwise the delivery's new status, why, and for a deferral
    when to try again."""

    status: str = ""
    reason: str = ""
    until: datetime | None = None

    @property
    def send(self) -> bool:
        return not self.status


SEND = Verdict()


def verdict(
    *,
    recipient: RecipientRules,
    category: CategoryRules,
    tenant: TenantRules,
    channel: str,
    created_at: datetime,
    now: datetime,
) -> Verdict:
    """Apply rules 1-7 of the module docstring to one delivery."""
    if category.kind == CRITICAL:
        return SEND
    if expired := expiry_verdict(category=category, created_at=created_at, at=now):
        return expired
    if recipient.paused and (recipient.paused_until is None or recipient.paused_until > now):
        until = f" until {recipient.paused_until.isoformat()}" if recipient.paused_until else ""
        return Verdict(SUPPRESSED, f"the recipient paused all notifications{until}")
    if category.kind == MARKETING and not recipient.consents.get(channel, False):
        return Verdict(SUPPRESSED, f"no marketing consent on {channel}")
    if not switch_on(own=recipient.channels, defaults=tenant.channel_defaults, channel=channel):
        source = "the recipient" if channel in recipient.channels else "the tenant's default"
        return Verdict(SUPPRESSED, f"{channel} is turned off by {source}")
    own = recipient.categories.get(category.key, {})
    if not switch_on(own=own, defaults=category.channel_defaults, channel=channel):
        source = "the recipient" if channel in own else "the category's default"
        return Verdict(SUPPRESSED, f"'{category.key}' on {channel} is turned off by {source}")
    window = recipient.quiet_hours or tenant.quiet_hours
    if window and (end := quiet_hours_end(quiet_hours=window, timezone_name=recipient.timezone, at=now)):
        if expired := expiry_verdict(category=category, created_at=created_at, at=end):
            return Verdict(EXPIRED, f"quiet hours until {end.isoformat()} outlast the category's expiry")
        return Verdict(DEFERRED, f"quiet hours until {end.isoformat()} ({recipient.timezone})", until=end)
    return SEND


def switch_on(*, own: dict[str, bool], defaults: dict[str, bool], channel: str) -> bool:
    """A switch as it stands: the recipient's own setting, else the default, else on."""
    return own.get(channel, defaults.get(channel, True))


def expiry_verdict(*, category: CategoryRules, created_at: datetime, at: datetime) -> Verdict | None:
    if category.expire_after is not None and at > created_at + category.expire_after:
        return Verdict(EXPIRED, f"not delivered within {category.expire_after} of the event")
    return None


def quiet_hours_end(*, quiet_hours: dict[str, Any], timezone_name: str, at: datetime) -> datetime | None:
    """When the quiet hours that `at` falls in end (in UTC), or None outside them.

    A window may cross midnight (22:00-07:00); `days` lists the weekdays (0 is Monday) on
    which a window starts. Instants are compared in UTC, because Python compares two
    datetimes of the same zone by their wall clocks, which goes wrong across a DST change."""
    zone = ZoneInfo(timezone_name or "UTC")
    start, end = _clock(quiet_hours["start"]), _clock(quiet_hours["end"])
    days = quiet_hours.get("days")
    at_utc = at.astimezone(UTC)
    today = at_utc.astimezone(zone).date()
    for day in (today - timedelta(days=1), today):
        if days is not None and day.weekday() not in days:
            continue
        window_start = _local(day, start, zone)
        window_end = _local(day + timedelta(days=1) if end <= start else day, end, zone)
        if window_start <= at_utc < window_end:
            return window_end
    return None


def _clock(value: str) -> time:
    return time.fromisoformat(value)


def _local(day: date, clock: time, zone: ZoneInfo) -> datetime:
    # A wall time skipped by a DST change (02:30 on the spring-forward night) resolves to the
    # instant an hour later; a repeated one (the fall-back night) to its first occurrence.
    return datetime.combine(day, clock, tzinfo=zone).astimezone(UTC)


# --- Validation of the settings above, for models and the API ---------------------------


def validate_channel_switches(value: Any) -> None:
    """{"sms": false, ...}: known channels, each on or off."""
    if not isinstance(value, dict):
        raise ValidationError("Give an object of channel: true/false.")
    for channel, enabled in value.items():
        if channel not in CHANNELS:
            raise ValidationError(f"'{channel}' is not a channel; use one of {', '.join(CHANNELS)}.")
        if not isinstance(enabled, bool):
            raise ValidationError(f"'{channel}' must be true or false.")


def validate_channel_order(value: Any) -> None:
    """["push", "sms", "email"]: known channels, each once."""
    if not isinstance(value, list) or not all(isinstance(channel, str) for channel in value):
        raise ValidationError('Give a list of channels, for example ["push", "sms", "email"].')
    for channel in value:
        if channel not in CHANNELS:
            raise ValidationError(f"'{channel}' is not a channel; use one of {', '.join(CHANNELS)}.")
    if len(set(value)) != len(value):
        raise ValidationError("Name each channel once.")


def validate_category_switches(value: Any) -> None:
    """{"<category key>": {"email": false}, ...}."""
    if not isinstance(value, dict):
        raise ValidationError("Give an object of category key: {channel: true/false}.")
    for switches in value.values():
        validate_channel_switches(switches)


def validate_quiet_hours(value: Any) -> None:
    """{} for none, or {"start": "22:00", "end": "07:00", "days": [0, 1, 2, 3, 4]} (days optional)."""
    if value in ({}, None):
        return
    if not isinstance(value, dict) or set(value) - {"start", "end", "days"} or not {"start", "end"} <= set(value):
        raise ValidationError('Give {"start": "HH:MM", "end": "HH:MM"} and, optionally, "days": [0-6] (0 is Monday).')
    try:
        start, end = _clock(value["start"]), _clock(value["end"])
    except (TypeError, ValueError):
        raise ValidationError("'start' and 'end' are local times written HH:MM.")
    if start == end:
        raise ValidationError("'start' and 'end' must differ.")
    days = value.get("days")
    if days is not None and (not isinstance(days, list) or not all(isinstance(d, int) and 0 <= d <= 6 for d in days)):
        raise ValidationError("'days' is a list of weekdays, 0 (Monday) to 6 (Sunday).")


def validate_frequency_cap(value: str) -> None:
    """ "" for none, or N per window: "3 per day", "10 per 2 hours"."""
    if not value:
        return
    try:
        limits.parse(value)
    except ValueError:
        raise ValidationError(f"'{value}' is not a cap; write it as N per window, for example '3 per day'.")
