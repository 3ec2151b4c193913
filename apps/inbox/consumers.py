"""The inbox WebSocket: `/inbox/v1/ws?token=<inbox token>[&after=<newest item id held>]`.

The protocol (docs/inbox.md): the server sends `hello` with the counts, then, when `after` is
given, `catch_up` with what was missed; after that `item`, `item_updated` and `counts` as they
happen, and `ping` every NOTIFY_INBOX_PING_SECONDS, which the client answers with `pong`.
A client silent for two ping intervals is closed as dead. The token is checked once, when
connecting; a bad one gets a close code that tells the client what to do."""

import asyncio
import time
from typing import Any
from urllib.parse import parse_qs
from uuid import UUID

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from apps.inbox.live import inbox_group, inbox_item_json
from apps.inbox.models import InboxItem
from apps.inbox.services import inbox_counts, inbox_items_after
from apps.recipients.tokens import INBOX, RecipientTokenInvalid, recipient_token_read

# Close codes (4000-4999 are the application's): each tells the client what to do next.
CLOSE_TOKEN_INVALID = 4001  # missing or tampered: do not retry with this token
CLOSE_TOKEN_EXPIRED = 4002  # ask the application for a new token, then reconnect
CLOSE_KEEP_ALIVE = 4008  # nothing heard for two ping intervals: reconnect
CATCH_UP_LIMIT = 100


class InboxConsumer(AsyncJsonWebsocketConsumer):
    recipient_id: UUID
    group: str = ""
    last_heard: float = 0.0
    keep_alive: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        query = parse_qs(self.scope["query_string"].decode(errors="replace"))
        # Accept first: a close code can only be sent on an accepted connection.
        await self.accept()
        try:
            self.recipient_id = recipient_token_read(purpose=INBOX, token=query.get("token", [""])[0]).recipient_id
        except RecipientTokenInvalid as error:
            await self.close(code=CLOSE_TOKEN_EXPIRED if error.expired else CLOSE_TOKEN_INVALID, reason=str(error))
            return
        # Join before reading the database: whatever is stored from now on is pushed, and
        # anything stored before is in the reads below (a repeat is dropped by id).
        self.group = inbox_group(recipient_id=self.recipient_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.send_json(
            {"type": "hello", "counts": await database_sync_to_async(inbox_counts)(recipient_id=self.recipient_id)}
        )
        if after := query.get("after", [""])[0]:
            items, more = await database_sync_to_async(_catch_up)(recipient_id=self.recipient_id, after=after)
            await self.send_json({"type": "catch_up", "items": items, "more": more})
        self.last_heard = time.monotonic()
        self.keep_alive = asyncio.create_task(self._keep_alive())

    async def disconnect(self, code: int) -> None:
        if self.keep_alive:
            self.keep_alive.cancel()
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        self.last_heard = time.monotonic()
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def _keep_alive(self) -> None:
        interval = settings.NOTIFY_INBOX_PING_SECONDS
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - self.last_heard > 2 * interval:
                await self.close(code=CLOSE_KEEP_ALIVE, reason="no pong: the connection looks dead")
                return
            await self.send_json({"type": "ping"})

    # Channel-layer messages from apps.inbox.live, one handler per message type.
    async def inbox_item(self, message: dict[str, Any]) -> None:
        await self.send_json({"type": "item", "item": message["item"]})
        await self.inbox_counts(message)

    async def inbox_item_updated(self, message: dict[str, Any]) -> None:
        await self.send_json({"type": "item_updated", "item": message["item"]})
        await self.inbox_counts(message)

    async def inbox_counts(self, message: dict[str, Any]) -> None:
        await self.send_json({"type": "counts", "counts": message["counts"]})


def _catch_up(*, recipient_id: UUID, after: str) -> tuple[list[dict[str, Any]], bool]:
    """The missed items and whether there were more; `more` alone, with no items, when `after`
    names no item of this inbox: either way the client reloads its list from the API."""
    try:
        items, more = inbox_items_after(recipient_id=recipient_id, item_id=UUID(after), limit=CATCH_UP_LIMIT)
    except (InboxItem.DoesNotExist, ValueError):
        return [], True
    return [inbox_item_json(item=item) for item in items], more
