"""The audit log: changes through the admin and the API are recorded with their actor and a
diff, each tenant's entries form a hash chain, and `audit_verify` finds an edited or a deleted
row."""

import threading

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections
from django.test import Client
from django.urls import reverse

from apps.ops.audit import REDACTED, Actor, audit_chain_verify, audit_record
from apps.ops.models import INSTALLATION_CHAIN, AuditChainHead, AuditEntry
from apps.tenants.models import ApiKey
from tests.factories import StaffUserFactory, TenantFactory


@pytest.fixture
def ops(admin_user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(admin_user)
    return client


def entries(**filters: object) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(**filters).order_by("id"))


def test_admin_changes_are_recorded_with_the_staff_user_and_a_redacted_diff(ops, admin_user, db):
    tenant = TenantFactory()
    form = {"tenant": tenant.pk, "name": "billing", "scopes": ["notifications:read"]}
    ops.post(reverse("admin:tenants_apikey_add"), form, follow=True)
    key = ApiKey.objects.get(name="billing")

    [created] = entries(object_type="tenants.ApiKey", action="create")
    assert (created.actor_type, created.actor_label) == ("staff", admin_user.username)
    assert created.tenant_id == tenant.pk and created.object_id == str(key.pk)
    assert created.changes["name"] == [None, "billing"]
    assert created.changes["digest"] == [None, REDACTED]  # never the key's digest
    assert key.digest not in str(created.changes)

    ops.post(reverse("admin:tenants_apikey_changelist"), {"action": "revoke", "_selected_action": [key.pk]})
    [revoked] = entries(object_type="tenants.ApiKey", action="revoke")
    assert revoked.object_id == str(key.pk) and revoked.actor_label == admin_user.username
    assert revoked.prev_hash == created.hash  # the same tenant's chain


def test_api_changes_are_recorded_with_the_key_and_a_field_diff(api, workspace):
    api.post("/api/v1/recipients", {"external_id": "ada", "email": "ada@example.com"}, format="json")
    assert api.put("/api/v1/recipients/ada/preferences", {"channels": {"sms": False}}, format="json").status_code == 200
    assert (
        api.patch("/api/v1/recipients/ada/preferences", {"channels": {"sms": True}}, format="json").status_code == 200
    )

    # The PUT creates the row with its defaults, then sets it: two entries; the PATCH one.
    created, put, updated = entries(object_type="recipients.PreferenceSet")
    assert [created.action, put.action, updated.action] == ["create", "update", "update"]
    assert put.changes["channels"] == [{}, {"sms": False}]
    for entry in (created, put, updated):
        assert entry.actor_type == "api_key" and entry.actor_id == str(workspace.api_key.pk)
        assert workspace.api_key.name in entry.actor_label and entry.tenant_id == workspace.tenant.pk
    assert updated.changes["channels"] == [{"sms": False}, {"sms": True}]
    assert set(updated.changes) <= {"channels", "updated_at"}


def test_a_key_rotating_itself_is_recorded_without_its_digests(api, workspace):
    old_digest = workspace.api_key.digest
    assert api.post("/api/v1/api-keys/self/rotate", {"grace_period_seconds": 60}, format="json").status_code == 201
    [rotated] = entries(object_type="tenants.ApiKey")
    assert rotated.action == "update" and rotated.actor_id == str(workspace.api_key.pk)
    assert rotated.changes["digest"] == [REDACTED, REDACTED] and rotated.changes["previous_digest"] == ["", REDACTED]
    assert old_digest not in str(rotated.changes)


def test_changes_without_an_actor_are_not_audit_entries(workspace):
    # The pipeline's own writes (workers, beat) are its history, not the audit log.
    ApiKey.objects.filter(pk=workspace.api_key.pk).first().save()  # type: ignore[union-attr]
    assert not AuditEntry.objects.exists()


def audit_some(*, tenant_id, count: int) -> list[AuditEntry]:  # type: ignore[no-untyped-def]
    actor = Actor(type="staff", id="1", label="ops")
    return [
        audit_record(
            actor=actor,
            tenant_id=tenant_id,
            action="update",
            object_type="catalog.Category",
            object_id=str(n),
            changes={"name": [f"old {n}", f"new {n}"]},
        )
        for n in range(count)
    ]


def test_audit_verify_reports_exactly_the_row_edited_in_the_database(db):
    tenant, other = TenantFactory(), TenantFactory()
    rows = audit_some(tenant_id=tenant.pk, count=5)
    audit_some(tenant_id=other.pk, count=2)
    audit_some(tenant_id=None, count=1)
    call_command("audit_verify")  # intact: no error

    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE ops_auditentry SET changes = %s WHERE id = %s", ['{"name": ["old 2", "forged"]}', rows[2].id]
        )
    with pytest.raises(CommandError) as broken:
        call_command("audit_verify")
    assert f"chain {tenant.pk}: entry {rows[2].id}: hash (this entry was changed)" in str(broken.value)
    assert f"found {rows[2].hash}" in str(broken.value)
    # The other chains are intact.
    call_command("audit_verify", "--tenant", other.slug)
    assert audit_chain_verify(chain=INSTALLATION_CHAIN) == (1, None)


def test_audit_verify_detects_a_deleted_row_in_the_middle_and_at_the_end(db):
    tenant = TenantFactory()
    rows = audit_some(tenant_id=tenant.pk, count=4)
    AuditEntry.objects.filter(pk=rows[1].pk).delete()
    count, broken = audit_chain_verify(chain=str(tenant.pk))
    assert count == 1 and broken is not None
    assert (broken.entry_id, broken.expected, broken.found) == (rows[2].id, rows[0].hash, rows[2].prev_hash)

    other = TenantFactory()
    rows = audit_some(tenant_id=other.pk, count=3)
    AuditEntry.objects.filter(pk=rows[-1].pk).delete()  # the newest: no later row points at it
    with pytest.raises(CommandError, match="last entries"):
        call_command("audit_verify", "--tenant", other.slug)


@pytest.mark.django_db(transaction=True)
def test_concurrent_appends_to_one_chain_keep_it_intact():
    tenant = TenantFactory()
    errors: list[BaseException] = []

    def append() -> None:
        try:
            audit_some(tenant_id=tenant.pk, count=10)
        except BaseException as error:  # surfaced below
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=append) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert audit_chain_verify(chain=str(tenant.pk)) == (60, None)
    assert AuditChainHead.objects.get(chain=str(tenant.pk)).entries == 60


def test_staff_see_only_their_own_tenants_audit_log(db):
    tenant, other = TenantFactory(), TenantFactory()
    [mine] = audit_some(tenant_id=tenant.pk, count=1)
    [theirs] = audit_some(tenant_id=other.pk, count=1)
    staff = StaffUserFactory(tenant=tenant, permissions=["ops.view_auditentry"])
    client = Client()
    client.force_login(staff)
    listing = client.get(reverse("admin:ops_auditentry_changelist"))
    assert listing.status_code == 200
    assert reverse("admin:ops_auditentry_change", args=[mine.pk]) in listing.content.decode()
    assert reverse("admin:ops_auditentry_change", args=[theirs.pk]) not in listing.content.decode()
    assert client.get(reverse("admin:ops_auditentry_change", args=[theirs.pk])).status_code == 302
    assert client.post(reverse("admin:ops_auditentry_delete", args=[mine.pk]), {"post": "yes"}).status_code == 403
