from django.utils import timezone
from rest_framework.test import APIClient

from apps.tenants.models import ApiKey
from tests.factories import ApiKeyFactory


def test_requests_without_a_valid_key_get_401(workspace):
    client = APIClient()
    assert client.get("/api/v1/notifications").status_code == 401
    client.credentials(HTTP_AUTHORIZATION="Bearer ntf_nope_nope")
    response = client.get("/api/v1/notifications")
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Unknown or revoked API key."
    client.credentials(HTTP_AUTHORIZATION="Token abc")
    assert client.get("/api/v1/notifications").status_code == 401


def test_a_revoked_key_stops_working(api, workspace):
    assert api.get("/api/v1/notifications").status_code == 200
    ApiKey.objects.filter(pk=workspace.api_key.pk).update(revoked_at=timezone.now())
    assert api.get("/api/v1/notifications").status_code == 401


def test_only_a_digest_of_the_key_is_stored(workspace):
    stored = ApiKey.objects.get(pk=workspace.api_key.pk)
    secret = workspace.api_key.raw_key.split("_", 2)[2]
    assert secret not in (stored.digest, stored.lookup)
    assert len(stored.digest) == 64


def test_the_openapi_schema_and_docs_are_served(client, db):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/api/v1/events", "/api/v1/events/batch", "/api/v1/notifications/{id}/cancel"} <= set(paths)
    assert "409" in paths["/api/v1/events"]["post"]["responses"]
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    assert b"swagger-ui" in docs.content


def test_the_schema_generates_without_warnings(tmp_path):
    from django.core.management import call_command

    call_command("spectacular", "--fail-on-warn", "--file", str(tmp_path / "schema.yml"))
    assert "/api/v1/events" in (tmp_path / "schema.yml").read_text()


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(api, workspace, broker, settings):
    workspace.api_key.rate_limit = "3 per minute"
    workspace.api_key.save()
    assert [api.get("/api/v1/notifications").status_code for _ in range(3)] == [200, 200, 200]
    refused = api.get("/api/v1/notifications")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "throttled"
    assert 50 <= int(refused["Retry-After"]) <= 60
    # Another key of the same tenant has its own window; the default applies to it.
    settings.NOTIFY_API_RATE_LIMIT = "1 per minute"
    other = ApiKeyFactory(tenant=workspace.tenant)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {other.raw_key}")
    assert [client.get("/api/v1/notifications").status_code for _ in range(2)] == [200, 429]
