"""The in-app inbox end to end: the ASGI server as the run command serves it, a real Celery
worker, Redis and PostgreSQL. An event triggered through the API reaches a connected
WebSocket client, and one sent while it was away arrives on reconnect. Then the same through
the embeddable widget in headless Chromium."""

import json
from typing import Any

import pytest
import requests
from websockets.sync.client import ClientConnection, connect

from apps.tenants.demo import demo_workspace_ensure
from tests.helpers import chromium_launch, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


class Producer:
    """The producer API over HTTP, with one tenant's API key."""

    def __init__(self, *, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {api_key}"}

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(f"{self.base_url}/api/v1/{path}", json=body, headers=self.headers, timeout=10)
        assert response.status_code in (200, 201, 202), response.text
        return response.json()

    def mention(self, *, text: str, recipient: str = "ada") -> str:
        body = {"category": "mention", "recipient": recipient, "data": {"who": "Grace", "text": text}}
        [notification_id] = self.post("events", body)["notification_ids"]
        return notification_id

    def status(self, notification_id: str) -> str:
        response = requests.get(
            f"{self.base_url}/api/v1/notifications/{notification_id}", headers=self.headers, timeout=10
        )
        return response.json()["status"]


def next_message(socket: ClientConnection) -> dict[str, Any]:
    """The next message that is not a keep-alive ping."""
    while (message := json.loads(socket.recv(timeout=20)))["type"] == "ping":
        socket.send(json.dumps({"type": "pong"}))
    return message


def test_an_event_reaches_a_connected_client_and_a_missed_one_arrives_on_reconnect(
    workspace, inbox_category, web_server, workers
):
    workers.start("normal")
    producer = Producer(base_url=web_server, api_key=workspace.api_key.raw_key)
    producer.post("recipients", {"external_id": "ada", "email": "ada@example.com"})
    token = producer.post("inbox-tokens", {"recipient": "ada"})["token"]
    socket_url = f"{web_server.replace('http', 'ws')}/inbox/v1/ws?token={token}"

    with connect(socket_url) as socket:
        assert next_message(socket) == {"type": "hello", "counts": {"unread": 0, "unseen": 0}}
        producer.mention(text="live")
        item = next_message(socket)
        assert (item["type"], item["item"]["body"]) == ("item", "live")
        assert next_message(socket) == {"type": "counts", "counts": {"unread": 1, "unseen": 1}}
    held = item["item"]["id"]

    missed = producer.mention(text="while away")
    wait_for(lambda: producer.status(missed) == "sent", timeout=30, what="the missed item to be stored")
    with connect(f"{socket_url}&after={held}") as socket:
        assert next_message(socket)["counts"] == {"unread": 2, "unseen": 2}
        catch_up = next_message(socket)
        assert catch_up["type"] == "catch_up"
        assert [i["body"] for i in catch_up["items"]] == ["while away"]


def test_the_widget_shows_a_new_notification_without_a_reload_and_marks_it_read(web_server, workers):
    from playwright.sync_api import expect, sync_playwright

    demo_api_key = "ntf_demo_0123456789abcdefTEST"
    demo_workspace_ensure(api_key=demo_api_key)
    workers.start("normal")
    producer = Producer(base_url=web_server, api_key=demo_api_key)

    with sync_playwright() as playwright:
        browser = chromium_launch(playwright)
        try:
            tabs = [browser.new_page(), browser.new_page()]
            for tab in tabs:
                tab.goto(f"{web_server}/demo/inbox/")
                expect(tab.locator("#inbox[data-connected=true]")).to_be_attached()
                expect(tab.locator(".ntf-badge")).to_be_hidden()
            notification_id = producer.mention(text="Can you review the launch plan?")
            for tab in tabs:
                expect(tab.locator(".ntf-badge")).to_have_text("1")
                expect(tab.locator(".ntf-bell")).to_have_attribute("aria-label", "Notifications, 1 unread")

            reader, other = tabs
            # The widget styles itself: its list drops down over the page.
            assert reader.evaluate("getComputedStyle(document.querySelector('.ntf-panel')).position") == "absolute"
            reader.get_by_role("button", name="Notifications, 1 unread").click()
            item = reader.locator(".ntf-item", has_text="Can you review the launch plan?")
            expect(item).to_have_class("ntf-item ntf-unread")
            expect(item.locator(".ntf-title")).to_have_text("Grace mentioned you")
            with reader.expect_navigation():
                item.click()  # marks it read, then follows its link (this same page)
            expect(reader.locator(".ntf-badge")).to_be_hidden()
            expect(other.locator(".ntf-badge")).to_be_hidden()  # pushed to the other tab
        finally:
            browser.close()
    assert producer.status(notification_id) == "sent"
    inbox = requests.get(
        f"{web_server}/inbox/v1/items",
        headers={"Authorization": f"Bearer {producer.post('inbox-tokens', {'recipient': 'ada'})['token']}"},
        timeout=10,
    ).json()["results"]
    assert [(i["body"], i["read"]) for i in inbox] == [("Can you review the launch plan?", True)]
