"""The hot path's database building blocks, on the real PostgreSQL: the any_of lookup and
lean loading give the same answers as Django's own IN and __init__."""

import uuid

from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.deliveries.models import Delivery
from apps.recipients.models import PreferenceSet, Recipient
from tests.notify.test_send import ingest_one


def test_any_of_selects_exactly_the_given_ids_with_one_array_parameter(workspace):
    deliveries = [ingest_one(workspace, email=f"p{n}@example.com") for n in range(3)]
    wanted = [str(deliveries[0].id), deliveries[2].id, uuid.uuid4()]  # strings, UUIDs, an unknown id
    with CaptureQueriesContext(connection) as queries:
        found = set(Delivery.objects.filter(id__any_of=wanted).values_list("id", flat=True))
    assert found == {deliveries[0].id, deliveries[2].id}
    assert "= ANY(" in queries[0]["sql"]
    assert not Delivery.objects.filter(id__any_of=[]).exists()


def test_a_lean_loaded_instance_behaves_as_djangos(workspace):
    delivery = ingest_one(workspace)
    lean = (
        Delivery.objects.select_related("notification__recipient__preferences")
        .only("id", "channel", "notification__recipient__email", "notification__recipient__preferences__paused")
        .get()
    )
    assert lean.channel == delivery.channel
    assert lean.get_deferred_fields() >= {"status", "attempt_count"}
    assert lean.status == delivery.status  # a deferred field still loads when read
    assert lean.notification.recipient.email == "ada@example.com"
    assert Recipient.preferences.related.get_cached_value(lean.notification.recipient) is None  # type: ignore[attr-defined]
    assert lean._state.adding is False and lean._state.db == "default"

    lean.attempt_count = 7
    lean.save(update_fields=["attempt_count"])
    assert Delivery.objects.get(pk=delivery.pk).attempt_count == 7

    PreferenceSet.objects.create(recipient=lean.notification.recipient, channels={"sms": False})
    recipient = Recipient.objects.select_related("preferences").get(pk=lean.notification.recipient.pk)
    assert recipient.preferences.channels == {"sms": False}
