"""Digests: a category's events collected per recipient and sent as one notification when the
window ends or the digest is full; never sent twice and never losing an event, even when
events arrive during a flush."""

import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from apps.catalog.models import Category
from apps.deliveries.models import Digest, DigestEntry, Event, Notification
from notify.pipeline.digest import digest_flush, digests_flush_due
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.send import deliveries_send
from tests.factories import CategoryFactory, template_with_email


@pytest.fixture
def activity(workspace) -> Category:  # type: ignore[no-untyped-def]
    template = template_with_email(
        tenant=workspace.tenant,
        key="activity-digest",
        variants={
            "": {
                "subject": "{{ data.count }} new comments",
                "body": "{% for e in data.events %}{{ e.who }}: {{ e.text }}\n{% endfor %}",
            }
        },
    )
    return CategoryFactory(
        tenant=workspace.tenant, key="activity", template=template, digest_window=timedelta(minutes=10), digest_max=None
    )


def comment(workspace, who: str, *, recipient: str = "ada", inline: bool = True) -> dict:  # type: ignore[no-untyped-def]
    fields = {"email": f"{recipient}@example.com"} if inline else None
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key="activity",
                recipients=[RecipientRef(external_id=recipient, fields=fields)],
                data={"who": who, "text": f"hi from {who}"},
            )
        ],
    )
    return result.response


def test_events_are_collected_then_sent_as_one_when_the_window_ends(workspace, activity, sandbox):
    responses = [comment(workspace, who) for who in ("bo", "cy", "di")]
    assert all(r["notification_ids"] == [] for r in responses)
    assert len({r["digest_ids"][0] for r in responses}) == 1  # all in ada's one open digest
    assert digests_flush_due(now=timezone.now()) == 0  # the window is still open

    assert digests_flush_due(now=timezone.now() + timedelta(minutes=11)) == 1
    [notification] = Notification.objects.filter(category=activity)
    assert notification.event.data["count"] == 3
    deliveries_send(delivery_ids=[str(d.pk) for d in notification.deliveries.all()])
    [email] = sandbox.requests_log()
    assert email["subject"] == "3 new comments"
    assert email["text"].startswith("bo: hi from bo\ncy: hi from cy\ndi: hi from di\n")

    # The next event opens the next digest.
    assert comment(workspace, "ed")["digest_ids"] != responses[0]["digest_ids"]
    assert digests_flush_due(now=timezone.now() + timedelta(minutes=11)) == 1


def test_a_full_digest_is_sent_at_once(workspace, activity):
    activity.digest_max = 2
    activity.save()
    assert comment(workspace, "bo")["notification_ids"] == []
    [notification_id] = comment(workspace, "cy")["notification_ids"]
    assert Notification.objects.get(id=notification_id).event.data["count"] == 2
    assert not Digest.objects.filter(flushed_at__isnull=True).exists()


def test_each_recipient_has_their_own_digest(workspace, activity):
    comment(workspace, "bo", recipient="ada")
    comment(workspace, "bo", recipient="max")
    comment(workspace, "cy", recipient="max")
    digests_flush_due(now=timezone.now() + timedelta(minutes=11))
    counts = {
        n.recipient.external_id: n.event.data["count"]
        for n in Notification.objects.select_related("event", "recipient")
    }
    assert counts == {"ada": 1, "max": 2}


@pytest.mark.django_db(transaction=True)
def test_events_arriving_during_flushes_are_each_sent_exactly_once(workspace, activity):
    """Four producers add 100 events for one recipient while a flusher keeps sending whatever
    digest is open; then the rest is sent. Every event is in exactly one sent digest."""
    comment(workspace, "first")  # creates ada
    producing = threading.Event()
    producing.set()
    errors: list[BaseException] = []

    def produce(worker: int) -> None:
        try:
            for n in range(25):
                # Half name ada by id, half upsert her inline (which locks her row first).
                comment(workspace, f"w{worker}-{n}", inline=worker % 2 == 0)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)
        finally:
            connection.close()

    def flush_continually() -> None:
        try:
            while producing.is_set():
                for digest_id in Digest.objects.filter(flushed_at__isnull=True).values_list("id", flat=True):
                    digest_flush(digest_id=digest_id)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            connection.close()

    producers = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    flusher = threading.Thread(target=flush_continually)
    flusher.start()
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    producing.clear()
    flusher.join()
    assert errors == []
    digests_flush_due(now=timezone.now() + timedelta(minutes=11))

    events = Event.objects.filter(category=activity, idempotency_key__isnull=True)
    assert events.count() == 101
    entries = Counter(DigestEntry.objects.values_list("event_id", flat=True))
    assert set(entries) == set(events.values_list("id", flat=True))
    assert set(entries.values()) == {1}  # each event in exactly one digest
    digests = Digest.objects.all()
    assert all(d.flushed_at and d.event_id for d in digests)
    sent = Notification.objects.filter(category=activity).select_related("event")
    assert sum(n.event.data["count"] for n in sent) == 101
    assert len(sent) == digests.count() > 1  # flushes really did interleave, one notification each


@pytest.mark.django_db(transaction=True)
def test_two_flushes_of_one_digest_send_it_once(workspace, activity):
    comment(workspace, "bo")
    digest_id = Digest.objects.get().id
    barrier = threading.Barrier(2)
    sent: list[int] = []

    def flush() -> None:
        barrier.wait()
        sent.append(len(digest_flush(digest_id=digest_id)))
        connection.close()

    threads = [threading.Thread(target=flush) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(sent) == [0, 1]
    assert Notification.objects.filter(category=activity).count() == 1
