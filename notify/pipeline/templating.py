"""The template language of notification content: Django's, plus filters that format money,
numbers, dates and times for the recipient's locale and timezone through Babel (CLDR data),
with no hand-written formats:

    {{ data.total|money:"EUR" }}        1.234,50 € for de-DE, €1,234.50 for en-IE
    {{ data.count|number }}             1 234 567 for fr
    {{ data.starts_at|datetime }}       in the recipient's timezone; |datetime:"short" or "long"
    {{ data.due_on|localdate }}         a date; |localdate:"long"

They format for the locale and timezone that content_render() is rendering for. A value
they cannot read (not a number, not an ISO date) is shown as it is, rather than failing the
notification."""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime
from babel.numbers import format_currency, format_decimal
from django.conf import settings
from django.template import Engine, Library

register = Library()
ENGINE = Engine(builtins=[__name__])

_rendering_for: ContextVar[tuple[str, str]] = ContextVar("rendering_for", default=("", "UTC"))


@contextmanager
def formatting_for(*, locale: str, timezone: str) -> Iterator[None]:
    token = _rendering_for.set((locale, timezone or "UTC"))
    try:
        yield
    finally:
        _rendering_for.reset(token)


@lru_cache(maxsize=256)
def _babel_locale(tag: str) -> Locale:
    for candidate in (tag, tag.partition("-")[0], settings.NOTIFY_DEFAULT_LOCALE, "en"):
        try:
            return Locale.parse(candidate.replace("_", "-"), sep="-")
        except (UnknownLocaleError, ValueError, TypeError):
            continue
    raise AssertionError("'en' is always a Babel locale")


def _locale() -> Locale:
    return _babel_locale(_rendering_for.get()[0])


def _decimal(value: Any) -> Decimal | None:
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


@register.filter
def money(value: Any, currency: str) -> Any:
    amount = _decimal(value)
    return value if amount is None else format_currency(amount, str(currency).upper(), locale=_locale())


@register.filter
def number(value: Any) -> Any:
    amount = _decimal(value)
    return value if amount is None else format_decimal(amount, locale=_locale())


@register.filter(name="datetime")
def datetime_(value: Any, length: str = "medium") -> Any:
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return format_datetime(moment, length, tzinfo=ZoneInfo(_rendering_for.get()[1]), locale=_locale())
    except (ValueError, LookupError):
        return value


@register.filter
def localdate(value: Any, length: str = "medium") -> Any:
    try:
        day = value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
        return format_date(day, length, locale=_locale())
    except (ValueError, LookupError):
        return value
