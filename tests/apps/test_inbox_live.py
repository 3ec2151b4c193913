"""The inbox WebSocket, through the project's ASGI application and Redis pub/sub:
token checks and close codes, live items and counts in every tab, catch-up on reconnect,
and the keep-alive that closes a silent connection."""

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections
from rest_framework.test import APIClient

from apps.deliveries.models import DeliveryStatus
from apps.inbox.consumers import (
    CLOSE_KEEP_ALIVE,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOKEN_INVALID,
    CLOSE_TOO_MANY_SOCKETS,
    SUBPROTOCOL,
)
from apps.recipients.tokens import INBOX, recipient_token_issue
from config.asgi import application
from tests.apps.test_inbox import notify
from tests.factories import RecipientFactory
from tests.helpers import inbox_history_analyze

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


async def opened(*, subprotocols: list[str] | None = None, **query: str) -> WebsocketCommunicator:
    """A connection, accepted, that has sent nothing yet."""
    tab = WebsocketCommunicator(
        application, f"/inbox/v1/ws?{urlencode(query)}" if query else "/inbox/v1/ws", subprotocols=subprotocols
    )
    connected, _ = await tab.connect(timeout=TIMEOUT)
    assert connected
    return tab


async def connect(token: str, **query: str) -> WebsocketCommunicator:
    """A tab that sends its token in the first message, as the widget does."""
    tab = await opened(**query)
    await tab.send_json_to({"type": "auth", "token": token})
    return tab


async def receive(tab: WebsocketCommunicator) -> dict[str, Any]:
    return await tab.receive_json_from(timeout=TIMEOUT)


async def closed_with(tab: WebsocketCommunicator, timeout: float = TIMEOUT) -> int:
    """The close code, once the server closes; only keep-alive pings may come before it."""
    while (message := await tab.receive_output(timeout=timeout))["type"] != "websocket.close":
        assert message == {"type": "websocket.send", "text": '{"type": "ping"}'}
    return message["code"]


async def closed_with_reason(tab: WebsocketCommunicator) -> tuple[int, str]:
    message = await tab.receive_output(timeout=TIMEOUT)
    assert message["type"] == "websocket.close", message
    return message["code"], message["reason"]


def as_subprotocol(token: str) -> str:
    """A subprotocol is an HTTP token, which cannot hold the token's colons: they become dots."""
    return "token." + token.replace(":", ".")


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
            assert await receive(tab) == {
                "type": "hello",
                "counts": {"unread": 0, "unseen": 0, "limit": 99, "severity": None},
            }
        item_id = await sync_to_async(lambda: notify(workspace, text="ping me").inbox_item.id)()
        for tab in tabs:
            item = await receive(tab)
            assert item["type"] == "item"
            assert (item["item"]["title"], item["item"]["body"]) == ("Bo mentioned you", "ping me")
            assert item["item"]["id"] == str(item_id)
            assert await receive(tab) == {
                "type": "counts",
                "counts": {"unread": 1, "unseen": 1, "limit": 99, "severity": "medium"},
            }
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
        assert (await receive(tab))["counts"] == {"unread": 1, "unseen": 1, "limit": 99, "severity": "medium"}
        response = await sync_to_async(browser.post)(f"/inbox/v1/items/{item_id}/read")
        assert response.status_code == 200
        updated = await receive(tab)
        assert (updated["type"], updated["item"]["read"]) == ("item_updated", True)
        assert await receive(tab) == {
            "type": "counts",
            "counts": {"unread": 0, "unseen": 0, "limit": 99, "severity": None},
        }
        await sync_to_async(notify)(workspace, text="second")
        assert (await receive(tab))["type"] == "item"
        assert (await receive(tab))["counts"] == {"unread": 1, "unseen": 1, "limit": 99, "severity": "medium"}
        await sync_to_async(browser.post)("/inbox/v1/items/read-all")
        assert await receive(tab) == {
            "type": "counts",
            "counts": {"unread": 0, "unseen": 0, "limit": 99, "severity": None},
        }
        await tab.disconnect()

    run(scenario)


def test_a_reconnecting_client_catches_up_on_what_it_missed(workspace, ada):
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)
    held = notify(workspace, text="seen live").inbox_item
    missed = [notify(workspace, text=f"missed {n}").inbox_item for n in range(3)]

    async def scenario() -> None:
        tab = await connect(token, after=str(held.id))
        assert (await receive(tab))["counts"] == {"unread": 4, "unseen": 4, "limit": 99, "severity": "medium"}
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


def test_with_redis_for_live_updates_down_the_item_is_still_stored_and_caught_up_later(
    workspace, ada, settings, caplog
):
    """The live push is a courtesy: Redis for live updates unreachable fails no delivery."""
    settings.NOTIFY_INBOX_LIVE_URL = "redis://127.0.0.1:1/0"
    delivery = notify(workspace, text="while Redis was away")
    assert delivery.status == DeliveryStatus.SENT
    assert delivery.inbox_item.body == "while Redis was away"
    assert "live inbox update not pushed" in caplog.text


def test_a_token_in_the_query_string_is_refused_because_access_logs_record_urls(ada):
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)

    async def scenario() -> None:
        tab = await opened(token=token)
        code, reason = await closed_with_reason(tab)
        assert code == CLOSE_TOKEN_INVALID
        assert "not in the URL" in reason

    run(scenario)


def test_the_token_as_a_subprotocol_opens_the_inbox_and_the_server_answers_with_its_own(workspace, ada):
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)
    held = notify(workspace, text="held").inbox_item
    missed = notify(workspace, text="missed").inbox_item

    async def scenario() -> None:
        tab = WebsocketCommunicator(
            application, f"/inbox/v1/ws?after={held.id}", subprotocols=[SUBPROTOCOL, as_subprotocol(token)]
        )
        assert await tab.connect(timeout=TIMEOUT) == (True, SUBPROTOCOL)  # browsers insist on one
        assert await receive(tab) == {
            "type": "hello",
            "counts": {"unread": 2, "unseen": 2, "limit": 99, "severity": "medium"},
        }
        catch_up = await receive(tab)
        assert [item["id"] for item in catch_up["items"]] == [str(missed.id)]
        await tab.disconnect()

        tampered = await opened(subprotocols=[SUBPROTOCOL, as_subprotocol(token[:-2] + "xx")])
        assert await closed_with(tampered) == CLOSE_TOKEN_INVALID

    run(scenario)


def test_a_connection_without_a_token_in_time_or_with_another_first_message_is_closed(ada, settings):
    settings.NOTIFY_INBOX_AUTH_SECONDS = 0.3
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)

    async def scenario() -> None:
        started = time.monotonic()
        code, reason = await closed_with_reason(await opened())
        assert (code, reason) == (CLOSE_TOKEN_INVALID, "no token within 0.3 seconds")
        assert time.monotonic() - started >= 0.3

        wrong_first = await opened()
        await wrong_first.send_json_to({"type": "ping"})
        assert (await closed_with_reason(wrong_first))[0] == CLOSE_TOKEN_INVALID
        not_json = await opened()
        await not_json.send_to(text_data="token=" + token)
        assert (await closed_with_reason(not_json))[0] == CLOSE_TOKEN_INVALID

        in_time = await connect(token)
        assert (await receive(in_time))["type"] == "hello"
        assert await in_time.receive_nothing(timeout=0.5)  # the deadline is for the token alone
        await in_time.disconnect()

    run(scenario)


def test_an_open_socket_is_closed_when_its_token_expires(ada, settings):
    settings.NOTIFY_INBOX_TOKEN_SECONDS = 2
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)

    async def scenario() -> None:
        tab = await connect(token)
        assert (await receive(tab))["type"] == "hello"
        assert await tab.receive_nothing(timeout=0.5)
        code, reason = await closed_with_reason(tab)
        assert (code, reason) == (CLOSE_TOKEN_EXPIRED, "the inbox token has expired")

    run(scenario)


def test_sockets_past_the_cap_for_one_recipient_are_refused_until_one_closes(workspace, ada, settings):
    settings.NOTIFY_INBOX_MAX_SOCKETS_PER_RECIPIENT = 2
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)
    bob = RecipientFactory(tenant=workspace.tenant, external_id="bob")

    async def scenario() -> None:
        tabs = [await connect(token), await connect(token)]
        for tab in tabs:
            assert (await receive(tab))["type"] == "hello"
        for _ in range(2):
            code, reason = await closed_with_reason(await connect(token))
            assert (code, reason) == (CLOSE_TOO_MANY_SOCKETS, "too many open connections for this inbox (2)")
        bobs = await connect(recipient_token_issue(purpose=INBOX, recipient_id=bob.id))
        assert (await receive(bobs))["type"] == "hello"  # the cap is per recipient

        await tabs.pop().disconnect()
        tabs.append(await connect(token))
        assert (await receive(tabs[-1]))["type"] == "hello"
        for tab in [*tabs, bobs]:
            await tab.disconnect()

    run(scenario)


def test_with_redis_for_the_cap_down_or_silent_sockets_are_still_accepted(ada, settings, caplog):
    """The cap protects resources, not data: without Redis it is not enforced (fails open),
    and a Redis that does not answer delays a connection by a bounded time only."""
    settings.NOTIFY_INBOX_MAX_SOCKETS_PER_RECIPIENT = 1
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes connections; nothing ever answers them

    async def scenario() -> None:
        for url in ("redis://127.0.0.1:1/0", f"redis://127.0.0.1:{silent.getsockname()[1]}/0"):
            settings.NOTIFY_REDIS_URL = url
            started = time.monotonic()
            tabs = [await connect(token), await connect(token)]
            for tab in tabs:
                assert (await receive(tab))["type"] == "hello"
            assert time.monotonic() - started < 3
            for tab in tabs:
                await tab.disconnect()

    try:
        run(scenario)
    finally:
        silent.close()
    assert "open inbox sockets not counted" in caplog.text


def test_open_sockets_are_counted_until_they_close(ada, metrics_token):
    from tests.helpers import metric_value, metrics_scrape

    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)
    before = metric_value(metrics_scrape(), "notify_websocket_connections")
    counts: list[float] = []

    async def scenario() -> None:
        tabs = [await connect(token), await connect(token)]
        for tab in tabs:
            assert (await receive(tab))["type"] == "hello"
        counts.append(
            await sync_to_async(metric_value)(await sync_to_async(metrics_scrape)(), "notify_websocket_connections")
        )
        await tabs[0].disconnect()
        counts.append(
            await sync_to_async(metric_value)(await sync_to_async(metrics_scrape)(), "notify_websocket_connections")
        )
        await tabs[1].disconnect()

    run(scenario)
    assert counts == [before + 2, before + 1]
    assert metric_value(metrics_scrape(), "notify_websocket_connections") == before


def test_a_reconnects_catch_up_and_counts_are_read_through_indexes(workspace, ada):
    """A restarting server's clients all come back at once: the reads that serve their
    reconnects (the items since each one's newest, the counts; each for many clients at once)
    must be index reads, never a scan of the table, and never a sort of a whole inbox."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from apps.inbox.services import inbox_counts_many, inbox_items_after_many

    held = notify(workspace, text="held").inbox_item
    notify(workspace, text="missed")
    inbox_history_analyze(item=held)
    with CaptureQueriesContext(connection) as queries:
        inbox_items_after_many(cursors=[(ada.id, held.id)], limit=100)
        inbox_counts_many(recipient_ids=[ada.id])
    items_sql, _, counts_sql = (query["sql"] for query in queries)  # the second loads the items by id
    plans = []
    with connection.cursor() as cursor:
        # A scan is still the cheapest read of a few thousand rows: make the planner show what
        # it would do with a large table.
        cursor.execute("SET enable_seqscan = off")
        for sql in (items_sql, counts_sql):
            cursor.execute(f"EXPLAIN {sql}")
            plans.append("\n".join(row[0] for row in cursor.fetchall()))
        cursor.execute("RESET enable_seqscan")
    items_plan, counts_plan = plans
    # Each client's items since its cursor, in order, straight off the index (the one sort
    # left is of the few rows found, by client).
    assert "Index Scan Backward using inbox_recipient_recent" in items_plan, items_plan
    assert items_plan.count("Sort Key") == 1 and "Sort Key: c.n," in items_plan, items_plan
    assert "inbox_unread" in counts_plan and "inbox_unseen" in counts_plan, counts_plan
    for plan in plans:
        assert "Seq Scan" not in plan, plan


def test_the_catch_up_of_many_clients_at_once_is_each_ones_own(workspace, ada):
    """Read together, each reconnecting client gets what it would alone: the items after the
    one it holds, `more` past the limit, nothing for an item of another inbox."""
    from apps.inbox.services import (
        inbox_items_after,
        inbox_items_after_many,
        inbox_items_since,
        inbox_items_since_many,
    )

    bob = RecipientFactory(tenant=workspace.tenant, external_id="bob")
    adas = [notify(workspace, text=f"ada {n}").inbox_item for n in range(4)]
    bobs = [notify(workspace, external_id="bob", text=f"bob {n}").inbox_item for n in range(2)]
    cursors = [(ada.id, adas[0].id), (ada.id, adas[1].id), (bob.id, bobs[1].id), (bob.id, adas[0].id)]
    found = inbox_items_after_many(cursors=cursors, limit=2)
    for recipient_id, item_id in cursors[:3]:
        items, more = inbox_items_after(recipient_id=recipient_id, item_id=item_id, limit=2)
        assert found[(recipient_id, item_id)] == (items, more)
    assert found[(ada.id, adas[0].id)] == (adas[1:3], True)
    # Within the look-back, the items placed just before the cursor come again (by id, harmless).
    assert found[(bob.id, bobs[1].id)] == ([bobs[0]], False)
    assert found[(bob.id, adas[0].id)] is None  # not bob's item: the client reloads its list

    # From a time, as a web process catches its sockets up after losing its subscription.
    since = adas[2].sort_at + timedelta(seconds=61)  # past the look-back: nothing
    found_since = inbox_items_since_many(cursors=[(ada.id, adas[2].sort_at), (bob.id, since)], limit=2)
    assert found_since[(ada.id, adas[2].sort_at)] == inbox_items_since(
        recipient_id=ada.id, since=adas[2].sort_at, limit=2
    )
    assert found_since[(ada.id, adas[2].sort_at)][0][0] == adas[0]  # the look-back reaches it
    assert found_since[(bob.id, since)] == ([], False)
