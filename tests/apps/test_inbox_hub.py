"""The live inbox across real web processes (uvicorn, as the run command serves it) and real
WebSocket clients: one published batch reaches each recipient's sockets on whichever process
holds them, and a Redis that stalls for longer than the hub's timeout closes no socket; every
item arrives, live or through the catch-up that follows when Redis answers again."""

import asyncio
import json
import secrets
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from asgiref.sync import sync_to_async
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from apps.deliveries.models import Delivery
from apps.inbox.hub import STALL_SECONDS, live_channel
from apps.recipients.models import Recipient
from apps.recipients.tokens import INBOX, recipient_token_issue
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.send import deliveries_send
from tests.apps.test_health import ThrowawayRedis
from tests.apps.test_inbox_live import run
from tests.factories import RecipientFactory

pytestmark = pytest.mark.django_db(transaction=True)
TIMEOUT = 15


@pytest.fixture
def live_redis(settings) -> Iterator[ThrowawayRedis]:  # type: ignore[no-untyped-def]
    """A Redis of the test's own for live updates, which the test may stall: the shared one
    is never stopped. This process publishes to it, as workers do."""
    server = ThrowawayRedis()
    server.start()
    settings.NOTIFY_INBOX_LIVE_URL = server.url
    yield server
    assert server.process is not None
    server.process.send_signal(signal.SIGCONT)
    server.stop()


def mention_all(workspace, external_ids: list[str], text: str) -> None:  # type: ignore[no-untyped-def]
    """One event to every recipient, stored and pushed as one batch, as a worker does."""
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key="mention",
                recipients=[RecipientRef(external_id=external_id) for external_id in external_ids],
                data={"who": "Bo", "text": text},
            )
        ],
    )
    ids = Delivery.objects.filter(notification_id__in=result.response["notification_ids"]).values_list("id", flat=True)
    deliveries_send(delivery_ids=[str(delivery_id) for delivery_id in ids])


class Tab:
    """One inbox socket, as the widget holds it: every message it received, in order."""

    def __init__(self, *, recipient: Recipient, socket: ClientConnection) -> None:
        self.recipient, self.socket = recipient, socket
        self.messages: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.socket:
            self.messages.append(json.loads(raw))

    def bodies(self, *kinds: str) -> set[str]:
        """The bodies of the items received in messages of these kinds."""
        found = set()
        for message in self.messages:
            if message["type"] in kinds:
                found |= {item["body"] for item in message.get("items", [message.get("item")]) if item}
        return found

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not condition():
                assert not self.reader.done(), f"{self.recipient.external_id}'s socket closed: {self.socket.close_code}"
                await asyncio.sleep(0.05)


async def open_tab(*, base_url: str, recipient: Recipient) -> Tab:
    socket = await connect(f"{base_url.replace('http', 'ws')}/inbox/v1/ws")
    await socket.send(
        json.dumps({"type": "auth", "token": recipient_token_issue(purpose=INBOX, recipient_id=recipient.id)})
    )
    tab = Tab(recipient=recipient, socket=socket)
    await tab.until(lambda: any(m["type"] == "hello" for m in tab.messages), "hello")
    return tab


def test_one_batch_reaches_each_recipients_sockets_on_every_web_process(
    workspace, inbox_category, web_server_start, live_redis
):
    env = {"NOTIFY_INBOX_LIVE_URL": live_redis.url}
    servers = [web_server_start(env=env), web_server_start(env=env)]
    recipients = [RecipientFactory(tenant=workspace.tenant, external_id=f"r{n}") for n in range(6)]

    async def scenario() -> None:
        # Each recipient on one process, and the first one on both.
        tabs = [await open_tab(base_url=servers[n % 2], recipient=r) for n, r in enumerate(recipients)]
        tabs.append(await open_tab(base_url=servers[1], recipient=recipients[0]))
        await sync_to_async(mention_all)(workspace, [r.external_id for r in recipients], "for everyone")
        for tab in tabs:
            await tab.until(lambda tab=tab: "for everyone" in tab.bodies("item"), "the item")
        await asyncio.sleep(0.3)
        for tab in tabs:
            items = [m["item"] for m in tab.messages if m["type"] == "item"]
            assert len(items) == 1  # its own item, no one else's
            assert [m["counts"]["unread"] for m in tab.messages if m["type"] == "counts"] == [1]
            await tab.socket.close()

    run(scenario)


def test_a_stalled_redis_closes_no_socket_and_every_item_arrives(
    workspace, inbox_category, web_server_start, live_redis, tmp_path
):
    base_url = web_server_start(env={"NOTIFY_INBOX_LIVE_URL": live_redis.url})
    recipients = [RecipientFactory(tenant=workspace.tenant, external_id=f"r{n}") for n in range(10)]
    external_ids = [r.external_id for r in recipients]
    assert live_redis.process is not None
    redis_process = live_redis.process

    async def scenario() -> None:
        tabs = [await open_tab(base_url=base_url, recipient=r) for r in recipients]
        await sync_to_async(mention_all)(workspace, external_ids, "before")
        for tab in tabs:
            await tab.until(lambda tab=tab: "before" in tab.bodies("item"), "the first item, live")

        redis_process.send_signal(signal.SIGSTOP)
        # Stored while Redis does not answer: the publish times out and is dropped.
        await sync_to_async(mention_all)(workspace, external_ids, "during")
        await asyncio.sleep(STALL_SECONDS + 2)  # past the hub's timeout: it gives the subscription up
        for tab in tabs:  # the consumers are alive: they answer
            await tab.socket.send(json.dumps({"type": "ping"}))
            await tab.until(lambda tab=tab: {"type": "pong"} in tab.messages, "a pong while Redis is stalled")
        redis_process.send_signal(signal.SIGCONT)

        for tab in tabs:
            await tab.until(lambda tab=tab: "during" in tab.bodies("catch_up"), "the missed item, caught up")
        await sync_to_async(mention_all)(workspace, external_ids, "after")
        for tab in tabs:
            await tab.until(lambda tab=tab: "after" in tab.bodies("item"), "the next item, live again")
            assert tab.bodies("item", "catch_up") == {"before", "during", "after"}
            assert tab.socket.close_code is None
            await tab.socket.close()

    run(scenario)
    log = (tmp_path / "web-0.log").read_text()
    assert "live inbox subscription lost" in log
    assert "Traceback" not in log


def test_a_client_too_slow_to_read_is_closed_to_catch_up_and_slows_no_one_else(
    workspace, inbox_category, web_server_start, live_redis, tmp_path
):
    """A client that stops reading while pushes keep coming: its socket's queue stops at the cap,
    and the socket is closed with 4013 (reconnect, catch up from the database), while another
    recipient's socket on the same process gets every push."""
    cap = 20
    base_url = web_server_start(
        env={"NOTIFY_INBOX_LIVE_URL": live_redis.url, "NOTIFY_INBOX_SEND_QUEUE_FRAMES": str(cap)}
    )
    slow_recipient, brisk_recipient = (
        RecipientFactory(tenant=workspace.tenant, external_id=n) for n in ("slow", "brisk")
    )
    publisher = redis.Redis.from_url(live_redis.url)
    # Random, so that per-message deflate cannot shrink it.
    big_frame = json.dumps({"type": "item", "item": {"body": secrets.token_urlsafe(150_000)}})
    batches = 30

    async def scenario() -> None:
        brisk = await open_tab(base_url=base_url, recipient=brisk_recipient)
        # Reads the hello, then nothing: with a one-message queue the client stops taking bytes
        # from the connection, and the kernel's buffers (made small, as autotuning would let
        # them take tens of megabytes on loopback) fill.
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.connect(("127.0.0.1", urlsplit(base_url).port))
        slow = await connect(f"{base_url.replace('http', 'ws')}/inbox/v1/ws", max_queue=1, sock=raw)
        await slow.send(
            json.dumps({"type": "auth", "token": recipient_token_issue(purpose=INBOX, recipient_id=slow_recipient.id)})
        )
        assert json.loads(await slow.recv())["type"] == "hello"
        for n in range(batches):  # 5 frames of 200 KB a batch for the slow one, a small one for the other
            message = [
                [str(slow_recipient.id), [big_frame] * 5],
                [str(brisk_recipient.id), [json.dumps({"type": "n", "n": n})]],
            ]
            await sync_to_async(publisher.publish)(live_channel(url=live_redis.url), json.dumps(message))
        await brisk.until(
            lambda: sum(m["type"] == "n" for m in brisk.messages) == batches, "every push to the other one"
        )

        received = 0
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(TIMEOUT):
                while True:
                    await slow.recv()
                    received += 1
        assert slow.close_code == 4013, slow.close_code
        assert received < batches * 5  # the rest was dropped: the client catches up from the database
        assert brisk.socket.close_code is None
        await brisk.socket.close()

    run(scenario)
    assert "Traceback" not in (tmp_path / "web-0.log").read_text()
