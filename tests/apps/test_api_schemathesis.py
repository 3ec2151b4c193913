"""The API keeps to its OpenAPI schema: schemathesis generates requests, valid and invalid, for
every operation, and checks each answer against the schema."""

from collections.abc import Iterator

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
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
from config.wsgi import application
from tests.factories import RecipientFactory

schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", application)
schema.config.generation.update(max_examples=25, deterministic=True)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture
def connection_kept() -> Iterator[None]:
    """Requests go to the WSGI application in this process, inside the test's transaction: as
    Django's test client does, keep the start and end of a request from closing the connection."""
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    yield
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
def test_the_api_answers_as_its_schema_says(case, credentials, connection_kept):
    (scheme,) = case.operation.definition.raw["security"][0]
    case.call_and_validate(headers={"Authorization": credentials[scheme]}, checks=CHECKS)
