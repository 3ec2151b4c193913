"""Phone numbers in the one form they are stored, compared, suppressed and sent in: E.164."""

import phonenumbers


def e164(*, number: str) -> str | None:
    """The number in E.164 form when it is a valid, complete number, else None."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
