"""Per-API-key request limits: a sliding window per key in Redis, shared by every web process,
so a producer over its limit gets 429 with Retry-After wherever its requests land."""

import time
from typing import Any

import limits
from django.conf import settings
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from apps.tenants.models import ApiKey
from notify.policy.caps import sliding_window


class ApiKeyRateThrottle(BaseThrottle):
    def __init__(self) -> None:
        self.retry_after: float | None = None

    def allow_request(self, request: Request, view: Any) -> bool:
        key = request.auth
        if not isinstance(key, ApiKey):  # the inbox API's recipient tokens are not limited here
            return True
        rate = key.rate_limit or settings.NOTIFY_API_RATE_LIMIT
        if not rate:
            return True
        item, limiter = limits.parse(rate), sliding_window()
        if limiter.hit(item, "api-key", str(key.pk)):
            return True
        self.retry_after = max(limiter.get_window_stats(item, "api-key", str(key.pk)).reset_time - time.time(), 1.0)
        return False

    def wait(self) -> float | None:
        return self.retry_after
