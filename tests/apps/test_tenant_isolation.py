"""Two tenants, each with one of everything: no response given to one contains the other's data.

The walks are driven by the URL conf and the admin registry, so a route or a ModelAdmin added
later is walked without editing this file; a top-level route that is neither walked nor
listed in OUTSIDE_THE_WALK fails the test."""

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlencode

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.db import models
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve, reverse
from django.urls.exceptions import NoReverseMatch
from rest_framework.test import APIClient

from apps.catalog.models import Category
from apps.deliveries.models import Notification
from apps.inbox.services import MARKS
from apps.recipients.models import Device, Recipient, Suppression
from apps.tenants.admin_site import TenantScopedAdmin
from tests.factories import StaffUserFactory, TenantWorld, tenant_world

# How each walked prefix is authenticated.
WALKED = {"api/v1/": "api key", "inbox/v1/": "inbox token"}
# Top-level routes not reached with a tenant's API key or a recipient's inbox token.
OUTSIDE_THE_WALK = {
    "admin/": "walked page by page in test_admin_pages_show_only_the_staff_tenants_rows",
    "anymail/": "the email provider's webhooks, authenticated by the provider's secret",
    "preferences/<str:token>": "a recipient's own signed link; the token names one recipient",
    "unsubscribe/<str:token>": "a recipient's own signed link; the token names one recipient",
    "unsubscribe/<str:token>/preferences": "a recipient's own signed link; the token names one recipient",
    "webhooks/twilio/status": "Twilio's callback, signed by the account's auth token",
    "webhooks/twilio/inbound": "Twilio's callback, signed by the account's auth token",
    "webpush/clicks/<str:token>": "a message's own signed link; the token names one recipient and delivery",
    "demo/inbox/": "demo page, on only with NOTIFY_DEMO_API_KEY",
    "demo/inbox/token": "demo page's token for the demo recipient, on only with NOTIFY_DEMO_API_KEY",
    "demo/webpush/": "demo page, on only with NOTIFY_DEMO_API_KEY",
    "demo/webpush/sw.js": "static service worker",
    "demo/webpush/subscribe": "demo page, on only with NOTIFY_DEMO_API_KEY",
    "api/schema/": "the OpenAPI schema, the same for everyone",
    "api/docs/": "the OpenAPI schema, the same for everyone",
    "api/redoc/": "the OpenAPI schema, the same for everyone",
}
# Path parameters that are a word from a fixed set rather than an identifier.
VOCABULARY = {"mark": sorted(MARKS)}


@pytest.fixture
def worlds(db: None) -> tuple[TenantWorld, TenantWorld]:
    return tenant_world(tag="alpha"), tenant_world(tag="bravo")


def identifiers(world: TenantWorld) -> list[str]:
    """Every value that could name one of the world's objects in a URL."""
    values = {str(obj.pk) for obj in world.objects} | {secret for secret in world.secrets if " " not in secret}
    return sorted(values)


def leaked(*, world: TenantWorld, text: str, request_text: str) -> set[str]:
    """The world's strings found in a response, except those the request itself carried."""
    return {secret for secret in world.secrets if secret in text and secret not in request_text}


def snapshot(world: TenantWorld) -> list[list[dict]]:
    return [list(type(obj)._default_manager.filter(pk=obj.pk).values()) for obj in world.objects]


@dataclass
class Route:
    prefix: str
    pattern: URLPattern

    @property
    def label(self) -> str:
        return f"{self.prefix}{self.pattern.pattern}"


def routes_under(prefix: str, patterns: list) -> Iterator[Route]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from routes_under(prefix, entry.url_patterns)
        else:
            yield Route(prefix=prefix, pattern=entry)


def walked_routes() -> list[Route]:
    top_level = {str(entry.pattern): entry for entry in get_resolver().url_patterns}
    unclassified = set(top_level) - set(WALKED) - set(OUTSIDE_THE_WALK)
    assert not unclassified, f"walk these routes here, or say in OUTSIDE_THE_WALK why not: {sorted(unclassified)}"
    routes: list[Route] = []
    for prefix in WALKED:
        resolver = top_level[prefix]
        assert isinstance(resolver, URLResolver)
        routes.extend(routes_under(prefix, resolver.url_patterns))
    return routes


def paths_for(route: Route, *, other: TenantWorld) -> list[str]:
    """The route's URL filled with each of the other tenant's identifiers, where it matches."""
    assert route.pattern.name, f"{route.label} needs a name to be walked"
    names = list(route.pattern.pattern.regex.groupindex)
    choices = [VOCABULARY.get(name, identifiers(other)) for name in names]
    paths = []
    for values in itertools.product(*choices):
        try:
            path = reverse(route.pattern.name, kwargs=dict(zip(names, values, strict=True)))
        except NoReverseMatch:
            continue  # e.g. a dot in a value the route's regex refuses
        if resolve(path).url_name == route.pattern.name:
            paths.append(path)
    return paths


def methods_served(route: Route) -> set[str]:
    """The HTTP methods the route's view handles; any other is answered 405 without reading
    anything, so walking it would prove nothing."""
    view = route.pattern.callback
    actions = getattr(view, "actions", None)  # a viewset's route maps its methods to actions
    if actions:
        return set(actions)
    view_class = getattr(view, "view_class", None) or getattr(view, "cls", None)
    served = {method for method in ("get", "post", "put", "patch", "delete") if hasattr(view_class, method)}
    assert served, f"{route.label}: no method found to walk"
    return served


def path_has_id(route: Route) -> bool:
    return any(name not in VOCABULARY for name in route.pattern.pattern.regex.groupindex)


def clients_of(world: TenantWorld) -> dict[str, APIClient]:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {world.api_key.raw_key}")  # type: ignore[attr-defined]
    issued = api.post("/api/v1/inbox-tokens", {"recipient": world.recipient.external_id}, format="json")
    assert issued.status_code == 201, issued.content
    inbox = APIClient()
    inbox.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.json()['token']}")
    return {"api key": api, "inbox token": inbox}


def walk_api(*, me: TenantWorld, other: TenantWorld) -> None:
    clients = clients_of(me)
    routes = walked_routes()
    before = snapshot(other)
    problems: list[str] = []
    probe = {
        "recipient": other.recipient.external_id,
        "recipients": [other.recipient.external_id],
        "category": other.of_model(Category)[0].key,  # type: ignore[attr-defined]
    }
    # Reads first, then writes, so that nothing a write made on my side confuses a read.
    for methods in (("get",), ("post", "put", "patch", "delete")):
        for route in routes:
            client = clients[WALKED[route.prefix]]
            paths = paths_for(route, other=other)
            assert paths, f"{route.label}: no URL could be made from the other tenant's identifiers"
            for path, method in itertools.product(paths, sorted(methods_served(route) & set(methods))):
                body = "" if method == "get" else json.dumps(probe)
                response = client.generic(method.upper(), path, body, content_type="application/json")
                text = response.content.decode(errors="replace") + json.dumps(dict(response.headers))
                found = leaked(world=other, text=text, request_text=unquote(path) + body)
                if found:
                    problems.append(f"{method.upper()} {path} -> {response.status_code} shows {sorted(found)}")
                # Integer ids of different models may be equal: only the other's alone say "found".
                mine = set(identifiers(me))
                named_only_theirs = not any(value in mine for value in unquote(path).split("/"))
                if method == "get" and named_only_theirs and path_has_id(route) and response.status_code < 400:
                    problems.append(f"GET {path} -> {response.status_code}: another tenant's object was found")
    assert not problems, "\n".join(problems)
    assert snapshot(other) == before, "a request with one tenant's credentials changed the other's data"


def test_the_api_and_inbox_show_one_tenant_nothing_of_the_other(worlds):
    alpha, bravo = worlds
    walk_api(me=alpha, other=bravo)
    walk_api(me=bravo, other=alpha)


def test_the_api_walk_sees_its_own_tenants_data(worlds):
    """The walk's reads are real: with its own ids a tenant gets its rows (so a leak would show)."""
    alpha, _ = worlds
    clients = clients_of(alpha)
    [notification] = alpha.of_model(Notification)
    own = clients["api key"].get(f"/api/v1/notifications/{notification.pk}")
    assert own.status_code == 200
    assert alpha.recipient.external_id in own.content.decode()
    items = clients["inbox token"].get("/inbox/v1/items")
    assert "alpha inbox title" in items.content.decode()


def staff_with_every_permission(world: TenantWorld) -> Client:
    world.staff.user_permissions.set(Permission.objects.all())
    client = Client()
    client.force_login(world.staff)
    return client


def admin_url(model: type[models.Model], page: str, *args: object) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{page}", args=args)


def walk_admin(*, me: TenantWorld, other: TenantWorld) -> None:
    client = staff_with_every_permission(me)
    problems: list[str] = []

    def visit(url: str, *, expect: tuple[int, ...]) -> str:
        response = client.get(url)
        if response.status_code not in expect:
            problems.append(f"GET {url} -> {response.status_code}, expected one of {expect}")
        text = response.content.decode(errors="replace")
        if response.status_code == 302:
            # Where the admin sends a refused request, with its message naming the id asked for.
            text += client.get(response["Location"]).content.decode(errors="replace")
        found = leaked(world=other, text=text, request_text=unquote(url))
        if found:
            at = text.find(sorted(found)[0])
            problems.append(f"GET {url} shows {sorted(found)}: …{text[max(at - 150, 0) : at + 60]}…")
        return text

    index = visit(reverse("admin:index"), expect=(200,))
    for app_label in {model._meta.app_label for model in admin.site._registry}:
        visit(reverse("admin:app_list", args=[app_label]), expect=(200, 404))
    for model, model_admin in admin.site._registry.items():
        changelist = admin_url(model, "changelist")
        if isinstance(model_admin, TenantScopedAdmin):
            assert other.of_model(model), f"tests/factories.py tenant_world: make a {model.__name__} too"
            text = visit(changelist, expect=(200,))
            for obj in me.of_model(model):
                # The page lists its own rows, so that the other's would show too.
                assert str(obj) in text or str(obj.pk) in text, f"{changelist} does not list {obj!r}"
                visit(admin_url(model, "change", obj.pk), expect=(200,))
            visit(f"{changelist}?q={other.recipient.external_id}", expect=(200,))
        else:
            visit(changelist, expect=(403,))
            if changelist in index:
                problems.append(f"the index links to {changelist}, which only superusers may use")
        try:
            visit(admin_url(model, "add"), expect=(200, 403))
        except NoReverseMatch:
            pass
        for obj in other.of_model(model):
            for page in ("change", "history", "delete"):
                visit(admin_url(model, page, obj.pk), expect=(302, 403, 404))
        # The autocomplete endpoint answers for any relation to a searchable admin's model.
        for field in model._meta.get_fields():
            if field.is_relation and field.concrete and field.related_model in admin.site._registry:
                query = urlencode({"app_label": model._meta.app_label, "model_name": model._meta.model_name})
                url = f"{reverse('admin:autocomplete')}?{query}&field_name={field.name}&term="
                visit(url, expect=(200, 403, 404))
    assert not problems, "\n".join(problems)


def test_admin_pages_show_only_the_staff_tenants_rows(worlds):
    alpha, bravo = worlds
    walk_admin(me=alpha, other=bravo)
    walk_admin(me=bravo, other=alpha)


def test_a_staff_user_without_a_tenant_sees_no_tenants_rows(worlds):
    alpha, _ = worlds
    nobody = StaffUserFactory(permissions=["recipients.view_recipient", "recipients.add_recipient"])
    client = Client()
    client.force_login(nobody)
    assert client.get(admin_url(Recipient, "changelist")).status_code == 403
    assert client.get(admin_url(Recipient, "change", alpha.recipient.pk)).status_code in (302, 403)
    assert client.get(admin_url(Recipient, "add")).status_code == 403
    assert admin_url(Recipient, "changelist") not in client.get(reverse("admin:index")).content.decode()


def test_the_tenant_of_a_new_row_is_the_staff_users_own_whatever_the_form_says(worlds):
    alpha, bravo = worlds
    client = staff_with_every_permission(alpha)
    form = {
        "tenant": bravo.tenant.pk,
        "channel": "email",
        "address": "forged@alpha.example",
        "reason": "r",
        "source": "admin",
    }
    assert client.post(admin_url(Suppression, "add"), form).status_code == 302
    assert Suppression.objects.get(address="forged@alpha.example").tenant == alpha.tenant
    # And an existing row does not move to another tenant.
    [suppression] = alpha.of_model(Suppression)
    form = {
        "tenant": bravo.tenant.pk,
        "channel": "email",
        "address": "moved@alpha.example",
        "reason": "r",
        "source": "admin",
    }
    assert client.post(admin_url(Suppression, "change", suppression.pk), form).status_code == 302
    assert Suppression.objects.get(pk=suppression.pk).tenant == alpha.tenant


def test_a_related_row_of_another_tenant_cannot_be_picked(worlds):
    alpha, bravo = worlds
    client = staff_with_every_permission(alpha)
    form = {"recipient": bravo.recipient.pk, "platform": "android", "token": "alpha-new-token", "active": "on"}
    page = client.post(admin_url(Device, "add"), form)
    assert page.status_code == 200
    assert "recipient" in page.context["adminform"].form.errors
    assert not Device.objects.filter(token="alpha-new-token").exists()
