from django.contrib import admin
from django.http import HttpRequest

from apps.audiences.admin import TopicMembershipInline
from apps.recipients.models import Consent, Device, PreferenceSet, Recipient, Suppression, WebPushSubscription
from notify.policy.suppression import address_canonical


class PreferenceSetInline(admin.StackedInline):
    model = PreferenceSet
    can_delete = False
    readonly_fields = ("updated_at",)


class ConsentInline(admin.TabularInline):
    """The consent record is evidence: shown, never edited (the API and the preference
    center add to it)."""

    model = Consent
    fields = ("channel", "granted", "source", "recorded_at")
    readonly_fields = fields
    ordering = ("-recorded_at",)
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Recipient)
class RecipientAdmin(admin.ModelAdmin):
    list_display = ("external_id", "tenant", "email", "phone", "locale", "timezone", "updated_at")
    list_filter = ("tenant", "locale")
    search_fields = ("external_id", "email", "phone")
    readonly_fields = ("created_at", "updated_at")
    inlines = [PreferenceSetInline, ConsentInline, TopicMembershipInline]


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
