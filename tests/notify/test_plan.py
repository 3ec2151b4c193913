import pytest

from apps.catalog.models import TemplateVersion
from notify.pipeline.plan import content_render, locale_chain, variant_resolve
from tests.factories import RecipientFactory, TenantFactory, template_with_email


def test_locale_chain_falls_back_region_language_tenant_default():
    assert locale_chain(locale="es-MX", default_locale="en") == ["es-mx", "es", "en", ""]
    assert locale_chain(locale="pt_BR", default_locale="pt") == ["pt-br", "pt", ""]
    assert locale_chain(locale="", default_locale="en-GB") == ["en-gb", "en", ""]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("locale", "expected"),
    [("es-MX", "Hola México"), ("es-AR", "Hola"), ("es", "Hola"), ("fr", "Hello"), ("", "Hello")],
)
def test_variant_resolution_follows_the_chain(locale, expected):
    tenant = TenantFactory(default_locale="de")
    template = template_with_email(
        tenant=tenant,
        key="greet",
        variants={"": {"subject": "Hello"}, "es": {"subject": "Hola"}, "es-MX": {"subject": "Hola México"}},
    )
    version = TemplateVersion.objects.get(template=template)
    variant = variant_resolve(version_id=version.pk, channel="email", locale=locale, default_locale="de")
    assert variant.subject == expected


@pytest.mark.django_db
def test_rendering_escapes_html_but_not_text():
    tenant = TenantFactory()
    template = template_with_email(
        tenant=tenant,
        key="t",
        variants={
            "": {
                "subject": "Hi {{ data.name }}",
                "body": "{{ data.name }} / {{ recipient.id }}",
                "html": "<p>{{ data.name }}</p>",
            }
        },
    )
    variant = TemplateVersion.objects.get(template=template).variants.get()
    recipient = RecipientFactory(tenant=tenant, external_id="r1")
    content = content_render(variant=variant, data={"name": "<Tom & Jerry>"}, recipient=recipient)
    assert content.subject == "Hi <Tom & Jerry>"
    assert content.body == "<Tom & Jerry> / r1"
    assert content.html == "<p>&lt;Tom &amp; Jerry&gt;</p>"


@pytest.mark.django_db
def test_template_versions_are_immutable():
    template = template_with_email(tenant=TenantFactory(), key="t")
    version = TemplateVersion.objects.get(template=template)
    variant = version.variants.get()
    variant.subject = "changed"
    with pytest.raises(Exception, match="immutable"):
        variant.save()
    with pytest.raises(Exception, match="immutable"):
        version.save()
