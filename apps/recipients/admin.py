from django.contrib import admin

from apps.recipients.models import Recipient, Suppression


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
