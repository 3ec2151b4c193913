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
    variant = variant_resolve(
        version_id=version.pk, channel="email", locale=locale, default_locale="de", recipient_id="someone"
    )
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
    content = content_render(variant=variant, data={"name": "<Tom & Jerry>"}, recipient=recipient, locale="en")
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


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("locale", "timezone", "expected"),
    [
        ("de-DE", "Europe/Berlin", "1.234,50 € · 1.234.567 · 22.11.2026, 16:30:00 · 1. Dezember 2026"),
        (
            "es-MX",
            "America/Mexico_City",
            "EUR1,234.50 · 1,234,567 · 22 nov 2026, 9:30:00 a.m. · 1 de diciembre de 2026",
        ),
        ("fr", "UTC", "1 234,50 € · 1 234 567 · 22 nov. 2026, 15:30:00 · 1 décembre 2026"),
        ("xx-YY", "UTC", "€1,234.50 · 1,234,567 · Nov 22, 2026, 3:30:00 PM · December 1, 2026"),  # unknown: the default
    ],
)
def test_money_numbers_and_dates_are_formatted_for_the_recipients_locale_and_timezone(locale, timezone, expected):
    tenant = TenantFactory()
    template = template_with_email(
        tenant=tenant,
        key="receipt",
        variants={
            "": {
                "subject": "Receipt",
                "body": '{{ data.total|money:"eur" }} · {{ data.points|number }} · {{ data.paid_at|datetime }}'
                ' · {{ data.renews_on|localdate:"long" }}',
            }
        },
    )
    variant = TemplateVersion.objects.get(template=template).variants.get()
    recipient = RecipientFactory(tenant=tenant, external_id="r1", timezone=timezone)
    data = {"total": "1234.50", "points": 1234567, "paid_at": "2026-11-22T15:30:00+00:00", "renews_on": "2026-12-01"}
    body = content_render(variant=variant, data=data, recipient=recipient, locale=locale).body
    assert body.replace("\u202f", " ").replace("\xa0", " ") == expected


@pytest.mark.django_db
def test_a_value_that_is_not_a_number_or_a_date_is_shown_as_it_is():
    tenant = TenantFactory()
    template = template_with_email(
        tenant=tenant,
        key="odd",
        variants={"": {"subject": "x", "body": "{{ data.a|money:'USD' }}/{{ data.b|datetime }}"}},
    )
    variant = TemplateVersion.objects.get(template=template).variants.get()
    recipient = RecipientFactory(tenant=tenant, external_id="r1")
    assert (
        content_render(variant=variant, data={"a": "lots", "b": "soon"}, recipient=recipient, locale="en").body
        == "lots/soon"
    )
