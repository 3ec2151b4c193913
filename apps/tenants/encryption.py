"""Secrets and personal content encrypted at rest, with the keys in NOTIFY_ENCRYPTION_KEYS
(Fernet keys, newest first: the newest encrypts, every one still decrypts, so a key is rotated by
putting a new one in front and running `manage.py secrets_reencrypt`).

Two kinds of field:
- `EncryptedJSONField` always encrypts (provider credentials): the column holds ciphertext only.
- `SealedJSONField` and `SealedTextField` encrypt a value that was marked for it (`content_seal`,
  for tenants with `encrypt_content`) and store the rest as they are, so the hot path of a tenant
  without it pays one isinstance check a value. Reading decrypts transparently either way.

Hand-written rather than a kept field library: the maintained ones (django-fernet-encrypted-fields)
derive their keys from SECRET_KEY and salts instead of taking operator-held Fernet keys, and none
encrypts per row by a tenant's choice, which content encryption needs."""

import base64
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django import forms
from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, models, transaction

# What an encrypted text starts with, so a sealed value is told from a plain one when read.
CIPHER_PREFIX = "fernet:"
# Every Fernet token starts so (its version byte and the high bytes of its timestamp): a plain
# text must match both to be taken for a ciphertext.
_TOKEN_START = CIPHER_PREFIX + "gAAAAA"
# The JSON a sealed object is stored as: {"fernet": "<token>"}.
SEALED_KEY = "fernet"


class SecretUnreadable(Exception):
    """A stored ciphertext that no key in NOTIFY_ENCRYPTION_KEYS decrypts."""


class SealedDict(dict):
    """A JSON object to be stored encrypted; otherwise an ordinary dict."""


class SealedText(str):
    """A text to be stored encrypted; otherwise an ordinary str."""

    __slots__ = ()


def encryption_keys() -> tuple[str, ...]:
    """The configured keys, newest first. With DEBUG on and none configured, one derived from
    SECRET_KEY, so a developer's checkout runs; outside DEBUG the start-up checks refuse that."""
    keys = tuple(settings.NOTIFY_ENCRYPTION_KEYS)
    if keys:
        return keys
    if settings.DEBUG:
        return (base64.urlsafe_b64encode(hashlib.sha256(settings.SECRET_KEY.encode()).digest()).decode(),)
    raise ImproperlyConfigured("NOTIFY_ENCRYPTION_KEYS is empty: no key to encrypt or decrypt secrets with.")


def encryption_keys_problem(*, keys: list[str]) -> str:
    """Why the given keys cannot be used, or "" when they can."""
    if not keys:
        return "it is empty"
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except ValueError:
            return f"key {position} is not a Fernet key (32 url-safe base64-encoded bytes)"
    return ""


@lru_cache(maxsize=8)
def _multi_fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(key) for key in keys])


def text_encrypt(*, plaintext: str) -> str:
    """The stored form of a text: the prefix and a Fernet token under the newest key."""
    return CIPHER_PREFIX + _multi_fernet(encryption_keys()).encrypt(plaintext.encode()).decode()


def text_decrypt(*, stored: str) -> str:
    """The text a stored ciphertext holds, under whichever configured key made it."""
    try:
        return _multi_fernet(encryption_keys()).decrypt(stored.removeprefix(CIPHER_PREFIX).encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            "a value stored encrypted cannot be decrypted with any key in NOTIFY_ENCRYPTION_KEYS: "
            "the key it was written under is missing (add it back after the newest key)"
        ) from None


def ciphertext_current(*, stored: str) -> bool:
    """Whether a stored ciphertext is already under the newest key."""
    try:
        Fernet(encryption_keys()[0]).decrypt(stored.removeprefix(CIPHER_PREFIX).encode())
    except InvalidToken:
        return False
    return True


def ciphertext_reencrypt(*, stored: str) -> str:
    """The same plaintext encrypted under the newest key."""
    return text_encrypt(plaintext=text_decrypt(stored=stored))


def content_seal(*, encrypt: bool, value: Any) -> Any:
    """Mark a JSON object or a text to be stored encrypted when `encrypt` (the tenant's
    encrypt_content); unchanged otherwise."""
    if not encrypt or isinstance(value, SealedDict | SealedText):
        return value
    if isinstance(value, dict):
        return SealedDict(value)
    if isinstance(value, str):
        return SealedText(value)
    return value


class EncryptedJSONField(models.TextField):
    """A JSON value stored only as ciphertext (a text column), for credentials."""

    # For django-stubs: the value is JSON (a dict for Provider.config), not the column's str.
    _pyi_private_set_type: Any
    _pyi_private_get_type: Any

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> Any:
        return None if value is None else json.loads(text_decrypt(stored=value))

    def to_python(self, value: Any) -> Any:
        return value

    def get_prep_value(self, value: Any) -> str | None:
        return None if value is None else text_encrypt(plaintext=json.dumps(value))

    def value_to_string(self, obj: models.Model) -> str:
        # Serialised (dumpdata) as the plain JSON: the dump is as secret as the database.
        return json.dumps(self.value_from_object(obj))

    def formfield(self, **kwargs: Any) -> forms.Field:  # type: ignore[override]
        return forms.JSONField(**{"required": not self.blank, **kwargs})


class SealedJSONField(models.JSONField):
    """JSON stored as it is, or encrypted as {"fernet": token} when given a SealedDict."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        value = super().from_db_value(value, expression, connection)
        if type(value) is dict and len(value) == 1 and isinstance(value.get(SEALED_KEY), str):
            return SealedDict(json.loads(text_decrypt(stored=value[SEALED_KEY])))
        return value

    def get_prep_value(self, value: Any) -> Any:
        if isinstance(value, SealedDict):
            value = {SEALED_KEY: text_encrypt(plaintext=json.dumps(value, cls=self.encoder))}
        return super().get_prep_value(value)


class SealedTextField(models.TextField):
    """Text stored as it is, or encrypted (prefixed) when given a SealedText."""

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> str | None:
        if value is not None and value.startswith(_TOKEN_START):
            return SealedText(text_decrypt(stored=value))
        return value

    def get_prep_value(self, value: Any) -> Any:
        if isinstance(value, SealedText):
            return text_encrypt(plaintext=str(value))
        return super().get_prep_value(value)


@dataclass(frozen=True)
class ReencryptCount:
    """What `secrets_reencrypt` did to one encrypted column."""

    column: str  # "table.column"
    encrypted: int  # values stored encrypted
    moved: int  # of those, re-encrypted under the newest key


def _encrypted_columns() -> list[tuple[type[models.Model], models.Field, str]]:
    """(model, field, SQL condition that picks its encrypted values) for every encrypted field."""
    columns: list[tuple[type[models.Model], models.Field, str]] = []
    for model in apps.get_models():
        for field in model._meta.concrete_fields:
            column = connection.ops.quote_name(str(field.column))
            if isinstance(field, EncryptedJSONField):
                columns.append((model, field, f"{column} IS NOT NULL"))
            elif isinstance(field, SealedJSONField):
                columns.append((model, field, f"jsonb_typeof({column} -> '{SEALED_KEY}') = 'string'"))
            elif isinstance(field, SealedTextField):
                columns.append((model, field, f"{column} LIKE '{_TOKEN_START}%%'"))
    return columns


def secrets_reencrypt(*, batch_size: int = 500) -> list[ReencryptCount]:
    """Re-encrypt every value stored encrypted under the newest key, one short transaction per
    batch of rows read in primary-key order (no long locks), and count them per column."""
    counts = []
    for model, field, condition in _encrypted_columns():
        table, column = connection.ops.quote_name(model._meta.db_table), connection.ops.quote_name(str(field.column))
        pk = connection.ops.quote_name(str(model._meta.pk.column))
        encrypted = moved = 0
        after: Any = None
        while True:
            with transaction.atomic(), connection.cursor() as cursor:
                # Raw SQL: the fields decrypt when they read, and this must see the ciphertext.
                cursor.execute(
                    f"SELECT {pk}, {column} FROM {table} WHERE {condition}"  # noqa: S608 - names are quoted
                    + (f" AND {pk} > %s" if after is not None else "")
                    + f" ORDER BY {pk} LIMIT %s FOR UPDATE",
                    [after, batch_size] if after is not None else [batch_size],
                )
                rows = cursor.fetchall()
                updates = []
                for row_pk, stored in rows:
                    if isinstance(field, SealedJSONField):
                        stored = stored if isinstance(stored, dict) else json.loads(stored)
                        if not ciphertext_current(stored=stored[SEALED_KEY]):
                            updates.append(
                                (json.dumps({SEALED_KEY: ciphertext_reencrypt(stored=stored[SEALED_KEY])}), row_pk)
                            )
                    elif not ciphertext_current(stored=stored):
                        updates.append((ciphertext_reencrypt(stored=stored), row_pk))
                if updates:
                    cursor.executemany(f"UPDATE {table} SET {column} = %s WHERE {pk} = %s", updates)  # noqa: S608
            encrypted += len(rows)
            moved += len(updates)
            if len(rows) < batch_size:
                break
            after = rows[-1][0]
        counts.append(ReencryptCount(column=f"{model._meta.db_table}.{field.column}", encrypted=encrypted, moved=moved))
    return counts
