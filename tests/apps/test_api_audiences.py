"""Topics, subscribers and segments through the API, on the real database."""

import json

import pytest

from apps.audiences.models import Topic, TopicMembership
from apps.recipients.models import Recipient
from tests.factories import RecipientFactory


def post(api, path: str, body: object):  # type: ignore[no-untyped-def]
    return api.post(path, data=json.dumps(body), content_type="application/json")


def delete(api, path: str, body: object):  # type: ignore[no-untyped-def]
    return api.delete(path, data=json.dumps(body), content_type="application/json")


@pytest.fixture
def news(api, workspace) -> Topic:  # type: ignore[no-untyped-def]
    response = post(api, "/api/v1/topics", {"key": "news", "name": "Breaking news", "description": "Alerts"})
    assert response.status_code == 201, response.content
    return Topic.objects.get(tenant=workspace.tenant, key="news")


def test_a_topic_is_created_read_renamed_and_deleted(api, news):
    assert api.get("/api/v1/topics/news").json()["name"] == "Breaking news"
    assert [t["key"] for t in api.get("/api/v1/topics").json()["results"]] == ["news"]
    response = api.patch("/api/v1/topics/news", data={"name": "News"}, format="json")
    assert response.status_code == 200
    assert response.json()["name"] == "News"
    again = post(api, "/api/v1/topics", {"key": "news"})
    assert again.status_code == 400
    assert "key" in again.json()["error"]["fields"]
    assert api.delete("/api/v1/topics/news").status_code == 204
    assert api.get("/api/v1/topics/news").status_code == 404


def test_subscribe_upserts_inline_recipients_and_unsubscribe_removes_them(api, workspace, news):
    RecipientFactory(tenant=workspace.tenant, external_id="ada")
    response = post(
        api,
        "/api/v1/topics/news/subscribers",
        {"recipients": ["ada", {"external_id": "grace", "email": "grace@example.com"}]},
    )
    assert response.status_code == 200, response.content
    assert response.json() == {"added": 2}
    assert Recipient.objects.get(tenant=workspace.tenant, external_id="grace").email == "grace@example.com"
    # Subscribing again adds nobody.
    assert post(api, "/api/v1/topics/news/subscribers", {"recipients": ["ada"]}).json() == {"added": 0}
    listed = api.get("/api/v1/topics/news/subscribers").json()
    assert [s["external_id"] for s in listed["results"]] == ["ada", "grace"]

    response = delete(api, "/api/v1/topics/news/subscribers", {"recipients": ["ada"]})
    assert response.status_code == 200
    assert response.json() == {"removed": 1}
    assert list(TopicMembership.objects.values_list("recipient__external_id", flat=True)) == ["grace"]


def test_subscribing_an_unknown_recipient_names_it(api, news):
    response = post(api, "/api/v1/topics/news/subscribers", {"recipients": ["nobody"]})
    assert response.status_code == 400
    assert list(response.json()["error"]["fields"]) == ["recipients[0]"]
    assert not TopicMembership.objects.exists()


def test_subscribers_are_listed_with_a_cursor(api, workspace, news):
    post(api, "/api/v1/topics/news/subscribers", {"recipients": [{"external_id": f"u{i:02}"} for i in range(5)]})
    first = api.get("/api/v1/topics/news/subscribers?page_size=3").json()
    assert [s["external_id"] for s in first["results"]] == ["u00", "u01", "u02"]
    second = api.get(first["next"]).json()
    assert [s["external_id"] for s in second["results"]] == ["u03", "u04"]
    assert second["next"] is None


def test_topics_of_another_tenant_are_invisible(api, news):
    other = Topic.objects.create(tenant=RecipientFactory().tenant, key="secret")
    assert api.get(f"/api/v1/topics/{other.key}").status_code == 404
    assert post(api, f"/api/v1/topics/{other.key}/subscribers", {"recipients": ["x"]}).status_code == 404


@pytest.fixture
def people(workspace, news):  # type: ignore[no-untyped-def]
    tenant = workspace.tenant
    ada = RecipientFactory(tenant=tenant, external_id="ada", locale="es-MX", attributes={"plan": "pro", "age": 36})
    grace = RecipientFactory(
        tenant=tenant, external_id="grace", locale="en", attributes={"plan": "free", "age": 85, "joined": "2020-05-01"}
    )
    linus = RecipientFactory(
        tenant=tenant, external_id="linus", locale="es", attributes={"age": "old", "joined": "2024-01-31"}
    )
    RecipientFactory(tenant=tenant, external_id="estonian", locale="et", email="")
    TopicMembership.objects.create(topic=news, recipient=grace)
    TopicMembership.objects.create(topic=news, recipient=linus)
    return ada, grace, linus


def segment_count(api, segment_filter: object) -> int:  # type: ignore[no-untyped-def]
    key = f"s{abs(hash(json.dumps(segment_filter, sort_keys=True)))}"
    response = post(api, "/api/v1/segments", {"key": key, "filter": segment_filter})
    assert response.status_code == 201, response.content
    response = api.get(f"/api/v1/segments/{key}/count")
    assert response.status_code == 200
    return response.json()["count"]


@pytest.mark.parametrize(
    ("segment_filter", "expected"),
    [
        ({"field": "locale", "eq": "en"}, 1),
        ({"field": "external_id", "in": ["ada", "linus", "nobody"]}, 2),
        ({"field": "locale", "prefix": "es"}, 2),  # es-MX and es, not et
        ({"field": "email", "exists": False}, 1),
        ({"field": "attributes.plan", "eq": "pro"}, 1),
        ({"field": "attributes.plan", "in": ["pro", "free"]}, 2),
        ({"field": "attributes.plan", "exists": True}, 2),
        ({"field": "attributes.plan", "prefix": "fr"}, 1),
        ({"field": "attributes.age", "gt": 40}, 1),  # 85, not 36 nor the string "old"
        ({"field": "attributes.age", "lte": 36}, 1),
        ({"field": "attributes.joined", "gte": "2021-01-01"}, 1),
        ({"field": "created_at", "gte": "2000-01-01"}, 4),
        ({"topic": "news"}, 2),
        ({"all": [{"topic": "news"}, {"field": "locale", "prefix": "es"}]}, 1),
        ({"any": [{"field": "attributes.plan", "eq": "pro"}, {"topic": "news"}]}, 3),
        ({"not": {"topic": "news"}}, 2),
    ],
)
def test_segment_filters_count_in_the_database(api, people, segment_filter, expected):
    assert segment_count(api, segment_filter) == expected


@pytest.mark.parametrize(
    ("segment_filter", "bad_field"),
    [
        ("locale", "filter"),
        ({}, "filter"),
        ({"field": "password", "eq": "x"}, "filter.field"),
        ({"field": "locale", "like": "e%"}, "filter.like"),
        ({"field": "locale"}, "filter"),
        ({"field": "locale", "eq": "en", "in": ["en"]}, "filter"),
        ({"field": "locale", "eq": 3}, "filter.eq"),
        ({"field": "locale", "in": []}, "filter.in"),
        ({"field": "locale", "gt": "a"}, "filter.gt"),
        ({"field": "email", "exists": "yes"}, "filter.exists"),
        ({"field": "attributes.age", "gt": [1]}, "filter.gt"),
        ({"field": "attributes.joined", "gt": "last tuesday"}, "filter.gt"),
        ({"field": "created_at", "eq": "2020-01-01"}, "filter.eq"),
        ({"field": "attributes.", "eq": 1}, "filter.field"),
        ({"topic": "missing"}, "filter.topic"),
        ({"all": []}, "filter.all"),
        ({"all": [{"field": "locale", "eq": "en"}, {"field": "locale", "near": "en"}]}, "filter.all[1].near"),
        ({"any": [{"not": {"topic": 7}}]}, "filter.any[0].not.topic"),
        ({"all": [{"topic": "news"}], "any": []}, "filter"),
        ({"bogus": 1}, "filter"),
    ],
)
def test_a_malformed_filter_is_refused_naming_the_bad_clause(api, people, segment_filter, bad_field):
    response = post(api, "/api/v1/segments", {"key": "bad", "filter": segment_filter})
    assert response.status_code == 400, response.content
    assert list(response.json()["error"]["fields"]) == [bad_field]


def test_a_segment_is_changed_and_counted_again(api, people):
    assert segment_count(api, {"field": "locale", "eq": "en"}) == 1
    key = api.get("/api/v1/segments").json()["results"][0]["key"]
    response = api.patch(f"/api/v1/segments/{key}", data={"filter": {"topic": "news"}}, format="json")
    assert response.status_code == 200, response.content
    assert api.get(f"/api/v1/segments/{key}/count").json() == {"count": 2}


def test_a_recipients_topics_are_in_its_record(api, workspace, news):
    post(api, "/api/v1/topics", {"key": "alerts"})
    post(api, "/api/v1/topics/news/subscribers", {"recipients": [{"external_id": "ada"}]})
    post(api, "/api/v1/topics/alerts/subscribers", {"recipients": ["ada"]})
    assert api.get("/api/v1/recipients/ada").json()["topics"] == ["alerts", "news"]
    assert api.get("/api/v1/recipients").json()["results"][0]["topics"] == ["alerts", "news"]
