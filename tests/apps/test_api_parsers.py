import json
import time

from apps.deliveries.models import Event
from apps.recipients.models import Recipient
from tests.factories import RecipientFactory

EVENTS = "/api/v1/events"


def test_a_100k_deep_json_array_gets_a_400_quickly(api, workspace):
    started = time.monotonic()
    response = api.post(EVENTS, data="[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert time.monotonic() - started < 2
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "malformed_json"
    assert "64 levels" in error["message"]


def test_json_nested_just_past_the_depth_limit_is_refused_with_the_depth(api, workspace):
    data: object = "deep"
    for _ in range(64):
        data = {"next": data}
    body = json.dumps({"category": "welcome", "recipient": "ada", "data": data})
    response = api.post(EVENTS, data=body, content_type="application/json")
    assert response.status_code == 400
    assert "64 levels" in response.json()["error"]["message"]
    assert not Event.objects.exists()


def test_json_within_the_depth_limit_is_accepted(api, workspace):
    RecipientFactory(tenant=workspace.tenant, external_id="ada", email="ada@example.com")
    data: object = "deep"
    for _ in range(60):
        data = {"next": data}
    body = json.dumps({"category": "welcome", "recipient": "ada", "data": data})
    response = api.post(EVENTS, data=body, content_type="application/json")
    assert response.status_code == 202, response.json()


def test_a_nul_deep_inside_is_still_named(api, workspace):
    body = {"external_id": "ada", "attributes": {"a": [{"b": "x\u0000y"}]}}
    response = api.post("/api/v1/recipients", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    assert "attributes.a[0].b" in response.json()["error"]["fields"]
    assert not Recipient.objects.exists()


def test_a_body_of_one_json_scalar_is_refused_as_input_not_a_crash(api, workspace):
    for body in ("null", "5", '"text"', "true"):
        response = api.post(EVENTS, data=body, content_type="application/json")
        assert response.status_code == 400, body
