from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from apps.audiences.models import Broadcast, BroadcastState, Segment, Topic, TopicMembership
from apps.tenants.admin_site import TenantScopedAdmin
from notify.pipeline.audience import AudienceError, segment_filter_compile
from notify.pipeline.broadcast import (
    NotControllable,
    broadcast_cancel,
    broadcast_estimate,
    broadcast_pause,
    broadcast_resume,
)


class TopicMembershipInline(admin.TabularInline):
    """A recipient's topics, on its page."""

    model = TopicMembership
    fields = ("topic", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = True
    verbose_name = "topic"
    verbose_name_plural = "topics"

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Topic)
class TopicAdmin(TenantScopedAdmin):
    list_display = ("key", "name", "tenant", "created_at")
    list_filter = ("tenant",)
    search_fields = ("key", "name")
    readonly_fields = ("created_at", "updated_at")


class SegmentForm(forms.ModelForm):
    class Meta:
        model = Segment
        fields = ["tenant", "key", "name", "filter"]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("tenant") is not None and "filter" in cleaned:
            try:
                segment_filter_compile(tenant=cleaned["tenant"], filter=cleaned["filter"])
            except AudienceError as error:
                self.add_error("filter", f"{error.field}: {error.message}")
        return cleaned


@admin.register(Segment)
class SegmentAdmin(TenantScopedAdmin):
    form = SegmentForm
    list_display = ("key", "name", "tenant", "updated_at")
    list_filter = ("tenant",)
    search_fields = ("key", "name")


CONTROLS = {
    "pause": (broadcast_pause, (BroadcastState.SCHEDULED, BroadcastState.FANNING_OUT, BroadcastState.SENDING)),
    "resume": (broadcast_resume, (BroadcastState.PAUSED,)),
    "cancel": (
        broadcast_cancel,
        (BroadcastState.SCHEDULED, BroadcastState.FANNING_OUT, BroadcastState.SENDING, BroadcastState.PAUSED),
    ),
}


@admin.register(Broadcast)
class BroadcastAdmin(TenantScopedAdmin):
    list_display = ("created_at", "category", "tenant", "state", "progress", "counts_shown", "estimate", "controls")
    list_filter = ("state", "tenant")
    list_select_related = ("category", "tenant")
    ordering = ("-created_at",)
    readonly_fields = [f.name for f in Broadcast._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # broadcasts start from the API, with their checks

    @admin.display(description="progress")
    def progress(self, broadcast: Broadcast) -> str:
        total = broadcast.audience_count or 0
        counts = broadcast.counts or {}
        done = sum(counts.get(name, 0) for name in ("sent", "failed", "suppressed", "cancelled"))
        percent = round(100 * done / total) if total else (100 if broadcast.state == BroadcastState.COMPLETED else 0)
        return format_html(
            '<progress value="{}" max="{}" style="width: 10em">{}%</progress> {}% '
            '<span class="help">planned {} of {}</span>',
            done,
            total or 1,
            percent,
            percent,
            broadcast.planned_count,
            total if broadcast.audience_count is not None else "?",
        )

    @admin.display(description="counts")
    def counts_shown(self, broadcast: Broadcast) -> str:
        counts = broadcast.counts or {}
        names = ("sent", "delivered", "failed", "suppressed", "deferred", "cancelled")
        return format_html_join(", ", "{} {}", ((counts.get(name, 0), name) for name in names))

    @admin.display(description="estimated finish")
    def estimate(self, broadcast: Broadcast) -> str:
        moment = broadcast_estimate(broadcast=broadcast, now=timezone.now())
        return f"{moment:%Y-%m-%d %H:%M:%S}" if moment else "—"

    @admin.display(description="controls")
    def controls(self, broadcast: Broadcast) -> str:
        # The buttons submit the change list's own form (with its CSRF token) to each control's URL.
        return format_html_join(
            " ",
            '<button type="submit" class="button" formmethod="post" formaction="{}">{}</button>',
            (
                (reverse(f"admin:audiences_broadcast_{name}", args=[broadcast.pk]), name.capitalize())
                for name, (_, states) in CONTROLS.items()
                if broadcast.state in states
            ),
        )

    def has_control_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("audiences.control_broadcast")

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                f"<uuid:broadcast_id>/{name}/",
                self.admin_site.admin_view(self._control_view(name)),
                name=f"audiences_broadcast_{name}",
            )
            for name in CONTROLS
        ] + super().get_urls()

    def _control_view(self, name: str) -> Any:
        control = CONTROLS[name][0]

        def view(request: HttpRequest, broadcast_id: str) -> HttpResponse:
            if request.method != "POST":
                return HttpResponseNotAllowed(["POST"])
            # Only a broadcast of the staff user's own tenant, and with the control permission.
            broadcast = get_object_or_404(self.get_queryset(request), pk=broadcast_id)
            if not self.has_control_permission(request):
                raise PermissionDenied
            try:
                control(broadcast=broadcast)
            except NotControllable as error:
                self.message_user(request, str(error), level=messages.ERROR)
            else:
                self.message_user(request, f"Broadcast {broadcast.pk}: {name} done.")
            return HttpResponseRedirect(reverse("admin:audiences_broadcast_changelist"))

        return view
