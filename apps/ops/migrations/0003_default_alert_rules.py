"""The alert rules an installation starts with; operators tune or disable them in the admin."""

from typing import Any

from django.db import migrations

DEFAULT_RULES: list[dict[str, Any]] = [
    {
        "name": "channel-failure-rate",
        "kind": "failure_rate",
        "window_seconds": 300,
        "threshold": 0.2,
        "min_attempts": 20,
        "description": "More than 20% of a channel's send attempts failed in 5 minutes (at least 20 attempts).",
    },
    {
        "name": "provider-failure-rate",
        "kind": "failure_rate",
        "per_provider": True,
        "window_seconds": 300,
        "threshold": 0.2,
        "min_attempts": 20,
        "description": "More than 20% of a provider account's send attempts failed in 5 minutes.",
    },
    {
        "name": "dead-letters",
        "kind": "dead_letters",
        "window_seconds": 900,
        "threshold": 10,
        "description": "More than 10 new dead letters on a channel in 15 minutes.",
    },
    {
        "name": "queue-age",
        "kind": "queue_age",
        "window_seconds": 900,
        "threshold": 300,
        "description": "The oldest due delivery has waited more than 5 minutes to be sent.",
    },
    {
        "name": "circuit-open",
        "kind": "circuit_open",
        "window_seconds": 900,
        "description": "A provider's circuit breaker is open.",
    },
    {
        "name": "canary-failing",
        "kind": "canary_failing",
        "window_seconds": 900,
        "description": "A channel's latest canary run failed or missed its deadline.",
    },
    {
        "name": "runaway-guard",
        "kind": "runaway_guard",
        "window_seconds": 3600,
        "description": "The runaway-send guard paused a tenant's normal and bulk sends.",
    },
]


def rules_create(apps: Any, schema_editor: Any) -> None:
    AlertRule = apps.get_model("ops", "AlertRule")
    for rule in DEFAULT_RULES:
        AlertRule.objects.get_or_create(name=rule["name"], defaults=rule)


def rules_delete(apps: Any, schema_editor: Any) -> None:
    apps.get_model("ops", "AlertRule").objects.filter(name__in=[rule["name"] for rule in DEFAULT_RULES]).delete()


class Migration(migrations.Migration):
    dependencies = [("ops", "0002_alert_rules_and_firings")]

    operations = [migrations.RunPython(rules_create, rules_delete)]
