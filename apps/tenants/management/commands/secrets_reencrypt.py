from django.core.management.base import BaseCommand

from apps.tenants.encryption import secrets_reencrypt


class Command(BaseCommand):
    help = (
        "Re-encrypt every secret and sealed content stored in the database under the newest key in "
        "NOTIFY_ENCRYPTION_KEYS, in batches; then the older keys can be dropped."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--batch-size", type=int, default=500, help="rows a transaction (default 500)")

    def handle(self, *args, **options):  # type: ignore[no-untyped-def]
        counts = secrets_reencrypt(batch_size=max(1, options["batch_size"]))
        for count in counts:
            self.stdout.write(f"{count.column}: {count.encrypted} encrypted, {count.moved} moved to the newest key")
        self.stdout.write(f"Done: {sum(c.moved for c in counts)} value(s) re-encrypted.")
