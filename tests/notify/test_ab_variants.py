"""A/B variants: stable, weighted assignment; the send renders and records the recipient's
variant (real anymail to the sandbox); promoting a winner publishes a new version."""

from collections import Counter

import pytest

from apps.catalog.models import Template, TemplateVariant, TemplateVersion
from apps.catalog.services import PromoteError, template_variant_promote
from apps.deliveries.models import Delivery, DeliveryStatus, Notification
from notify.pipeline.plan import variant_assign, variant_resolve
from notify.pipeline.send import deliveries_send
from tests.factories import CategoryFactory, TemplateFactory, TenantFactory
from tests.notify.test_send import ingest_many, send_now


def ab_template(*, tenant, key: str, weights: dict[str, int] | None = None) -> Template:  # type: ignore[no-untyped-def]
    """A template whose version 1 tests email subjects ("Subject a", "Subject b", ...) and
    has one in-app variant."""
    template = TemplateFactory(tenant=tenant, key=key)
    version = TemplateVersion.objects.create(template=template, number=1)
    for arm, weight in (weights or {"a": 50, "b": 50}).items():
        TemplateVariant.objects.create(
            version=version, channel="email", key=arm, weight=weight, subject=f"Subject {arm}", body=f"Body {arm}"
        )
    TemplateVariant.objects.create(version=version, channel="inapp", title="In-app title", body="In-app body")
    return template


def arms(*, weights: dict[str, int]) -> list[TemplateVariant]:
    """Unsaved variants: assignment reads only their keys and weights."""
    return [TemplateVariant(channel="email", key=key, weight=weight) for key, weight in weights.items()]


def assigned(*, experiment: str, recipient_ids: list[str], weights: dict[str, int]) -> list[str]:
    variants = arms(weights=weights)
    return [variant_assign(variants=variants, experiment=experiment, recipient_id=r).key for r in recipient_ids]


PEOPLE = [f"person-{i}" for i in range(1000)]


def test_the_same_recipient_always_gets_the_same_variant_of_an_experiment():
    first = assigned(experiment="version:7", recipient_ids=PEOPLE, weights={"a": 50, "b": 50})
    again = assigned(experiment="version:7", recipient_ids=PEOPLE, weights={"a": 50, "b": 50})
    assert first == again


@pytest.mark.parametrize(
    "weights", [{"a": 50, "b": 50}, {"a": 70, "b": 30}, {"a": 1, "b": 1, "c": 2}, {"a": 90, "b": 0, "c": 10}]
)
def test_across_a_thousand_recipients_the_split_is_near_the_weights(weights):
    counts = Counter(assigned(experiment="version:7", recipient_ids=PEOPLE, weights=weights))
    total = sum(weights.values())
    for key, weight in weights.items():
        expected = len(PEOPLE) * weight / total
        # Four standard deviations of a binomial count: a correct hash fails this about never.
        spread = 4 * (len(PEOPLE) * (weight / total) * (1 - weight / total)) ** 0.5
        assert abs(counts[key] - expected) <= spread, (key, counts)


def test_another_experiment_splits_people_afresh():
    one = assigned(experiment="version:7", recipient_ids=PEOPLE, weights={"a": 50, "b": 50})
    other = assigned(experiment="version:8", recipient_ids=PEOPLE, weights={"a": 50, "b": 50})
    moved = sum(first != second for first, second in zip(one, other, strict=True))
    # Independent halves: about half the people change sides, not none and not all.
    assert 400 <= moved <= 600


@pytest.mark.django_db
def test_the_locale_comes_first_then_the_variant_within_it():
    tenant = TenantFactory(default_locale="en")
    template = ab_template(tenant=tenant, key="promo")
    version = template.versions.get()
    TemplateVariant.objects.create(version=version, channel="email", locale="es", subject="Asunto")
    resolved = {
        variant_resolve(
            version_id=version.pk, channel="email", locale="es-MX", default_locale="en", recipient_id=person
        ).subject
        for person in PEOPLE[:50]
    }
    assert resolved == {"Asunto"}
    english = {
        variant_resolve(
            version_id=version.pk, channel="email", locale="fr", default_locale="en", recipient_id=person
        ).subject
        for person in PEOPLE[:50]
    }
    assert english == {"Subject a", "Subject b"}


@pytest.fixture
def promo(workspace):  # type: ignore[no-untyped-def]
    template = ab_template(tenant=workspace.tenant, key="promo")
    return CategoryFactory(tenant=workspace.tenant, key="promo", template=template, default_channels=["email"])


def test_a_send_uses_each_recipients_variant_and_records_it(workspace, sandbox, promo):
    emails = {f"p{i}": f"p{i}@example.com" for i in range(24)}
    delivery_ids = ingest_many(workspace, category="promo", emails=emails, data={"name": "you"})
    # One batch: the content is the same for everyone of the event but for their variant,
    # so the batch's render cache must keep the variants apart.
    assert deliveries_send(delivery_ids=delivery_ids) == len(delivery_ids)
    subjects = {request["delivery_id"]: request["subject"] for request in sandbox.requests_log()}
    version = promo.template.versions.get()
    seen = Counter()
    for delivery in Delivery.objects.filter(id__in=delivery_ids).select_related("notification"):
        expected = variant_assign(
            variants=list(version.variants.filter(channel="email").order_by("key")),
            experiment=f"version:{version.pk}",
            recipient_id=delivery.notification.recipient_id,
        ).key
        assert delivery.status == DeliveryStatus.SENT
        assert delivery.variant == expected
        assert subjects[str(delivery.pk)] == f"Subject {expected}"
        seen[expected] += 1
    assert set(seen) == {"a", "b"}, seen


def test_a_retried_delivery_keeps_its_variant(workspace, sandbox, promo):
    [delivery_id] = ingest_many(workspace, category="promo", emails={"ada": "ada@example.com"})
    sandbox.faults_set(fail_next=[503])
    delivery = send_now(Delivery.objects.get(pk=delivery_id))
    assert delivery.status == DeliveryStatus.RETRYING
    first_variant = delivery.variant
    delivery = send_now(delivery)
    assert delivery.status == DeliveryStatus.SENT and delivery.variant == first_variant != ""
    assert [r["subject"] for r in sandbox.requests_log()] == [f"Subject {first_variant}"] * 2


def test_content_without_a_test_records_no_variant(workspace, sandbox):
    [delivery_id] = ingest_many(workspace, category="welcome", emails={"ada": "ada@example.com"})
    delivery = send_now(Delivery.objects.get(pk=delivery_id))
    assert delivery.status == DeliveryStatus.SENT and delivery.variant == ""


def test_promoting_publishes_a_new_version_and_new_sends_use_the_winner(workspace, sandbox, promo):
    old = promo.template.versions.get()
    old_rows = list(old.variants.order_by("channel", "key").values())
    promoted = template_variant_promote(version=old, channel="email", key="b")
    assert promoted.number == old.number + 1 and promoted.template_id == old.template_id
    assert "'b'" in promoted.note
    # The old version is untouched.
    assert list(old.variants.order_by("channel", "key").values()) == old_rows
    assert list(promoted.variants.order_by("channel").values_list("channel", "key", "weight", "subject")) == [
        ("email", "", 100, "Subject b"),
        ("inapp", "", 100, ""),
    ]
    emails = {f"q{i}": f"q{i}@example.com" for i in range(10)}
    delivery_ids = ingest_many(workspace, category="promo", emails=emails)
    assert {n.template_version_id for n in Notification.objects.filter(deliveries__id__in=delivery_ids)} == {
        promoted.pk
    }
    deliveries_send(delivery_ids=delivery_ids)
    assert {r["subject"] for r in sandbox.requests_log()} == {"Subject b"}
    assert set(Delivery.objects.filter(id__in=delivery_ids).values_list("variant", flat=True)) == {""}


def test_promoting_keeps_locales_the_winner_is_missing_from(workspace, promo):
    old = promo.template.versions.get()
    TemplateVariant.objects.create(version=old, channel="email", locale="es", subject="Asunto")
    promoted = template_variant_promote(version=old, channel="email", key="a")
    assert sorted(promoted.variants.filter(channel="email").values_list("locale", "subject")) == [
        ("", "Subject a"),
        ("es", "Asunto"),
    ]


@pytest.mark.parametrize(("channel", "key", "field"), [("email", "z", "variant"), ("sms", "a", "channel")])
def test_promoting_what_the_version_does_not_hold_is_refused(workspace, promo, channel, key, field):
    old = promo.template.versions.get()
    with pytest.raises(PromoteError) as refused:
        template_variant_promote(version=old, channel=channel, key=key)
    assert refused.value.field == field
    assert promo.template.versions.count() == 1
