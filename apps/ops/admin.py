"""The canary's runs and the alerts, for superusers (installation-wide, no tenant); the audit
log and retention, scoped to the staff user's tenant."""

from django.contrib import admin
from django.http import HttpRequest

from apps.ops.models import AlertFiring, AlertRule, AuditEntry, CanaryRun, RetentionPolicy
from apps.tenants.admin_site import TenantScopedAdmin


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


@admin.register(AuditEntry)
class AuditEntryAdmin(TenantScopedAdmin):
    """The audit log, read-only: staff see their tenant's chain, superusers every chain."""

    list_display = ("created_at", "tenant", "actor_type", "actor_label", "action", "object_type", "object_id")
    list_filter = ("action", "object_type", "actor_type")
    search_fields = ("object_id", "actor_label")
    date_hierarchy = "created_at"
    list_select_related = ("tenant",)
    show_full_result_count = False  # the log grows without end; counting it on each page is a scan

    def has_add_permission(self, request: HttpRequest, *args: object) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(RetentionPolicy)
class RetentionPolicyAdmin(TenantScopedAdmin):
    list_display = ("tenant", "retention_days")
