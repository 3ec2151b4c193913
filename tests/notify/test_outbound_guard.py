"""The SSRF guard (notify/resilience/outbound.py): which URLs the server may request, and that a
request connects to the address that was checked.

Every refusal here happens before any connection is attempted, and only IP literals and
`localhost` (from /etc/hosts) are resolved, so nothing leaves this machine, not even a DNS query."""

import ipaddress
import socket
from dataclasses import dataclass

import pytest
import requests
import urllib3.util.connection

from notify.resilience.outbound import OutboundRefused, OutboundSession, address_refusal, outbound_url_check

REFUSED = [
    ("http://push.example.com/send/1", "only https URLs are allowed"),
    ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("https://127.0.0.1:9200/_search", "127.0.0.1 is a loopback address"),
    ("https://10.0.0.1/x", "10.0.0.1 is a private address"),
    ("https://172.16.5.4/x", "172.16.5.4 is a private address"),
    ("https://192.168.1.1/x", "192.168.1.1 is a private address"),
    ("https://[::1]/x", "::1 is a loopback address"),
    ("https://[::ffff:127.0.0.1]/x", "::ffff:127.0.0.1 is a loopback address (as 127.0.0.1)"),
    ("https://[::ffff:169.254.169.254]/x", "is a link-local address (as 169.254.169.254)"),
    ("https://[64:ff9b::a00:1]/x", "is a private address (as 10.0.0.1)"),
    ("https://[2002:7f00:1::]/x", "is a loopback address (as 127.0.0.1)"),
    ("https://[fe80::1]/x", "fe80::1 is a link-local address"),
    ("https://[fd00::1]/x", "fd00::1 is a private address"),
    ("https://100.64.0.1/x", "100.64.0.1 is a shared (carrier-grade NAT) address"),
    ("https://0.0.0.0/x", "0.0.0.0 is an unspecified address"),
    ("https://224.0.0.1/x", "224.0.0.1 is a multicast address"),
    # Python's address tables for 192.0.0.0/24 differ between releases and distributions' builds.
    ("https://192.0.0.8/x", ("192.0.0.8 is not a public address", "192.0.0.8 is a private address")),
    ("https://198.18.0.1/x", "198.18.0.1 is a private address"),
    # Which loopback comes first is the machine's resolver's choice.
    (
        "https://localhost:9200/x",
        (
            "localhost resolves to 127.0.0.1, which is a loopback address",
            "localhost resolves to ::1, which is a loopback address",
        ),
    ),
    ("ftp://8.8.8.8/x", "not an http(s) URL with a host"),
    ("https:///x", "not an http(s) URL with a host"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_internal_and_plain_http_urls_are_refused_with_a_reason(url, reason):
    with pytest.raises(OutboundRefused) as refused:
        outbound_url_check(url=url, allowed_hosts=[])
    reasons = (reason,) if isinstance(reason, str) else reason
    assert any(expected in refused.value.reason for expected in reasons), refused.value.reason


@pytest.mark.parametrize(
    ("url", "address"),
    [("https://8.8.8.8/push/1", "8.8.8.8"), ("https://[2606:4700::1111]:8443/push", "2606:4700::1111")],
)
def test_a_public_https_url_passes_with_the_address_to_connect_to(url, address):
    assert outbound_url_check(url=url, allowed_hosts=[]) == [ipaddress.ip_address(address)]


@pytest.mark.parametrize(
    ("url", "allowed", "passes"),
    [
        ("http://127.0.0.1:8025/webpush/a", ["127.0.0.1:8025"], True),
        ("http://127.0.0.1:9200/_search", ["127.0.0.1:8025"], False),  # another port of the host
        ("http://127.0.0.1:9200/_search", ["127.0.0.1"], True),  # every port
        ("http://LocalHost:8025/x", ["localhost"], True),
        ("http://[::1]:8025/x", ["[::1]:8025"], True),
        ("http://sandbox:8025/x", ["sandbox:8025"], True),
        ("http://127.0.0.2:8025/x", ["127.0.0.1:8025"], False),
        ("https://127.0.0.1/x", ["127.0.0.1:443"], True),  # the scheme's port
    ],
)
def test_a_host_on_the_allow_list_may_use_http_and_internal_addresses(url, allowed, passes):
    if passes:
        assert outbound_url_check(url=url, allowed_hosts=allowed) == []
    else:
        with pytest.raises(OutboundRefused):
            outbound_url_check(url=url, allowed_hosts=allowed)


def test_an_embedded_public_address_is_judged_by_what_it_reaches():
    assert address_refusal(ipaddress.ip_address("::ffff:8.8.8.8")) == ""
    assert address_refusal(ipaddress.ip_address("8.8.8.8")) == ""


@dataclass
class Recorded:
    connections: list[tuple[str, int]]
    timeouts: list[float | None]


@pytest.fixture
def rebinding_resolver(monkeypatch):  # type: ignore[no-untyped-def]
    """`rebind.example` answers a public address once, then loopback (a DNS rebinding attack
    with a zero TTL); every connection is recorded and refused, so nothing is sent anywhere.

    The resolver is the standard library's and the connection urllib3's: neither is ours."""
    real_getaddrinfo = socket.getaddrinfo
    answers = ["93.184.215.14", "127.0.0.1"]
    connections: list[tuple[str, int]] = []
    timeouts: list[float | None] = []

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "rebind.example":
            address = answers.pop(0) if len(answers) > 1 else answers[0]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    def create_connection(address, timeout=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        connections.append(address)
        timeouts.append(timeout)
        raise ConnectionRefusedError("recorded, not connected")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", create_connection)
    return Recorded(connections=connections, timeouts=timeouts)


def test_a_request_connects_to_the_address_that_was_checked(rebinding_resolver):
    session = OutboundSession(allowed_hosts=[])
    with pytest.raises(requests.ConnectionError):
        session.post("https://rebind.example/push/1", data=b"x", timeout=1)
    # Resolved once, checked, and connected to that address: not to the loopback address a
    # second look-up would have answered.
    assert rebinding_resolver.connections == [("93.184.215.14", 443)]


def test_a_rebound_name_is_refused_at_the_next_request(rebinding_resolver):
    session = OutboundSession(allowed_hosts=[])
    with pytest.raises(requests.ConnectionError):
        session.post("https://rebind.example/push/1", data=b"x", timeout=1)
    with pytest.raises(OutboundRefused, match="rebind.example resolves to 127.0.0.1, which is a loopback address"):
        session.post("https://rebind.example/push/1", data=b"x", timeout=1)
    assert len(rebinding_resolver.connections) == 1


def test_the_connection_gets_the_short_connect_timeout_and_the_answer_the_callers(rebinding_resolver):
    session = OutboundSession(allowed_hosts=[], connect_timeout=3.0)
    with pytest.raises(requests.ConnectionError):
        session.post("https://rebind.example/push/1", data=b"x", timeout=10.0)
    assert rebinding_resolver.timeouts == [3.0]


def test_a_name_with_any_internal_address_is_refused(monkeypatch):
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "mixed.example":
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
            ]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(OutboundRefused, match="resolves to 10.1.2.3, which is a private address"):
        outbound_url_check(url="https://mixed.example/x", allowed_hosts=[])


def test_the_session_follows_no_redirect_and_ignores_proxies_from_the_environment(sandbox, monkeypatch):
    sandbox.faults_set(provider="webpush", fail_next=[302])
    host = sandbox.base_url.removeprefix("http://")
    with monkeypatch.context() as environment:
        environment.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        response = OutboundSession(allowed_hosts=[host]).post(
            f"{sandbox.base_url}/webpush/sub-r",
            data=b"x",
            headers={"Authorization": "vapid t=x", "TTL": "60"},
            timeout=5,
        )
    assert response.status_code == 302
    assert response.headers["Location"] == "/webpush/sub-r/redirected"
    assert [r["to"] for r in sandbox.requests_log(provider="webpush")] == ["sub-r"]
