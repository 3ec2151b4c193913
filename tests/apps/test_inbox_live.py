"""The inbox WebSocket, through the project's ASGI application and the Redis channel layer:
token checks and close codes, live items and counts in every tab, catch-up on reconnect,
and the keep-alive that closes a silent connection."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections
from rest_framework.test import APIClient

from apps.deliveries.models import DeliveryStatus
from apps.inbox.consumers import CLOSE_KEEP_ALIVE, CLOSE_TOKEN_EXPIRED, CLOSE_TOKEN_INVALID
from apps.recipients.tokens import INBOX, recipient_token_issue
from config.asgi import application
from tests.apps.test_inbox import notify
from tests.factories import RecipientFactory

pytestmark = pytest.mark.django_db(transaction=True)
TIMEOUT = 5


@pytest.fixture
def ada(workspace, inbox_category, broker):  # type: ignore[no-untyped-def]
    return RecipientFactory(tenant=workspace.tenant, external_id="ada")


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def and_close_connections() -> None:
        try:
            await scenario()
        finally:
            # The consumer's queries ran on asgiref's worker thread: close its connection there.
            await sync_to_async(connections.close_all)()

    asyncio.run(and_close_connections())


async def connect(token: str, **query: str) -> WebsocketCommunicator:
    params = "&".join(f"{name}={value}" for name, value in {"token": token, **query}.items())
    tab = WebsocketCommunicator(application, f"/inbox/v1/ws?{params}")
    connected, _ = await tab.connect(timeout=TIMEOUT)
    assert connected
    return tab


async def receive(tab: WebsocketCommunicator) -> dict[str, Any]:
    return await tab.receive_json_from(timeout=TIMEOUT)


async def closed_with(tab: WebsocketCommunicator) -> int:
    """The close code, once the server closes; only keep-alive pings may come before it."""
    while (message := await tab.receive_output(timeout=TIMEOUT))["type"] != "websocket.close":
        assert message == {"type": "websocket.send", "text": '{"type": "ping"}'}
    return message["code"]


def test_a_missing_tampered_or_expired_token_is_closed_with_a_code_that_says_which(ada, settings):
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)

    async def scenario() -> None:
        assert await closed_with(await connect("")) == CLOSE_TOKEN_INVALID
        assert await closed_with(await connect(token[:-2] + "xx")) == CLOSE_TOKEN_INVALID
        settings.NOTIFY_INBOX_TOKEN_SECONDS = -1
        assert await closed_with(await connect(token)) == CLOSE_TOKEN_EXPIRED

    run(scenario)


def test_a_new_item_and_the_new_counts_reach_every_open_tab(workspace, ada):
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)
    other = RecipientFactory(tenant=workspace.tenant, external_id="bob")

    async def scenario() -> None:
        tabs = [await connect(token), await connect(token)]
        bobs_tab = await connect(recipient_token_issue(purpose=INBOX, recipient_id=other.id))
        for tab in [*tabs, bobs_tab]:
            assert await receive(tab) == {"type": "hello", "counts": {"unread": 0, "unseen": 0}}
        item_id = await sync_to_async(lambda: notify(workspace, text="ping me").inbox_item.id)()
        for tab in tabs:
            item = await receive(tab)
            assert item["type"] == "item"
            assert (item["item"]["title"], item["item"]["body"]) == ("Bo mentioned you", "ping me")
            assert item["item"]["id"] == str(item_id)
            assert await receive(tab) == {"type": "counts", "counts": {"unread": 1, "unseen": 1}}
        assert await bobs_tab.receive_nothing(timeout=0.3)
        for tab in [*tabs, bobs_tab]:
            await tab.disconnect()

    run(scenario)


def test_marking_an_item_read_in_one_tab_updates_the_others(workspace, ada):
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)
    item_id = notify(workspace).inbox_item.id
    browser = APIClient()
    browser.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")

    async def scenario() -> None:
        tab = await connect(token)
        assert (await receive(tab))["counts"] == {"unread": 1, "unseen": 1}
        response = await sync_to_async(browser.post)(f"/inbox/v1/items/{item_id}/read")
        assert response.status_code == 200
        updated = await receive(tab)
        assert (updated["type"], updated["item"]["read"]) == ("item_updated", True)
        assert await receive(tab) == {"type": "counts", "counts": {"unread": 0, "unseen": 0}}
        await sync_to_async(notify)(workspace, text="second")
        assert (await receive(tab))["type"] == "item"
        assert (await receive(tab))["counts"] == {"unread": 1, "unseen": 1}
        await sync_to_async(browser.post)("/inbox/v1/items/read-all")
        assert await receive(tab) == {"type": "counts", "counts": {"unread": 0, "unseen": 0}}
        await tab.disconnect()

    run(scenario)


def test_a_reconnecting_client_catches_up_on_what_it_missed(workspace, ada):
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)
    held = notify(workspace, text="seen live").inbox_item
    missed = [notify(workspace, text=f"missed {n}").inbox_item for n in range(3)]

    async def scenario() -> None:
        tab = await connect(token, after=str(held.id))
        assert (await receive(tab))["counts"] == {"unread": 4, "unseen": 4}
        catch_up = await receive(tab)
        assert catch_up["type"] == "catch_up"
        assert [i["id"] for i in catch_up["items"]] == [str(i.id) for i in missed]
        assert catch_up["more"] is False
        await tab.disconnect()

        # A cursor that names no item of this inbox: nothing to add, reload the list.
        tab = await connect(token, after="0b6e1c8e-0000-4000-8000-000000000000")
        await receive(tab)
        assert await receive(tab) == {"type": "catch_up", "items": [], "more": True}
        await tab.disconnect()

    run(scenario)


def test_a_silent_client_is_closed_and_one_that_answers_stays(ada, settings):
    settings.NOTIFY_INBOX_PING_SECONDS = 0.2
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)

    async def scenario() -> None:
        answering, silent = await connect(token), await connect(token)
        for tab in (answering, silent):
            await receive(tab)
        for _ in range(4):  # four intervals: twice what a silent client is allowed
            assert await receive(answering) == {"type": "ping"}
            await answering.send_json_to({"type": "pong"})
        assert await closed_with(silent) == CLOSE_KEEP_ALIVE
        await answering.send_json_to({"type": "ping"})
        assert await receive(answering) == {"type": "pong"}
        await answering.disconnect()

    run(scenario)


def test_with_the_channel_layer_down_the_item_is_still_stored_and_caught_up_later(workspace, ada, settings, caplog):
    """The live push is a courtesy: Redis for the channel layer unreachable fails no delivery."""
    from channels.layers import channel_layers

    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]}}
    }
    channel_layers.backends.clear()  # built again from the settings above
    try:
        delivery = notify(workspace, text="while Redis was away")
    finally:
        channel_layers.backends.clear()
    assert delivery.status == DeliveryStatus.SENT
    assert delivery.inbox_item.body == "while Redis was away"
    assert "live inbox update not pushed" in caplog.text
