"""The body limit under the ASGI server the service runs on, spoken to over a raw socket so
that the test, not a client library, decides when each byte is sent."""

import json
import select
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.core.asgi import get_asgi_application

from apps.api.middleware import AsgiRequestBodyLimit
from apps.recipients.models import Recipient

LIMIT = 256 * 1024  # NOTIFY_MAX_REQUEST_BYTES's default, which the test server runs with
CHUNK = 64 * 1024


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client had sent when the answer arrived


def _connect(base_url: str) -> socket.socket:
    url = urlparse(base_url)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def _read_answer(sock: socket.socket, *, sent: int) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(status=int(status_line.split()[1]), headers=headers, body=body, sent=sent)


def _post_chunked(base_url: str, path: str, *, chunks: int) -> Answer:
    """POST a chunked body of `chunks` 64 KiB chunks, stopping as soon as the server answers."""
    sock = _connect(base_url)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    sent = 0
    piece = b"x" * CHUNK
    try:
        for _ in range(chunks):
            readable, _, _ = select.select([sock], [], [], 0.01)
            if readable:
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        else:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading: its answer is waiting
    with sock:
        return _read_answer(sock, sent=sent)


@pytest.mark.parametrize("path", ["/api/v1/events", "/webhooks/twilio/status", "/inbox/v1/items/read-all"])
def test_a_chunked_body_over_the_limit_is_cut_off_with_413(web_server, path):
    total = 64 * 1024 * 1024
    answer = _post_chunked(web_server, path, chunks=total // CHUNK)
    assert answer.status == 413
    assert json.loads(answer.body)["error"]["code"] == "request_too_large"
    assert answer.headers["connection"] == "close"
    # Answered once the limit was crossed, not after the server had taken in the whole body.
    assert answer.sent < LIMIT + 2 * 1024 * 1024 < total


def test_a_declared_length_over_the_limit_is_refused_before_any_body_is_sent(web_server):
    sock = _connect(web_server)
    sock.sendall(
        f"POST /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-Request-ID: big-upload-1\r\nContent-Length: {10 * LIMIT}\r\n\r\n".encode()
    )
    with sock:
        answer = _read_answer(sock, sent=0)
    assert answer.status == 413
    # Refused before Django's middleware runs, and still with the request's id.
    assert answer.headers["x-request-id"] == "big-upload-1"
    error = json.loads(answer.body)["error"]
    assert error["code"] == "request_too_large"
    assert f"{LIMIT} bytes" in error["message"]


def test_a_body_under_the_limit_is_served(web_server, workspace):
    body = json.dumps({"external_id": "ada", "attributes": {"note": "y" * (LIMIT // 2)}}).encode()
    sock = _connect(web_server)
    sock.sendall(
        f"POST /api/v1/recipients HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: {workspace.auth_header}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with sock:
        answer = _read_answer(sock, sent=len(body))
    assert answer.status == 201, answer.body
    assert Recipient.objects.filter(tenant=workspace.tenant, external_id="ada").exists()


async def _asgi_post(*, path: str, body_size: int) -> int:
    """The status the ASGI application answers a chunked POST of `body_size` bytes with."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 5000),
        "scheme": "http",
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }
    communicator = ApplicationCommunicator(AsgiRequestBodyLimit(get_asgi_application()), scope)
    await communicator.send_input({"type": "http.request", "body": b"x" * body_size, "more_body": True})
    await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await communicator.receive_output(timeout=10)
    await communicator.wait(timeout=10)
    return start["status"]


def test_a_path_may_be_given_a_larger_limit(settings):
    settings.NOTIFY_MAX_REQUEST_BYTES_BY_PATH = {"/api/v1/imports/": 4 * LIMIT}
    post = async_to_sync(_asgi_post)
    assert post(path="/api/v1/imports/csv", body_size=2 * LIMIT) == 404  # past the limit, to no view
    assert post(path="/api/v1/events", body_size=2 * LIMIT) == 413
