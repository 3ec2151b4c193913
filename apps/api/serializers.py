from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from drf_spectacular.utils import extend_schema_field, inline_serializer
from rest_framework import serializers

from apps.catalog.models import Category, Channel, Priority, Severity
from apps.deliveries.models import REPLACE_KEY_MAX_LENGTH, Delivery, DeliveryEvent, Notification, RecurringSend
from apps.deliveries.selectors import NOTIFICATION_STATUSES, notification_status
from apps.inbox.serializers import InboxItemSerializer
from apps.recipients.models import Consent, Device, PreferenceSet, Recipient, validate_timezone
from apps.recipients.phone import e164
from notify.pipeline.ingest import EventRequest, RecipientRef
from notify.pipeline.plan import LocalSendTime
from notify.policy.rules import validate_category_switches, validate_channel_switches

MAX_RECIPIENTS_PER_EVENT = 1000
MAX_EVENTS_PER_BATCH = 100


class StrictCharField(serializers.CharField):
    """JSON strings only: DRF's CharField turns 42 into "42", where the schema says a string."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictSlugField(StrictCharField, serializers.SlugField):
    pass


class StrictModelSerializer(serializers.ModelSerializer):
    """A ModelSerializer whose text fields take JSON strings only."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
        models.SlugField: StrictSlugField,
    }


class DeviceSerializer(serializers.ModelSerializer):
    """A device that receives mobile push, registered by the producer for a recipient."""

    recipient = serializers.CharField(source="recipient.external_id", help_text="The recipient's external id.")
    token = serializers.CharField(max_length=1024)

    class Meta:
        model = Device
        fields = ["recipient", "token", "platform", "app", "active", "deactivated_reason", "last_seen_at", "created_at"]
        read_only_fields = ["active", "deactivated_reason", "last_seen_at", "created_at"]


class WebPushSubscriptionSerializer(serializers.Serializer):
    """A browser's PushSubscription (as its toJSON() gives it), for a recipient."""

    id = serializers.IntegerField(read_only=True)
    recipient = serializers.CharField(help_text="The recipient's external id.")
    endpoint = serializers.URLField(max_length=1024)
    keys = inline_serializer(
        name="WebPushKeys",
        fields={"p256dh": serializers.CharField(max_length=200), "auth": serializers.CharField(max_length=100)},
    )
    active = serializers.BooleanField(read_only=True)

    def to_representation(self, instance: Any) -> dict[str, Any]:
        return {
            "id": instance.id,
            "recipient": instance.recipient.external_id,
            "endpoint": instance.endpoint,
            "keys": {"p256dh": instance.p256dh, "auth": instance.auth},
            "active": instance.active,
        }


class RecipientSerializer(serializers.ModelSerializer):
    """A recipient as producers create, read and update it."""

    external_id = serializers.CharField(max_length=255)
    timezone = serializers.CharField(max_length=64, required=False)
    attributes = serializers.DictField(required=False)
    topics = serializers.SerializerMethodField(help_text="Keys of the topics the recipient is subscribed to.")

    class Meta:
        model = Recipient
        fields = [
            "external_id",
            "email",
            "phone",
            "locale",
            "timezone",
            "attributes",
            "topics",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]

    def get_topics(self, recipient: Recipient) -> list[str]:
        # A list prefetches the memberships with their topics (RecipientViewSet.get_queryset).
        return sorted(membership.topic.key for membership in recipient.topic_memberships.all())

    def validate_timezone(self, value: str) -> str:
        try:
            validate_timezone(value)
        except Exception as error:  # Django's ValidationError carries the message
            raise serializers.ValidationError(getattr(error, "messages", [str(error)])[0])
        return value

    def validate_phone(self, value: str) -> str:
        """Stored in E.164 form; a number that cannot be one is refused here, not at send time."""
        if not value:
            return value
        number = e164(number=value)
        if number is None:
            raise serializers.ValidationError("Give a valid number in E.164 format, for example +14155550123.")
        return number


class RecipientFieldsSerializer(RecipientSerializer):
    """A recipient's fields, without the external id that the URL gives."""

    class Meta(RecipientSerializer.Meta):
        fields = [name for name in RecipientSerializer.Meta.fields if name != "external_id"]


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "description": "The external id of an existing recipient."},
            {"$ref": "#/components/schemas/Recipient"},
        ]
    }
)
class RecipientRefField(serializers.Field):
    """An external id, or an inline recipient object that is upserted."""

    default_error_messages = {"invalid": "Give an external id string or a recipient object."}
    # One shared serializer validates every inline recipient: building a ModelSerializer
    # per item would cost more than the rest of the request at 1,000 recipients.
    _recipient = RecipientSerializer()

    def to_internal_value(self, data: Any) -> RecipientRef:
        if isinstance(data, str):
            if not data.strip():
                raise serializers.ValidationError("An external id may not be blank.")
            return RecipientRef(external_id=data)
        if isinstance(data, dict):
            fields = dict(self._recipient.run_validation(data))
            return RecipientRef(external_id=fields.pop("external_id"), fields=fields)
        self.fail("invalid")

    def to_representation(self, value: RecipientRef) -> Any:
        return value.external_id


def replace_key_field() -> StrictCharField:
    """An event's optional replace_key (events and broadcasts alike)."""
    return StrictCharField(
        max_length=REPLACE_KEY_MAX_LENGTH,
        required=False,
        help_text="A newer event with the same key replaces this one for each recipient: what is not yet "
        "sent is superseded, the in-app item is updated in place, and push shows only the latest.",
    )


class EventSerializer(serializers.Serializer):
    """Trigger one event for one recipient or for a list of them."""

    category = serializers.CharField(max_length=100)
    recipient = RecipientRefField(required=False)
    recipients = serializers.ListField(
        child=RecipientRefField(), required=False, min_length=1, max_length=MAX_RECIPIENTS_PER_EVENT
    )
    data = serializers.DictField(default=dict)  # type: ignore[assignment]  # a field, not Serializer.data
    priority = serializers.ChoiceField(choices=Priority.choices, required=False)
    channels = serializers.ListField(
        child=serializers.ChoiceField(choices=Channel.choices), required=False, min_length=1
    )
    idempotency_key = serializers.CharField(max_length=255, required=False)
    replace_key = replace_key_field()
    send_at = serializers.DateTimeField(required=False, help_text="Send at this instant.")
    send_at_local = serializers.CharField(
        required=False,
        help_text="Send at this wall-clock time in each recipient's timezone: '09:00' (the next one) "
        "or '2026-12-01T09:00' (no offset).",
    )
    # What the in-app items of the event carry (docs/inbox.md).
    tags = serializers.ListField(
        child=serializers.RegexField(
            r"^[\w.:-]{1,64}$", error_messages={"invalid": "Tags are 1-64 letters, digits, _ . : -."}
        ),
        required=False,
        max_length=20,
        help_text="In-app: tags the inbox can be filtered by.",
    )
    severity = serializers.ChoiceField(
        choices=Severity.choices, required=False, help_text="In-app: instead of the category's severity."
    )
    group_key = serializers.CharField(
        max_length=200, required=False, help_text="In-app: items with the same key form one item per recipient."
    )
    actor = serializers.CharField(max_length=200, required=False, help_text="In-app: who did it, shown in a group.")
    expires_at = serializers.DateTimeField(required=False, help_text="In-app: the item disappears at this time.")

    def validate_send_at_local(self, value: str) -> LocalSendTime:
        try:
            return LocalSendTime.parse(value)
        except ValueError as error:
            raise serializers.ValidationError(f"Give 'HH:MM' or 'YYYY-MM-DDTHH:MM' without an offset ({error}).")

    def validate_channels(self, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise serializers.ValidationError("List each channel once.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("recipient" in attrs) == ("recipients" in attrs):
            raise serializers.ValidationError({"recipients": ["Give either 'recipient' or 'recipients', not both."]})
        if "send_at" in attrs and "send_at_local" in attrs:
            raise serializers.ValidationError(
                {"send_at_local": ["Give either 'send_at' or 'send_at_local', not both."]}
            )
        return attrs


def event_request_from(
    *, attrs: dict[str, Any], body: dict[str, Any], idempotency_key: str | None = None
) -> EventRequest:
    """The engine's view of one validated event; `body` is what the producer sent."""
    refs = attrs["recipients"] if "recipients" in attrs else [attrs["recipient"]]
    return EventRequest(
        category_key=attrs["category"],
        recipients=refs,
        data=attrs.get("data", {}),
        priority=attrs.get("priority"),
        channels=attrs.get("channels"),
        idempotency_key=attrs.get("idempotency_key") or idempotency_key,
        replace_key=attrs.get("replace_key"),
        send_at=attrs.get("send_at"),
        send_at_local=attrs.get("send_at_local"),
        body=body,
        inbox_tags=attrs.get("tags", []),
        inbox_severity=attrs.get("severity", ""),
        inbox_group_key=attrs.get("group_key", ""),
        inbox_actor=attrs.get("actor", ""),
        inbox_expires_at=attrs.get("expires_at"),
    )


class EventBatchSerializer(serializers.Serializer):
    events = serializers.ListField(child=EventSerializer(), min_length=1, max_length=MAX_EVENTS_PER_BATCH)


class EventAcceptedSerializer(serializers.Serializer):
    event_id = serializers.UUIDField()
    idempotency_key = serializers.CharField(allow_null=True)
    notification_ids = serializers.ListField(child=serializers.UUIDField())
    digest_ids = serializers.ListField(
        child=serializers.UUIDField(), required=False, help_text="For a digest category: the digests it joined."
    )


EventBatchAcceptedSerializer = inline_serializer(
    name="EventBatchAccepted", fields={"events": EventAcceptedSerializer(many=True)}
)


class DeliveryEventSerializer(serializers.ModelSerializer):
    at = serializers.DateTimeField(source="created_at")

    class Meta:
        model = DeliveryEvent
        fields = ["status", "reason", "attempt", "detail", "at"]


class DeliverySerializer(serializers.ModelSerializer):
    class Meta:
        model = Delivery
        fields = [
            "id",
            "channel",
            "priority",
            "status",
            "status_reason",
            "attempt_count",
            "next_attempt_at",
            "sent_at",
            "provider_message_id",
        ]


class DeliveryWithHistorySerializer(DeliverySerializer):
    history = DeliveryEventSerializer(source="events", many=True, read_only=True)

    class Meta(DeliverySerializer.Meta):
        fields = DeliverySerializer.Meta.fields + ["history"]


class NotificationSerializer(serializers.ModelSerializer):
    recipient = serializers.CharField(source="recipient.external_id")
    category = serializers.CharField(source="category.key")
    template_version = serializers.IntegerField(source="template_version.number")
    status = serializers.SerializerMethodField()
    deliveries = DeliverySerializer(many=True, read_only=True)

    class Meta:
        model = Notification
        fields = [
            "id",
            "event_id",
            "recipient",
            "category",
            "priority",
            "locale",
            "template_version",
            "status",
            "send_at",
            "created_at",
            "cancelled_at",
            "deliveries",
        ]

    @extend_schema_field(serializers.ChoiceField(choices=NOTIFICATION_STATUSES))
    def get_status(self, notification: Notification) -> str:
        return notification_status(deliveries=list(notification.deliveries.all()))


class NotificationDetailSerializer(NotificationSerializer):
    deliveries = DeliveryWithHistorySerializer(many=True, read_only=True)


class CancelResultSerializer(serializers.Serializer):
    cancelled_deliveries = serializers.IntegerField()


class ErrorSerializer(serializers.Serializer):
    error = inline_serializer(
        name="ErrorBody",
        fields={
            "code": serializers.CharField(),
            "message": serializers.CharField(),
            "fields": serializers.DictField(child=serializers.ListField(child=serializers.CharField()), required=False),
        },
    )


class PreferencesSerializer(serializers.ModelSerializer):
    """A recipient's preferences. PATCH merges `channels` and `categories` key by key, where a
    null puts a key back to its default; every other field is replaced."""

    channels = serializers.JSONField(required=False, help_text='Channels on or off, e.g. {"sms": false}.')
    categories = serializers.JSONField(
        required=False, help_text='Per category key and channel, e.g. {"weekly-digest": {"email": false}}.'
    )
    # Preferences never set are the defaults, not yet saved.
    updated_at = serializers.DateTimeField(read_only=True, allow_null=True, help_text="Null until first set.")

    class Meta:
        model = PreferenceSet
        fields = ["paused", "paused_until", "channels", "categories", "channel_order", "quiet_hours", "updated_at"]
        read_only_fields = ["updated_at"]

    def validate_channels(self, value: Any) -> Any:
        # A partial update may null a key, putting it back to its default: check the rest.
        _check(validate_channel_switches, _without_nulls(value) if self.partial else value)
        return value

    def validate_categories(self, value: Any) -> Any:
        checked = value
        if self.partial and isinstance(value, dict):
            checked = {key: _without_nulls(switches) for key, switches in value.items() if switches is not None}
        _check(validate_category_switches, checked)
        known = set(self.context["tenant"].categories.values_list("key", flat=True))
        if unknown := sorted(set(value) - known):
            raise serializers.ValidationError(
                f"Unknown category: {', '.join(unknown)}. Known: {', '.join(sorted(known))}."
            )
        return value


def _without_nulls(value: Any) -> Any:
    return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value


def _check(validator: Any, value: Any) -> None:
    try:
        validator(value)
    except DjangoValidationError as error:
        raise serializers.ValidationError(error.messages)


class ConsentSerializer(serializers.ModelSerializer):
    """One grant or withdrawal of marketing consent on a channel."""

    channel = serializers.ChoiceField(choices=Channel.choices)

    class Meta:
        model = Consent
        fields = ["channel", "granted", "source", "recorded_at"]
        read_only_fields = ["recorded_at"]


class RecurringSendSerializer(serializers.ModelSerializer):
    """An event the service triggers on a cron schedule, in a timezone."""

    category = serializers.SlugRelatedField(slug_field="key", queryset=Category.objects.none())
    recipients = serializers.ListField(
        child=serializers.CharField(max_length=255), min_length=1, max_length=MAX_RECIPIENTS_PER_EVENT
    )
    data = serializers.DictField(required=False)  # type: ignore[assignment]  # a field, not Serializer.data
    timezone = serializers.CharField(max_length=64, required=False)

    class Meta:
        model = RecurringSend
        fields = ["id", "name", "category", "recipients", "data", "cron", "timezone", "enabled", "created_at"]
        read_only_fields = ["id", "created_at"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "tenant" in self.context:  # not while the OpenAPI schema is generated
            self.fields["category"].queryset = Category.objects.filter(tenant=self.context["tenant"])  # type: ignore[attr-defined]

    def validate_timezone(self, value: str) -> str:
        _check(validate_timezone, value)
        return value


class SuppressionExportSerializer(serializers.Serializer):
    channel = serializers.CharField()
    address = serializers.CharField()
    reason = serializers.CharField()
    created_at = serializers.DateTimeField()


class RecipientExportSerializer(serializers.Serializer):
    """Everything held about a person (apps/recipients/privacy.py recipient_export)."""

    recipient = RecipientSerializer()
    devices = DeviceSerializer(many=True)
    webpush_subscriptions = WebPushSubscriptionSerializer(many=True)
    preferences = PreferencesSerializer(allow_null=True, help_text="Null when never set (the defaults apply).")
    consents = ConsentSerializer(many=True, help_text="Every grant and withdrawal, oldest first.")
    topics = serializers.ListField(child=serializers.CharField(), help_text="Keys of the topics subscribed to.")
    notifications = NotificationDetailSerializer(
        many=True, help_text="Newest first, with each delivery's full history; at most NOTIFY_EXPORT_MAX_NOTIFICATIONS."
    )
    notifications_truncated = serializers.BooleanField(
        help_text="True when there are older notifications: list them with GET /notifications?recipient=."
    )
    inbox_items = InboxItemSerializer(many=True)
    suppressions = SuppressionExportSerializer(many=True, help_text="Suppressions of the person's addresses.")


class ErasureSerializer(serializers.Serializer):
    external_id = serializers.CharField()
    erased_at = serializers.DateTimeField(help_text="When the person's data was first erased.")
