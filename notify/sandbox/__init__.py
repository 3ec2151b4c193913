"""Loopback imitations of the providers (Postmark, Twilio, FCM, a web push service), which the
tests, the demo and the benchmarks send to.

The sandbox is never kinder than the real provider. Where the real API accepts a repeated
message, so does the sandbox, and it counts the repeat as a duplicate; where a provider offers
idempotency, the imitation honours it only as that provider documents it (none of these four
does). A guarantee that holds only against the sandbox is no guarantee."""
