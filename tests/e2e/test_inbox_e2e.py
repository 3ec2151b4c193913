"""The in-app inbox end to end: the ASGI server as the run command serves it, a real Celery
worker, Redis and PostgreSQL. An event triggered through the API reaches a connected
WebSocket client, and one sent while it was away arrives on reconnect. Then the same through
the embeddable widget in headless Chromium. The token never reaches the server's logs, and
the cap on one recipient's sockets holds across server processes, one of them killed."""

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from asgiref.sync import sync_to_async
from django.db import connections
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from apps.inbox.consumers import CLOSE_TOO_MANY_SOCKETS, SUBPROTOCOL
from apps.recipients.models import Recipient
from apps.recipients.tokens import INBOX, recipient_token_issue
from apps.tenants.demo import demo_workspace_ensure
from tests.apps.test_inbox_live import as_subprotocol
from tests.apps.test_inbox_live import connect as connect_in_process
from tests.conftest import ROOT, process_env
from tests.factories import RecipientFactory
from tests.helpers import chromium_launch, free_port, wait_for

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


@dataclass
class WebServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def serve(transactional_db, sandbox, tmp_path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """Start uvicorn as the run command does, with its access log on and extra environment;
    every one started is stopped afterwards."""
    started: list[WebServer] = []

    def start(**environment: str) -> WebServer:
        port = free_port()
        log_path = tmp_path / f"web-{len(started)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
            + ["--access-log", "--log-level", "info"],
            cwd=ROOT,
            env={**process_env(sandbox_url=sandbox.base_url), **environment},
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
        )
        server = WebServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
        started.append(server)
        wait_for(lambda: "Uvicorn running" in server.log() or process.poll() is not None, what="uvicorn to start")
        if process.poll() is not None:
            raise AssertionError(f"the web server exited:\n{server.log()}")
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.terminate()
            server.process.wait(timeout=10)


def authenticated(socket: ClientConnection, token: str) -> ClientConnection:
    """The socket, having sent its token as the first message, as the widget does."""
    socket.send(json.dumps({"type": "auth", "token": token}))
    return socket


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
    socket_url = f"{web_server.replace('http', 'ws')}/inbox/v1/ws"

    with connect(socket_url) as socket:
        authenticated(socket, token)
        assert next_message(socket) == {
            "type": "hello",
            "counts": {"unread": 0, "unseen": 0, "limit": 99, "severity": None},
        }
        producer.mention(text="live")
        item = next_message(socket)
        assert (item["type"], item["item"]["body"]) == ("item", "live")
        assert next_message(socket) == {
            "type": "counts",
            "counts": {"unread": 1, "unseen": 1, "limit": 99, "severity": "medium"},
        }
    held = item["item"]["id"]

    missed = producer.mention(text="while away")
    wait_for(lambda: producer.status(missed) == "sent", timeout=30, what="the missed item to be stored")
    with connect(f"{socket_url}?after={held}") as socket:
        authenticated(socket, token)
        assert next_message(socket)["counts"] == {"unread": 2, "unseen": 2, "limit": 99, "severity": "medium"}
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
            panel = "document.querySelector('notify-inbox').shadowRoot.querySelector('.ntf-panel')"
            assert reader.evaluate(f"getComputedStyle({panel}).position") == "absolute"
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
    assert producer.status(notification_id) == "opened"  # a read in-app item is its delivery opened
    inbox = requests.get(
        f"{web_server}/inbox/v1/items",
        headers={"Authorization": f"Bearer {producer.post('inbox-tokens', {'recipient': 'ada'})['token']}"},
        timeout=10,
    ).json()["results"]
    assert [(i["body"], i["read"]) for i in inbox] == [("Can you review the launch plan?", True)]


def test_the_token_reaches_no_log_of_the_server(workspace, serve):
    """Uvicorn logs each request's URL (the access log) and each WebSocket's (its own log):
    the token travels in the first message, the handshake's subprotocol or the API's
    Authorization header, none of which it writes down."""
    server = serve()
    ada = RecipientFactory(tenant=workspace.tenant, external_id="ada")
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)
    socket_url = f"{server.url.replace('http', 'ws')}/inbox/v1/ws"

    with connect(socket_url) as socket:
        assert next_message(authenticated(socket, token))["type"] == "hello"
    with connect(socket_url, subprotocols=[SUBPROTOCOL, as_subprotocol(token)]) as socket:  # type: ignore[list-item]
        assert socket.subprotocol == SUBPROTOCOL
        assert next_message(socket)["type"] == "hello"
    answer = requests.get(f"{server.url}/inbox/v1/items", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 200
    with connect(f"{socket_url}?token={token}") as socket:  # the old way in: refused
        with pytest.raises(ConnectionClosed) as refused:
            next_message(socket)
    assert refused.value.rcvd is not None and refused.value.rcvd.code == 4001

    log = wait_for(lambda: (log := server.log()).count('"WebSocket /inbox/v1/ws') >= 2 and log, what="the log")
    assert '"GET /inbox/v1/items HTTP/1.1" 200' in log
    signature = token.rsplit(":", 1)[1]
    leaked = [line for line in log.splitlines() if signature in line]
    assert not leaked, leaked
    # Even the refused attempt above, whose client put it in the URL, is masked in the log.
    assert '"WebSocket /inbox/v1/ws?token=[Filtered]"' in log


def test_the_socket_cap_holds_across_processes_and_a_killed_process_frees_its_sockets(workspace, serve, settings):
    settings.NOTIFY_INBOX_MAX_SOCKETS_PER_RECIPIENT = 2
    server = serve(NOTIFY_INBOX_MAX_SOCKETS_PER_RECIPIENT="2", NOTIFY_INBOX_PING_SECONDS="1")
    ada = RecipientFactory(tenant=workspace.tenant, external_id="ada")
    token = recipient_token_issue(purpose=INBOX, recipient_id=ada.id)
    socket_url = f"{server.url.replace('http', 'ws')}/inbox/v1/ws"

    async def refused_here() -> bool:
        """Whether a socket to this process (not the server's) is refused for the cap."""
        tab = await connect_in_process(token)
        message = await tab.receive_output(timeout=5)
        if message["type"] == "websocket.close":
            assert message["code"] == CLOSE_TOO_MANY_SOCKETS
            return True
        await tab.disconnect()
        return False

    def in_process(check: Any) -> Any:
        async def and_close_connections() -> Any:
            try:
                return await check()
            finally:
                await sync_to_async(connections.close_all)()

        return asyncio.run(and_close_connections())

    with ExitStack() as held:
        for _ in range(2):
            socket = held.enter_context(connect(socket_url))
            assert next_message(authenticated(socket, token))["type"] == "hello"
        with connect(socket_url) as third:  # one past the cap at the server
            with pytest.raises(ConnectionClosed) as refused:
                next_message(authenticated(third, token))
            assert refused.value.rcvd is not None and refused.value.rcvd.code == CLOSE_TOO_MANY_SOCKETS
        assert in_process(refused_here)  # and one more here, in another process

        server.process.send_signal(signal.SIGKILL)  # its sockets never say goodbye
        server.process.wait(timeout=10)
        assert in_process(refused_here)  # their slots outlive the process for a lease (3 pings)...
        wait_for(lambda: not in_process(refused_here), timeout=10, interval=0.5, what="the slots to lapse")


def test_the_widget_gets_a_fresh_token_when_its_socket_closes_at_expiry(serve, workers):
    """The demo page gives the widget a getToken that asks the page's server for a new token,
    as an application's page does: live updates go on past the token's lifetime."""
    from playwright.sync_api import expect, sync_playwright

    demo_api_key = "ntf_demo_0123456789abcdefTEST"
    demo_workspace_ensure(api_key=demo_api_key)
    server = serve(DJANGO_DEBUG="1", NOTIFY_INBOX_TOKEN_SECONDS="2")
    workers.start("normal")

    with sync_playwright() as playwright:
        browser = chromium_launch(playwright)
        try:
            tab = browser.new_page()
            tab.goto(f"{server.url}/demo/inbox/")
            expect(tab.locator("#inbox[data-connected=true]")).to_be_attached()
            # Closed at expiry (4002), the widget reconnects with a fresh token, more than once.
            wait_for(lambda: server.log().count("GET /demo/inbox/token") >= 2, what="two fresh tokens")
            Producer(base_url=server.url, api_key=demo_api_key).mention(text="after the first token")
            expect(tab.locator(".ntf-badge")).to_have_text("1")
            expect(tab.locator(".ntf-status")).to_be_hidden()
        finally:
            browser.close()


def test_the_inbox_element_severity_tabs_groups_expiry_snooze_bounded_badge_and_keyboard(serve, workers):
    """One page of the demo, the <notify-inbox> element in headless Chromium, driven through
    each feature: the badge takes the highest unread severity's colour, a tag's tab shows its
    items and count, a group shows as one item with its count, an announcement vanishes when
    it expires, a snoozed item comes back when its time comes, a page answered late undoes
    no change pushed or made meanwhile, the badge stops at 99+, and the whole thing works
    from the keyboard."""
    from playwright.sync_api import APIResponse, Route, expect, sync_playwright

    from apps.inbox.live import inbox_snoozes_return

    demo_api_key = "ntf_demo_0123456789abcdefTEST"
    demo_workspace_ensure(api_key=demo_api_key)
    Recipient.objects.filter(tenant__slug="demo", external_id="ada").update(locale="de-AT")
    server = serve(DJANGO_DEBUG="1")
    workers.start("normal")
    producer = Producer(base_url=server.url, api_key=demo_api_key)
    token = producer.post("inbox-tokens", {"recipient": "ada"})["token"]

    def snoozes_return() -> int:
        try:
            return inbox_snoozes_return(now=datetime.now(UTC))
        finally:
            connections.close_all()

    def event(text: str, **fields: Any) -> None:
        producer.post("events", {"category": "mention", "recipient": "ada", "data": {"text": text}, **fields})

    with sync_playwright() as playwright:
        browser = chromium_launch(playwright)
        try:
            page = browser.new_page()  # in English: the strings follow the recipient's locale
            page.goto(f"{server.url}/demo/inbox/")
            expect(page.locator("#inbox[data-connected=true]")).to_be_attached()
            badge, bell = page.locator(".ntf-badge"), page.locator(".ntf-bell")

            def pump_until(condition: Callable[[], bool]) -> None:
                """Wait while Playwright runs the route handlers (a sleep would hold them up)."""
                deadline = time.monotonic() + 30
                while not condition() and time.monotonic() < deadline:
                    page.wait_for_timeout(50)

            event("Disk full", severity="high", tags=["ops"])
            for who in ("Ann", "Bo", "Cy"):
                event(f"{who} commented", group_key="launch-plan", actor=who)
            expires_at = datetime.now(UTC) + timedelta(seconds=8)
            event("Maintenance tonight", expires_at=expires_at.isoformat())
            expect(badge).to_have_text("3")
            expect(badge).to_have_attribute("data-severity", "high")
            # In the recipient's locale (de-AT: the German strings).
            expect(bell).to_have_attribute("aria-label", "Benachrichtigungen, 3 ungelesen")
            expect(page.locator(".ntf-live")).to_have_text("Neue Benachrichtigung: Someone mentioned you")

            # Keyboard: open from the bell, focus lands on the first item, arrows move, Escape
            # closes and gives focus back to the bell.
            bell.focus()
            page.keyboard.press("Enter")
            focused = "document.querySelector('notify-inbox').shadowRoot.activeElement"
            expect(page.locator(".ntf-panel")).to_be_visible()
            assert page.evaluate(f"{focused}.className").startswith("ntf-item")
            first = page.evaluate(f"{focused}.dataset.id")
            page.keyboard.press("ArrowDown")
            assert page.evaluate(f"{focused}.dataset.id") != first
            page.keyboard.press("Escape")
            expect(page.locator(".ntf-panel")).to_be_hidden()
            assert page.evaluate(f"{focused}.className") == "ntf-bell"
            page.keyboard.press("Enter")

            grouped = page.locator(".ntf-item", has_text="Cy commented")
            expect(grouped.locator(".ntf-group")).to_have_text("3 neue · Cy, Bo, Ann")
            expect(page.locator(".ntf-item", has_text="Ann commented")).to_have_count(0)

            # The announcement vanishes at its expiry, without a reload.
            expect(page.locator(".ntf-item", has_text="Maintenance tonight")).to_have_count(0, timeout=15000)

            # Tabs, by keyboard: right arrow from the selected tab to "Ungelesen", then "Ops".
            page.locator(".ntf-tab[aria-selected=true]").focus()
            page.keyboard.press("ArrowRight")
            page.keyboard.press("ArrowRight")
            expect(page.locator(".ntf-tab[aria-selected=true]")).to_have_text("Ops1")
            expect(page.locator(".ntf-item")).to_have_count(1)
            expect(page.locator(".ntf-item")).to_contain_text("Disk full")
            # Back to "Alle". Each tab reads its page; these answers are held until after
            # the snooze below has been pushed, as a slow answer would be: a page read before a
            # change must not undo the change's push.
            held: list[tuple[Route, APIResponse]] = []
            page.route(re.compile(r"/inbox/v1/items(\?|$)"), lambda route: held.append((route, route.fetch())))
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("ArrowLeft")
            expect(page.locator(".ntf-tab[aria-selected=true]")).to_have_text(re.compile("^Alle"))

            # The read of the page now shown is held. ("Ungelesen"'s, passed on the way, was seen
            # to go unheld on a loaded machine, so it is not counted on.)
            def shown_page_held() -> bool:
                return any(route.request.url.endswith("/inbox/v1/items") for route, _ in held)

            pump_until(shown_page_held)
            assert shown_page_held(), held

            # Snoozed (through the API, for seconds): gone at once, back when its time comes.
            # The element shows it again at `until` by its own clock, so the snooze is long
            # enough that the push reaches it well before then on a loaded machine.
            disk = page.locator(".ntf-item", has_text="Disk full")
            item_id = disk.get_attribute("data-id")
            until = datetime.now(UTC) + timedelta(seconds=8)
            snoozed = requests.post(
                f"{server.url}/inbox/v1/items/{item_id}/snooze",
                json={"until": until.isoformat()},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert snoozed.status_code == 200, snoozed.text
            expect(disk).to_have_count(0)
            expect(badge).to_have_attribute("data-severity", "medium")
            # Reading the group from the keyboard reads it (Enter on the focused item), shown at
            # once; its request is held too, so that no push confirms it yet. The page handles
            # the opening itself, as the element's event allows, and stays.
            page.evaluate(
                "document.querySelector('notify-inbox')"
                ".addEventListener('notify-inbox-open', (event) => event.preventDefault())"
            )
            reads: list[Route] = []
            page.route(re.compile(r"/inbox/v1/items/[^/]+/read$"), lambda route: reads.append(route))
            grouped.focus()
            page.keyboard.press("Enter")
            pump_until(lambda: len(reads) == 1)
            assert len(reads) == 1, reads
            expect(grouped).not_to_have_class(re.compile("ntf-unread"))

            # The pages read before both changes answer now, and undo neither.
            with page.expect_event("requestfinished") as answered:
                for route, response in held:
                    route.fulfill(response=response)
            assert "Disk full" in answered.value.response().text()  # the page from before the snooze
            page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 300))")  # merged by now
            expect(disk).to_have_count(0)
            expect(grouped).not_to_have_class(re.compile("ntf-unread"))
            reads[0].continue_()
            page.unroute_all()
            expect(badge).to_be_hidden()  # nothing unread: the group read, the other snoozed

            wait_for(lambda: datetime.now(UTC) > until, what="the snooze to end")
            # What the sweeper does, on a thread: Playwright's loop runs on this one.
            assert ThreadPoolExecutor(1).submit(snoozes_return).result() == 1
            expect(disk).to_have_count(1)
            expect(badge).to_have_attribute("data-severity", "high")
            expect(badge).to_have_text("1")

            # Past the limit, the badge says so.
            producer.post(
                "events/batch",
                {"events": [{"category": "mention", "recipient": "ada", "data": {"text": str(n)}} for n in range(99)]},
            )
            expect(badge).to_have_text("99+", timeout=30000)
            expect(bell).to_have_attribute("aria-label", "Benachrichtigungen, 99+ ungelesen")
        finally:
            browser.close()
