"""The inbox WebSocket: `/inbox/v1/ws[?after=<newest item id held>]`.

The token never travels in the URL, which access logs record. The client sends it either as
its first message, `{"type": "auth", "token": "..."}`, within NOTIFY_INBOX_AUTH_SECONDS, or
in the handshake as the subprotocols `notify-inbox` and `token.<token with its colons made
dots>`, and the server then answers with `notify-inbox`. A token in the query string is
refused.

The protocol (docs/inbox.md): the server sends `hello` with the counts, then, when `after` is
given, `catch_up` with what was missed; after that `item`, `item_updated` and `counts` as they
happen, and `ping` every NOTIFY_INBOX_PING_SECONDS, which the client answers with `pong`.
A client silent for two ping intervals is closed as dead, and a socket is closed when its
token expires; each close code tells the client what to do."""

import asyncio
import json
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs
from uuid import UUID, uuid4

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from apps.inbox.hub import CatchUp, inbox_hub
from apps.inbox.sockets import socket_slot_release, socket_slot_renew, socket_slot_take
from apps.recipients.tokens import INBOX, RecipientTokenInvalid, recipient_token_read
from notify.observability import metrics

# Close codes (4000-4999 are the application's): each tells the client what to do next.
CLOSE_TOKEN_INVALID = 4001  # missing, late, in the URL or tampered: do not retry with this token
CLOSE_TOKEN_EXPIRED = 4002  # ask the application for a new token, then reconnect
CLOSE_KEEP_ALIVE = 4008  # nothing heard for two ping intervals: reconnect
CLOSE_TOO_SLOW = 4013  # the client fell too far behind the pushes: reconnect, and catch up
CLOSE_TOO_MANY_SOCKETS = 4029  # the recipient has the most sockets allowed open: retry later
SUBPROTOCOL = "notify-inbox"
SUBPROTOCOL_TOKEN_PREFIX = "token."
TOKEN_IN_URL = "the token belongs in the first message or the subprotocol, not in the URL, which logs record"
FIRST_MESSAGE = 'the first message must be {"type": "auth", "token": "<inbox token>"}'


class InboxConsumer(AsyncJsonWebsocketConsumer):
    socket_id: str = ""
    recipient_id: UUID | None = None
    token_received: bool = False
    token_expires_at: float = 0.0  # a Unix time
    after: str = ""
    joined: bool = False  # takes pushes from this process's hub
    holds_slot: bool = False
    last_heard: float = 0.0
    watch: asyncio.Task[None] | None = None  # the token's deadline, then the keep-alive
    counted: bool = False  # in the open-connections gauge
    outbox: deque[str]  # pushed frames not sent yet, in order
    sender: asyncio.Task[None] | None = None
    falling_behind: bool = False  # closed for a send queue past its cap; pushes are dropped
    closing: asyncio.Task[None] | None = None
    catching_up: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self.socket_id, self.outbox = uuid4().hex, deque()
        query = parse_qs(self.scope["query_string"].decode(errors="replace"))
        offered: list[str] = self.scope.get("subprotocols") or []
        # Accept first: a close code can only be sent on an accepted connection.
        await self.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        metrics.websocket_opened()
        self.counted = True
        if "token" in query:
            # Refused, not deprecated: the point is that no client keeps putting it in logs.
            await self.close(code=CLOSE_TOKEN_INVALID, reason=TOKEN_IN_URL)
            return
        self.after = query.get("after", [""])[0]
        for protocol in offered:
            if protocol.startswith(SUBPROTOCOL_TOKEN_PREFIX):
                # A subprotocol is an HTTP token, which has no colons: the client made them dots.
                await self._authenticate(token=protocol.removeprefix(SUBPROTOCOL_TOKEN_PREFIX).replace(".", ":"))
                return
        self.watch = asyncio.create_task(self._close_without_token())

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections before every message, a hop to the
        # database thread each: for every socket's connect, token and keep-alive answer. This
        # consumer reads the database only through database_sync_to_async, which does it.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def disconnect(self, code: int) -> None:
        if self.counted:
            metrics.websocket_closed()
            self.counted = False
        if self.watch:
            self.watch.cancel()
        if self.joined and self.recipient_id:
            inbox_hub().leave(recipient_id=self.recipient_id, socket=self)
            self.joined = False
        if self.holds_slot and self.recipient_id:
            await socket_slot_release(recipient_id=self.recipient_id, socket_id=self.socket_id)

    @classmethod
    async def decode_json(cls, text_data: str) -> Any:
        try:
            return await super().decode_json(text_data)
        except ValueError:
            return None  # not JSON: refused in place of the token, ignored after it

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        message = content if isinstance(content, dict) else {}
        if not self.token_received:
            token = message.get("token")
            if message.get("type") != "auth" or not isinstance(token, str):
                await self.close(code=CLOSE_TOKEN_INVALID, reason=FIRST_MESSAGE)
                return
            await self._authenticate(token=token)
            return
        self.last_heard = time.monotonic()
        if message.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def _authenticate(self, *, token: str) -> None:
        self.token_received = True
        if self.watch:
            self.watch.cancel()
        try:
            read = recipient_token_read(purpose=INBOX, token=token)
        except RecipientTokenInvalid as error:
            await self.close(code=CLOSE_TOKEN_EXPIRED if error.expired else CLOSE_TOKEN_INVALID, reason=str(error))
            return
        self.recipient_id, self.token_expires_at = read.recipient_id, read.expires_at.timestamp()
        self.holds_slot = await socket_slot_take(recipient_id=self.recipient_id, socket_id=self.socket_id)
        if not self.holds_slot:
            cap = settings.NOTIFY_INBOX_MAX_SOCKETS_PER_RECIPIENT
            await self.close(code=CLOSE_TOO_MANY_SOCKETS, reason=f"too many open connections for this inbox ({cap})")
            return
        # Join before reading the database: whatever is stored from now on is pushed, and
        # anything stored before is in the reads below (a repeat is dropped by id).
        await inbox_hub().join(recipient_id=self.recipient_id, socket=self)
        self.joined = True
        await self.send_json({"type": "hello", "counts": await inbox_hub().counts.get(self.recipient_id)})
        if self.after:
            items, more = await _catch_up_after(recipient_id=self.recipient_id, after=self.after)
            await self.send_json({"type": "catch_up", "items": items, "more": more})
        self.last_heard = time.monotonic()
        self.watch = asyncio.create_task(self._keep_alive(recipient_id=self.recipient_id))

    async def _close_without_token(self) -> None:
        # An unauthenticated socket holds a connection and counts against no recipient's cap.
        deadline = settings.NOTIFY_INBOX_AUTH_SECONDS
        await asyncio.sleep(deadline)
        await self.close(code=CLOSE_TOKEN_INVALID, reason=f"no token within {deadline:g} seconds")

    async def _keep_alive(self, *, recipient_id: UUID) -> None:
        """Ping, renew the socket's slot, and close a silent socket, or one whose token expired."""
        interval = settings.NOTIFY_INBOX_PING_SECONDS
        while True:
            await asyncio.sleep(max(0.0, min(interval, self.token_expires_at - time.time())))
            if time.time() >= self.token_expires_at:
                await self.close(code=CLOSE_TOKEN_EXPIRED, reason="the inbox token has expired")
                return
            if time.monotonic() - self.last_heard > 2 * interval:
                await self.close(code=CLOSE_KEEP_ALIVE, reason="no pong: the connection looks dead")
                return
            await self.send_json({"type": "ping"})
            await socket_slot_renew(recipient_id=recipient_id, socket_id=self.socket_id)

    # From this process's hub (apps.inbox.hub), which holds the socket while it is joined.
    def push(self, *, frames: list[str]) -> None:
        """Send the frames (encoded messages) in order, without making the hub wait for a slow
        client: the socket's own task sends them."""
        if self.falling_behind:
            return
        cap = settings.NOTIFY_INBOX_SEND_QUEUE_FRAMES
        if len(self.outbox) + len(frames) > cap:
            # The database holds every item: a client this far behind reconnects and catches
            # up from there, rather than holding the process's memory for frames it can't take.
            self.falling_behind = True
            self.outbox.clear()
            self.closing = asyncio.create_task(  # held, so that the task is not collected
                self.close(code=CLOSE_TOO_SLOW, reason=f"more than {cap} messages waiting: reconnect and catch up")
            )
            return
        self.outbox.extend(frames)
        if self.sender is None or self.sender.done():
            self.sender = asyncio.create_task(self._send_outbox())

    def catch_up_since(self, *, since: float) -> None:
        """The hub's subscription was lost a while: send what was stored since `since`."""
        self.catching_up = asyncio.create_task(self._catch_up_since(since=datetime.fromtimestamp(since, tz=UTC)))

    async def _send_outbox(self) -> None:
        try:
            while self.outbox:
                await self.send(text_data=self.outbox.popleft())
        except (OSError, RuntimeError):  # the socket is closing: disconnect() is on its way
            self.outbox.clear()

    async def _catch_up_since(self, *, since: datetime) -> None:
        if not self.joined or self.recipient_id is None:
            return
        recipient_id = self.recipient_id
        items, more = await inbox_hub().catch_ups_since.get((recipient_id, since))
        counts = await inbox_hub().counts.get(recipient_id)
        self.push(
            frames=[
                json.dumps({"type": "catch_up", "items": items, "more": more}),
                json.dumps({"type": "counts", "counts": counts}),
            ]
        )


async def _catch_up_after(*, recipient_id: UUID, after: str) -> CatchUp:
    """What the client missed since the newest item it holds (read together with the other
    clients that reconnect meanwhile)."""
    try:
        held_id = UUID(after)
    except ValueError:
        return [], True
    return await inbox_hub().catch_ups.get((recipient_id, held_id))
