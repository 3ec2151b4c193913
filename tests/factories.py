import factory

from apps.catalog.models import Category, CategoryKind, Priority, Template, TemplateVariant, TemplateVersion
from apps.recipients.models import Recipient
from apps.tenants.models import ALL_SCOPES, ApiKey, Tenant


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant

    slug = factory.Sequence(lambda n: f"tenant-{n}")
    name = factory.Sequence(lambda n: f"Tenant {n}")


class ApiKeyFactory(factory.django.DjangoModelFactory):
    """`ApiKeyFactory()` returns the saved key; its raw form is on `.raw_key`."""

    class Meta:
        model = ApiKey

    tenant = factory.SubFactory(TenantFactory)
    name = "test key"
    scopes = factory.LazyFunction(lambda: list(ALL_SCOPES))  # tests of one scope pass their own

    @classmethod
    def _create(cls, model_class, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = model_class(*args, **kwargs)
        key.raw_key = key.assign_secret()
        key.save()
        return key


class TemplateFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Template

    tenant = factory.SubFactory(TenantFactory)
    key = factory.Sequence(lambda n: f"template-{n}")
    name = factory.LazyAttribute(lambda t: t.key)


def template_with_email(*, tenant: Tenant, key: str, variants: dict[str, dict[str, str]] | None = None) -> Template:
    """A template with one version holding an email variant per locale ("" = default)."""
    template = TemplateFactory(tenant=tenant, key=key)
    version = TemplateVersion.objects.create(template=template, number=1)
    for locale, fields in (
        variants or {"": {"subject": "Hello {{ data.name }}", "body": "Hi {{ data.name }}"}}
    ).items():
        TemplateVariant.objects.create(version=version, channel="email", locale=locale, **fields)
    return template


class CategoryFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Category

    tenant = factory.SubFactory(TenantFactory)
    key = factory.Sequence(lambda n: f"category-{n}")
    kind = CategoryKind.TRANSACTIONAL
    default_channels = factory.LazyFunction(lambda: ["email"])
    default_priority = Priority.NORMAL
    template = factory.LazyAttribute(lambda c: template_with_email(tenant=c.tenant, key=c.key))


class RecipientFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Recipient

    tenant = factory.SubFactory(TenantFactory)
    external_id = factory.Sequence(lambda n: f"user-{n}")
    email = factory.LazyAttribute(lambda r: f"{r.external_id}@example.com")
    locale = "en"
