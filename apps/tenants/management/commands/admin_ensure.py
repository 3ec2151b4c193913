from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.tenants.services import admin_user_ensure


class Command(BaseCommand):
    help = (
        "Create the admin login named by NOTIFY_ADMIN_USERNAME, NOTIFY_ADMIN_EMAIL and NOTIFY_ADMIN_PASSWORD "
        "unless that user exists (idempotent: safe on every deploy)."
    )

    def handle(self, *args, **options):  # type: ignore[no-untyped-def]
        missing = [
            name
            for name in ("NOTIFY_ADMIN_USERNAME", "NOTIFY_ADMIN_EMAIL", "NOTIFY_ADMIN_PASSWORD")
            if not getattr(settings, name)
        ]
        if missing:
            raise CommandError(f"Set {', '.join(missing)} in the environment to create the admin login.")
        try:
            created = admin_user_ensure(
                username=settings.NOTIFY_ADMIN_USERNAME,
                email=settings.NOTIFY_ADMIN_EMAIL,
                password=settings.NOTIFY_ADMIN_PASSWORD,
            )
        except ValidationError as error:
            raise CommandError(f"NOTIFY_ADMIN_PASSWORD: {' '.join(error.messages)}") from error
        username = settings.NOTIFY_ADMIN_USERNAME
        if created:
            self.stdout.write(f"admin login '{username}' created")
        else:
            self.stdout.write(f"admin login '{username}' exists; left unchanged (change its password in the admin)")
