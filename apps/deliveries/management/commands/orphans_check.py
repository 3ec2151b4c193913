"""Count the rows whose unchecked key (into the partitioned tables, out of a notification, a
reached row's broadcast) names no row (exit status 1 if any)."""

from django.core.management.base import BaseCommand, CommandError

from apps.deliveries.partitions import orphans_count


class Command(BaseCommand):
    help = (
        "Check the foreign keys that PostgreSQL does not check (into notifications and deliveries, a "
        "notification's tenant, category and template version, a broadcast's reached rows): "
        "every row they name exists (exit status 0) or not (1). Reads each table whole."
    )

    def handle(self, *args: object, **options: object) -> None:
        counts = orphans_count()
        for key, count in counts.items():
            self.stdout.write(f"{key}: {count} orphan{'s' if count != 1 else ''}")
        orphans = {key: count for key, count in counts.items() if count}
        if orphans:
            listed = ", ".join(f"{key} ({count})" for key, count in orphans.items())
            raise CommandError(
                f"rows name a notification or delivery that does not exist: {listed}. These keys are kept by "
                "the code, not the database (docs/architecture.md, 'Partitioned tables'): report it as a bug."
            )
