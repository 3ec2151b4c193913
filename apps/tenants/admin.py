from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.postgres.forms import SimpleArrayField
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from apps.tenants.admin_site import TenantScopedAdmin
from apps.tenants.models import ApiKey, Scope, StaffMembership, Tenant, default_scopes
from apps.tenants.services import ROTATION_GRACE_DEFAULT, api_key_rotate
from notify.resilience.runaway import runaway_resume


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    fields = ("name", "lookup", "scopes", "categories", "expires_at", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return False  # keys are created on the API key page, which shows the secret once


@admin.register(Tenant)
class TenantAdmin(TenantScopedAdmin):
    """A tenant's staff see and edit their own tenant's settings; only superusers add or delete one."""

    tenant_path = "pk"
    list_display = ("name", "slug", "default_locale", "sending", "created_at")
    list_filter = (("runaway_paused_at", admin.EmptyFieldListFilter),)
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}
    readonly_fields = ("runaway_paused_at", "runaway_reason")
    inlines = [ApiKeyInline]
    actions = ["resume_runaway"]

    @admin.display(description="sending")
    def sending(self, tenant: Tenant) -> str:
        if tenant.runaway_paused_at is None:
            return "yes"
        return (
            f"normal and bulk paused by the runaway-send guard at {tenant.runaway_paused_at:%Y-%m-%d %H:%M} UTC: "
            f"{tenant.runaway_reason}"
        )

    def has_resume_runaway_tenant_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("tenants.resume_runaway_tenant")

    @admin.action(
        description="Resume tenants paused by the runaway-send guard (sends what they held)",
        permissions=["resume_runaway_tenant"],
    )
    def resume_runaway(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        paused = list(queryset.filter(runaway_paused_at__isnull=False).values_list("pk", flat=True))
        published = sum(runaway_resume(tenant_id=pk, actor=str(request.user)) for pk in paused)
        self.message_user(request, f"Resumed {len(paused)} tenant(s); {published} held deliveries published.")

    def has_add_permission(self, request: HttpRequest, *args: object) -> bool:
        return request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return request.user.is_superuser


class ApiKeyForm(forms.ModelForm):
    """Scopes as checkboxes, categories as comma-separated keys: what `apikey_create` takes."""

    scopes = forms.MultipleChoiceField(
        choices=Scope.choices, widget=forms.CheckboxSelectMultiple, initial=default_scopes
    )
    categories = SimpleArrayField(
        forms.SlugField(),
        required=False,
        help_text="Comma-separated category keys the key is limited to; empty: every category.",
    )

    class Meta:
        model = ApiKey
        fields = ("tenant", "name", "scopes", "categories", "expires_at", "rate_limit")


@admin.register(StaffMembership)
class StaffMembershipAdmin(admin.ModelAdmin):
    """Which tenant each staff user works for (superusers only: it declares no scope)."""

    list_display = ("user", "tenant", "created_at")
    list_filter = ("tenant",)
    search_fields = ("user__username", "user__email", "tenant__name")
    autocomplete_fields = ("user",)


@admin.register(ApiKey)
class ApiKeyAdmin(TenantScopedAdmin):
    form = ApiKeyForm
    list_display = ("name", "tenant", "lookup", "scopes", "expires_at", "created_at", "last_used_at", "revoked_at")
    list_filter = ("tenant", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("name", "lookup", "tenant__name")
    readonly_fields = ("lookup", "created_at", "last_used_at", "previous_expires_at", "revoked_at")
    actions = ["rotate", "rotate_without_grace", "revoke"]

    def save_model(self, request: HttpRequest, obj: ApiKey, form: object, change: bool) -> None:
        if not change:
            raw_key = obj.assign_secret()
            messages.warning(request, f"Copy this API key now; it is not stored and will not be shown again: {raw_key}")
        super().save_model(request, obj, form, change)

    def has_rotate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("tenants.rotate_apikey")

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("tenants.revoke_apikey")

    @admin.action(
        description=f"Rotate selected API keys (old secrets work {ROTATION_GRACE_DEFAULT.days} more day)",
        permissions=["rotate"],
    )
    def rotate(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        self._rotate(request, queryset, grace=ROTATION_GRACE_DEFAULT)

    @admin.action(description="Rotate selected API keys (old secrets stop now)", permissions=["rotate"])
    def rotate_without_grace(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        self._rotate(request, queryset, grace=timedelta(0))

    def _rotate(self, request: HttpRequest, queryset: QuerySet[ApiKey], *, grace: timedelta) -> None:
        for key in queryset.filter(revoked_at__isnull=True):
            raw_key = api_key_rotate(api_key=key, grace=grace)
            messages.warning(request, f"Copy the new key for '{key.name}' now; it will not be shown again: {raw_key}")

    @admin.action(description="Revoke selected API keys", permissions=["revoke"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {revoked} API key(s).")
