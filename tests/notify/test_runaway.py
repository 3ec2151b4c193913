"""The runaway-send guard: a tenant sending more than NOTIFY_RUNAWAY_MULTIPLE times its
recipient count (at least the floor) within the window is paused for normal and bulk work,
critical work still flows, operators are alerted, and a person resumes it from the admin."""

import logging

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from apps.deliveries.models import Delivery, DeliveryStatus
from apps.tenants.models import StaffMembership, Tenant
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.send import deliveries_claim
from notify.policy.caps import redis_client
from notify.resilience.runaway import runaway_window_count
from tests.factories import RecipientFactory


@pytest.fixture
def guard(settings, sandbox):  # type: ignore[no-untyped-def]
    """A guard that trips past 2 x max(recipients, 3) notifications in the window."""
    settings.NOTIFY_RUNAWAY_MULTIPLE = 2
    settings.NOTIFY_RUNAWAY_RECIPIENT_FLOOR = 3
    settings.NOTIFY_OPS_EMAILS = ["ops@example.com", "oncall@example.com"]
    redis_client().delete(*redis_client().keys("notify:runaway:*") or ["-"])
    return sandbox


def send(workspace, *, category: str = "welcome", recipients: list[str]) -> list[Delivery]:  # type: ignore[no-untyped-def]
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[EventRequest(category_key=category, recipients=[RecipientRef(external_id=r) for r in recipients])],
    )
    return list(Delivery.objects.filter(notification_id__in=result.response["notification_ids"]))


def claimed(deliveries: list[Delivery]) -> list[Delivery]:
    return deliveries_claim(delivery_ids=[str(d.pk) for d in deliveries])[1]


@pytest.fixture
def people(workspace):  # type: ignore[no-untyped-def]
    return [RecipientFactory(tenant=workspace.tenant, external_id=f"p{n}").external_id for n in range(2)]


def test_a_tenant_in_a_loop_is_paused_for_normal_and_bulk_but_critical_flows(workspace, guard, people, caplog):
    caplog.set_level(logging.ERROR, logger="notify.resilience.runaway")
    for _ in range(3):  # 6 notifications: at the limit, not over it
        send(workspace, recipients=people)
    assert Tenant.objects.get(pk=workspace.tenant.pk).runaway_paused_at is None
    held = send(workspace, recipients=people)  # 8 > 2 x max(2 recipients, floor 3)
    tenant = Tenant.objects.get(pk=workspace.tenant.pk)
    assert tenant.runaway_paused_at is not None
    assert "8 notifications" in tenant.runaway_reason
    assert f"runaway-send guard paused tenant {tenant.slug}" in caplog.text

    [alert] = [r for r in guard.requests_log(provider="postmark") if r["to"] == "ops@example.com, oncall@example.com"]
    assert tenant.slug in alert["subject"]
    assert "resume" in alert["text"].lower()

    later_normal = send(workspace, recipients=people)
    bulk = send(workspace, category="digest", recipients=people)
    critical = send(workspace, category="otp", recipients=people)
    assert claimed(held + later_normal + bulk) == []
    assert {d.pk for d in claimed(critical)} == {d.pk for d in critical}
    assert len([r for r in guard.requests_log(provider="postmark") if "runaway" in r["subject"]]) == 1  # once


def test_a_tenants_first_big_broadcast_does_not_trip_it(workspace, guard):
    recipients = [RecipientRef(external_id=f"new{n}", fields={"email": f"new{n}@example.com"}) for n in range(40)]
    events_ingest(api_key=workspace.api_key, events=[EventRequest(category_key="digest", recipients=recipients)])
    assert Tenant.objects.get(pk=workspace.tenant.pk).runaway_paused_at is None


def test_the_count_is_one_increment_per_ingest_call(workspace, guard, people):
    events_ingest(
        api_key=workspace.api_key,
        events=[EventRequest(category_key="welcome", recipients=[RecipientRef(external_id=r) for r in people])] * 2,
    )
    assert runaway_window_count(tenant_id=workspace.tenant.pk) == 4


def test_a_multiple_of_zero_turns_the_guard_off(workspace, guard, people, settings):
    settings.NOTIFY_RUNAWAY_MULTIPLE = 0
    for _ in range(10):
        send(workspace, recipients=people)
    assert Tenant.objects.get(pk=workspace.tenant.pk).runaway_paused_at is None


def test_only_a_person_with_the_permission_resumes_it_and_the_held_work_is_published(
    workspace, guard, people, django_user_model, django_capture_on_commit_callbacks
):
    for _ in range(4):
        held = send(workspace, recipients=people)
    assert Tenant.objects.get(pk=workspace.tenant.pk).runaway_paused_at is not None
    staff = django_user_model.objects.create_user(username="staff", password="x", is_staff=True)
    StaffMembership.objects.create(user=staff, tenant=workspace.tenant)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=["view_tenant", "change_tenant"]))
    client = Client()
    client.force_login(staff)
    changelist = reverse("admin:tenants_tenant_changelist")
    resume = {"action": "resume_runaway", "_selected_action": [workspace.tenant.pk]}
    action_form = client.get(changelist).context["action_form"]  # None: no action at all
    assert action_form is None or "resume_runaway" not in dict(action_form.fields["action"].choices)
    client.post(changelist, resume)
    assert Tenant.objects.get(pk=workspace.tenant.pk).runaway_paused_at is not None

    staff.user_permissions.add(Permission.objects.get(codename="resume_runaway_tenant"))
    staff = django_user_model.objects.get(pk=staff.pk)  # permissions are cached on the user
    client.force_login(staff)
    with django_capture_on_commit_callbacks(execute=False) as published:
        response = client.post(changelist, resume, follow=True)
    assert "Resumed 1 tenant" in str(list(response.context["messages"])[0])
    tenant = Tenant.objects.get(pk=workspace.tenant.pk)
    assert (tenant.runaway_paused_at, tenant.runaway_reason) == (None, "")
    assert published  # every held delivery handed to the broker again
    assert {d.pk for d in claimed(held)} == {d.pk for d in held}
    # The window starts afresh: the next event does not trip it again at once.
    send(workspace, recipients=people)
    assert Tenant.objects.get(pk=workspace.tenant.pk).runaway_paused_at is None
    assert {d.status for d in Delivery.objects.filter(pk__in=[d.pk for d in held])} == {DeliveryStatus.SENDING}


def test_the_admin_shows_the_runaway_state(workspace, guard, people, admin_client):
    for _ in range(4):
        send(workspace, recipients=people)
    page = admin_client.get(reverse("admin:tenants_tenant_changelist")).content.decode()
    assert "paused by the runaway-send guard" in page
