from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from apps.tenants.admin_site import TenantScopedAdmin
from apps.tenants.models import ApiKey, StaffMembership, Tenant


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    fields = ("name", "lookup", "rate_limit", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("lookup", "created_at", "last_used_at", "revoked_at")
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return False  # keys are created on the API key page, which shows the secret once


@admin.register(Tenant)
class TenantAdmin(TenantScopedAdmin):
    """A tenant's staff see and edit their own tenant's settings; only superusers add or delete one."""

    tenant_path = "pk"
    list_display = ("name", "slug", "default_locale", "created_at")
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [ApiKeyInline]

    def has_add_permission(self, request: HttpRequest, *args: object) -> bool:
        return request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return request.user.is_superuser


@admin.register(StaffMembership)
class StaffMembershipAdmin(admin.ModelAdmin):
    """Which tenant each staff user works for (superusers only: it declares no scope)."""

    list_display = ("user", "tenant", "created_at")
    list_filter = ("tenant",)
    search_fields = ("user__username", "user__email", "tenant__name")
    autocomplete_fields = ("user",)


@admin.register(ApiKey)
class ApiKeyAdmin(TenantScopedAdmin):
    list_display = ("name", "tenant", "lookup", "created_at", "last_used_at", "revoked_at")
    list_filter = ("tenant", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("name", "lookup", "tenant__name")
    readonly_fields = ("lookup", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke"]

    def save_model(self, request: HttpRequest, obj: ApiKey, form: object, change: bool) -> None:
        if not change:
            raw_key = obj.assign_secret()
            messages.warning(request, f"Copy this API key now; it is not stored and will not be shown again: {raw_key}")
        super().save_model(request, obj, form, change)

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("tenants.revoke_apikey")

    @admin.action(description="Revoke selected API keys", permissions=["revoke"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {revoked} API key(s).")
