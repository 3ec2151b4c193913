"""A category can only use its own tenant's templates: in the model, the admin and the database."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.test import Client
from django.urls import reverse

from apps.catalog.models import Category
from tests.factories import TemplateFactory, TenantFactory


@pytest.fixture
def ops(admin_user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(admin_user)
    return client


def test_a_category_with_another_tenants_template_is_refused_naming_the_field(workspace):
    foreign = TemplateFactory(tenant=TenantFactory(), key="theirs")
    category = Category(tenant=workspace.tenant, key="x", default_channels=["email"], template=foreign)
    with pytest.raises(ValidationError) as refused:
        category.full_clean()
    assert "belongs to another tenant" in refused.value.message_dict["template"][0]
    with pytest.raises(ValidationError):
        category.save()  # also where no form validates
    assert not Category.objects.filter(key="x").exists()


def test_moving_a_category_to_another_tenant_keeps_the_check(workspace):
    with pytest.raises(ValidationError):
        workspace.normal.tenant = TenantFactory()
        workspace.normal.save()


def test_a_template_used_by_categories_cannot_move_to_another_tenant(workspace):
    template = workspace.normal.template
    template.tenant = TenantFactory()
    with pytest.raises(ValidationError) as refused:
        template.full_clean()
    assert "welcome" in refused.value.message_dict["tenant"][0]


@pytest.mark.django_db(transaction=True)
def test_the_database_refuses_a_category_pointing_at_another_tenants_template(workspace):
    foreign = TemplateFactory(tenant=TenantFactory())
    with pytest.raises(IntegrityError, match="category_template_same_tenant"):
        with transaction.atomic():
            # Past the model's checks, as a raw update would be.
            Category.objects.filter(pk=workspace.normal.pk).update(template=foreign)
            with connection.cursor() as cursor:
                cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")


def test_the_admin_offers_only_the_tenants_templates_and_refuses_others(ops, workspace):
    foreign = TemplateFactory(tenant=TenantFactory(), key="theirs")
    url = reverse("admin:catalog_category_change", args=[workspace.normal.pk])
    form = ops.get(url).context["adminform"].form
    offered = set(form.fields["template"].queryset.values_list("tenant_id", flat=True))
    assert offered == {workspace.tenant.pk}

    add = reverse("admin:catalog_category_add")
    response = ops.post(
        add,
        {
            "tenant": workspace.tenant.pk,
            "key": "new",
            "kind": "transactional",
            "default_channels": '["email"]',
            "default_priority": "normal",
            "template": foreign.pk,
            "channel_defaults": "{}",
            "over_cap": "suppress",
            "routing": "all",
            "over_budget": "hold",
            "escalate_to": "[]",
        },
    )
    assert response.status_code == 200  # the form again, with the error
    assert "belongs to another tenant" in str(response.context["adminform"].form.errors["template"])
    assert not Category.objects.filter(key="new").exists()
