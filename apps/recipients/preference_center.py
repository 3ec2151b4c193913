"""The pages a person reaches from a signed link in a notification, with no login: the hosted
preference center, to choose what reaches them, where and when; and one-click unsubscribe."""

from dataclasses import dataclass
from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo, available_timezones

from django import forms
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from apps.catalog.models import Category, CategoryKind, Channel
from apps.recipients.models import Recipient
from apps.recipients.services import (
    consent_record,
    consents_current,
    preferences_get,
    preferences_update,
    unsubscribe,
)
from apps.recipients.tokens import (
    PREFERENCES,
    UNSUBSCRIBE,
    Purpose,
    RecipientTokenInvalid,
    recipient_link,
    recipient_token_read,
)
from notify.policy.rules import switch_on

CHANNEL_LABELS = dict(Channel.choices)
WEEKDAYS = [(0, "Mon"), (1, "Tue"), (2, "Wed"), (3, "Thu"), (4, "Fri"), (5, "Sat"), (6, "Sun")]
TIMEZONES = sorted(available_timezones())


@dataclass(frozen=True)
class Switch:
    """One checkbox: its form field name, and what it stands for."""

    name: str
    channel: str
    label: str


@dataclass(frozen=True)
class CategoryRow:
    category: Category
    switches: list[Switch]


class PreferenceCenterForm(forms.Form):
    paused = forms.BooleanField(required=False, label="Pause all notifications")
    paused_until = forms.DateField(required=False, label="Until (leave empty for no end date)")
    quiet_enabled = forms.BooleanField(required=False, label="Hold notifications during quiet hours")
    quiet_start = forms.TimeField(required=False, label="From", initial=time(22, 0))
    quiet_end = forms.TimeField(required=False, label="To", initial=time(7, 0))
    quiet_days = forms.TypedMultipleChoiceField(
        choices=WEEKDAYS, coerce=int, required=False, label="On nights starting", widget=forms.CheckboxSelectMultiple
    )
    timezone = forms.ChoiceField(choices=[(name, name) for name in TIMEZONES], label="Your timezone")

    def __init__(self, *args: object, recipient: Recipient, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.recipient = recipient
        categories = list(recipient.tenant.categories.order_by("kind", "key"))
        used = [c for c in CHANNEL_LABELS if any(c in category.default_channels for category in categories)]
        self.channel_switches = [Switch(f"channel__{c}", c, CHANNEL_LABELS[c]) for c in used]
        self.rows = [
            CategoryRow(
                category=category,
                switches=[
                    Switch(f"category__{category.key}__{c}", c, CHANNEL_LABELS[c]) for c in category.default_channels
                ],
            )
            for category in categories
            if category.kind != CategoryKind.CRITICAL
        ]
        self.always_sent = [category for category in categories if category.kind == CategoryKind.CRITICAL]
        marketing_channels = {
            c for row in self.rows if row.category.kind == CategoryKind.MARKETING for c in row.category.default_channels
        }
        self.consent_switches = [Switch(f"consent__{c}", c, CHANNEL_LABELS[c]) for c in used if c in marketing_channels]
        for switch in [*self.channel_switches, *self.consent_switches]:
            self.fields[switch.name] = forms.BooleanField(required=False, label=switch.label)
        for row in self.rows:
            for switch in row.switches:
                self.fields[switch.name] = forms.BooleanField(required=False, label=switch.label)
        if not self.is_bound:
            self._initial_from(recipient)

    def _initial_from(self, recipient: Recipient) -> None:
        preferences = preferences_get(recipient=recipient)
        tenant = recipient.tenant
        for switch in self.channel_switches:
            self.initial[switch.name] = switch_on(
                own=preferences.channels, defaults=tenant.channel_defaults, channel=switch.channel
            )
        for row in self.rows:
            own = preferences.categories.get(row.category.key, {})
            for switch in row.switches:
                self.initial[switch.name] = switch_on(
                    own=own, defaults=row.category.channel_defaults, channel=switch.channel
                )
        consents = consents_current(recipient=recipient)
        for switch in self.consent_switches:
            self.initial[switch.name] = switch.channel in consents and consents[switch.channel].granted
        paused_until = preferences.paused_until
        quiet = preferences.quiet_hours
        self.initial.update(
            paused=preferences.paused and (paused_until is None or paused_until > datetime.now(UTC)),
            paused_until=paused_until.astimezone(ZoneInfo(recipient.timezone or "UTC")).date()
            if paused_until
            else None,
            quiet_enabled=bool(quiet),
            quiet_start=time.fromisoformat(quiet["start"]) if quiet else time(22, 0),
            quiet_end=time.fromisoformat(quiet["end"]) if quiet else time(7, 0),
            quiet_days=quiet.get("days", [d for d, _ in WEEKDAYS]) if quiet else [d for d, _ in WEEKDAYS],
            timezone=recipient.timezone or "UTC",
        )

    # Bound fields grouped for the template, which cannot look fields up by a computed name.
    @property
    def channel_fields(self) -> list[forms.BoundField]:
        return [self[s.name] for s in self.channel_switches]

    @property
    def consent_fields(self) -> list[forms.BoundField]:
        return [self[s.name] for s in self.consent_switches]

    @property
    def category_fields(self) -> list[tuple[Category, list[forms.BoundField]]]:
        return [(row.category, [self[s.name] for s in row.switches]) for row in self.rows]

    def clean(self) -> dict:
        data = super().clean() or {}
        if data.get("quiet_enabled"):
            if not data.get("quiet_start") or not data.get("quiet_end"):
                self.add_error("quiet_start", "Give the time quiet hours start and end.")
            elif data["quiet_start"] == data["quiet_end"]:
                self.add_error("quiet_end", "Quiet hours must end at another time than they start.")
        return data

    @transaction.atomic
    def save(self) -> None:
        data = self.cleaned_data
        recipient = self.recipient
        quiet_hours = {}
        if data["quiet_enabled"]:
            quiet_hours = {"start": data["quiet_start"].strftime("%H:%M"), "end": data["quiet_end"].strftime("%H:%M")}
            if len(data["quiet_days"]) < len(WEEKDAYS):
                quiet_hours["days"] = sorted(data["quiet_days"])
        until = data["paused_until"]
        zone = ZoneInfo(data["timezone"])
        preferences_update(
            recipient=recipient,
            merge=True,
            fields={
                "paused": data["paused"],
                "paused_until": datetime.combine(until, time.max, tzinfo=zone) if data["paused"] and until else None,
                # Only what differs from the default is the person's own choice; the rest follows
                # the defaults (None clears a setting), so a later change of default reaches them.
                "channels": {
                    s.channel: _own(data[s.name], default=recipient.tenant.channel_defaults.get(s.channel, True))
                    for s in self.channel_switches
                },
                "categories": {
                    row.category.key: {
                        s.channel: _own(data[s.name], default=row.category.channel_defaults.get(s.channel, True))
                        for s in row.switches
                    }
                    for row in self.rows
                },
                "quiet_hours": quiet_hours,
            },
        )
        if recipient.timezone != data["timezone"]:
            recipient.timezone = data["timezone"]
            recipient.save(update_fields=["timezone", "updated_at"])
        consents = consents_current(recipient=recipient)
        for switch in self.consent_switches:
            granted = data[switch.name]
            if (switch.channel in consents and consents[switch.channel].granted) != granted:
                consent_record(recipient=recipient, channel=switch.channel, granted=granted, source="preference center")


def _own(value: bool, *, default: bool) -> bool | None:
    return None if value == default else value


def _link_read(
    request: HttpRequest, *, purpose: Purpose, token: str
) -> tuple[Recipient, dict[str, str]] | HttpResponse:
    """The recipient the link is for and what else it carries, or the page that refuses it."""
    try:
        parsed = recipient_token_read(purpose=purpose, token=token)
        return Recipient.objects.select_related("tenant").get(id=parsed.recipient_id), parsed.extra
    except (RecipientTokenInvalid, Recipient.DoesNotExist) as error:
        expired = isinstance(error, RecipientTokenInvalid) and error.expired
        return render(request, "preferences/refused.html", {"expired": expired, "noun": purpose.noun}, status=403)


def preference_center(request: HttpRequest, token: str) -> HttpResponse:
    link = _link_read(request, purpose=PREFERENCES, token=token)
    if isinstance(link, HttpResponse):
        return link
    recipient, _ = link
    if request.method == "POST":
        form = PreferenceCenterForm(request.POST, recipient=recipient)
        if form.is_valid():
            form.save()
            return redirect(f"{reverse('preference-center', args=[token])}?saved=1")
    else:
        form = PreferenceCenterForm(recipient=recipient)
    return render(
        request,
        "preferences/center.html",
        {"form": form, "recipient": recipient, "saved": request.GET.get("saved") == "1", "weekdays": WEEKDAYS},
    )


# Mail clients POST the one-click unsubscribe (RFC 8058) without any CSRF token; the signed
# link is what authorises it.
@csrf_exempt
def unsubscribe_page(request: HttpRequest, token: str) -> HttpResponse:
    """POST unsubscribes at once: the mail client's one-click, or the button on this page.
    GET only shows that button, because mail scanners follow links in messages by themselves."""
    link = _link_read(request, purpose=UNSUBSCRIBE, token=token)
    if isinstance(link, HttpResponse):
        return link
    recipient, extra = link
    category = recipient.tenant.categories.filter(key=extra["c"]).first()
    context = {
        "category": category.description if category and category.description else extra["c"],
        "channel": CHANNEL_LABELS.get(extra["ch"], extra["ch"]),
        "preferences_url": recipient_link(purpose=PREFERENCES, recipient_id=recipient.id),
        "done": request.method == "POST",
    }
    if request.method == "POST":
        unsubscribe(recipient=recipient, category_key=extra["c"], channel=extra["ch"])
    return render(request, "preferences/unsubscribe.html", context)


def preferences_from_email(request: HttpRequest, token: str) -> HttpResponse:
    """A message's preferences link: its unsubscribe token, exchanged for a preference-center
    link (apps.recipients.tokens.email_links)."""
    link = _link_read(request, purpose=UNSUBSCRIBE, token=token)
    if isinstance(link, HttpResponse):
        return link
    recipient, _ = link
    return redirect(recipient_link(purpose=PREFERENCES, recipient_id=recipient.id))
