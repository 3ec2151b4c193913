"""The preference rules on their own: the order of precedence, each category kind, and quiet
hours across midnight and daylight-saving changes."""

from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError

from notify.policy.rules import (
    DEFERRED,
    EXPIRED,
    SUPPRESSED,
    CategoryRules,
    RecipientRules,
    TenantRules,
    quiet_hours_end,
    validate_quiet_hours,
    verdict,
)

NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # a Wednesday
NEWS = CategoryRules(key="news", kind="transactional")


def decide(
    recipient: RecipientRules = RecipientRules(),
    category: CategoryRules = NEWS,
    tenant: TenantRules = TenantRules(),
    channel: str = "email",
    now: datetime = NOW,
    created_at: datetime = NOW,
):  # type: ignore[no-untyped-def]
    return verdict(
        recipient=recipient, category=category, tenant=tenant, channel=channel, created_at=created_at, now=now
    )


def test_with_nothing_set_everything_is_sent():
    assert decide().send


@pytest.mark.parametrize(
    ("recipient_channels", "recipient_category", "tenant_default", "category_default", "sent"),
    [
        # The recipient's channel switch beats the tenant's default, either way.
        ({"email": True}, {}, {"email": False}, {}, True),
        ({}, {}, {"email": False}, {}, False),
        ({"email": False}, {}, {"email": True}, {}, False),
        # The recipient's category switch beats the category's default, either way.
        ({}, {"email": True}, {}, {"email": False}, True),
        ({}, {}, {}, {"email": False}, False),
        ({}, {"email": False}, {}, {"email": True}, False),
        # Both must be on: a channel turned off stays off for every category.
        ({"email": False}, {"email": True}, {}, {}, False),
        # Other channels' settings do not matter.
        ({"sms": False}, {"sms": False}, {"sms": False}, {"sms": False}, True),
    ],
)
def test_the_order_of_precedence(recipient_channels, recipient_category, tenant_default, category_default, sent):
    result = decide(
        recipient=RecipientRules(channels=recipient_channels, categories={"news": recipient_category}),
        category=CategoryRules(key="news", kind="transactional", channel_defaults=category_default),
        tenant=TenantRules(channel_defaults=tenant_default),
    )
    assert result.send is sent
    if not sent:
        assert result.status == SUPPRESSED and "email" in result.reason


def test_a_critical_category_ignores_pause_opt_outs_quiet_hours_and_consent():
    everything_off = RecipientRules(
        paused=True,
        channels={"sms": False},
        categories={"otp": {"sms": False}},
        quiet_hours={"start": "00:00", "end": "23:59"},
    )
    assert decide(recipient=everything_off, category=CategoryRules(key="otp", kind="critical"), channel="sms").send


def test_a_marketing_category_needs_consent_on_the_channel():
    promo = CategoryRules(key="promo", kind="marketing")
    assert decide(category=promo).reason == "no marketing consent on email"
    assert decide(category=promo, recipient=RecipientRules(consents={"email": True})).send
    assert not decide(category=promo, recipient=RecipientRules(consents={"email": True}), channel="sms").send
    withdrawn = RecipientRules(consents={"email": False})
    assert decide(category=promo, recipient=withdrawn).status == SUPPRESSED
    # Consent does not override an opt-out.
    opted_out = RecipientRules(consents={"email": True}, categories={"promo": {"email": False}})
    assert decide(category=promo, recipient=opted_out).status == SUPPRESSED


def test_a_transactional_category_can_be_opted_out_of_per_channel():
    recipient = RecipientRules(categories={"news": {"sms": False}})
    assert decide(recipient=recipient, channel="sms").status == SUPPRESSED
    assert decide(recipient=recipient, channel="email").send


def test_a_pause_holds_everything_until_it_ends():
    indefinitely = RecipientRules(paused=True)
    assert "paused" in decide(recipient=indefinitely).reason
    until_tomorrow = RecipientRules(paused=True, paused_until=NOW + timedelta(days=1))
    assert decide(recipient=until_tomorrow).status == SUPPRESSED
    ended = RecipientRules(paused=True, paused_until=NOW - timedelta(minutes=1))
    assert decide(recipient=ended).send


def test_quiet_hours_defer_until_they_end_in_the_recipients_timezone():
    # 12:00 UTC is 21:30 in Adelaide (UTC+9:30 in June), inside 21:00-07:00.
    recipient = RecipientRules(quiet_hours={"start": "21:00", "end": "07:00"}, timezone="Australia/Adelaide")
    result = decide(recipient=recipient)
    assert result.status == DEFERRED
    assert result.until == datetime(2026, 6, 10, 21, 30, tzinfo=UTC)  # 07:00 next morning there
    assert "Australia/Adelaide" in result.reason
    # The tenant's default applies to those with none of their own.
    assert decide(tenant=TenantRules(quiet_hours={"start": "11:00", "end": "13:00"})).until == NOW + timedelta(hours=1)


def test_a_category_expiry_drops_what_quiet_hours_would_hold_too_long():
    recipient = RecipientRules(quiet_hours={"start": "11:00", "end": "15:00"})
    short_lived = CategoryRules(key="news", kind="transactional", expire_after=timedelta(hours=1))
    assert decide(recipient=recipient, category=short_lived).status == EXPIRED
    assert decide(recipient=recipient, category=short_lived, created_at=NOW - timedelta(hours=2)).status == EXPIRED
    long_lived = CategoryRules(key="news", kind="transactional", expire_after=timedelta(hours=6))
    assert decide(recipient=recipient, category=long_lived).status == DEFERRED


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


NIGHT = {"start": "22:00", "end": "07:00"}


@pytest.mark.parametrize(
    ("now", "end"),
    [
        ("2026-06-10T21:59:59+02:00", None),  # just before
        ("2026-06-10T22:00:00+02:00", "2026-06-11T07:00:00+02:00"),  # starts
        ("2026-06-10T23:59:00+02:00", "2026-06-11T07:00:00+02:00"),  # before midnight
        ("2026-06-11T00:30:00+02:00", "2026-06-11T07:00:00+02:00"),  # after midnight: yesterday's window
        ("2026-06-11T07:00:00+02:00", None),  # ends
    ],
)
def test_a_window_that_crosses_midnight(now, end):
    result = quiet_hours_end(quiet_hours=NIGHT, timezone_name="Europe/Paris", at=at(now))
    assert result == (at(end) if end else None)


def test_days_name_the_weekday_a_window_starts_on():
    weeknights = {"start": "22:00", "end": "07:00", "days": [0, 1, 2, 3, 4]}  # Monday to Friday nights
    friday_night, saturday_night = at("2026-06-12T23:00:00+00:00"), at("2026-06-13T23:00:00+00:00")
    assert quiet_hours_end(quiet_hours=weeknights, timezone_name="UTC", at=friday_night) == at("2026-06-13T07:00+00:00")
    assert quiet_hours_end(quiet_hours=weeknights, timezone_name="UTC", at=saturday_night) is None
    # Sunday night is not listed, and early Monday belongs to it.
    assert quiet_hours_end(quiet_hours=weeknights, timezone_name="UTC", at=at("2026-06-15T03:00+00:00")) is None


def test_quiet_hours_across_the_spring_forward_night():
    # New York, 8 March 2026: 02:00 EST jumps to 03:00 EDT. 22:00-07:00 lasts 8 hours that night.
    end = quiet_hours_end(quiet_hours=NIGHT, timezone_name="America/New_York", at=at("2026-03-08T01:30:00-05:00"))
    assert end == at("2026-03-08T07:00:00-04:00")
    assert end - at("2026-03-07T22:00:00-05:00") == timedelta(hours=8)
    # A window starting in the skipped hour starts when the clocks reach it (03:30 EDT).
    gap = {"start": "02:30", "end": "05:00"}
    assert (
        quiet_hours_end(quiet_hours=gap, timezone_name="America/New_York", at=at("2026-03-08T03:15:00-04:00")) is None
    )
    assert quiet_hours_end(quiet_hours=gap, timezone_name="America/New_York", at=at("2026-03-08T03:45:00-04:00")) == at(
        "2026-03-08T05:00:00-04:00"
    )


def test_quiet_hours_across_the_fall_back_night():
    # New York, 1 November 2026: 02:00 EDT falls back to 01:00 EST. 22:00-07:00 lasts 10 hours.
    start = at("2026-10-31T22:00:00-04:00")
    end = quiet_hours_end(quiet_hours=NIGHT, timezone_name="America/New_York", at=at("2026-11-01T01:30:00-05:00"))
    assert end == at("2026-11-01T07:00:00-05:00")
    assert end - start == timedelta(hours=10)
    # Both 01:30s (EDT, then EST) are inside the window.
    for repeated in ("2026-11-01T01:30:00-04:00", "2026-11-01T01:30:00-05:00"):
        assert quiet_hours_end(quiet_hours=NIGHT, timezone_name="America/New_York", at=at(repeated)) == end


@pytest.mark.parametrize(
    "bad",
    [
        {"start": "22:00"},
        {"start": "22:00", "end": "22:00"},
        {"start": "25:00", "end": "07:00"},
        {"start": "22:00", "end": "07:00", "days": [7]},
        {"start": "22:00", "end": "07:00", "when": "always"},
        "22:00-07:00",
    ],
)
def test_malformed_quiet_hours_are_refused(bad):
    with pytest.raises(ValidationError):
        validate_quiet_hours(bad)
