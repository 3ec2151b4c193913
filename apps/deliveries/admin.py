from django import forms
from django.contrib import admin
from django.db.models import Prefetch, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from apps.catalog.models import Channel
from apps.deliveries.models import (
    ChannelSwitch,
    DeadLetter,
    Delivery,
    DeliveryEvent,
    Digest,
    Event,
    Notification,
    Provider,
    RecurringSend,
)
from apps.tenants.admin_site import TenantScopedAdmin
from config.queues import PRIORITIES
from notify.pipeline.control import (
    NotCancellable,
    channel_pause,
    channel_resume,
    dead_letters_replay,
    notification_cancel,
)
from notify.pipeline.dispatch import queue_depths
from notify.pipeline.recurring import recurring_send_delete, recurring_send_save
from notify.resilience.providers import breaker_reset, breaker_state


class ReadOnlyAdmin(TenantScopedAdmin):
    """Delivery records are written by the engine only; the admin reads them and acts
    through the engine's entry points."""

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


def history_table(deliveries: QuerySet[Delivery] | list[Delivery]) -> str:
    rows = []
    for delivery in deliveries:
        for event in delivery.events.all():
            rows.append(
                (
                    event.created_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                    delivery.channel,
                    event.status,
                    event.attempt,
                    event.reason,
                )
            )
    if not rows:
        return "—"
    body = format_html_join("", "<tr><td>{}</td><td>{}</td><td><b>{}</b></td><td>{}</td><td>{}</td></tr>", rows)
    return format_html(
        "<table><thead><tr><th>At (UTC)</th><th>Channel</th><th>Status</th><th>Attempt</th><th>Why</th>"
        "</tr></thead><tbody>{}</tbody></table>",
        body,
    )


@admin.register(ChannelSwitch)
class ChannelSwitchAdmin(TenantScopedAdmin):
    """Every channel's kill switch for the installation (one row each, always listed; superusers
    only) and any tenant's own (add one to pause a channel for one tenant), with what waits on
    the broker. Switching one, by action or on its page, takes the pause permission."""

    list_display = ("channel", "scope", "paused", "reason", "broker_backlog", "updated_at")
    list_filter = ("paused", "channel", ("tenant", admin.EmptyFieldListFilter))
    list_select_related = ("tenant",)
    fields = ("tenant", "channel", "paused", "reason")
    actions = ["pause", "resume"]

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):  # type: ignore[no-untyped-def]
        for channel in Channel.values:  # one installation row per channel, so that each can be switched
            ChannelSwitch.objects.get_or_create(tenant=None, channel=channel)
        self._depths = queue_depths()
        return super().changelist_view(request, extra_context)

    def get_readonly_fields(self, request: HttpRequest, obj: ChannelSwitch | None = None) -> tuple[str, ...]:
        return ("tenant", "channel") if obj is not None else ()

    @admin.display(description="for")
    def scope(self, switch: ChannelSwitch) -> str:
        return str(switch.tenant) if switch.tenant_id else "the installation"

    @admin.display(description="task messages waiting (critical / normal / bulk)")
    def broker_backlog(self, switch: ChannelSwitch) -> str:
        depths = getattr(self, "_depths", {})
        return " / ".join(str(depths.get((switch.channel, priority), "?")) for priority in PRIORITIES)

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return super().has_change_permission(request, obj) and self.has_pause_permission(request)

    def has_pause_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("deliveries.pause_channelswitch")

    def save_model(self, request: HttpRequest, obj: ChannelSwitch, form: object, change: bool) -> None:
        self.tenant_enforce(request=request, obj=obj)
        if obj.paused:
            saved = channel_pause(
                channel=obj.channel, tenant=obj.tenant, reason=obj.reason or f"paused by {request.user}"
            )
        else:
            channel_resume(channel=obj.channel, tenant=obj.tenant)
            saved = ChannelSwitch.objects.get(tenant=obj.tenant, channel=obj.channel)
        obj.pk = saved.pk  # for the admin's log and redirect

    @admin.action(description="Pause: hold every delivery these switches cover", permissions=["pause"])
    def pause(self, request: HttpRequest, queryset: QuerySet[ChannelSwitch]) -> None:
        for switch in queryset.select_related("tenant"):
            channel_pause(channel=switch.channel, tenant=switch.tenant, reason=f"paused by {request.user}")
        self.message_user(request, f"Paused {queryset.count()} switch(es); their deliveries wait.")

    @admin.action(description="Resume: send everything they held back", permissions=["pause"])
    def resume(self, request: HttpRequest, queryset: QuerySet[ChannelSwitch]) -> None:
        published = sum(
            channel_resume(channel=switch.channel, tenant=switch.tenant) for switch in queryset.select_related("tenant")
        )
        self.message_user(request, f"Resumed; {published} waiting deliveries published.")


class SecretsWidget(forms.Textarea):
    """Write-only: renders empty whatever is stored, so a saved credential never reaches a page."""

    def format_value(self, value: object) -> None:
        return None


class ProviderForm(forms.ModelForm):
    """The config's credentials (Provider.SECRET_KEYS) are written here and never shown again:
    a blank `secrets` keeps the stored ones, a JSON object replaces them."""

    secrets = forms.JSONField(
        required=False,
        widget=SecretsWidget(attrs={"rows": 3, "autocomplete": "off"}),
        help_text='Credentials, e.g. {"server_token": "..."}; blank keeps the stored ones, {} removes them.',
    )

    class Meta:
        model = Provider
        fields = "__all__"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        stored = self.instance.config_secrets() if self.instance.pk else {}
        self.initial["config"] = self.instance.config_public() if self.instance.pk else {}
        self.fields["secrets"].help_text = (f"Set: {', '.join(sorted(stored))}. " if stored else "None set. ") + str(
            self.fields["secrets"].help_text
        )

    def clean(self) -> dict:
        cleaned = super().clean() or {}
        config = cleaned.get("config")
        if not isinstance(config, dict):
            return cleaned
        given = cleaned.get("secrets")
        if given is not None and not isinstance(given, dict):
            self.add_error("secrets", 'Give a JSON object, e.g. {"auth_token": "..."}, or leave it blank.')
            return cleaned
        # Credentials typed into the config itself count as given too.
        secrets = self.instance.config_secrets() if given is None else given
        cleaned["config"] = {**config, **secrets, **{k: v for k, v in config.items() if k in Provider.SECRET_KEYS}}
        return cleaned


@admin.register(Provider)
class ProviderAdmin(TenantScopedAdmin):
    """Provider accounts, the installation's (superusers only) and each tenant's, with their
    circuit as every worker sees it; pause one (its work goes to the others, or waits) or close
    its circuit by hand. Each takes its own permission; without the pause permission `enabled`
    is read-only on the page too."""

    list_display = (
        "name",
        "scope",
        "channel",
        "position",
        "weight",
        "enabled",
        "circuit",
        "rate_per_second",
        "burst",
    )
    list_filter = ("channel", "enabled", ("tenant", admin.EmptyFieldListFilter), "tenant")
    list_select_related = ("tenant",)
    actions = ["reset_circuit", "pause", "resume"]
    form = ProviderForm

    @admin.display(description="for")
    def scope(self, provider: Provider) -> str:
        return str(provider.tenant) if provider.tenant_id else "the installation (default)"

    @admin.display(description="circuit")
    def circuit(self, provider: Provider) -> str:
        return breaker_state(provider)

    def get_readonly_fields(self, request: HttpRequest, obj: Provider | None = None) -> list[str]:
        readonly = list(super().get_readonly_fields(request, obj))
        return readonly if self.has_pause_permission(request) else [*readonly, "enabled"]

    def has_pause_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("deliveries.pause_provider")

    def has_reset_circuit_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("deliveries.reset_circuit_provider")

    @admin.action(description="Close the circuit (send to it again now)", permissions=["reset_circuit"])
    def reset_circuit(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        for provider in queryset:
            breaker_reset(provider)
        self.message_user(request, f"Closed the circuit of {queryset.count()} provider(s).")

    @admin.action(description="Pause: send through the other providers, or hold", permissions=["pause"])
    def pause(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        queryset.update(enabled=False)

    @admin.action(description="Resume", permissions=["pause"])
    def resume(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        queryset.update(enabled=True)


@admin.register(RecurringSend)
class RecurringSendAdmin(TenantScopedAdmin):
    """Saving or deleting here keeps the beat schedule in step (notify.pipeline.recurring)."""

    list_display = ("name", "tenant", "category", "cron", "timezone", "enabled")
    list_filter = ("tenant", "enabled")
    search_fields = ("name",)

    def save_model(self, request: HttpRequest, obj: RecurringSend, form: object, change: bool) -> None:
        recurring_send_save(recurring=obj)

    def delete_model(self, request: HttpRequest, obj: RecurringSend) -> None:
        recurring_send_delete(recurring=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[RecurringSend]) -> None:
        for recurring in queryset:
            recurring_send_delete(recurring=recurring)


@admin.register(Digest)
class DigestAdmin(ReadOnlyAdmin):
    list_display = ("recipient", "category", "opened_at", "due_at", "flushed_at", "size")
    list_filter = ("category", ("flushed_at", admin.EmptyFieldListFilter))
    search_fields = ("recipient__external_id",)
    list_select_related = ("recipient", "category")

    @admin.display(description="events")
    def size(self, digest: Digest) -> int:
        return digest.entries.count()


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ("id", "tenant", "category", "idempotency_key", "created_at")
    list_filter = ("tenant", "category")
    search_fields = ("=id", "idempotency_key", "=correlation_id")
    date_hierarchy = "created_at"
    list_select_related = ("tenant", "category")


# From the best news to the worst: a notification's overall status is the first of these that
# any of its deliveries reached (a fallback that reached the recipient outranks a failed step).
_OVERALL_ORDER = (
    ("clicked", {"clicked"}),
    ("opened", {"opened"}),
    ("delivered", {"delivered"}),
    ("sent", {"sent"}),
    ("in progress", {"queued", "sending", "retrying", "deferred", "standby"}),
    ("failed", {"failed", "dead", "bounced", "complained"}),
    ("suppressed", {"suppressed"}),
    ("expired", {"expired"}),
    ("cancelled", {"cancelled"}),
    ("superseded", {"superseded"}),
)


def notification_overall_status(*, statuses: list[str]) -> str:
    """One word for a notification from its deliveries' states."""
    present = set(statuses)
    for label, members in _OVERALL_ORDER:
        if present & members:
            return label
    return "no deliveries"


class DeliveryInline(admin.TabularInline):
    model = Delivery
    extra = 0
    fields = ("channel", "status", "status_reason", "attempt_count", "next_attempt_at", "sent_at")
    readonly_fields = fields
    show_change_link = True
    can_delete = False


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "recipient",
        "category",
        "priority",
        "overall_status",
        "channels",
        "created_at",
        "cancelled_at",
    )
    list_filter = ("tenant", "category", "priority", "deliveries__status", "deliveries__channel")
    search_fields = ("=id", "recipient__external_id", "recipient__email", "=event__id", "=event__correlation_id")
    date_hierarchy = "created_at"
    list_select_related = ("recipient", "category")
    readonly_fields = ("history",)
    inlines = [DeliveryInline]
    actions = ["cancel"]

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("deliveries.cancel_notification")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Notification]:
        # The list's status and channels columns read every row's deliveries: one query for the page.
        return (
            super()
            .get_queryset(request)
            .prefetch_related(
                Prefetch("deliveries", queryset=Delivery.objects.only("id", "notification_id", "channel", "status"))
            )
        )

    @admin.display(description="status")
    def overall_status(self, notification: Notification) -> str:
        return notification_overall_status(statuses=[d.status for d in notification.deliveries.all()])

    @admin.display(description="channels")
    def channels(self, notification: Notification) -> str:
        return ", ".join(f"{d.channel}: {d.status}" for d in notification.deliveries.all()) or "—"

    @admin.display(description="Why: every state change of every delivery")
    def history(self, notification: Notification) -> str:
        return history_table(notification.deliveries.prefetch_related("events"))

    @admin.action(description="Cancel selected notifications (unsent deliveries only)", permissions=["cancel"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        cancelled = 0
        for notification in queryset:
            try:
                cancelled += notification_cancel(notification=notification, reason=f"cancelled by {request.user}")
            except NotCancellable:
                pass
        self.message_user(request, f"Cancelled {cancelled} deliveries.")


class DeliveryEventInline(admin.TabularInline):
    model = DeliveryEvent
    extra = 0
    fields = ("created_at", "status", "attempt", "reason", "detail")
    readonly_fields = fields
    can_delete = False


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    tenant_path = "notification__tenant"
    list_display = ("id", "channel", "priority", "status", "attempt_count", "next_attempt_at", "sent_at", "updated_at")
    list_filter = ("status", "channel", "priority", "notification__tenant")
    search_fields = (
        "=id",
        "=notification__id",
        "notification__recipient__external_id",
        "=provider_message_id",
        "=notification__event__correlation_id",
    )
    date_hierarchy = "updated_at"
    inlines = [DeliveryEventInline]


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    tenant_path = "delivery__notification__tenant"
    list_display = ("delivery_link", "channel", "attempts", "reason", "created_at", "replayed_at", "replayed_by")
    list_filter = ("channel", ("replayed_at", admin.EmptyFieldListFilter))
    search_fields = ("=delivery__id", "reason", "delivery__notification__recipient__external_id")
    date_hierarchy = "created_at"
    actions = ["replay"]

    @admin.display(description="Delivery")
    def delivery_link(self, dead_letter: DeadLetter) -> str:
        return format_html('<a href="../delivery/{}/change/">{}</a>', dead_letter.delivery_id, dead_letter.delivery_id)

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("deliveries.replay_deadletter")

    @admin.action(description="Replay selected dead letters", permissions=["replay"])
    def replay(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        replayed = dead_letters_replay(
            dead_letter_ids=list(queryset.values_list("id", flat=True)), actor=str(request.user)
        )
        skipped = queryset.count() - replayed
        note = f" ({skipped} already replayed)" if skipped else ""
        self.message_user(request, f"Replayed {replayed} dead letter(s){note}.")
