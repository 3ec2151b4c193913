"""Recurring sends: the API keeps a django-celery-beat schedule in step, and each run triggers
one event through the normal pipeline, however often beat fires within its minute."""

import json

import pytest
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from apps.deliveries.models import Event, Notification
from notify.pipeline.recurring import recurring_send_run
from tests.factories import RecipientFactory

URL = "/api/v1/recurring-sends"


@pytest.fixture
def weekly(api, workspace):  # type: ignore[no-untyped-def]
    for name in ("ada", "bo"):
        RecipientFactory(tenant=workspace.tenant, external_id=name, email=f"{name}@example.com")
    body = {
        "name": "monday-summary",
        "category": "digest",
        "recipients": ["ada", "bo"],
        "data": {"headline": "Your week"},
        "cron": "0 9 * * 1",
        "timezone": "Europe/Paris",
    }
    response = api.post(URL, body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_a_recurring_send_gets_a_beat_schedule_in_its_timezone(weekly):
    task = PeriodicTask.objects.get(name=f"recurring send {weekly['id']}")
    assert task.task == "notify.recurring_send"
    assert json.loads(task.kwargs) == {"recurring_send_id": weekly["id"]}
    crontab = task.crontab
    assert (crontab.minute, crontab.hour, crontab.day_of_week, str(crontab.timezone)) == ("0", "9", "1", "Europe/Paris")
    assert task.enabled


def test_each_run_triggers_one_event_even_if_beat_fires_twice(weekly, workspace):
    now = timezone.now()
    first = recurring_send_run(recurring_send_id=weekly["id"], now=now)
    again = recurring_send_run(recurring_send_id=weekly["id"], now=now)
    assert first is not None and again is not None
    assert again.replayed and again.response == first.response
    [event] = Event.objects.filter(tenant=workspace.tenant)
    assert event.data == {"headline": "Your week"}
    assert Notification.objects.filter(event=event).count() == 2


def test_pausing_and_changing_the_schedule_reach_beat(api, weekly):
    response = api.patch(f"{URL}/{weekly['id']}", {"enabled": False, "cron": "30 18 * * 5"}, format="json")
    assert response.status_code == 200
    task = PeriodicTask.objects.get(name=f"recurring send {weekly['id']}")
    assert not task.enabled
    assert (task.crontab.minute, task.crontab.hour, task.crontab.day_of_week) == ("30", "18", "5")
    assert recurring_send_run(recurring_send_id=weekly["id"], now=timezone.now()) is None  # paused: nothing


def test_deleting_stops_it(api, weekly):
    assert api.delete(f"{URL}/{weekly['id']}").status_code == 204
    assert not PeriodicTask.objects.filter(name=f"recurring send {weekly['id']}").exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cron": "0 9 * *"}, "cron"),
        ({"cron": "61 9 * * *"}, "cron"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"category": "nope"}, "category"),
        ({"recipients": []}, "recipients"),
        ({"name": "monday-summary"}, "name"),  # taken
    ],
)
def test_bad_input_is_refused_by_field(api, weekly, change, field):
    body = {"name": "other", "category": "digest", "recipients": ["ada"], "cron": "0 9 * * *", **change}
    response = api.post(URL, body, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
