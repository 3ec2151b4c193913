from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class TenantsConfig(AppConfig):
    name = "apps.tenants"
    label = "tenants"
    default = True


class NotifyAdminConfig(admin_apps.AdminConfig):
    """Django's admin on the control panel's site (apps/tenants/admin_site.py)."""

    default = False
    default_site = "apps.tenants.admin_site.NotifyAdminSite"

    def ready(self) -> None:
        super().ready()  # discovers every admin module
        from django.contrib import admin

        from apps.tenants.admin_site import admins_undeclared_restrict

        admins_undeclared_restrict(site=admin.site)
