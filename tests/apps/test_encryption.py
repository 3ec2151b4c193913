"""Secrets and content encrypted at rest: provider credentials always, a tenant's event data and
inbox content with encrypt_content; keys rotate (old ones still read, `secrets_reencrypt` moves
everything to the newest), the raw columns hold no plaintext, and the admin never shows a
stored credential again."""

import json
from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.urls import reverse

from apps.deliveries.models import Delivery, Event, Provider
from apps.inbox.models import InboxItem
from apps.tenants.encryption import CIPHER_PREFIX, SecretUnreadable
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.send import deliveries_send

KEY_A, KEY_B, KEY_C = (Fernet.generate_key().decode() for _ in range(3))


def raw(sql: str, *params: object) -> object:
    """One value as the database holds it, past the fields that decrypt."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def raw_config(provider: Provider) -> str:
    return str(raw("SELECT config FROM deliveries_provider WHERE id = %s", provider.pk))


def raw_event_data(event_id: object) -> dict:
    value = raw("SELECT data FROM deliveries_event WHERE id = %s", event_id)
    return value if isinstance(value, dict) else json.loads(str(value))


def under(key: str, stored: str) -> bytes:
    """The plaintext, if `stored` was encrypted under `key` (raises otherwise)."""
    return Fernet(key).decrypt(stored.removeprefix(CIPHER_PREFIX).encode())


def reencrypt() -> str:
    out = StringIO()
    call_command("secrets_reencrypt", "--batch-size", "1", stdout=out)
    return out.getvalue()


def ingest(workspace, data: dict) -> str:  # type: ignore[no-untyped-def]
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key="mention",
                recipients=[RecipientRef(external_id="ada", fields={"email": "ada@example.com"})],
                data=data,
            )
        ],
    )
    return result.response["event_id"]


def test_provider_credentials_are_ciphertext_in_the_database(db, settings):
    settings.NOTIFY_ENCRYPTION_KEYS = [KEY_A]
    provider = Provider.objects.create(name="pm", channel="email", config={"server_token": "tok-plain-123"})
    stored = raw_config(provider)
    assert stored.startswith(CIPHER_PREFIX) and "tok-plain-123" not in stored
    assert json.loads(under(KEY_A, stored)) == {"server_token": "tok-plain-123"}
    assert Provider.objects.get(pk=provider.pk).config == {"server_token": "tok-plain-123"}
    assert list(Provider.objects.values_list("config", flat=True)) == [{"server_token": "tok-plain-123"}]


def test_a_secret_survives_key_rotation_and_reencrypt_moves_it_to_the_newest_key(workspace, inbox_category, settings):
    settings.NOTIFY_ENCRYPTION_KEYS = [KEY_A]
    workspace.tenant.encrypt_content = True
    workspace.tenant.save()
    provider = Provider.objects.create(name="tw", channel="sms", config={"auth_token": "twilio-secret"})
    event_id = ingest(workspace, {"who": "Bo", "text": "lab results"})
    under(KEY_A, raw_config(provider))
    under(KEY_A, raw_event_data(event_id)["fernet"])

    # A new key in front: the old ciphertexts still read.
    settings.NOTIFY_ENCRYPTION_KEYS = [KEY_B, KEY_A]
    assert Provider.objects.get(pk=provider.pk).config == {"auth_token": "twilio-secret"}
    assert Event.objects.get(pk=event_id).data == {"who": "Bo", "text": "lab results"}

    report = reencrypt()
    assert "deliveries_provider.config: 1 encrypted, 1 moved to the newest key" in report
    assert "deliveries_event.data: 1 encrypted, 1 moved to the newest key" in report
    assert json.loads(under(KEY_B, raw_config(provider))) == {"auth_token": "twilio-secret"}
    under(KEY_B, raw_event_data(event_id)["fernet"])
    assert "Done: 0 value(s) re-encrypted." in reencrypt()  # already under the newest key

    # The old key dropped: everything still reads.
    settings.NOTIFY_ENCRYPTION_KEYS = [KEY_B]
    assert Provider.objects.get(pk=provider.pk).config == {"auth_token": "twilio-secret"}
    assert Event.objects.get(pk=event_id).data == {"who": "Bo", "text": "lab results"}

    # Only a key that never wrote them: reading fails, and says why.
    settings.NOTIFY_ENCRYPTION_KEYS = [KEY_C]
    with pytest.raises(SecretUnreadable, match="cannot be decrypted with any key in NOTIFY_ENCRYPTION_KEYS"):
        Provider.objects.get(pk=provider.pk)


def test_a_tenant_without_encrypt_content_stores_its_data_as_it_is(workspace, inbox_category):
    event_id = ingest(workspace, {"who": "Bo", "text": "hello"})
    assert raw_event_data(event_id) == {"who": "Bo", "text": "hello"}


def test_encrypt_content_seals_event_data_and_the_inbox_item_yet_delivers_it(workspace, inbox_category):
    workspace.tenant.encrypt_content = True
    workspace.tenant.save()
    event_id = ingest(workspace, {"who": "Bo", "text": "your biopsy is benign"})
    stored = raw_event_data(event_id)
    assert list(stored) == ["fernet"] and "biopsy" not in json.dumps(stored)

    deliveries_send(
        delivery_ids=[
            str(pk) for pk in Delivery.objects.filter(notification__event_id=event_id).values_list("id", flat=True)
        ]
    )
    item = InboxItem.objects.get(recipient__external_id="ada")
    assert (item.title, item.body) == ("Bo mentioned you", "your biopsy is benign")
    title, body = (
        raw("SELECT title FROM inbox_inboxitem WHERE id = %s", item.pk),
        raw("SELECT body FROM inbox_inboxitem WHERE id = %s", item.pk),
    )
    assert str(title).startswith(CIPHER_PREFIX) and "Bo" not in str(title)
    assert str(body).startswith(CIPHER_PREFIX) and "biopsy" not in str(body)


@pytest.fixture
def ops(admin_user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(admin_user)
    return client


def provider_form(**changes: object) -> dict[str, object]:
    return {
        "name": "pm",
        "channel": "email",
        "position": 0,
        "weight": 1,
        "enabled": "on",
        "config": '{"from_email": "Acme <hi@acme.example>"}',
        "secrets": "",
        "failure_threshold": 5,
        "cooldown_seconds": 30,
        **changes,
    }


def test_the_admin_never_shows_a_stored_credential_again(ops, db):
    response = ops.post(
        reverse("admin:deliveries_provider_add"), provider_form(secrets='{"server_token": "tok-never-shown"}')
    )
    assert response.status_code == 302, response.content.decode()
    provider = Provider.objects.get()
    assert provider.config == {"from_email": "Acme <hi@acme.example>", "server_token": "tok-never-shown"}

    page = ops.get(reverse("admin:deliveries_provider_change", args=[provider.pk])).content.decode()
    assert "tok-never-shown" not in page
    assert "Set: server_token." in page
    assert "hi@acme.example" in page  # what is not a credential is shown as ever

    # Blank keeps the stored credential; a new value replaces it.
    response = ops.post(reverse("admin:deliveries_provider_change", args=[provider.pk]), provider_form(weight=3))
    assert response.status_code == 302, response.content.decode()
    provider.refresh_from_db()
    assert (provider.weight, provider.config["server_token"]) == (3, "tok-never-shown")
    ops.post(
        reverse("admin:deliveries_provider_change", args=[provider.pk]), provider_form(secrets='{"server_token": "t2"}')
    )
    provider.refresh_from_db()
    assert provider.config == {"from_email": "Acme <hi@acme.example>", "server_token": "t2"}


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_the_credentials_stored_before_it_and_reverses():
    def migrate(target: tuple[str, str]):  # type: ignore[no-untyped-def]
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate([target])
        return executor.loader.project_state([target]).apps

    try:
        old = migrate(("deliveries", "0018_event_correlation_id"))
        old.get_model("deliveries", "Provider").objects.create(
            name="pm", channel="email", config={"server_token": "t-1"}
        )
        migrate(("deliveries", "0019_provider_credentials_encrypted"))
        [stored] = [raw_config(provider) for provider in Provider.objects.all()]
        assert stored.startswith(CIPHER_PREFIX) and "t-1" not in stored
        assert Provider.objects.get().config == {"server_token": "t-1"}
        migrate(("deliveries", "0018_event_correlation_id"))
        assert raw("SELECT config->>'server_token' FROM deliveries_provider") == "t-1"
    finally:
        migrate_all = MigrationExecutor(connection)
        migrate_all.migrate(migrate_all.loader.graph.leaf_nodes())
