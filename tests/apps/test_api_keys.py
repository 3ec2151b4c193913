"""API keys: scopes, category limits, expiry and rotation, through the API, the command and
the admin."""

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from rest_framework.test import APIClient, APIRequestFactory
from rest_framework.views import APIView

from apps.api.scopes import ANY_KEY, scope_required
from apps.deliveries.models import Event, Notification, RecurringSend
from apps.tenants.demo import demo_workspace_ensure
from apps.tenants.models import ALL_SCOPES, ApiKey
from tests.factories import ApiKeyFactory, RecipientFactory

API = "/api/v1"


def client_for(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


def key_client(workspace, **fields) -> APIClient:  # type: ignore[no-untyped-def]
    return client_for(ApiKeyFactory(tenant=workspace.tenant, **fields).raw_key)


def error(response) -> dict:  # type: ignore[no-untyped-def]
    return response.json()["error"]


@pytest.fixture
def ada(workspace):  # type: ignore[no-untyped-def]
    return RecipientFactory(tenant=workspace.tenant, external_id="ada")


@pytest.fixture
def notification_id(api, ada) -> str:  # type: ignore[no-untyped-def]
    response = api.post(f"{API}/events", {"category": "welcome", "recipient": "ada"}, format="json")
    assert response.status_code == 202, response.content
    return str(response.json()["notification_ids"][0])


# (method, path, body, scope): every operation of the producer API.
OPERATIONS = [
    ("post", "/events", {"category": "welcome", "recipient": "ada"}, "events:send"),
    ("post", "/events/batch", {"events": [{"category": "welcome", "recipient": "ada"}]}, "events:send"),
    ("get", "/notifications", None, "notifications:read"),
    ("get", "/notifications/{notification}", None, "notifications:read"),
    ("post", "/notifications/{notification}/cancel", None, "events:send"),
    ("get", "/recipients", None, "recipients:read"),
    ("get", "/recipients/ada", None, "recipients:read"),
    ("post", "/recipients", {"external_id": "bo"}, "recipients:write"),
    ("put", "/recipients/ada", {"email": "ada@example.com"}, "recipients:write"),
    ("patch", "/recipients/ada", {"email": "ada@example.com"}, "recipients:write"),
    ("delete", "/recipients/ada", None, "recipients:write"),
    ("get", "/recipients/ada/preferences", None, "recipients:read"),
    ("put", "/recipients/ada/preferences", {"channels": {"sms": False}}, "recipients:write"),
    ("patch", "/recipients/ada/preferences", {"channels": {"sms": False}}, "recipients:write"),
    ("get", "/recipients/ada/consents", None, "recipients:read"),
    ("post", "/recipients/ada/consents", {"channel": "email", "granted": True, "source": "t"}, "recipients:write"),
    ("post", "/recipients/ada/preference-link", None, "recipients:write"),
    ("get", "/devices", None, "recipients:read"),
    (
        "post",
        "/devices",
        {"token": "t1", "platform": "android", "recipient": {"external_id": "ada"}},
        "recipients:write",
    ),
    ("delete", "/devices/t1", None, "recipients:write"),
    ("get", "/webpush-subscriptions", None, "recipients:read"),
    ("delete", "/webpush-subscriptions/1", None, "recipients:write"),
    ("post", "/inbox-tokens", {"recipient": "ada"}, "inbox:tokens"),
    ("get", "/recurring-sends", None, "admin"),
    (
        "post",
        "/recurring-sends",
        {"name": "w", "category": "welcome", "recipients": ["ada"], "cron": "0 9 * * 1"},
        "admin",
    ),
    ("patch", "/recurring-sends/1", {"enabled": False}, "admin"),
    ("delete", "/recurring-sends/1", None, "admin"),
    ("get", "/webhook-endpoints", None, "webhooks:manage"),
    (
        "post",
        "/webhook-endpoints",
        {"url": "https://hooks.example.com/notify", "event_types": ["delivery.sent"]},
        "webhooks:manage",
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "scope"), OPERATIONS, ids=[f"{o[0]} {o[1]}" for o in OPERATIONS])
def test_each_operation_needs_its_scope_and_names_it_when_missing(
    workspace, notification_id, broker, method, path, body, scope
):
    url = API + path.format(notification=notification_id)
    without = key_client(workspace, scopes=[s for s in ALL_SCOPES if s != scope])
    refused = getattr(without, method)(url, body, format="json")
    assert refused.status_code == 403, refused.content
    assert error(refused) == {
        "code": "missing_scope",
        "message": f"This API key lacks the scope '{scope}'.",
        "scope": scope,
    }
    # The one scope is enough (whatever the operation then answers, it is not a refusal).
    only = key_client(workspace, scopes=[scope])
    assert getattr(only, method)(url, body, format="json").status_code not in (401, 403)


def _api_routes(resolver: URLResolver, prefix: str = "") -> list[tuple[str, URLPattern]]:
    routes = []
    for pattern in resolver.url_patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            routes += _api_routes(pattern, route)
        elif route.startswith("api/v1/"):
            routes.append((route, pattern))
    return routes


def test_every_api_route_declares_a_scope_for_each_of_its_methods():
    routes = _api_routes(get_resolver())
    assert len(routes) >= 15
    undeclared = []
    for route, pattern in routes:
        view_class = pattern.callback.cls  # type: ignore[attr-defined]
        actions = getattr(pattern.callback, "actions", None)
        methods = list(actions) if actions else [m for m in view_class.http_method_names if hasattr(view_class, m)]
        for method in methods:
            if method in ("options", "head"):
                continue
            if scope_required(view=view_class, method=method) not in [*ALL_SCOPES, ANY_KEY]:
                undeclared.append(f"{method.upper()} {route}")
    assert undeclared == []


def test_a_view_that_declares_no_scope_is_refused(workspace):
    class Undeclared(APIView):
        def get(self, request):  # type: ignore[no-untyped-def]
            raise AssertionError("must not run")

    request = APIRequestFactory().get("/x", HTTP_AUTHORIZATION=workspace.auth_header)
    response = Undeclared.as_view()(request)
    assert response.status_code == 403
    assert response.data["error"]["code"] == "scope_undeclared"
    # A method the view has no scope for is refused too, even with every scope.
    assert APIClient().options(f"{API}/notifications", HTTP_AUTHORIZATION=workspace.auth_header).status_code == 403


def test_the_schema_documents_each_operations_scope_and_403(client, db):
    paths = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()["paths"]
    delete = paths["/api/v1/recipients/{external_id}"]["delete"]
    assert delete["x-required-scope"] == "recipients:write"
    assert "Requires the API key scope `recipients:write`." in delete["description"]
    assert "403" in delete["responses"]
    assert paths["/api/v1/recurring-sends"]["post"]["x-required-scope"] == "admin"
    assert paths["/api/v1/api-keys/self/rotate"]["post"]["x-required-scope"] == ANY_KEY
    for path, operations in paths.items():
        if not path.startswith("/api/v1/"):
            continue  # the inbox API takes recipient tokens, not keys
        for method, operation in operations.items():
            assert "x-required-scope" in operation and "403" in operation["responses"], f"{method} {path}"


# --- Categories --------------------------------------------------------------------------


def test_a_category_limited_key_cannot_send_another_category(workspace, ada, broker):
    marketing = key_client(workspace, categories=["welcome", "digest"])
    refused = marketing.post(f"{API}/events", {"category": "otp", "recipient": "ada"}, format="json")
    assert refused.status_code == 403
    message = "This API key may not use the category 'otp'."
    assert error(refused) == {"code": "category_not_allowed", "message": message, "fields": {"category": [message]}}
    # An unknown category is refused the same way: a limited key learns nothing of others.
    assert marketing.post(f"{API}/events", {"category": "nope", "recipient": "ada"}, format="json").status_code == 403
    accepted = marketing.post(f"{API}/events", {"category": "welcome", "recipient": "ada"}, format="json")
    assert accepted.status_code == 202
    assert Event.objects.filter(tenant=workspace.tenant).count() == 1


def test_a_batch_with_one_forbidden_category_is_refused_whole(workspace, ada, broker):
    marketing = key_client(workspace, categories=["welcome"])
    events = [{"category": "welcome", "recipient": "ada"}] * 2 + [{"category": "otp", "recipient": "ada"}]
    refused = marketing.post(f"{API}/events/batch", {"events": events}, format="json")
    assert refused.status_code == 403
    assert error(refused)["fields"] == {"events[2].category": ["This API key may not use the category 'otp'."]}
    assert not Event.objects.exists()


def test_a_category_limited_key_reads_and_cancels_only_its_categories(workspace, api, ada, broker):
    otp = api.post(f"{API}/events", {"category": "otp", "recipient": "ada"}, format="json").json()
    welcome = api.post(f"{API}/events", {"category": "welcome", "recipient": "ada"}, format="json").json()
    [otp_id], [welcome_id] = otp["notification_ids"], welcome["notification_ids"]
    marketing = key_client(workspace, categories=["welcome"])
    listed = marketing.get(f"{API}/notifications").json()["results"]
    assert [n["id"] for n in listed] == [welcome_id]
    assert marketing.get(f"{API}/notifications/{welcome_id}").status_code == 200
    for response in (
        marketing.get(f"{API}/notifications/{otp_id}"),
        marketing.post(f"{API}/notifications/{otp_id}/cancel"),
    ):
        assert response.status_code == 403
        assert error(response)["code"] == "category_not_allowed"
    assert Notification.objects.get(id=otp_id).cancelled_at is None


def test_a_category_limited_admin_key_schedules_only_its_categories(workspace, api, ada):
    body = {"name": "w", "category": "otp", "recipients": ["ada"], "cron": "0 9 * * 1"}
    assert api.post(f"{API}/recurring-sends", body, format="json").status_code == 201
    limited = key_client(workspace, categories=["welcome"])
    refused = limited.post(f"{API}/recurring-sends", {**body, "name": "x"}, format="json")
    assert refused.status_code == 403
    assert error(refused)["fields"] == {"category": ["This API key may not use the category 'otp'."]}
    assert limited.get(f"{API}/recurring-sends").json()["results"] == []
    own = limited.post(f"{API}/recurring-sends", {**body, "name": "y", "category": "welcome"}, format="json")
    assert own.status_code == 201
    moved = limited.patch(f"{API}/recurring-sends/{own.json()['id']}", {"category": "otp"}, format="json")
    assert moved.status_code == 403
    assert RecurringSend.objects.get(name="y").category.key == "welcome"


def test_a_category_limited_key_cannot_switch_off_another_category_for_a_recipient(workspace, ada):
    marketing = key_client(workspace, categories=["digest"])
    url = f"{API}/recipients/ada/preferences"
    refused = marketing.patch(url, {"categories": {"digest": {"email": True}, "otp": {"sms": False}}}, format="json")
    assert refused.status_code == 403
    assert list(error(refused)["fields"]) == ["categories.otp"]
    assert marketing.patch(url, {"categories": {"digest": {"email": False}}}, format="json").status_code == 200


# --- Expiry and revocation ------------------------------------------------------------------


def test_an_expired_key_gets_401_saying_when_it_expired(workspace):
    key = ApiKeyFactory(tenant=workspace.tenant, expires_at=timezone.now() + timedelta(hours=1))
    client = client_for(key.raw_key)
    assert client.get(f"{API}/notifications").status_code == 200
    ApiKey.objects.filter(pk=key.pk).update(expires_at="2026-01-02T03:04:05Z")
    refused = client.get(f"{API}/notifications")
    assert refused.status_code == 401
    assert error(refused)["message"] == "This API key expired on 2026-01-02T03:04:05Z."


def test_a_revoked_key_gets_401_saying_when_it_was_revoked(workspace):
    key = ApiKeyFactory(tenant=workspace.tenant, revoked_at="2026-05-06T07:08:09Z")
    refused = client_for(key.raw_key).get(f"{API}/notifications")
    assert refused.status_code == 401
    assert error(refused)["message"] == "This API key was revoked on 2026-05-06T07:08:09Z."
    # Without the secret, nothing is said about the key.
    guess = client_for(f"ntf_{key.lookup}_wrong").get(f"{API}/notifications")
    assert error(guess)["message"] == "Unknown or revoked API key."


# --- Rotation -------------------------------------------------------------------------------


def test_rotation_answers_a_new_key_and_the_old_one_works_until_its_grace_ends(workspace):
    key = ApiKeyFactory(tenant=workspace.tenant, scopes=["notifications:read"], categories=["welcome"])
    old = client_for(key.raw_key)
    rotated = old.post(f"{API}/api-keys/self/rotate", {"grace_period_seconds": 3600}, format="json")
    assert rotated.status_code == 201, rotated.content
    assert rotated["Cache-Control"] == "no-store"
    body = rotated.json()
    assert body["key"] != key.raw_key and body["key"].startswith(f"ntf_{key.lookup}_")
    assert (body["scopes"], body["categories"]) == (["notifications:read"], ["welcome"])
    new = client_for(body["key"])
    assert new.get(f"{API}/notifications").status_code == 200
    assert old.get(f"{API}/notifications").status_code == 200  # within the grace period
    stored = ApiKey.objects.get(pk=key.pk)
    assert key.raw_key.split("_", 2)[2] not in (stored.digest, stored.previous_digest)
    assert timedelta(minutes=59) < stored.previous_expires_at - timezone.now() <= timedelta(hours=1)
    ApiKey.objects.filter(pk=key.pk).update(previous_expires_at=timezone.now() - timedelta(seconds=1))
    refused = old.get(f"{API}/notifications")
    assert refused.status_code == 401
    assert "rotated; its previous secret stopped working on" in error(refused)["message"]
    assert new.get(f"{API}/notifications").status_code == 200
    assert new.get(f"{API}/api-keys/self").json()["previous_expires_at"] is not None


def test_rotation_without_grace_stops_the_old_secret_at_once_and_a_second_drops_the_first(workspace):
    key = ApiKeyFactory(tenant=workspace.tenant, scopes=["events:send"])
    first = client_for(key.raw_key)
    second_key = first.post(f"{API}/api-keys/self/rotate", format="json").json()["key"]  # default grace
    second = client_for(second_key)
    assert first.get(f"{API}/api-keys/self").status_code == 200
    third_key = second.post(f"{API}/api-keys/self/rotate", {"grace_period_seconds": 0}, format="json").json()["key"]
    assert first.get(f"{API}/api-keys/self").status_code == 401
    assert second.get(f"{API}/api-keys/self").status_code == 401
    assert client_for(third_key).get(f"{API}/api-keys/self").json()["scopes"] == ["events:send"]


def test_a_grace_period_out_of_range_is_refused_naming_the_field(api):
    refused = api.post(f"{API}/api-keys/self/rotate", {"grace_period_seconds": 8 * 86400}, format="json")
    assert refused.status_code == 400
    assert list(error(refused)["fields"]) == ["grace_period_seconds"]


def test_a_key_reads_itself_without_showing_its_secret(workspace):
    key = ApiKeyFactory(tenant=workspace.tenant, scopes=["inbox:tokens"])
    body = client_for(key.raw_key).get(f"{API}/api-keys/self").json()
    assert body["prefix"] == f"ntf_{key.lookup}_"
    assert body["scopes"] == ["inbox:tokens"]
    assert key.raw_key.split("_", 2)[2] not in str(body)
    assert ApiKey.objects.get(pk=key.pk).last_used_at is not None


# --- The command ----------------------------------------------------------------------------


def run_apikey_create(*arguments: str) -> str:
    out = io.StringIO()
    call_command("apikey_create", *arguments, stdout=out, stderr=io.StringIO())
    return out.getvalue().strip()


def test_the_command_prints_a_key_with_the_given_scopes_categories_and_expiry(workspace, ada, broker):
    raw_key = run_apikey_create(
        "--tenant", workspace.tenant.slug, "--name", "billing",
        "--scopes", "events:send,notifications:read", "--categories", "welcome", "--expires-in-days", "30",
    )  # fmt: skip
    key = ApiKey.objects.get(name="billing")
    assert raw_key.startswith(f"ntf_{key.lookup}_") and raw_key.split("_", 2)[2] not in key.digest
    assert (key.scopes, key.categories) == (["events:send", "notifications:read"], ["welcome"])
    assert timedelta(days=29, hours=23) < key.expires_at - timezone.now() <= timedelta(days=30)
    client = client_for(raw_key)
    assert client.get(f"{API}/notifications").status_code == 200
    assert client.post(f"{API}/events", {"category": "otp", "recipient": "ada"}, format="json").status_code == 403
    assert client.get(f"{API}/recipients").status_code == 403


def test_a_key_made_without_scopes_may_only_send_events(workspace):
    raw_key = run_apikey_create("--tenant", workspace.tenant.slug, "--name", "x")
    key = ApiKey.objects.get(lookup=raw_key.split("_")[1])
    assert (key.scopes, key.categories, key.expires_at) == (["events:send"], [], None)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--tenant", "nope"], "Unknown tenant 'nope'. Valid slugs: "),
        (["--scopes", "events:send,everything"], "--scopes: Unknown scope 'everything'. Valid scopes: events:send"),
        (
            ["--categories", "welcome,fraud"],
            "--categories: Unknown category 'fraud'. Valid keys: digest, otp, welcome.",
        ),
        (["--expires-in-days", "0"], "--expires-in-days takes a whole number of days, 1 or more."),
    ],
)
def test_the_command_explains_bad_arguments(workspace, arguments, message):
    base = {"--tenant": workspace.tenant.slug, "--name": "x"}
    pairs = dict(zip(arguments[::2], arguments[1::2], strict=True))
    with pytest.raises(CommandError) as raised:
        run_apikey_create(*[item for pair in {**base, **pairs}.items() for item in pair])
    assert message in str(raised.value)
    assert not ApiKey.objects.filter(name="x").exists()


# --- The admin ------------------------------------------------------------------------------


@pytest.fixture
def ops(admin_user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(admin_user)
    return client


def test_the_admin_creates_a_scoped_category_limited_key_shown_once(ops, workspace, ada, broker):
    form = {"tenant": workspace.tenant.pk, "name": "marketing", "scopes": ["events:send"], "categories": "welcome"}
    response = ops.post(reverse("admin:tenants_apikey_add"), form, follow=True)
    [message] = [str(m) for m in response.context["messages"] if "Copy this API key now" in str(m)]
    raw_key = message.rsplit(" ", 1)[1]
    key = ApiKey.objects.get(name="marketing")
    assert (key.scopes, key.categories) == (["events:send"], ["welcome"])
    client = client_for(raw_key)
    assert client.post(f"{API}/events", {"category": "welcome", "recipient": "ada"}, format="json").status_code == 202
    assert client.post(f"{API}/events", {"category": "otp", "recipient": "ada"}, format="json").status_code == 403
    assert client.get(f"{API}/notifications").status_code == 403


def test_the_admin_add_form_offers_scope_checkboxes_and_refuses_unknown_categories(ops, workspace):
    page = ops.get(reverse("admin:tenants_apikey_add")).content.decode()
    for scope in ALL_SCOPES:
        assert f'type="checkbox" name="scopes" value="{scope}"' in page
    form = {"tenant": workspace.tenant.pk, "name": "bad", "scopes": ["events:send"], "categories": "fraud"}
    response = ops.post(reverse("admin:tenants_apikey_add"), form)
    assert response.status_code == 200
    assert "Unknown category &#x27;fraud&#x27;" in response.content.decode()
    assert not ApiKey.objects.filter(name="bad").exists()


def test_the_admin_rotate_action_shows_the_new_key_once(ops, workspace):
    key = ApiKeyFactory(tenant=workspace.tenant, name="billing")
    changelist = reverse("admin:tenants_apikey_changelist")
    response = ops.post(changelist, {"action": "rotate", "_selected_action": [key.pk]}, follow=True)
    [message] = [str(m) for m in response.context["messages"] if "Copy the new key for 'billing'" in str(m)]
    new_key = message.rsplit(" ", 1)[1]
    assert client_for(new_key).get(f"{API}/notifications").status_code == 200
    assert client_for(key.raw_key).get(f"{API}/notifications").status_code == 200  # its grace period
    response = ops.post(changelist, {"action": "rotate_without_grace", "_selected_action": [key.pk]}, follow=True)
    [message] = [str(m) for m in response.context["messages"] if "Copy the new key" in str(m)]
    assert client_for(new_key).get(f"{API}/notifications").status_code == 401
    assert client_for(message.rsplit(" ", 1)[1]).get(f"{API}/notifications").status_code == 200
    assert "events:send" in ops.get(changelist).content.decode()  # the list shows each key's scopes


# --- Upgrades -------------------------------------------------------------------------------


def test_keys_made_before_scopes_existed_keep_every_scope(transactional_db):
    executor = MigrationExecutor(connection)
    executor.migrate([("tenants", "0004_cost_guard")])
    old_apps = executor.loader.project_state([("tenants", "0004_cost_guard")]).apps
    tenant = old_apps.get_model("tenants", "Tenant").objects.create(slug="old", name="Old")
    old_apps.get_model("tenants", "ApiKey").objects.create(tenant=tenant, name="legacy", lookup="abc", digest="0" * 64)
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    legacy = ApiKey.objects.get(lookup="abc")
    # Every scope there was when scopes came in; a scope added later is granted to no old key.
    scopes_then = [scope for scope in ALL_SCOPES if scope != "analytics:read"]
    assert (legacy.scopes, legacy.categories, legacy.expires_at) == (scopes_then, [], None)
    assert ApiKey(tenant_id=legacy.tenant_id, name="new").scopes == ["events:send"]


def test_the_demo_key_does_everything_the_demo_shows(db, broker):
    demo = client_for("ntf_demo_0123456789abcdefTEST")
    demo_workspace_ensure(api_key="ntf_demo_0123456789abcdefTEST")
    assert demo.post(f"{API}/events", {"category": "mention", "recipient": "ada"}, format="json").status_code == 202
    assert demo.post(f"{API}/inbox-tokens", {"recipient": "ada"}, format="json").status_code == 201
    assert demo.post(f"{API}/recipients/ada/preference-link").status_code == 201
    weekly = {"name": "weekly", "category": "weekly-digest", "recipients": ["ada"], "cron": "0 9 * * 1"}
    assert demo.post(f"{API}/recurring-sends", weekly, format="json").status_code == 201
