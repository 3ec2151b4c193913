"""A database outage, made by cutting a TCP forwarder between the server and PostgreSQL
(which others share, so it is never stopped itself)."""

import socket
import threading
from collections.abc import Iterator

import pytest
import requests
from django.db import connection

from apps.recipients.tokens import INBOX, PREFERENCES, recipient_link, recipient_token_issue
from tests.factories import RecipientFactory
from tests.helpers import free_port, wait_for


class TcpForwarder:
    """Forwards a local port to PostgreSQL; `stop()` closes the port and every connection
    through it, `start()` opens the same port again."""

    def __init__(self, *, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        if self.listener is None:
            return
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close() alone does not
        self.listener.close()
        self.listener = None
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def database_forwarder() -> Iterator[TcpForwarder]:
    db = connection.settings_dict
    forwarder = TcpForwarder(target=(db["HOST"], int(db["PORT"])))
    forwarder.start()
    yield forwarder
    forwarder.stop()


def _assert_database_unavailable(response: requests.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    assert response.json()["error"]["code"] == "database_unavailable"


def test_while_the_database_is_unreachable_requests_get_503_then_200_once_it_is_back(
    web_server_start, database_forwarder, workspace
):
    db = connection.settings_dict
    url = web_server_start(
        env={
            "DATABASE_URL": f"postgres://{db['USER']}@127.0.0.1:{database_forwarder.port}/{db['NAME']}",
            "DATABASE_POOL_TIMEOUT_SECONDS": "1",
        }
    )
    recipient = RecipientFactory(tenant=workspace.tenant, external_id="ada")
    api = requests.Session()
    api.headers["Authorization"] = workspace.auth_header
    inbox_token = recipient_token_issue(purpose=INBOX, recipient_id=recipient.id)
    preferences_path = recipient_link(purpose=PREFERENCES, recipient_id=recipient.id).split("/", 3)[3]
    assert api.get(f"{url}/api/v1/notifications", timeout=10).status_code == 200

    database_forwarder.stop()
    # Authenticating the API key is the first thing that needs the database.
    _assert_database_unavailable(api.get(f"{url}/api/v1/notifications", timeout=10))
    # The inbox token is checked without it; the view's query is what fails.
    _assert_database_unavailable(
        requests.get(f"{url}/inbox/v1/counts", headers={"Authorization": f"Bearer {inbox_token}"}, timeout=10)
    )
    # A page outside the API.
    _assert_database_unavailable(requests.get(f"{url}/{preferences_path}", timeout=10))

    database_forwarder.start()
    wait_for(
        lambda: api.get(f"{url}/api/v1/notifications", timeout=10).status_code == 200,
        timeout=60,
        interval=0.5,
        what="the API to answer again",
    )
