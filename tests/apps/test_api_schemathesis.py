"""The API keeps to its OpenAPI schema: schemathesis generates requests, valid and invalid, for
every operation, and checks each answer against the schema."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from apps.recipients.tokens import INBOX, recipient_token_issue
from tests.factories import RecipientFactory

schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", get_wsgi_application())
schema.config.generation.update(max_examples=25, deterministic=True)
# A body refused for its size (a negative case can be megabytes) is refused as much as any.
rejection = schema.config.checks.negative_data_rejection
rejection.expected_statuses = [*rejection.expected_statuses, "413"]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@contextmanager
def connection_kept() -> Iterator[None]:
    """Requests go to the WSGI application in this process, inside the test's transaction: as
    Django's test client does, keep the start and end of a request from closing the connection."""
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    try:
        yield
    finally:
        for signal in (request_started, request_finished):
            signal.connect(close_old_connections)


@pytest.fixture
def credentials(workspace) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """An Authorization header for each security scheme: the producer's API key, and an
    inbox token for one of its recipients."""
    recipient = RecipientFactory(tenant=workspace.tenant, external_id="ada")
    return {
        "apiKey": workspace.auth_header,
        "inboxToken": f"Bearer {recipient_token_issue(purpose=INBOX, recipient_id=recipient.id)}",
    }


@schema.parametrize()
@settings(suppress_health_check=list(HealthCheck), deadline=None)
def test_the_api_answers_as_its_schema_says(case, credentials):
    (scheme,) = case.operation.definition.raw["security"][0]
    with connection_kept():
        case.call_and_validate(headers={"Authorization": credentials[scheme]}, checks=CHECKS)


def test_real_objects_answer_as_the_schema_says(api, workspace, credentials, settings):
    """Generated ids rarely name anything: each read and change of a real object, once."""
    settings.NOTIFY_WEBPUSH_ALLOWED_HOSTS = ["push.example.com"]  # a made-up push service, not looked up
    RecipientFactory(tenant=workspace.tenant, external_id="bob", email="bob@example.com")
    accepted = api.post("/api/v1/events", {"category": "welcome", "recipient": "bob"}, format="json")
    notification_id = accepted.json()["notification_ids"][0]
    recurring = api.post(
        "/api/v1/recurring-sends",
        {"name": "weekly", "category": "digest", "recipients": ["bob"], "cron": "0 9 * * 1"},
        format="json",
    )
    device = {"recipient": "bob", "token": "device-token-1", "platform": "android"}
    assert api.post("/api/v1/devices", device, format="json").status_code == 201
    subscription = {"recipient": "bob", "endpoint": "https://push.example.com/1", "keys": {"p256dh": "k", "auth": "a"}}
    assert api.post("/api/v1/webpush-subscriptions", subscription, format="json").status_code == 201
    calls = [
        ("GET", "/api/v1/recipients", {}, None),
        ("GET", "/api/v1/recipients/{external_id}", {"external_id": "bob"}, None),
        ("PATCH", "/api/v1/recipients/{external_id}", {"external_id": "bob"}, {"locale": "fr"}),
        ("GET", "/api/v1/recipients/{external_id}/preferences", {"external_id": "ada"}, None),
        ("PATCH", "/api/v1/recipients/{external_id}/preferences", {"external_id": "bob"}, {"paused": True}),
        ("PUT", "/api/v1/recipients/{external_id}/preferences", {"external_id": "bob"}, {"channels": {"sms": False}}),
        ("GET", "/api/v1/recipients/{external_id}/preferences", {"external_id": "bob"}, None),
        (
            "POST",
            "/api/v1/recipients/{external_id}/consents",
            {"external_id": "bob"},
            {"channel": "email", "granted": True, "source": "form"},
        ),
        ("GET", "/api/v1/recipients/{external_id}/consents", {"external_id": "bob"}, None),
        ("POST", "/api/v1/recipients/{external_id}/preference-link", {"external_id": "bob"}, None),
        ("POST", "/api/v1/inbox-tokens", {}, {"recipient": "bob"}),
        ("GET", "/api/v1/notifications", {}, None),
        ("GET", "/api/v1/notifications/{id}", {"id": notification_id}, None),
        ("POST", "/api/v1/notifications/{id}/cancel", {"id": notification_id}, None),
        ("GET", "/api/v1/recurring-sends", {}, None),
        ("GET", "/api/v1/recurring-sends/{id}", {"id": recurring.json()["id"]}, None),
        ("PATCH", "/api/v1/recurring-sends/{id}", {"id": recurring.json()["id"]}, {"enabled": False}),
        ("GET", "/api/v1/devices", {}, None),
        ("GET", "/api/v1/webpush-subscriptions", {}, None),
        ("GET", "/inbox/v1/items", {}, None),
        ("GET", "/inbox/v1/counts", {}, None),
        ("POST", "/inbox/v1/items/read-all", {}, None),
    ]
    for method, path, path_parameters, body in calls:
        operation = schema[path][method]
        case = operation.Case(
            path_parameters=path_parameters,
            **({"body": body, "media_type": "application/json"} if body is not None else {}),
        )
        (scheme,) = operation.definition.raw["security"][0]
        with connection_kept():
            response = case.call_and_validate(headers={"Authorization": credentials[scheme]}, checks=CHECKS[:-1])
        assert response.status_code < 300, (method, path, response.text)
