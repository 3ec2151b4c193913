from collections import defaultdict
from typing import Any

from django.contrib import admin
from django.core.exceptions import ValidationError
from django.forms import ModelForm
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html_join

from apps.catalog.models import Category, Template, TemplateVariant, TemplateVersion
from apps.catalog.services import template_version_number_next
from apps.tenants.admin_site import TenantScopedAdmin


@admin.register(Category)
class CategoryAdmin(TenantScopedAdmin):
    list_display = ("key", "tenant", "kind", "default_priority", "default_channels", "template")
    list_filter = ("tenant", "kind", "default_priority", "ordered")
    search_fields = ("key", "description")
    list_select_related = ("tenant", "template")

    def get_form(
        self, request: HttpRequest, obj: Category | None = None, change: bool = False, **kwargs: Any
    ) -> type[ModelForm]:
        """Only the category's own tenant's templates to choose from (Category.clean refuses
        another tenant's on a new category too)."""
        form = super().get_form(request, obj, change=change, **kwargs)
        if obj is not None and "template" in form.base_fields:
            form.base_fields["template"].queryset = Template.objects.filter(tenant_id=obj.tenant_id)  # type: ignore[attr-defined]
        return form


class TemplateVersionInline(admin.TabularInline):
    model = TemplateVersion
    extra = 0
    fields = ("number", "note", "created_at")
    readonly_fields = fields
    show_change_link = True
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Template | None = None) -> bool:
        return False


@admin.register(Template)
class TemplateAdmin(TenantScopedAdmin):
    list_display = ("key", "name", "tenant")
    list_filter = ("tenant",)
    search_fields = ("key", "name")
    inlines = [TemplateVersionInline]


class TemplateVariantFormSet(BaseInlineFormSet):
    def clean(self) -> None:
        """An A/B test names each of its variants: several variants of one channel and locale
        must each have a key, or the control could not be told from content outside a test."""
        super().clean()
        per_place: dict[tuple[str, str], list[str]] = defaultdict(list)
        for form in self.forms:
            data = getattr(form, "cleaned_data", None)
            if data and not data.get("DELETE"):
                per_place[(data.get("channel", ""), data.get("locale", ""))].append(data.get("key", ""))
        for (channel, locale), keys in per_place.items():
            if len(keys) > 1 and "" in keys:
                raise ValidationError(
                    f"{channel}/{locale or 'default'} has {len(keys)} variants: give each a key (e.g. a, b)."
                )


class TemplateVariantInline(admin.StackedInline):
    model = TemplateVariant
    formset = TemplateVariantFormSet
    extra = 0
    fields = ("channel", "locale", "key", "weight", "subject", "title", "body", "html", "link", "data")


@admin.register(TemplateVersion)
class TemplateVersionAdmin(TenantScopedAdmin):
    """Versions are immutable. Saving an existing version saves a new version with the
    edited content, so every notification keeps the exact content it was rendered with."""

    tenant_path = "template__tenant"
    list_display = ("template", "number", "note", "created_at")
    list_filter = ("template__tenant", "template")
    search_fields = ("template__key", "note")
    readonly_fields = ("number", "created_at", "ab_tests")
    inlines = [TemplateVariantInline]

    @admin.display(description="A/B tests")
    def ab_tests(self, obj: TemplateVersion) -> str:
        """A link to each channel's comparison, where the version tests variants."""
        channels = sorted(
            {channel for channel, key in obj.variants.values_list("channel", "key") if key} if obj.pk else set()
        )
        if not channels:
            return "None: give a channel's variants keys and weights to test them."
        return format_html_join(
            " · ",
            '<a href="{}?version={}&amp;channel={}">Compare the {} variants</a>',
            ((reverse("admin:analytics_variants"), obj.pk, channel, channel) for channel in channels),
        )

    def changeform_view(  # type: ignore[override]
        self, request: HttpRequest, object_id: str | None = None, form_url: str = "", extra_context: dict | None = None
    ) -> HttpResponse:
        if request.method == "POST" and object_id is not None:
            post = request.POST.copy()
            post["_saveasnew"] = "Save as new version"
            request.POST = post  # type: ignore[assignment]
        extra_context = {**(extra_context or {}), "show_save_and_add_another": False}
        if object_id is not None:
            extra_context["subtitle"] = "Saving creates a new version; this one stays as it is."
        return super().changeform_view(request, object_id, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: TemplateVersion, form: object, change: bool) -> None:
        # The admin saves in a transaction, which holds the template's lock until it commits.
        obj.number = template_version_number_next(template_id=obj.template_id)
        super().save_model(request, obj, form, change)

    def has_delete_permission(self, request: HttpRequest, obj: TemplateVersion | None = None) -> bool:
        return False
