"""A web pool kept for critical traffic (NOTIFY_WEB_POOL=critical) takes critical events and
nothing else, so bulk ingest, imports and broadcasts never share its processes."""

import json

from apps.deliveries.models import Event, Notification


def post(api, path: str, body: dict):  # type: ignore[no-untyped-def, type-arg]
    return api.post(path, data=json.dumps(body), content_type="application/json")


def test_the_critical_pool_takes_a_critical_event(api, workspace, settings):
    settings.NOTIFY_WEB_POOL = "critical"
    response = post(api, "/api/v1/events", {"category": "otp", "recipient": {"external_id": "ada"}, "data": {}})
    assert response.status_code == 202, response.content
    assert Notification.objects.filter(recipient__external_id="ada", priority="critical").count() == 1


def test_the_critical_pool_refuses_a_bulk_event_naming_the_priority(api, workspace, settings):
    settings.NOTIFY_WEB_POOL = "critical"
    response = post(api, "/api/v1/events", {"category": "digest", "recipient": {"external_id": "ada"}, "data": {}})
    assert response.status_code == 400, response.content
    assert "priority" in response.json()["error"]["fields"]
    # Nor does a critical category sent at a lower priority get in.
    lowered = post(
        api,
        "/api/v1/events",
        {"category": "otp", "recipient": {"external_id": "ada"}, "data": {}, "priority": "normal"},
    )
    assert lowered.status_code == 400, lowered.content
    assert not Event.objects.exists()


def test_the_critical_pool_answers_nothing_else(api, workspace, settings):
    settings.NOTIFY_WEB_POOL = "critical"
    for path, body in (
        ("/api/v1/broadcasts", {"category": "digest", "audience": {"all": True}}),
        ("/api/v1/events/batch", {"events": []}),
    ):
        response = post(api, path, body)
        assert response.status_code == 421, (path, response.content)
        assert response.json()["error"]["code"] == "critical_pool_only"
    assert api.get("/admin/").status_code == 421


def test_the_main_pool_takes_everything(api, workspace, settings):
    assert settings.NOTIFY_WEB_POOL == "all"
    response = post(api, "/api/v1/events", {"category": "digest", "recipient": {"external_id": "ada"}, "data": {}})
    assert response.status_code == 202, response.content
