import json
from collections.abc import Mapping
from typing import Any

from rest_framework import exceptions, parsers

# Deeper than any payload the API takes (event data, recipient attributes, preferences nest a
# few levels), and far below Python's recursion limit (1,000 frames), so nothing downstream
# that recurses (json.dumps, psycopg's adapters, the template engine) can overflow.
MAX_JSON_DEPTH = 64
TOO_DEEP = f"JSON may nest at most {MAX_JSON_DEPTH} levels of arrays and objects."


class JsonTooDeep(ValueError):
    """JSON nested past MAX_JSON_DEPTH (or past what the decoder could recurse into)."""

    def __init__(self) -> None:
        super().__init__(TOO_DEEP)


def _unstorable(text: str) -> bool:
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def json_check(value: Any) -> str | None:
    """The path of the first string PostgreSQL cannot store (NUL, unpaired surrogates), or None;
    raises JsonTooDeep past MAX_JSON_DEPTH. Loops, not recursion, whatever the nesting."""
    if isinstance(value, str):
        return "" if _unstorable(value) else None
    if not isinstance(value, dict | list):
        return None
    # A first pass without paths: building them for every node would double the time.
    pending: list[tuple[Any, int]] = [(value, 1)]
    found = False
    while pending and not found:
        container, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise JsonTooDeep()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in items:
            if isinstance(item, str):
                found = found or _unstorable(item)
            elif isinstance(item, dict | list):
                pending.append((item, depth + 1))
            if isinstance(key, str):
                found = found or _unstorable(key)
    return _unstorable_path(value) if found else None


def _unstorable_path(value: Any) -> str | None:
    """The path of the first unstorable string in document order, in JSON already checked
    for depth."""
    pending: list[tuple[Any, str]] = [(value, "")]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            if _unstorable(item):
                return path
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                pending += [(child, f"{path}.{key}" if path else key), (key, path)]
        elif isinstance(item, list):
            pending += [(child, f"{path}[{index}]") for index, child in reversed(list(enumerate(item)))]
    return None


def json_loads_bounded(text: str | bytes) -> Any:
    """json.loads that raises JsonTooDeep, a ValueError, for nesting past MAX_JSON_DEPTH
    instead of a RecursionError from the decoder."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise JsonTooDeep()
    json_check(data)
    return data


class JSONParser(parsers.JSONParser):
    """JSON that the database can store: text with a NUL character or an unpaired surrogate
    is refused with a 400 naming the field, instead of failing on insert; nesting past
    MAX_JSON_DEPTH is refused with a 400 saying so, instead of a RecursionError's 500."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
            path = json_check(data)
        except (RecursionError, JsonTooDeep):
            raise exceptions.ParseError(TOO_DEEP)
        if path is not None:
            raise exceptions.ValidationError(
                {path or "non_field_errors": ["Text may not contain NUL characters or unpaired surrogates."]}
            )
        return data
