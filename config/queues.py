"""The queue map: one queue per channel and priority, one dead-letter queue per channel,
and the worker groups that consume them.

Run `python -m config.queues GROUP` to print a group's queues for `celery worker -Q`.
Separate worker processes per group are what keeps critical work from waiting behind bulk
work; Redis message priorities are approximate, so we do not rely on them.
"""

import sys

CHANNELS: tuple[str, ...] = ("email", "sms", "push", "webpush", "inapp")
PRIORITIES: tuple[str, ...] = ("critical", "normal", "bulk")
MAINTENANCE_QUEUE = "maintenance"
# Bulk recipient imports: long tasks, so served with bulk sends, never ahead of the sweeper.
IMPORT_QUEUE = "recipients.import"
# Webhooks to producers: slow endpoints must not hold up the sweeper, so a group of their own.
WEBHOOK_QUEUE = "webhooks"


def delivery_queue(*, channel: str, priority: str) -> str:
    """The queue that carries send work for one channel and priority."""
    return f"{channel}.{priority}"


def dead_letter_queue(*, channel: str) -> str:
    """The queue that carries dead-letter notices for one channel."""
    return f"{channel}.dlq"


WORKER_GROUPS: dict[str, list[str]] = {
    "critical": [delivery_queue(channel=c, priority="critical") for c in CHANNELS],
    "normal": [delivery_queue(channel=c, priority="normal") for c in CHANNELS],
    "bulk": [delivery_queue(channel=c, priority="bulk") for c in CHANNELS] + [IMPORT_QUEUE],
    "maintenance": [MAINTENANCE_QUEUE] + [dead_letter_queue(channel=c) for c in CHANNELS],
    "webhooks": [WEBHOOK_QUEUE],
}

ALL_QUEUES: list[str] = [queue for queues in WORKER_GROUPS.values() for queue in queues]

if __name__ == "__main__":
    groups = sys.argv[1:] or ["all"]
    names: list[str] = []
    for group in groups:
        if group == "all":
            names.extend(ALL_QUEUES)
        elif group in WORKER_GROUPS:
            names.extend(WORKER_GROUPS[group])
        else:
            sys.exit(f"unknown worker group {group!r}; choose from: all, {', '.join(WORKER_GROUPS)}")
    print(",".join(names))
