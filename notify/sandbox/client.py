"""A small client for the sandbox's control API, used by tests, the demo and the benchmark."""

import base64
import hashlib
import time
from functools import lru_cache
from typing import Any

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# The sandbox's one browser: every subscription made for the sandbox's push service carries
# its keys, so the push service can decrypt what it receives and see what a person would.
_BROWSER_PRIVATE_VALUE = int.from_bytes(hashlib.sha256(b"notify sandbox browser").digest(), "big")
_BROWSER_AUTH_SECRET = b"0123456789abcdef"


@lru_cache(maxsize=1)
def browser_private_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """The sandbox browser's ECDH private key and auth secret (RFC 8291)."""
    return ec.derive_private_key(_BROWSER_PRIVATE_VALUE, ec.SECP256R1()), _BROWSER_AUTH_SECRET


def browser_subscription_keys() -> dict[str, str]:
    """What a browser's PushSubscription carries, its ECDH public key and auth secret, for a
    subscription whose endpoint is the sandbox's push service."""
    private_key, auth_secret = browser_private_key()
    public = private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return {"p256dh": _b64url(public), "auth": _b64url(auth_secret)}


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class SandboxClient:
    def __init__(self, *, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()

    def reset(self) -> None:
        self.session.post(f"{self.base_url}/_sandbox/reset", timeout=5).raise_for_status()

    def faults_set(self, *, provider: str = "postmark", **faults: Any) -> None:
        response = self.session.post(
            f"{self.base_url}/_sandbox/faults", json={"provider": provider, **faults}, timeout=5
        )
        response.raise_for_status()

    def webhooks_set(self, **urls: str) -> None:
        self.session.post(f"{self.base_url}/_sandbox/webhooks", json=urls, timeout=5).raise_for_status()

    def requests_log(self, *, provider: str | None = None) -> list[dict[str, Any]]:
        params = {"provider": provider} if provider else {}
        response = self.session.get(f"{self.base_url}/_sandbox/requests", params=params, timeout=30)
        response.raise_for_status()
        return response.json()["requests"]

    def stats(self) -> dict[str, Any]:
        response = self.session.get(f"{self.base_url}/_sandbox/stats", timeout=5)
        response.raise_for_status()
        return response.json()

    def is_up(self) -> bool:
        try:
            self.stats()
        except requests.RequestException:
            return False
        return True

    def wait_until_up(self, *, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_up():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sandbox at {self.base_url} did not start within {timeout}s")
            time.sleep(0.05)
