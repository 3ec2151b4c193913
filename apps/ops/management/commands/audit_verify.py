"""Walk the audit log's hash chains and report the first broken link (exit status 1)."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.ops.audit import audit_chain_verify, audit_chains
from apps.tenants.models import Tenant


class Command(BaseCommand):
    help = "Verify the audit log's hash chains: every tenant's and the installation's, or one tenant's."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", help="Only this tenant's chain (its slug).")

    def handle(self, *args: object, tenant: str | None, **options: object) -> None:
        try:
            chains = audit_chains(tenant_slug=tenant)
        except Tenant.DoesNotExist:
            raise CommandError(f"No tenant '{tenant}'.")
        for chain in chains:
            count, broken = audit_chain_verify(chain=chain)
            if broken is not None:
                raise CommandError(f"audit chain broken: {broken}")
            self.stdout.write(f"chain {chain}: {count} entries, intact")
