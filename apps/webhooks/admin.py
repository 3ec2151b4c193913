"""Producers' webhook endpoints, their messages and every attempt, scoped to the staff user's
tenant; actions enable and disable endpoints and replay messages."""

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.deliveries.admin import ReadOnlyAdmin
from apps.tenants.admin_site import TenantScopedAdmin
from apps.webhooks.models import WebhookAttempt, WebhookEndpoint, WebhookMessage
from apps.webhooks.services import endpoints_disable, endpoints_enable, messages_replay, secret_generate


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(TenantScopedAdmin):
    list_display = ("url", "tenant", "enabled", "category", "created_at", "last_success_at", "disabled_reason")
    list_filter = ("enabled",)
    search_fields = ("url", "description")
    readonly_fields = ("disabled_reason", "last_success_at", "created_at")
    actions = ["enable", "disable"]

    def save_model(self, request: HttpRequest, obj: WebhookEndpoint, form: object, change: bool) -> None:
        self.tenant_enforce(request=request, obj=obj)
        if not change:
            obj.secret = secret_generate()
            self.message_user(request, f"The endpoint's signing secret, shown this once: {obj.secret}")
        super().save_model(request, obj, form, change)  # type: ignore[arg-type]

    @admin.action(description="Enable (close their circuits and send what waits)", permissions=["change"])
    def enable(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        self.message_user(request, f"Enabled {endpoints_enable(endpoints=list(queryset))} endpoint(s).")

    @admin.action(description="Disable (their messages wait)", permissions=["change"])
    def disable(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        count = endpoints_disable(endpoints=list(queryset), reason=f"disabled by {request.user}")
        self.message_user(request, f"Disabled {count} endpoint(s).")


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    fields = ("created_at", "webhook_id", "status_code", "duration_ms", "error", "response_excerpt")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("id",)

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(WebhookMessage)
class WebhookMessageAdmin(ReadOnlyAdmin):
    list_display = ("id", "event_type", "endpoint", "status", "attempt_count", "next_attempt_at", "last_error")
    list_filter = ("status", "event_type")
    search_fields = ("=id", "endpoint__url")
    date_hierarchy = "created_at"
    list_select_related = ("endpoint",)
    inlines = [WebhookAttemptInline]
    actions = ["replay"]

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("webhooks.replay_webhookmessage")

    @admin.action(description="Replay: send again from a fresh retry schedule", permissions=["replay"])
    def replay(self, request: HttpRequest, queryset: QuerySet[WebhookMessage]) -> None:
        self.message_user(request, f"Replaying {messages_replay(messages=queryset)} message(s).")
