from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from apps.tenants.models import ALL_SCOPES, Tenant, default_scopes
from apps.tenants.services import api_key_create


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


class Command(BaseCommand):
    help = "Create an API key for a tenant and print it once (only a digest is stored)."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--tenant", required=True, help="the tenant's slug")
        parser.add_argument("--name", required=True, help="what the key is for, e.g. 'billing service'")
        parser.add_argument(
            "--scopes",
            type=_names,
            help=f"comma-separated, from: {', '.join(ALL_SCOPES)} (default: {', '.join(default_scopes())})",
        )
        parser.add_argument(
            "--categories", type=_names, default=[], help="comma-separated category keys (default: every category)"
        )
        parser.add_argument("--expires-in-days", type=int, help="the key stops working after this many days")

    def handle(self, *args, **options):  # type: ignore[no-untyped-def]
        tenant = Tenant.objects.filter(slug=options["tenant"]).first()
        if tenant is None:
            valid = ", ".join(Tenant.objects.order_by("slug").values_list("slug", flat=True)) or "(none yet)"
            raise CommandError(f"Unknown tenant '{options['tenant']}'. Valid slugs: {valid}.")
        days = options["expires_in_days"]
        if days is not None and days < 1:
            raise CommandError("--expires-in-days takes a whole number of days, 1 or more.")
        try:
            key, raw_key = api_key_create(
                tenant=tenant,
                name=options["name"],
                scopes=options["scopes"],
                categories=options["categories"],
                expires_at=timezone.now() + timedelta(days=days) if days else None,
            )
        except ValidationError as error:
            problems = "; ".join(
                f"--{field.replace('_', '-')}: {' '.join(messages)}" for field, messages in error.message_dict.items()
            )
            raise CommandError(problems) from error
        self.stderr.write(
            f"Created '{key.name}' for {tenant.slug} with scopes {', '.join(key.scopes)}"
            + (f", limited to categories {', '.join(key.categories)}" if key.categories else "")
            + (f", expiring {key.expires_at:%Y-%m-%d %H:%M} UTC" if key.expires_at else "")
            + ". Copy the key now; it is not stored and will not be shown again:"
        )
        self.stdout.write(raw_key)
