from django.contrib import admin
from django.http import HttpRequest

from apps.recipients.models import Device, Recipient, Suppression, WebPushSubscription
from notify.policy.suppression import address_canonical


@admin.register(Recipient)
class RecipientAdmin(admin.ModelAdmin):
    list_display = ("external_id", "tenant", "email", "phone", "locale", "timezone", "updated_at")
    list_filter = ("tenant", "locale")
    search_fields = ("external_id", "email", "phone")
    readonly_fields = ("created_at", "updated_at")


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):
    list_display = ("address", "channel", "tenant", "reason", "source", "created_at")
    list_filter = ("tenant", "channel", "source")
    search_fields = ("address", "reason")
    readonly_fields = ("created_at",)

    def save_model(self, request: HttpRequest, obj: Suppression, form: object, change: bool) -> None:
        obj.address = address_canonical(channel=obj.channel, address=obj.address)
        if not obj.source:
            obj.source = f"admin:{request.user}"
        super().save_model(request, obj, form, change)


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = ("recipient", "platform", "app", "active", "deactivated_reason", "last_seen_at")
    list_filter = ("tenant", "platform", "active")
    search_fields = ("recipient__external_id", "token")
    readonly_fields = ("created_at", "last_seen_at")


@admin.register(WebPushSubscription)
class WebPushSubscriptionAdmin(admin.ModelAdmin):
    list_display = ("recipient", "endpoint", "active", "deactivated_reason", "updated_at")
    list_filter = ("tenant", "active")
    search_fields = ("recipient__external_id", "endpoint")
    readonly_fields = ("created_at", "updated_at")
