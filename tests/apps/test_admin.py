import json
from datetime import timedelta

import pytest
from django.contrib import admin
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from apps.catalog.models import TemplateVersion
from apps.tenants.models import ApiKey
from tests.factories import TenantFactory


@pytest.fixture
def ops(admin_user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(admin_user)
    return client


def test_every_admin_list_and_add_page_renders(ops, workspace, api):
    api.post(
        "/api/v1/events",
        data=json.dumps({"category": "welcome", "recipient": {"external_id": "ada", "email": "a@example.com"}}),
        content_type="application/json",
    )
    # A row for every model, so that each change page renders too.
    api.put("/api/v1/recipients/ada/preferences", {"channels": {"sms": False}}, format="json")
    api.post("/api/v1/recipients/ada/consents", {"channel": "email", "granted": True, "source": "t"}, format="json")
    recurring = {"name": "weekly", "category": "digest", "recipients": ["ada"], "cron": "0 9 * * 1"}
    assert api.post("/api/v1/recurring-sends", recurring, format="json").status_code == 201
    workspace.bulk.digest_window = timedelta(hours=1)
    workspace.bulk.save()
    api.post("/api/v1/events", {"category": "digest", "recipient": "ada"}, format="json")
    for model in admin.site._registry:
        meta = model._meta
        changelist = ops.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist"))
        assert changelist.status_code == 200, meta.label
        for obj in model.objects.all()[:1]:
            change = ops.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk]))
            assert change.status_code == 200, meta.label


def test_an_api_key_made_in_the_admin_is_shown_once_and_works(ops, db):
    tenant = TenantFactory()
    form = {"tenant": tenant.pk, "name": "billing", "scopes": ["notifications:read"]}
    response = ops.post(reverse("admin:tenants_apikey_add"), form, follow=True)
    [message] = [str(m) for m in response.context["messages"] if "Copy this API key now" in str(m)]
    raw_key = message.rsplit(" ", 1)[1]
    key = ApiKey.objects.get(name="billing")
    assert raw_key.startswith(f"ntf_{key.lookup}_")
    assert raw_key.split("_", 2)[2] not in key.digest
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    assert client.get("/api/v1/notifications").status_code == 200

    ops.post(reverse("admin:tenants_apikey_changelist"), {"action": "revoke", "_selected_action": [key.pk]})
    assert client.get("/api/v1/notifications").status_code == 401


def test_saving_a_template_version_creates_a_new_version(ops, workspace):
    version = TemplateVersion.objects.get(template=workspace.normal.template)
    variant = version.variants.get()
    url = reverse("admin:catalog_templateversion_change", args=[version.pk])
    form = {
        "template": version.template_id,
        "note": "friendlier",
        "variants-TOTAL_FORMS": "1",
        "variants-INITIAL_FORMS": "1",
        "variants-MIN_NUM_FORMS": "0",
        "variants-MAX_NUM_FORMS": "1000",
        "variants-0-id": variant.pk,
        "variants-0-version": version.pk,
        "variants-0-channel": "email",
        "variants-0-locale": "",
        "variants-0-weight": "100",
        "variants-0-subject": "Howdy {{ data.name }}",
        "variants-0-body": "Hi",
        "variants-0-data": "{}",
    }
    response = ops.post(url, form)
    assert response.status_code == 302, response.content
    versions = list(TemplateVersion.objects.filter(template=version.template).order_by("number"))
    assert [v.number for v in versions] == [1, 2]
    assert versions[0].variants.get().subject == "Hello {{ data.name }}"
    assert versions[1].variants.get().subject == "Howdy {{ data.name }}"
    assert workspace.normal.template.current_version() == versions[1]


def test_the_notification_page_shows_why(ops, workspace, api):
    response = api.post(
        "/api/v1/events",
        data=json.dumps({"category": "welcome", "recipient": {"external_id": "nomail"}}),
        content_type="application/json",
    )
    notification_id = response.json()["notification_ids"][0]
    page = ops.get(reverse("admin:deliveries_notification_change", args=[notification_id]))
    assert b"recipient has no email address" in page.content
    assert b"suppressed" in page.content


def test_migrations_match_the_models(db):
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)
