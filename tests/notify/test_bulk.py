"""The hot path's database building blocks, on the real PostgreSQL: the any_of lookup and
lean loading give the same answers as Django's own IN and __init__, and concurrent claims
lease each delivery once; lean new instances match the model constructor's."""

import random
import threading
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.deliveries.models import Delivery
from apps.inbox.models import InboxItem
from apps.recipients.models import PreferenceSet, Recipient
from notify.channels.base import SendOutcome
from notify.pipeline.bulk import rows_insert_new
from notify.pipeline.record import outcomes_record
from notify.pipeline.send import deliveries_claim
from tests.notify.test_send import ingest_many, ingest_one


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


def test_a_lean_new_instance_is_what_the_model_constructor_makes(workspace):
    notification = ingest_one(workspace).notification
    values = {"notification": notification, "channel": "sms", "priority": "bulk", "next_attempt_at": timezone.now()}
    lean, django_made = Delivery.new(**values), Delivery(**values)

    def fields(delivery: Delivery) -> dict:
        return {f.attname: getattr(delivery, f.attname) for f in Delivery._meta.concrete_fields if f.name != "id"}

    assert fields(lean) == fields(django_made)
    assert lean.id != django_made.id and isinstance(lean.id, uuid.UUID)  # a fresh default each time
    assert lean.id.version == 7 and django_made.id > lean.id  # time-ordered: made later, sorts later
    assert lean.notification is notification and lean.notification_id == notification.id
    assert lean._state.adding is True
    assert Delivery.new(notification_id=notification.id, channel="sms").notification_id == notification.id
    with pytest.raises(TypeError, match="no field 'chanel'"):
        Delivery.new(chanel="sms")
    # Mutable defaults are made per instance, not shared.
    first, second = Recipient.new(), Recipient.new()
    assert first.attributes == {} and first.attributes is not second.attributes

    lean.save(force_insert=True)
    assert Delivery.objects.get(pk=lean.pk).channel == "sms"


@pytest.mark.django_db(transaction=True)
def test_workers_claiming_overlapping_batches_at_once_claim_each_delivery_once(workspace):
    emails = {f"r{n}": f"r{n}@example.com" for n in range(300)}
    delivery_ids = ingest_many(workspace, category="digest", emails=emails)
    barrier = threading.Barrier(6)
    claimed: list[uuid.UUID] = []
    errors: list[BaseException] = []

    def claim(seed: int) -> None:
        # Overlapping batches in different orders, as republished and redelivered tasks give.
        batch = random.Random(seed).sample(delivery_ids, 200)
        barrier.wait()
        try:
            claimed.extend(d.id for d in deliveries_claim(delivery_ids=batch)[1])
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(claimed) == len(set(claimed))  # no delivery claimed twice
    assert set(claimed) == set(Delivery.objects.filter(status="sending").values_list("id", flat=True))
    assert len(claimed) > 200  # the batches really overlapped and several workers won some


def _plan(sql: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN {sql}")
        return "\n".join(line for (line,) in cursor.fetchall())


PARTIAL_INDEXES_ON_STATUS = ("delivery_claimable_due", "delivery_standby", "delivery_leased")


def test_the_claim_and_the_sent_update_do_not_go_through_the_partial_indexes(workspace):
    """Those keep an entry for every row that ever matched until VACUUM, so a claim through
    one read the whole backlog. (On this small table the planner reads the table instead;
    on a large one, by the benchmark's plans, it takes the primary key.)"""
    # A drained history: every row has left the partial indexes' statuses, but their entries
    # are still there. Then a batch of 250 is queued again, and the statistics say so.
    emails = {f"h{n}": f"h{n}@example.com" for n in range(3000)}
    ids = ingest_many(workspace, category="digest", emails=emails)
    Delivery.objects.update(status="sent")
    batch = ids[:250]
    Delivery.objects.filter(id__in=batch).update(status="queued", next_attempt_at=timezone.now())
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE deliveries_delivery")

    with CaptureQueriesContext(connection) as queries:
        token, claimed = deliveries_claim(delivery_ids=batch)
        outcomes_record(
            lease_token=token,
            deliveries={d.id: d for d in claimed},
            outcomes=[SendOutcome(delivery_id=d.id) for d in claimed],
        )

    assert Delivery.objects.filter(id__in=batch, status="sent", sent_at__isnull=False).count() == 250
    claim, sent = [q["sql"] for q in queries if q["sql"].startswith("UPDATE")]
    for plan in (_plan(claim), _plan(sent)):
        assert not any(index in plan for index in PARTIAL_INDEXES_ON_STATUS), plan


def test_new_rows_go_in_as_one_statement_with_their_arrays_whole_and_known_keys_are_skipped(workspace):
    ids = ingest_many(workspace, category="digest", emails={f"i{n}": f"i{n}@example.com" for n in range(3)})
    deliveries = list(Delivery.objects.filter(id__in=ids).select_related("notification").order_by("id"))
    awkward_tags = ['say "hi"', "back\\slash", "a,b", "{braces}", "NULL", "", "naïve ✓"]

    def item(delivery: Delivery, *, title: str, tags: list[str]) -> InboxItem:
        return InboxItem(
            recipient_id=delivery.notification.recipient_id,
            delivery=delivery,
            title=title,
            data={"n": 1},
            tags=tags,
            actors=[],
        )

    with CaptureQueriesContext(connection) as queries:
        inserted = rows_insert_new(objects=[item(d, title="first", tags=awkward_tags) for d in deliveries[:2]])
    assert inserted == 2
    assert len(queries) == 1
    # One delivery already has its item: that one is skipped, the other goes in.
    inserted = rows_insert_new(objects=[item(d, title="second", tags=["x"]) for d in deliveries[1:]])
    assert inserted == 1

    stored = {i.delivery_id: i for i in InboxItem.objects.all()}
    assert [stored[d.id].title for d in deliveries] == ["first", "first", "second"]
    assert stored[deliveries[0].id].tags == awkward_tags
    assert stored[deliveries[2].id].tags == ["x"]
    assert stored[deliveries[0].id].data == {"n": 1}
    assert InboxItem.objects.filter(tags__contains=['say "hi"']).count() == 2
