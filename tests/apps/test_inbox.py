"""The in-app inbox: the channel stores items; the recipient's browser reads and marks them
with a signed, short-lived token from the producer API."""

import pytest
from rest_framework.test import APIClient

from apps.deliveries.models import Delivery, DeliveryStatus
from apps.inbox.models import InboxItem
from apps.recipients.tokens import (
    INBOX,
    PREFERENCES,
    RecipientTokenInvalid,
    recipient_token_issue,
    recipient_token_read,
)
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.send import deliveries_send
from tests.factories import RecipientFactory


def notify(workspace, external_id: str = "ada", text: str = "hello") -> Delivery:  # type: ignore[no-untyped-def]
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key="mention",
                recipients=[RecipientRef(external_id=external_id)],
                data={"who": "Bo", "text": text},
            )
        ],
    )
    delivery = Delivery.objects.get(notification_id=result.response["notification_ids"][0])
    deliveries_send(delivery_ids=[str(delivery.pk)])
    delivery.refresh_from_db()
    return delivery


@pytest.fixture
def browser(api, workspace, inbox_category):  # type: ignore[no-untyped-def]
    RecipientFactory(tenant=workspace.tenant, external_id="ada")
    response = api.post("/api/v1/inbox-tokens", {"recipient": "ada"}, format="json")
    assert response.status_code == 201
    assert response.json()["expires_in"] == 3600
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {response.json()['token']}")
    return client


def test_an_inapp_delivery_becomes_an_inbox_item(workspace, browser):
    delivery = notify(workspace)
    assert delivery.status == DeliveryStatus.SENT
    deliveries_send(delivery_ids=[str(delivery.pk)])  # a duplicate task stores nothing more
    [item] = browser.get("/inbox/v1/items").json()["results"]
    assert (item["title"], item["body"], item["link"]) == ("Bo mentioned you", "hello", "/c/1")
    assert (item["seen"], item["read"], item["archived"]) == (False, False, False)
    assert InboxItem.objects.count() == 1


def test_counts_marks_and_read_all(workspace, browser):
    for text in ("one", "two", "three"):
        notify(workspace, text=text)
    assert browser.get("/inbox/v1/counts").json() == {"unread": 3, "unseen": 3, "limit": 99, "severity": "medium"}
    newest, middle, oldest = browser.get("/inbox/v1/items").json()["results"]
    assert (newest["body"], oldest["body"]) == ("three", "one")

    assert browser.post(f"/inbox/v1/items/{oldest['id']}/seen").json()["seen"] is True
    read = browser.post(f"/inbox/v1/items/{middle['id']}/read").json()
    assert read["read"] and read["seen"]
    assert browser.get("/inbox/v1/counts").json() == {"unread": 2, "unseen": 1, "limit": 99, "severity": "medium"}

    browser.post(f"/inbox/v1/items/{newest['id']}/archive")
    assert [i["body"] for i in browser.get("/inbox/v1/items").json()["results"]] == ["two", "one"]
    assert [i["body"] for i in browser.get("/inbox/v1/items", {"archived": "true"}).json()["results"]] == ["three"]

    assert browser.post("/inbox/v1/items/read-all").json() == {"updated": 2}  # archived ones too
    assert browser.get("/inbox/v1/counts").json() == {"unread": 0, "unseen": 0, "limit": 99, "severity": None}


def test_the_inbox_is_paged_by_cursor(workspace, browser):
    for index in range(25):
        notify(workspace, text=str(index))
    first = browser.get("/inbox/v1/items").json()
    second = browser.get(first["next"]).json()
    assert len(first["results"]) == 20 and len(second["results"]) == 5
    assert {i["id"] for i in first["results"]}.isdisjoint({i["id"] for i in second["results"]})


def test_another_recipients_items_are_out_of_reach(workspace, browser):
    RecipientFactory(tenant=workspace.tenant, external_id="bob")
    notify(workspace, external_id="bob")
    bobs = InboxItem.objects.get()
    assert browser.get("/inbox/v1/items").json()["results"] == []
    assert browser.post(f"/inbox/v1/items/{bobs.id}/read").status_code == 404
    assert browser.post("/inbox/v1/items/not-a-uuid/read").status_code == 404
    assert browser.post(f"/inbox/v1/items/{bobs.id}/explode").status_code == 404


def test_tampered_expired_and_missing_tokens_are_refused(workspace, inbox_category, settings):
    recipient = RecipientFactory(tenant=workspace.tenant, external_id="ada")
    token = recipient_token_issue(purpose=INBOX, recipient_id=recipient.id)
    assert recipient_token_read(purpose=INBOX, token=token).recipient_id == recipient.id
    # Made for the inbox, it is no preferences link.
    with pytest.raises(RecipientTokenInvalid):
        recipient_token_read(purpose=PREFERENCES, token=token)
    settings.NOTIFY_INBOX_TOKEN_SECONDS = -1
    with pytest.raises(RecipientTokenInvalid) as expired:
        recipient_token_read(purpose=INBOX, token=token)
    assert expired.value.expired
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert "expired" in client.get("/inbox/v1/items").json()["error"]["message"]
    client = APIClient()
    assert client.get("/inbox/v1/items").status_code == 401
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token[:-2]}xx")
    response = client.get("/inbox/v1/items")
    assert response.status_code == 401
    assert "not valid" in response.json()["error"]["message"]


def test_an_api_key_is_not_an_inbox_token(api, workspace, inbox_category):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {workspace.api_key.raw_key}")
    assert client.get("/inbox/v1/items").status_code == 401
    assert api.post("/api/v1/inbox-tokens", {"recipient": "ghost"}, format="json").status_code == 400
