from collections.abc import Mapping
from typing import Any

from rest_framework import exceptions, parsers


def _unstorable_text_path(value: Any, path: str = "") -> str | None:
    """The path of the first string PostgreSQL cannot store (NUL, unpaired surrogates)."""
    if isinstance(value, str):
        if "\x00" in value:
            return path
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if (found := _unstorable_text_path(key, path)) is not None:
                return found
            if (found := _unstorable_text_path(item, f"{path}.{key}" if path else str(key))) is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if (found := _unstorable_text_path(item, f"{path}[{index}]")) is not None:
                return found
    return None


class JSONParser(parsers.JSONParser):
    """JSON that the database can store: text with a NUL character or an unpaired surrogate
    is refused with a 400 naming the field, instead of failing on insert."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        data = super().parse(stream, media_type, parser_context)
        path = _unstorable_text_path(data)
        if path is not None:
            raise exceptions.ValidationError(
                {path or "non_field_errors": ["Text may not contain NUL characters or unpaired surrogates."]}
            )
        return data
