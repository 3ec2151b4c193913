"""The canary's runs and the alerts, for superusers (installation-wide, no tenant)."""

from django.contrib import admin
from django.http import HttpRequest

from apps.ops.models import AlertFiring, AlertRule, CanaryRun


class RecordAdmin(admin.ModelAdmin):
    """Rows the engine writes; the admin only reads them."""

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(CanaryRun)
class CanaryRunAdmin(RecordAdmin):
    list_display = ("started_at", "channel", "state", "success_state", "sent_seconds", "delivered_seconds", "reason")
    list_filter = ("channel", "state")
    date_hierarchy = "started_at"


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "enabled", "channel", "per_provider", "window_seconds", "threshold", "min_attempts")
    list_editable = ("enabled",)
    list_filter = ("kind", "enabled")


@admin.register(AlertFiring)
class AlertFiringAdmin(RecordAdmin):
    list_display = ("first_fired_at", "rule", "subject", "value", "notices", "last_notified_at", "resolved_at")
    list_filter = ("rule", ("resolved_at", admin.EmptyFieldListFilter))
    date_hierarchy = "first_fired_at"
    list_select_related = ("rule",)
