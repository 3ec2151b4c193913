from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.tenants.demo import demo_workspace_ensure


class Command(BaseCommand):
    help = "Create the demo workspace, API key and admin login (idempotent)."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--admin-username", default="admin")
        parser.add_argument("--admin-password", default="admin")
        parser.add_argument("--webpush-endpoint", default="", help="subscribe the demo recipient at this push service")

    def handle(self, *args, **options):  # type: ignore[no-untyped-def]
        if not settings.DEBUG:
            raise CommandError("demo_setup makes a published admin login and API key: run it with DJANGO_DEBUG=1 only.")
        if not settings.NOTIFY_DEMO_API_KEY:
            raise CommandError("Set NOTIFY_DEMO_API_KEY (format ntf_<lookup>_<secret>) to create the demo key.")
        demo_workspace_ensure(
            api_key=settings.NOTIFY_DEMO_API_KEY,
            admin_username=options["admin_username"],
            admin_password=options["admin_password"],
            webpush_endpoint=options["webpush_endpoint"],
        )
        self.stdout.write("demo workspace ready")
