"""Several providers for a channel: failover, circuit breakers and rate limits.

Providers belong to a tenant or to the installation: a tenant's deliveries use the tenant's
own providers for the channel if it has any, else the installation's, else the provider the
settings configure. A channel with Provider rows sends through them in `position` order (by `weight` within a
position). Each provider is behind a circuit breaker whose state every worker shares through
Redis (pybreaker's CircuitRedisStorage): `failure_threshold` failed sends in a row open it,
and after `cooldown_seconds` one trial send half-opens it, closing it on success. A send that
fails as a whole, or a provider whose circuit is open or that ops disabled, hands the messages
to the next provider; only messages the provider certainly did not take move on (an error
answer, or no connection), so failover never sends one twice. When no provider can take them,
they wait (deferred) without spending a retry.

Each provider's `rate_per_second` and `burst` are a token bucket in Redis shared by every
worker. The `limits` library, used for the caps, has no token bucket (its windows cannot
express a burst on top of a steady rate), so the bucket is a short Lua script: one atomic
round trip per take."""

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import lru_cache
from typing import Any
from uuid import UUID

import pybreaker
import redis
from django.db.models import Q
from django.utils import timezone

from apps.deliveries.models import DeliveryStatus, Provider
from notify.channels.base import Channel, OutboundMessage, SendOutcome
from notify.observability import metrics
from notify.policy.caps import redis_client
from notify.resilience.failures import FailureKind

logger = logging.getLogger(__name__)

# How long a send waits for its rate limit's tokens before its messages are deferred instead.
RATE_WAIT_MAX_SECONDS = 10.0


class ProviderDown(Exception):
    """Every message of a send failed transiently: the provider, not the messages, is at fault."""

    def __init__(self, outcomes: list[SendOutcome]) -> None:
        super().__init__(outcomes[0].reason if outcomes else "provider down")
        self.outcomes = outcomes


def providers_for_tenants(*, channel: str, tenant_ids: set[UUID]) -> dict[UUID, list[Provider]]:
    """Each tenant's provider accounts for the channel: its own if it has any, else the
    installation's (none: the configured default). One query for a whole batch."""
    own: dict[UUID, list[Provider]] = defaultdict(list)
    installation: list[Provider] = []
    for provider in Provider.objects.filter(Q(tenant_id__in=tenant_ids) | Q(tenant__isnull=True), channel=channel):
        if provider.tenant_id is None:
            installation.append(provider)
        else:
            own[provider.tenant_id].append(provider)
    return {tenant_id: own.get(tenant_id) or installation for tenant_id in tenant_ids}


def providers_send(
    *,
    channel: Channel,
    messages: list[OutboundMessage],
    providers: list[Provider],
    channel_for: Callable[[Provider], Channel],
) -> list[SendOutcome]:
    """Send through the channel's providers with failover; the configured default provider
    when the channel has none."""
    providers = _ordered(providers)
    if not providers:
        with metrics.provider_call(channel=channel.name, provider_name="", messages=len(messages)) as called:
            called.extend(outcomes := channel.send_batch(messages=messages))
        return outcomes
    final: dict[Any, SendOutcome] = {}
    last_failure: dict[Any, SendOutcome] = {}
    passed_over: list[str] = []
    remaining = messages
    for provider in providers:
        if not remaining:
            break
        if not provider.enabled:
            passed_over.append(f"{provider.name} is paused")
            continue
        try:
            outcomes = breaker_for(provider).call(_attempt, provider, remaining, channel_for(provider))
        except pybreaker.CircuitBreakerError:
            passed_over.append(f"{provider.name}'s circuit is open")
            continue
        except ProviderDown as down:
            outcomes = down.outcomes
        moving_on = []
        for message, outcome in zip(remaining, outcomes, strict=True):
            if outcome.failure is FailureKind.TRANSIENT and outcome.unsent:
                last_failure[message.delivery_id] = outcome
                moving_on.append(message)
            else:
                final[message.delivery_id] = outcome
        remaining = moving_on
    for message in remaining:  # no provider took these
        final[message.delivery_id] = last_failure.get(message.delivery_id) or _wait_outcome(
            message=message, why=passed_over, providers=providers
        )
    return [final[message.delivery_id] for message in messages]


@dataclass(frozen=True)
class ProviderAnswers:
    """What the channel's provider accounts said about in-doubt messages."""

    found: dict[UUID, str]  # provider message ids of the messages some account already took
    unanswered: dict[UUID, str]  # messages an account that can be asked did not answer for, and why
    askable: bool  # whether any account can be asked at all


def providers_reconcile(
    *,
    channel: Channel,
    messages: list[OutboundMessage],
    providers: list[Provider],
    channel_for: Callable[[Provider], Channel],
) -> ProviderAnswers:
    """Ask each provider account the messages may have gone through (every one of the
    tenant's for the channel: failover may have used any) whether it has them."""
    accounts = [(provider_label(p), channel_for(p)) for p in providers] or [("the default provider", channel)]
    found: dict[UUID, str] = {}
    unanswered: dict[UUID, str] = {}
    askable = False
    for label, account in accounts:
        remaining = [m for m in messages if m.delivery_id not in found]
        if not remaining:
            break
        try:
            answer = account.reconcile(messages=remaining)
        except Exception as error:  # noqa: BLE001 - any failure to answer leaves the doubt
            logger.warning("could not ask %s about %d in-doubt messages: %s", label, len(remaining), error)
            account.reset()
            askable = True
            unanswered.update((m.delivery_id, f"{label} did not answer: {type(error).__name__}") for m in remaining)
            continue
        if answer is not None:
            askable = True
            found.update(answer)
    return ProviderAnswers(
        found=found,
        unanswered={key: why for key, why in unanswered.items() if key not in found},
        askable=askable,
    )


def _attempt(provider: Provider, messages: list[OutboundMessage], channel: Channel) -> list[SendOutcome]:
    # In parts no larger than the rate limit's bucket, each sent once its tokens are taken.
    size = _capacity(provider) or len(messages)
    outcomes: list[SendOutcome] = []
    for start in range(0, len(messages), size):
        part = messages[start : start + size]
        try:
            tokens = _tokens_take(provider=provider, count=len(part))
        except redis.RedisError:
            logger.warning("rate limit of %s unreadable; holding its sends", provider_label(provider), exc_info=True)
            tokens = False
        if not tokens:
            until = timezone.now() + timedelta(seconds=1)
            reason = f"{provider.name} is at its rate limit"
            outcomes.extend(
                SendOutcome(delivery_id=m.delivery_id, withheld=DeliveryStatus.DEFERRED, reason=reason, until=until)
                for m in messages[start:]
            )
            break
        try:
            with metrics.provider_call(channel=channel.name, provider_name=provider.name, messages=len(part)) as called:
                called.extend(sent := channel.send_batch(messages=part))
        except Exception as error:  # noqa: BLE001 - keep what earlier parts sent; this part is unknown
            logger.exception("provider %s raised while sending %d messages", provider_label(provider), len(part))
            channel.reset()
            reason = f"channel error: {type(error).__name__}: {error}"[:400]
            sent = [
                SendOutcome(delivery_id=m.delivery_id, failure=FailureKind.TRANSIENT, reason=reason, in_doubt=True)
                for m in part
            ]
        outcomes.extend(
            replace(outcome, provider_status=f"{provider.name}/{outcome.provider_status or 'accepted'}")
            for outcome in sent
        )
    if outcomes and all(o.failure is FailureKind.TRANSIENT for o in outcomes):
        raise ProviderDown(outcomes)  # counted by the breaker, and handled as failover
    return outcomes


def _wait_outcome(*, message: OutboundMessage, why: list[str], providers: list[Provider]) -> SendOutcome:
    """Nothing could try it: wait for a circuit to cool down or ops to resume a provider, with
    no retry spent."""
    wait = min((p.cooldown_seconds for p in providers), default=30)
    return SendOutcome(
        delivery_id=message.delivery_id,
        withheld=DeliveryStatus.DEFERRED,
        reason="no provider can take it now: " + "; ".join(why),
        until=timezone.now() + timedelta(seconds=wait),
    )


def _ordered(providers: list[Provider]) -> list[Provider]:
    """By position; within a position, a weighted random order (enabled ones first)."""
    ordered: list[Provider] = []
    for position in sorted({p.position for p in providers}):
        group = [p for p in providers if p.position == position]
        shuffled: list[Provider] = []
        while group:
            pick = random.choices(group, weights=[max(p.weight, 1) for p in group])[0]
            shuffled.append(pick)
            group.remove(pick)
        ordered.extend(shuffled)
    return ordered


# --- Circuit breakers -------------------------------------------------------------------


class _StateLog(pybreaker.CircuitBreakerListener):
    """Every change of a provider's circuit, in the log (and so in Sentry when it opens)."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        level = logging.WARNING if new_state.name == pybreaker.STATE_OPEN else logging.INFO
        before = old_state.name if old_state is not None else "new"
        logger.log(level, "circuit of provider %s: %s -> %s", cb.name, before, new_state.name)


def provider_label(provider: Provider) -> str:
    """The provider's name in logs: names are unique only within a tenant."""
    return provider.name if provider.tenant_id is None else f"{provider.name} (tenant {provider.tenant_id})"


def breaker_for(provider: Provider) -> pybreaker.CircuitBreaker:
    return _breaker(provider.pk, provider_label(provider), provider.failure_threshold, provider.cooldown_seconds)


@lru_cache(maxsize=256)
def _breaker(provider_id: int, label: str, failure_threshold: int, cooldown_seconds: int) -> pybreaker.CircuitBreaker:
    # Keyed by the provider's id: two tenants may each have a provider of the same name.
    storage = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_CLOSED, redis_client(), namespace=f"notify:provider:{provider_id}"
    )
    return pybreaker.CircuitBreaker(
        name=label,
        listeners=[_StateLog()],
        fail_max=failure_threshold,
        reset_timeout=cooldown_seconds,
        state_storage=storage,
        # The failure itself, not a CircuitBreakerError, when the failing send trips it: its
        # outcomes are needed for failover.
        throw_new_error_on_trip=False,
    )


def breaker_state(provider: Provider) -> str:
    """closed, open or half-open, as every worker sees it."""
    return str(breaker_for(provider).current_state)


def breaker_reset(provider: Provider) -> None:
    breaker_for(provider).close()


# --- Rate limits ------------------------------------------------------------------------

# KEYS[1]: the bucket. ARGV: rate per second, capacity, tokens wanted.
# Returns 0 when the tokens were taken, else the seconds to wait until they would be there.
# The time is Redis's own: with each worker's clock, a call that read its clock first but ran
# second would move the bucket's time back, and the interval between would refill twice.
_TAKE = """
local rate, capacity, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(bucket[1]) or capacity, tonumber(bucket[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= wanted then tokens = tokens - wanted else wait = (wanted - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
return tostring(wait)
"""


@lru_cache(maxsize=1)
def _take_script() -> Any:
    return redis_client().register_script(_TAKE)


def _capacity(provider: Provider) -> int:
    """How many messages the bucket holds when full: the burst, or a second's worth without
    one (0: no limit). So in any second at most rate + burst go out."""
    return (provider.burst or provider.rate_per_second) if provider.rate_per_second else 0


def _tokens_take(*, provider: Provider, count: int) -> bool:
    """Take `count` tokens (at most the capacity) from the provider's bucket, waiting for them
    if need be; False when that would take longer than RATE_WAIT_MAX_SECONDS."""
    if not provider.rate_per_second:
        return True
    deadline = time.monotonic() + RATE_WAIT_MAX_SECONDS
    take = _take_script()
    args = [provider.rate_per_second, _capacity(provider), count]
    while wait := float(take(keys=[f"notify:rate:{provider.pk}"], args=args)):
        if time.monotonic() + wait > deadline:
            return False
        metrics.rate_limit_wait_count(provider_name=provider.name, channel=provider.channel, seconds=wait)
        time.sleep(wait)
    return True
