from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from apps.audiences.admin import TopicMembershipInline
from apps.audiences.models import Topic
from apps.recipients.imports import ImportRefused, recipient_import_start
from apps.recipients.models import (
    Consent,
    Device,
    ImportFormat,
    ImportStatus,
    PreferenceSet,
    Recipient,
    RecipientImport,
    RecipientImportRefusal,
    Suppression,
    WebPushSubscription,
)
from apps.tenants.admin_site import TenantScopedAdmin, tenant_rows
from apps.tenants.models import Tenant
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
class RecipientAdmin(TenantScopedAdmin):
    list_display = ("external_id", "tenant", "email", "phone", "locale", "timezone", "updated_at")
    list_filter = ("tenant", "locale")
    search_fields = ("external_id", "email", "phone")
    readonly_fields = ("created_at", "updated_at")
    inlines = [PreferenceSetInline, ConsentInline, TopicMembershipInline]


@admin.register(Suppression)
class SuppressionAdmin(TenantScopedAdmin):
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
class DeviceAdmin(TenantScopedAdmin):
    list_display = ("recipient", "platform", "app", "active", "deactivated_reason", "last_seen_at")
    list_filter = ("tenant", "platform", "active")
    search_fields = ("recipient__external_id", "token")
    readonly_fields = ("created_at", "last_seen_at")


@admin.register(WebPushSubscription)
class WebPushSubscriptionAdmin(TenantScopedAdmin):
    list_display = ("recipient", "endpoint", "active", "deactivated_reason", "updated_at")
    list_filter = ("tenant", "active")
    search_fields = ("recipient__external_id", "endpoint")
    readonly_fields = ("created_at", "updated_at")


class RecipientImportForm(forms.Form):
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.order_by("name"))
    format = forms.ChoiceField(choices=ImportFormat.choices)
    file = forms.FileField(help_text="One recipient a line. A CSV file starts with a header naming the columns.")
    topic = forms.ModelChoiceField(
        queryset=Topic.objects.none(), required=False, help_text="Also subscribe every imported recipient to it."
    )

    def __init__(self, *args: Any, tenants: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["tenant"].queryset = tenants  # type: ignore[attr-defined]
        self.fields["topic"].queryset = Topic.objects.filter(tenant__in=tenants).select_related("tenant")  # type: ignore[attr-defined]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        topic, tenant = cleaned.get("topic"), cleaned.get("tenant")
        if topic is not None and tenant is not None and topic.tenant_id != tenant.pk:
            self.add_error("topic", "Choose a topic of the tenant the recipients go to.")
        return cleaned


class RecipientImportRefusalInline(admin.TabularInline):
    model = RecipientImportRefusal
    fields = ("line_number", "reason")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


def progress_bar(recipient_import: RecipientImport) -> str:
    """A <progress> element with the share processed, for the list and the detail page."""
    share = recipient_import.progress
    return format_html(
        '<progress value="{}" max="1" style="width: 12em">{}%</progress> {}%',
        f"{share:.4f}",
        f"{share * 100:.0f}",
        f"{share * 100:.0f}",
    )


@admin.register(RecipientImport)
class RecipientImportAdmin(TenantScopedAdmin):
    """Upload a file of recipients (the add page), then watch its progress on its page."""

    list_display = (
        "created_at",
        "tenant",
        "format",
        "status",
        "progress",
        "rows_total",
        "created",
        "updated",
        "refused",
        "source",
    )
    list_filter = ("status", "tenant")
    readonly_fields = (
        "id",
        "tenant",
        "format",
        "source",
        "status",
        "progress",
        "rows_total",
        "rows_processed",
        "created",
        "updated",
        "unchanged",
        "refused",
        "error",
        "created_at",
        "started_at",
        "finished_at",
    )
    fields = readonly_fields
    inlines = [RecipientImportRefusalInline]
    change_form_template = "admin/recipients/recipientimport/change_form.html"

    @admin.display(description="progress")
    def progress(self, obj: RecipientImport) -> str:
        return progress_bar(obj)

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: Any = None) -> HttpResponse:
        """The upload form; the file is streamed into staging as the import service reads it."""
        if not self.has_add_permission(request):
            return HttpResponse(status=403)
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        # A tenant's staff import into their own tenant only.
        tenants = tenant_rows(queryset=Tenant.objects.order_by("name"), user=request.user, tenant_path="pk")
        form = RecipientImportForm(tenants=tenants)
        if request.method == "POST":
            if length > settings.NOTIFY_IMPORT_MAX_BYTES:
                messages.error(
                    request, f"The file is over the import limit of {settings.NOTIFY_IMPORT_MAX_BYTES} bytes."
                )
            else:
                form = RecipientImportForm(request.POST, request.FILES, tenants=tenants)
                if form.is_valid():
                    try:
                        recipient_import = recipient_import_start(
                            tenant=form.cleaned_data["tenant"],
                            file_format=form.cleaned_data["format"],
                            stream=form.cleaned_data["file"].file,
                            source=f"staff {request.user}",
                            topic=form.cleaned_data["topic"],
                        )
                    except ImportRefused as error:
                        form.add_error("file", error.message)
                    else:
                        messages.success(request, f"Import of {recipient_import.rows_total} lines queued.")
                        return HttpResponseRedirect(
                            reverse("admin:recipients_recipientimport_change", args=[recipient_import.pk])
                        )
        context = {
            **self.admin_site.each_context(request),
            "title": "Import recipients",
            "opts": self.model._meta,
            "form": form,
            "max_bytes": settings.NOTIFY_IMPORT_MAX_BYTES,
        }
        return TemplateResponse(request, "admin/recipients/recipientimport/upload.html", context)

    def render_change_form(self, request: HttpRequest, context: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        obj = context.get("original")
        # The page reloads itself until the import is finished, moving its progress bar.
        context["import_unfinished"] = obj is not None and obj.status in (ImportStatus.QUEUED, ImportStatus.RUNNING)
        return super().render_change_form(request, context, *args, **kwargs)
