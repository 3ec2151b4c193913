"""The canary's runs, for superusers (installation-wide, no tenant)."""

from django.contrib import admin
from django.http import HttpRequest

from apps.ops.models import CanaryRun


@admin.register(CanaryRun)
class CanaryRunAdmin(admin.ModelAdmin):
    list_display = ("started_at", "channel", "state", "success_state", "sent_seconds", "delivered_seconds", "reason")
    list_filter = ("channel", "state")
    date_hierarchy = "started_at"

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
