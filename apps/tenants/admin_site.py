"""The control panel's admin site: two-factor login, and what each staff user may reach.

Every ModelAdmin declares its scope by its base class. `TenantScopedAdmin` rows belong to a
tenant: staff see and change only their own tenant's (StaffMembership), superusers all; rows
with no tenant (the installation's providers and kill switches) are the superusers'. Any other
ModelAdmin (auth, celery beat, axes, django-otp, and whatever is added later without a scope)
is for superusers only, so that a forgotten declaration fails closed."""

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import RelatedOnlyFieldListFilter
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.admin.utils import get_fields_from_path
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import QuerySet
from django.forms import ModelChoiceField
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, path, reverse
from django.utils import timezone
from django_otp import login as otp_login
from django_otp import user_has_device
from django_otp.forms import OTPAuthenticationFormMixin

from apps.catalog.models import Category, TemplateVersion
from apps.catalog.services import PromoteError, template_variant_promote
from apps.tenants.models import Tenant
from apps.tenants.two_factor import (
    totp_device_confirm,
    totp_device_confirmed,
    totp_device_pending,
    totp_qr_svg,
    totp_secret,
    two_factor_enrolment_needed,
    two_factor_satisfied,
)


def staff_tenant(*, user: AbstractBaseUser | AnonymousUser) -> Tenant | None:
    """The tenant a staff user works for, or None (superusers need none)."""
    membership = getattr(user, "staff_membership", None)
    return membership.tenant if membership is not None else None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value or "")
    except ValueError:
        return None


def tenant_rows(*, queryset: QuerySet, user: AbstractBaseUser | AnonymousUser, tenant_path: str) -> QuerySet:
    """The rows of `queryset` this user may reach: all for superusers, none without a tenant."""
    if getattr(user, "is_superuser", False):
        return queryset
    tenant = staff_tenant(user=user)
    if tenant is None:
        return queryset.none()
    return queryset.filter(**{tenant_path: tenant.pk})


class AuditedActionsAdmin(admin.ModelAdmin):
    """Records each admin action run on rows in the audit log: actions change rows in bulk,
    which sends no model signals (deletions are recorded row by row by the signals)."""

    def response_action(
        self, request: HttpRequest, queryset: QuerySet, *args: Any, **kwargs: Any
    ) -> HttpResponse | None:
        from django.contrib.admin import helpers

        from apps.ops.audit import audit_admin_action

        actions = request.POST.getlist("action")
        index = request.POST.get("index", "0")
        action = actions[int(index)] if index.isdigit() and int(index) < len(actions) else ""
        if request.POST.get("select_across") != "1":
            queryset = queryset.filter(pk__in=request.POST.getlist(helpers.ACTION_CHECKBOX_NAME))
        selected = list(queryset) if action and action != "delete_selected" else []
        response = super().response_action(request, queryset, *args, **kwargs)
        if response is not None and selected and action in self.get_actions(request):
            audit_admin_action(request=request, action=action, objects=selected)
        return response


class TenantScopedAdmin(AuditedActionsAdmin):
    """Admin of tenant-owned rows. `tenant_path` leads from a row to its tenant's key."""

    tenant_path = "tenant"

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return tenant_rows(queryset=super().get_queryset(request), user=request.user, tenant_path=self.tenant_path)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return super().has_module_permission(request) and self._has_scope(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_view_permission(request, obj) and self._has_scope(request)

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return super().has_add_permission(request, *args) and self._has_scope(request)  # type: ignore[call-arg]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_change_permission(request, obj) and self._has_scope(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_delete_permission(request, obj) and self._has_scope(request)

    def _has_scope(self, request: HttpRequest) -> bool:
        return request.user.is_superuser or staff_tenant(user=request.user) is not None

    def formfield_for_foreignkey(  # type: ignore[override]
        self, db_field: models.ForeignKey, request: HttpRequest, **kwargs: Any
    ) -> ModelChoiceField | None:
        if not request.user.is_superuser:
            kwargs["queryset"] = related_choices(site=self.admin_site, model=db_field.related_model, request=request)
            if db_field.related_model is Tenant:
                # The tenant is the staff user's own: shown, never taken from the request.
                tenant = staff_tenant(user=request.user)
                kwargs.update(disabled=True, initial=tenant.pk if tenant else None)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_list_filter(self, request: HttpRequest) -> Any:
        filters = super().get_list_filter(request)
        if request.user.is_superuser:
            return filters
        # A related filter lists every row of the related model; offer only the staff's own.
        scoped: list[Any] = []
        for item in filters:
            if isinstance(item, str):
                field = get_fields_from_path(self.model, item)[-1]
                if field.is_relation:
                    if field.related_model is Tenant:
                        continue  # one tenant: nothing to filter by
                    item = (item, RelatedOnlyFieldListFilter)
            scoped.append(item)
        return scoped

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        self.tenant_enforce(request=request, obj=obj)
        super().save_model(request, obj, form, change)

    def tenant_enforce(self, *, request: HttpRequest, obj: Any) -> None:
        """A staff user's row belongs to their own tenant, whatever the form said."""
        if not request.user.is_superuser and any(f.name == "tenant" for f in obj._meta.concrete_fields):
            obj.tenant = staff_tenant(user=request.user)


def related_choices(*, site: admin.AdminSite, model: type[models.Model], request: HttpRequest) -> QuerySet:
    """The rows of a related model a non-superuser may pick: what its admin lets them reach."""
    related_admin = site._registry.get(model)
    if isinstance(related_admin, TenantScopedAdmin):
        return related_admin.get_queryset(request)
    return model._default_manager.none()


class SuperuserOnlyAdmin(AuditedActionsAdmin):
    """Admin that only superusers may use; see admins_undeclared_restrict."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser and super().has_module_permission(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser and super().has_view_permission(request, obj)

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return request.user.is_superuser and super().has_add_permission(request, *args)  # type: ignore[call-arg]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser and super().has_delete_permission(request, obj)


def admins_undeclared_restrict(*, site: admin.AdminSite) -> None:
    """Make every registered ModelAdmin that declares no scope superuser-only."""
    for model, model_admin in list(site._registry.items()):
        if isinstance(model_admin, TenantScopedAdmin | SuperuserOnlyAdmin):
            continue
        restricted = type(f"SuperuserOnly{type(model_admin).__name__}", (SuperuserOnlyAdmin, type(model_admin)), {})
        site._registry[model] = restricted(model, site)


class StaffLoginForm(AdminAuthenticationForm, OTPAuthenticationFormMixin):
    """The admin login: password, then the TOTP code when the user has enrolled a device."""

    otp_token = forms.CharField(
        required=False,
        label="Two-factor code",
        help_text="The six digits from your authenticator app, if you have enrolled one.",
        widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}),
    )

    def clean(self) -> dict[str, Any]:
        super().clean()
        user = self.get_user()
        device = totp_device_confirmed(user=user) if user is not None else None
        if device is not None:
            # Staff have one TOTP device (enrolment adds no second), so the form asks for no choice.
            self.cleaned_data["otp_device"] = device.persistent_id
            self.clean_otp(user)
        return self.cleaned_data


class TwoFactorEnrolForm(forms.Form):
    token = forms.CharField(label="Code from the app", max_length=12)


class NotifyAdminSite(admin.AdminSite):
    """The admin with two-factor login (NOTIFY_ADMIN_2FA) and a TOTP enrolment page."""

    login_form = StaffLoginForm
    login_template = "admin/notify_login.html"

    def has_permission(self, request: HttpRequest) -> bool:
        return super().has_permission(request) and two_factor_satisfied(user=request.user)

    def login(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        if request.method == "GET" and two_factor_enrolment_needed(user=request.user):
            return HttpResponseRedirect(reverse("admin:two_factor_enrol", current_app=self.name))
        return super().login(request, extra_context)

    def index(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> TemplateResponse:
        """The home page: the dashboard (apps/ops/dashboard.py) over the app list."""
        from apps.ops.dashboard import dashboard_build, period_parse  # the ops app imports this module

        context = dict(extra_context or {})
        user = request.user
        tenant = staff_tenant(user=user)
        if user.is_superuser or tenant is not None:
            period = period_parse(value=request.GET.get("period"))
            context["dashboard"] = dashboard_build(
                tenant_id=None if user.is_superuser else tenant.pk,  # type: ignore[union-attr]
                period=period,
            )
            context["periods"] = ("hour", "day", "week")
        return super().index(request, context)

    def get_urls(self) -> list[URLResolver | URLPattern]:
        return [
            path("two-factor/", self.two_factor_enrol_view, name="two_factor_enrol"),
            path("analytics/", self.admin_view(self.analytics_view), name="analytics"),
            path("analytics/variants/", self.admin_view(self.variants_view), name="analytics_variants"),
            *super().get_urls(),
        ]

    def analytics_view(self, request: HttpRequest) -> HttpResponse:
        """Engagement rates per channel, category and template version over the last N days."""
        from apps.ops.dashboard import engagement_rates  # the ops app imports this module

        user = request.user
        tenant = staff_tenant(user=user)
        if not (user.is_superuser or tenant is not None):
            return HttpResponseRedirect(reverse("admin:index", current_app=self.name))
        try:
            days = min(max(int(request.GET.get("days", "7")), 1), 92)
        except ValueError:
            days = 7
        until = timezone.now()
        since = (until - timedelta(days=days)).replace(minute=0, second=0, microsecond=0)
        rows = engagement_rates(
            tenant_id=None if user.is_superuser else tenant.pk,  # type: ignore[union-attr]
            since=since,
            until=until,
            group_by=["category", "channel", "template_version", "variant"],
        )
        categories = dict(
            tenant_rows(queryset=Category.objects.all(), user=user, tenant_path="tenant").values_list("id", "key")
        )
        context = {
            **self.each_context(request),
            "title": "Engagement analytics",
            "days": days,
            "rows": [{**row, "category": categories.get(row["category"], row["category"])} for row in rows],
        }
        return TemplateResponse(request, "admin/analytics.html", context)

    def variants_view(self, request: HttpRequest) -> HttpResponse:
        """A template version's A/B variants on one channel side by side, and a button that
        promotes one of them (a new version with only its content on the channel)."""
        from apps.ops.experiments import METRICS, variants_compare  # the ops app imports this module

        user = request.user
        versions = tenant_rows(
            queryset=TemplateVersion.objects.select_related("template"), user=user, tenant_path="template__tenant"
        )
        version = versions.filter(pk=_int_or_none(request.GET.get("version"))).first()
        channel = request.GET.get("channel", "")
        if version is None or not version.variants.filter(channel=channel).exists():
            messages.error(request, "Choose a template version and one of its channels to compare.")
            return HttpResponseRedirect(reverse("admin:catalog_templateversion_changelist", current_app=self.name))
        if request.method == "POST":
            if not user.has_perm("catalog.add_templateversion"):
                raise PermissionDenied
            try:
                promoted = template_variant_promote(
                    version=version, channel=channel, key=request.POST.get("promote", "")
                )
            except PromoteError as error:
                messages.error(request, error.message)
            else:
                messages.success(request, f"{promoted} is published: {promoted.note}.")
                return HttpResponseRedirect(
                    reverse("admin:catalog_templateversion_change", args=[promoted.pk], current_app=self.name)
                )
        metric = request.GET.get("metric", "")
        metric = metric if metric in METRICS else METRICS[0]
        days = min(max(_int_or_none(request.GET.get("days")) or 30, 1), 92)
        until = timezone.now()
        since = (until - timedelta(days=days)).replace(minute=0, second=0, microsecond=0)
        context = {
            **self.each_context(request),
            "title": f"A/B variants of {version} on {channel}",
            "version": version,
            "channel": channel,
            "metric": metric,
            "metrics": METRICS,
            "days": days,
            "can_promote": user.has_perm("catalog.add_templateversion"),
            "variants": variants_compare(
                tenant_id=version.template.tenant_id,
                template_version_id=version.pk,
                channel=channel,
                metric=metric,
                since=since,
                until=until,
            ),
        }
        return TemplateResponse(request, "admin/analytics_variants.html", context)

    def two_factor_enrol_view(self, request: HttpRequest) -> HttpResponse:
        """Enrol a TOTP device: show its key, confirm it with a code, and verify this session."""
        user = request.user
        if not (user.is_active and user.is_staff):
            return redirect_to_login(request.get_full_path(), reverse("admin:login", current_app=self.name))
        if user_has_device(user, confirmed=True):
            # A second device would let a password alone replace the first: not from here.
            return HttpResponseRedirect(reverse("admin:index", current_app=self.name))
        device = totp_device_pending(user=user)  # type: ignore[arg-type]
        form = TwoFactorEnrolForm(request.POST or None)
        if form.is_valid():
            if totp_device_confirm(device=device, token=form.cleaned_data["token"]):
                otp_login(request, device)
                return HttpResponseRedirect(reverse("admin:index", current_app=self.name))
            form.add_error("token", "That code is not right; check the app's clock and try the next one.")
        context = {
            **self.each_context(request),
            "title": "Two-factor login",
            "form": form,
            "otpauth_uri": device.config_url,
            "secret": totp_secret(device=device),
            "qr_svg": totp_qr_svg(device=device),
        }
        return TemplateResponse(request, "admin/two_factor_enrol.html", context)
