"""The SSRF guard for requests to addresses a tenant chose (web push endpoints, the API URLs of
tenants' provider accounts, producer webhooks).

A URL passes when it is https and every address its host resolves to is public, or when its
host is on the caller's allow list (which may then use http and private or loopback
addresses: the sandbox in the tests and the demo). The same check runs when the URL is saved
and again for each request, and the request connects to the very address that was checked,
so a DNS answer that changes in between (rebinding) does not get through. Redirects are never
followed, and proxies from the environment are not used (a proxy would resolve the host
itself, after our check).

Written here rather than taken from requests-hardened, the closest well-kept library: its
filter has one switch for loopback addresses instead of a per-host allow list that also lets
those hosts use http, and it vets only the first address a name resolves to, while a URL is
refused here if any of its addresses is unsafe. Its way of pinning the connection (the vetted
address as the pool's host, the name kept for the Host header, SNI and the certificate check)
is the one used below: pinning keeps the check and the connection on one address, where a
check of the socket's peer after connecting would have sent the TCP handshake (and, for
http, nothing else could stop the request bytes) before refusing."""

import ipaddress
import socket
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}
# Ranges the standard library (3.11) still calls global that reach no public host: the IPv4
# special-purpose block, the 6to4 relay anycast, and IPv6 segment routing.
NOT_PUBLIC = tuple(ipaddress.ip_network(n) for n in ("192.0.0.0/24", "192.88.99.0/24", "5f00::/16"))
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT
# NAT64 prefixes: the IPv4 address they carry in their last 32 bits is the one reached.
NAT64 = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48"))


class OutboundRefused(requests.ConnectionError):
    """The URL may not be requested; `reason` says why in a few words. A ConnectionError, as no
    connection was made, so callers that tell "never reached" from "maybe taken" get it right."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HostUnresolved(OutboundRefused):
    """The host has no address now: refused when a URL is saved, but at send time possibly a
    passing DNS failure rather than a bad URL."""


def outbound_url_check(*, url: str, allowed_hosts: Collection[str]) -> list[IPAddress]:
    """Refuse (OutboundRefused) a URL the server must not request; return the addresses to
    connect to (empty for a host on the allow list, which connects as usual)."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if scheme not in DEFAULT_PORTS or not host:
        raise OutboundRefused("not an http(s) URL with a host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise OutboundRefused("the port is not a number from 0 to 65535")
    if host_allowed(host=host, port=port, allowed_hosts=allowed_hosts):
        return []
    if scheme != "https":
        raise OutboundRefused("only https URLs are allowed")
    addresses = _resolve(host=host, port=port)
    for address in addresses:
        refusal = address_refusal(address)
        if refusal:
            shown = host if _is_literal(host, address) else f"{host} resolves to {address}, which"
            raise OutboundRefused(f"{shown} is {refusal}")
    return addresses


def host_allowed(*, host: str, port: int, allowed_hosts: Collection[str]) -> bool:
    """Whether an allow list entry names the host: `host` for any port, or `host:port`
    (IPv6 addresses in brackets, `[::1]:8025`)."""
    host = host.lower().strip("[]")
    for entry in allowed_hosts:
        entry = entry.strip().lower()
        if entry.startswith("["):
            name, _, rest = entry[1:].partition("]")
            entry_port = rest.removeprefix(":")
        else:
            name, _, entry_port = entry.partition(":")
        if name == host and entry_port in ("", str(port)):
            return True
    return False


def address_refusal(address: IPAddress) -> str:
    """Why the server must not connect to this address ("a loopback address"), or "" when it
    is a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and any(address in prefix for prefix in NAT64):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_refusal(embedded)
            return f"{inner} (as {embedded})" if inner else ""
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address in SHARED_ADDRESS_SPACE, "a shared (carrier-grade NAT) address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global or any(address in network for network in NOT_PUBLIC), "not a public address"),
    )
    return next((reason for refused, reason in checks if refused), "")


def _is_literal(host: str, address: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(host) == address
    except ValueError:
        return False


def _resolve(*, host: str, port: int) -> list[IPAddress]:
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise HostUnresolved(f"{host} does not resolve")
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in answers:
        if family in (socket.AF_INET, socket.AF_INET6):
            # An IPv6 scope ("fe80::1%eth0") is dropped: link-local is refused anyway.
            address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            if address not in addresses:
                addresses.append(address)
    if not addresses:
        raise HostUnresolved(f"{host} does not resolve")
    return addresses


class _GuardedAdapter(HTTPAdapter):
    """Checks every request's URL and connects to the address that was checked."""

    def __init__(self, *, allowed_hosts: Collection[str], connect_timeout: float | None) -> None:
        super().__init__()
        self.allowed_hosts = tuple(allowed_hosts)
        self.connect_timeout = connect_timeout

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        timeout = kwargs.get("timeout")
        if self.connect_timeout is not None and isinstance(timeout, (int, float)):
            # A short wait for the connection, so that black-holed addresses cannot hold a
            # batch; the caller's timeout stays the wait for the answer.
            kwargs["timeout"] = (min(self.connect_timeout, timeout), timeout)
        return super().send(request, *args, **kwargs)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        addresses = outbound_url_check(url=request.url or "", allowed_hosts=self.allowed_hosts)
        if not addresses:  # on the allow list
            return host_params, pool_kwargs
        name = host_params["host"]
        host_header = f"[{name}]" if ":" in name else name
        if host_params["port"] is not None:
            host_header += f":{host_params['port']}"
        request.headers["Host"] = host_header
        if host_params["scheme"] == "https":
            # TLS still names, and verifies the certificate of, the host the URL names.
            pool_kwargs["server_hostname"] = name
            pool_kwargs["assert_hostname"] = name
        host_params["host"] = str(addresses[0])
        return host_params, pool_kwargs


class OutboundSession(requests.Session):
    """A requests session for tenant-chosen URLs: every request passes the guard, connects to
    the checked address, follows no redirect (a 3xx is the answer) and ignores proxy settings
    from the environment."""

    def __init__(self, *, allowed_hosts: Collection[str], connect_timeout: float | None = None) -> None:
        super().__init__()
        self.trust_env = False
        adapter = _GuardedAdapter(allowed_hosts=allowed_hosts, connect_timeout=connect_timeout)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        kwargs["allow_redirects"] = False
        return super().send(request, **kwargs)


def webhook_secret_problem(*, secret: str) -> str:
    """Why the webhook secret cannot sign ("" when it can)."""
    if not secret:
        return "it is empty"
    try:
        Webhook(secret)
    except (ValueError, RuntimeError, EmptyWebhookSecretError) as error:  # binascii.Error is a ValueError
        return f"it is not a base64 key, optionally prefixed with whsec_ ({type(error).__name__})"
    return ""


def signed_webhook_post(
    *, url: str, secret: str, webhook_id: str, body: str, allowed_hosts: Collection[str], timeout: float
) -> requests.Response:
    """POST a JSON body to a URL someone configured, signed per the Standard Webhooks
    specification (webhook-id, webhook-timestamp, webhook-signature), through the guard."""
    sent_at = datetime.now(UTC).replace(microsecond=0)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "notify-webhooks",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id=webhook_id, timestamp=sent_at, data=body),
    }
    with OutboundSession(allowed_hosts=allowed_hosts, connect_timeout=timeout) as session:
        return session.post(url, data=body.encode(), headers=headers, timeout=timeout)
