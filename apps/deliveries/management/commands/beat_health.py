"""Exit 0 when beat ticked recently, 1 otherwise: a container healthcheck for beat."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.beat import beat_heartbeat_age_seconds


class Command(BaseCommand):
    help = "Check that celery beat's heartbeat is recent (exit status 0) or not (1)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--max-age-seconds", type=float, default=60.0, help="How old the heartbeat may be (default 60)."
        )

    def handle(self, *args: object, max_age_seconds: float, **options: object) -> None:
        age = beat_heartbeat_age_seconds()
        if age is None:
            raise CommandError("beat has no heartbeat: it is not running, or cannot reach NOTIFY_REDIS_URL's Redis")
        if age > max_age_seconds:
            raise CommandError(
                f"beat's heartbeat is {age:.0f} s old (more than {max_age_seconds:.0f} s): beat is stuck"
            )
        self.stdout.write(f"beat ticked {age:.1f} s ago")
