import json

from apps.deliveries.models import Event
from apps.recipients.tokens import INBOX, recipient_token_issue
from tests.factories import RecipientFactory


def _fields(response) -> dict:  # type: ignore[no-untyped-def]
    return response.json()["error"]["fields"]


def test_an_unknown_query_parameter_is_refused_and_named(api, workspace):
    response = api.get("/api/v1/notifications", {"recipeint": "ada", "status": "sent"})
    assert response.status_code == 400
    assert "Unknown query parameter" in _fields(response)["recipeint"][0]
    assert "recipient" in _fields(response)["recipeint"][0]  # says which ones it takes


def test_an_operation_without_query_parameters_refuses_any(api, workspace):
    body = json.dumps({"category": "welcome", "recipient": {"external_id": "ada", "email": "a@example.com"}})
    response = api.post("/api/v1/events?dry_run=1", data=body, content_type="application/json")
    assert response.status_code == 400
    assert "dry_run" in _fields(response)
    assert not Event.objects.exists()


def test_malformed_filters_and_page_parameters_are_refused_and_named(api, workspace):
    for query, field in [
        ({"status": ""}, "status"),
        ({"status": "lost"}, "status"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"page_size": "many"}, "page_size"),
        ({"page_size": "0"}, "page_size"),
        ({"page_size": "501"}, "page_size"),
        ({"cursor": "not-a-cursor"}, "cursor"),
    ]:
        response = api.get("/api/v1/notifications", query)
        assert response.status_code == 400, query
        assert field in _fields(response), query


def test_devices_take_only_a_recipient_filter(api, workspace):
    assert api.get("/api/v1/devices", {"recipient": "ada", "page_size": "10"}).status_code == 200
    refused = api.get("/api/v1/devices", {"token": "x"})
    assert refused.status_code == 400
    assert "token" in _fields(refused)


def test_the_inbox_checks_its_archived_filter(client, workspace):
    recipient = RecipientFactory(tenant=workspace.tenant, external_id="ada")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {recipient_token_issue(purpose=INBOX, recipient_id=recipient.id)}"}
    assert client.get("/inbox/v1/items", {"archived": "true"}, **auth).status_code == 200
    refused = client.get("/inbox/v1/items", {"archived": "maybe"}, **auth)
    assert refused.status_code == 400
    assert "archived" in _fields(refused)


def test_a_path_matching_no_api_view_gets_the_json_error_body(api, workspace):
    response = api.get("/api/v1/notifications/not.a.uuid")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert api.get("/no-such-page").headers["Content-Type"].startswith("text/html")
