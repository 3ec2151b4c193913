"""Ordering per recipient at the claim and after recording, in this process, with real
PostgreSQL, Redis as the broker and the sandbox."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from apps.catalog.models import Category
from apps.deliveries.models import Delivery, DeliveryStatus, Notification
from config.queues import delivery_queue
from notify.pipeline.control import notification_cancel
from notify.pipeline.dispatch import broker_queue_depths, due_publish
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.send import deliveries_claim, deliveries_send


def ingest_for(workspace, *, external_id: str, send_at=None) -> Delivery:  # type: ignore[no-untyped-def]
    """One `welcome` event to one recipient; its email delivery."""
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key="welcome",
                recipients=[RecipientRef(external_id=external_id, fields={"email": f"{external_id}@example.com"})],
                data={"name": external_id},
                send_at=send_at,
            )
        ],
    )
    return Delivery.objects.get(notification_id=result.response["notification_ids"][0])


def claimed_ids(*deliveries: Delivery) -> set:
    _, claimed = deliveries_claim(delivery_ids=[str(d.pk) for d in deliveries])
    return {d.pk for d in claimed}


def ordered(category: Category, value: bool = True) -> None:
    category.ordered = value
    category.save()


def published_messages(broker) -> int:  # type: ignore[no-untyped-def]
    queue = delivery_queue(channel="email", priority="normal")
    return broker_queue_depths(queues=[queue])[queue]


def test_a_later_delivery_is_claimable_while_an_earlier_one_waits_when_the_category_is_not_ordered(workspace):
    first, second = ingest_for(workspace, external_id="ada"), ingest_for(workspace, external_id="ada")
    assert claimed_ids(second) == {second.pk}
    assert claimed_ids(first) == {first.pk}


def test_an_ordered_category_holds_a_later_delivery_for_that_recipient_only(workspace):
    ordered(workspace.normal)
    first, second = ingest_for(workspace, external_id="ada"), ingest_for(workspace, external_id="ada")
    other = ingest_for(workspace, external_id="bob")
    # Given the same batch, only the head of ada's scope and bob's go.
    assert claimed_ids(second, other, first) == {first.pk, other.pk}
    # Being sent still holds the later one back.
    assert claimed_ids(second) == set()
    Delivery.objects.filter(pk=first.pk).update(status=DeliveryStatus.SENT)
    assert claimed_ids(second) == {second.pk}


@pytest.mark.parametrize(
    "status",
    [DeliveryStatus.RETRYING, DeliveryStatus.DEFERRED, DeliveryStatus.QUEUED],
)
def test_an_earlier_unfinished_delivery_holds_back_even_when_not_due(workspace, status):
    ordered(workspace.normal)
    first, second = ingest_for(workspace, external_id="ada"), ingest_for(workspace, external_id="ada")
    Delivery.objects.filter(pk=first.pk).update(status=status, next_attempt_at=timezone.now() + timedelta(hours=1))
    assert claimed_ids(second) == set()


@pytest.mark.parametrize(
    "status",
    [DeliveryStatus.DEAD, DeliveryStatus.FAILED, DeliveryStatus.CANCELLED, DeliveryStatus.SUPPRESSED],
)
def test_an_earlier_delivery_that_ended_without_sending_lets_the_later_ones_go(workspace, status):
    ordered(workspace.normal)
    first, second = ingest_for(workspace, external_id="ada"), ingest_for(workspace, external_id="ada")
    Delivery.objects.filter(pk=first.pk).update(status=status)
    assert claimed_ids(second) == {second.pk}


def test_the_flag_is_per_category(workspace):
    ordered(workspace.critical)
    first, second = ingest_for(workspace, external_id="ada"), ingest_for(workspace, external_id="ada")
    assert claimed_ids(second) == {second.pk}
    assert claimed_ids(first) == {first.pk}


def test_a_notification_scheduled_for_later_holds_nothing_back(workspace):
    ordered(workspace.normal)
    scheduled = ingest_for(workspace, external_id="ada", send_at=timezone.now() + timedelta(hours=2))
    now_due = ingest_for(workspace, external_id="ada")
    assert Notification.objects.get(pk=scheduled.notification_id).send_at is not None
    assert claimed_ids(now_due) == {now_due.pk}


def test_recording_the_head_publishes_the_next_of_its_scope_at_once(workspace, sandbox, broker):
    ordered(workspace.normal)
    first, second, third = (ingest_for(workspace, external_id="ada") for _ in range(3))
    # The task for the later ones came first: it claims nothing and is spent.
    assert deliveries_send(delivery_ids=[str(second.pk), str(third.pk)]) == 0
    assert published_messages(broker) == 0

    sandbox.faults_set(fail_next=[503])
    deliveries_send(delivery_ids=[str(first.pk)])
    first.refresh_from_db()
    assert first.status == DeliveryStatus.RETRYING
    # Retrying, it is still first: nothing of its scope is published.
    assert published_messages(broker) == 0

    Delivery.objects.filter(pk=first.pk).update(next_attempt_at=timezone.now())  # as if the backoff passed
    deliveries_send(delivery_ids=[str(first.pk)])
    first.refresh_from_db()
    assert first.status == DeliveryStatus.SENT and first.sent_at is not None
    # The next one (only it) is on the broker now, not left to the sweeper.
    assert published_messages(broker) == 1
    second.refresh_from_db()
    third.refresh_from_db()
    assert second.published_at is not None and second.published_at >= first.sent_at
    assert third.published_at is None or third.published_at < first.sent_at

    assert deliveries_send(delivery_ids=[str(second.pk), str(third.pk)]) == 1
    assert published_messages(broker) == 2
    assert deliveries_send(delivery_ids=[str(third.pk)]) == 1
    accepted = [r["delivery_id"] for r in sandbox.requests_log() if r["outcome"] == "accepted"]
    assert accepted == [str(first.pk), str(second.pk), str(third.pk)]


def test_a_dead_head_lets_the_next_go_at_once(workspace, sandbox, broker):
    ordered(workspace.normal)
    sandbox.faults_set(address_status={"ada@example.com": 500})
    first, second = ingest_for(workspace, external_id="ada"), ingest_for(workspace, external_id="ada")
    for _ in range(3):  # NOTIFY_EMAIL_MAX_ATTEMPTS in the test settings
        Delivery.objects.filter(pk=first.pk).update(next_attempt_at=timezone.now())
        deliveries_send(delivery_ids=[str(first.pk)])
    first.refresh_from_db()
    assert first.status == DeliveryStatus.DEAD
    # The retries' own tasks are published on commit (not run here); only the successor is on the broker.
    assert published_messages(broker) == 1
    assert claimed_ids(second) == {second.pk}


def test_cancelling_the_head_publishes_the_next_once_committed(workspace, broker, django_capture_on_commit_callbacks):
    ordered(workspace.normal)
    first, second = ingest_for(workspace, external_id="ada"), ingest_for(workspace, external_id="ada")
    with django_capture_on_commit_callbacks(execute=True):
        notification_cancel(notification=Notification.objects.get(pk=first.notification_id))
    assert published_messages(broker) == 1
    second.refresh_from_db()
    assert second.published_at is not None and second.published_at > first.published_at
    assert claimed_ids(second) == {second.pk}


def test_the_sweeper_republishes_a_held_delivery_whose_task_was_spent(workspace, settings, broker):
    ordered(workspace.normal)
    first, second = ingest_for(workspace, external_id="ada"), ingest_for(workspace, external_id="ada")
    assert claimed_ids(second) == set()  # its task is spent
    # The head finishes, but its worker dies before publishing the next one.
    Delivery.objects.filter(pk=first.pk).update(status=DeliveryStatus.SENT)
    later = timezone.now() + timedelta(seconds=settings.NOTIFY_REPUBLISH_AFTER_SECONDS + 1)
    assert due_publish(now=later) == 1
    second.refresh_from_db()
    assert second.published_at == later
    assert claimed_ids(second) == {second.pk}


def test_an_operator_sets_the_flag_in_the_admin(admin_client, workspace):
    change = admin_client.get(reverse("admin:catalog_category_change", args=[workspace.normal.pk]))
    assert 'name="ordered"' in change.content.decode()
    ordered(workspace.normal)
    listed = admin_client.get(reverse("admin:catalog_category_changelist"), {"ordered__exact": "1"})
    assert [c.key for c in listed.context["cl"].result_list] == ["welcome"]
