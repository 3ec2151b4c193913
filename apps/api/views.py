"""Producer API views: parse, call one service, shape the response."""

from typing import Any, cast

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.errors import error_response, field_error
from apps.api.query import CheckedCursorPagination, QueryCheckedView
from apps.api.scopes import category_check, read_write
from apps.api.serializers import (
    CancelResultSerializer,
    ConsentSerializer,
    DeviceSerializer,
    ErasureSerializer,
    ErrorSerializer,
    EventAcceptedSerializer,
    EventBatchAcceptedSerializer,
    EventBatchSerializer,
    EventSerializer,
    NotificationDetailSerializer,
    NotificationSerializer,
    PreferencesSerializer,
    RecipientExportSerializer,
    RecipientFieldsSerializer,
    RecipientSerializer,
    RecurringSendSerializer,
    WebPushSubscriptionSerializer,
    event_request_from,
)
from apps.deliveries.models import DeliveryStatus, Notification, RecurringSend
from apps.deliveries.selectors import notification_get, notifications_list, recurring_sends_list
from apps.recipients.models import Device, Recipient, WebPushSubscription
from apps.recipients.privacy import recipient_erase, recipient_export
from apps.recipients.services import (
    consent_record,
    consents_current,
    device_register,
    preferences_get,
    preferences_update,
    recipient_upsert,
    webpush_subscribe,
)
from apps.recipients.tokens import INBOX, PREFERENCES, recipient_link, recipient_token_issue, recipient_token_lifetime
from apps.tenants.models import ApiKey, Scope, Tenant
from notify.pipeline.control import NotCancellable, notification_cancel
from notify.pipeline.ingest import (
    CategoryNotAllowed,
    EventRequest,
    IdempotencyConflict,
    IngestError,
    events_ingest,
)
from notify.pipeline.recurring import recurring_send_delete, recurring_send_save
from notify.resilience.backpressure import Refused

IDEMPOTENCY_HEADER = "Idempotency-Key"
# What an event is refused with besides the errors every operation documents (apps.api.errors).
EVENT_ERRORS = {
    409: OpenApiResponse(ErrorSerializer, description="Idempotency key reused with a different body."),
    429: OpenApiResponse(
        ErrorSerializer, description="Over a limit, or bulk shed under backpressure; see Retry-After."
    ),
}


class CreatedCursorPagination(CheckedCursorPagination):
    ordering = "-created_at"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


def api_key_of(request: Request) -> ApiKey:
    """The authenticated producer key; every view here requires one (HasRequiredScope)."""
    return cast(ApiKey, request.auth)


def body_of(request: Request) -> dict[str, Any]:
    """The parsed JSON body, which the serializer has already checked is an object."""
    return cast(dict[str, Any], request.data)


def recipient_named(*, tenant: Tenant, external_id: str) -> Recipient | Response:
    """The tenant's recipient with that external id, or the 400 that names the field."""
    recipient = Recipient.objects.filter(tenant=tenant, external_id=external_id).first()
    if recipient is None:
        return field_error(field="recipient", message=f"Unknown recipient '{external_id}'. Create it first.")
    return recipient


def _ingest(request: Request, events: list[EventRequest]) -> tuple[list[dict[str, Any]], bool] | Response:
    try:
        results = events_ingest(api_key=api_key_of(request), events=events)
    except CategoryNotAllowed as error:
        return error_response(
            status_code=status.HTTP_403_FORBIDDEN,
            code="category_not_allowed",
            message=error.message,
            fields={error.field: [error.message]},
        )
    except IngestError as error:
        return field_error(field=error.field, message=error.message)
    except Refused as error:
        fields = {error.field: [str(error)]} if error.field else None
        response = error_response(
            status_code=status.HTTP_429_TOO_MANY_REQUESTS, code=error.code, message=str(error), fields=fields
        )
        response["Retry-After"] = str(error.retry_after)
        return response
    except IdempotencyConflict as error:
        return error_response(
            status_code=status.HTTP_409_CONFLICT,
            code="idempotency_conflict",
            message=str(error),
            fields={"idempotency_key": [str(error)]},
        )
    return [r.response for r in results], all(r.replayed for r in results)


def _accepted(body: dict[str, Any], *, replayed: bool) -> Response:
    response = Response(body, status=status.HTTP_202_ACCEPTED)
    if replayed:
        response["Idempotent-Replayed"] = "true"
    return response


class EventView(QueryCheckedView):
    required_scopes = {"POST": Scope.EVENTS_SEND}

    @extend_schema(
        request=EventSerializer,
        responses={202: EventAcceptedSerializer, **EVENT_ERRORS},
        parameters=[OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER, required=False)],
        summary="Trigger an event",
        description="Notify one recipient or up to 1,000. The same idempotency key with the same "
        "body returns the original response; with a different body, 409.",
    )
    def post(self, request: Request) -> Response:
        serializer = EventSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        header_key = request.headers.get(IDEMPOTENCY_HEADER)
        body_key = serializer.validated_data.get("idempotency_key")
        if header_key is not None and not 0 < len(header_key) <= 255:
            return field_error(field=IDEMPOTENCY_HEADER, message="An idempotency key has 1 to 255 characters.")
        if header_key and body_key and header_key != body_key:
            return field_error(field="idempotency_key", message="The body and the Idempotency-Key header disagree.")
        event = event_request_from(attrs=serializer.validated_data, body=body_of(request), idempotency_key=header_key)
        outcome = _ingest(request, [event])
        if isinstance(outcome, Response):
            return outcome
        responses, replayed = outcome
        return _accepted(responses[0], replayed=replayed)


class EventBatchView(QueryCheckedView):
    required_scopes = {"POST": Scope.EVENTS_SEND}

    @extend_schema(
        request=EventBatchSerializer,
        responses={202: EventBatchAcceptedSerializer, **EVENT_ERRORS},
        summary="Trigger a batch of events",
        description="Up to 100 events, accepted or refused together.",
    )
    def post(self, request: Request) -> Response:
        if IDEMPOTENCY_HEADER in request.headers:
            return field_error(
                field=IDEMPOTENCY_HEADER,
                message="A batch takes no Idempotency-Key header; give each event its own idempotency_key.",
            )
        serializer = EventBatchSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        events = [
            event_request_from(attrs=attrs, body=body)
            for attrs, body in zip(serializer.validated_data["events"], body_of(request)["events"], strict=True)
        ]
        outcome = _ingest(request, events)
        if isinstance(outcome, Response):
            return outcome
        responses, replayed = outcome
        return _accepted({"events": responses}, replayed=replayed)


class NotificationFilterSerializer(serializers.Serializer):
    recipient = serializers.CharField(required=False, help_text="External id of the recipient.")
    category = serializers.CharField(required=False, help_text="Category key.")
    status = serializers.ChoiceField(choices=DeliveryStatus.choices, required=False, help_text="A delivery status.")
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)


class NotificationViewSet(QueryCheckedView, viewsets.GenericViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    # Cancelling takes back what the producer sent, so it goes with sending.
    required_scopes = {"GET": Scope.NOTIFICATIONS_READ, "POST": Scope.EVENTS_SEND}
    serializer_class = NotificationSerializer
    pagination_class = CreatedCursorPagination
    filter_serializer_class = NotificationFilterSerializer
    queryset = Notification.objects.none()

    def get_queryset(self):  # type: ignore[no-untyped-def]
        key = api_key_of(self.request)
        return notifications_list(tenant=key.tenant, categories=key.categories, **self.filters)

    def get_object(self) -> Notification:
        try:
            notification = notification_get(tenant=api_key_of(self.request).tenant, notification_id=self.kwargs["pk"])
        except (Notification.DoesNotExist, DjangoValidationError):
            raise Http404
        self.check_object_permissions(self.request, notification)
        return notification

    @extend_schema(parameters=[NotificationFilterSerializer], summary="List notifications")
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(responses=NotificationDetailSerializer, summary="A notification with its full delivery history")
    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(NotificationDetailSerializer(self.get_object()).data)

    @extend_schema(
        request=None,
        responses={200: CancelResultSerializer, 409: ErrorSerializer},
        summary="Cancel a notification that has not been sent",
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        try:
            cancelled = notification_cancel(notification=self.get_object())
        except NotCancellable as error:
            return error_response(status_code=status.HTTP_409_CONFLICT, code="not_cancellable", message=str(error))
        return Response({"cancelled_deliveries": cancelled})


# The URL gives the external id: the bodies of PUT and PATCH carry the other fields.
@extend_schema_view(
    partial_update=extend_schema(
        summary="Change a recipient", request=RecipientFieldsSerializer(partial=True), responses=RecipientSerializer
    )
)
class RecipientViewSet(QueryCheckedView, viewsets.ModelViewSet):
    required_scopes = read_write(read=Scope.RECIPIENTS_READ, write=Scope.RECIPIENTS_WRITE)
    serializer_class = RecipientSerializer
    pagination_class = CreatedCursorPagination
    lookup_field = "external_id"
    lookup_value_regex = ".+"  # external ids may contain slashes
    queryset = Recipient.objects.none()

    def get_queryset(self):  # type: ignore[no-untyped-def]
        return Recipient.objects.filter(tenant=api_key_of(self.request).tenant).prefetch_related(
            "topic_memberships__topic"
        )

    def _upsert(self, *, external_id: str, data: dict[str, Any], partial: bool) -> Response:
        instance = self.get_queryset().filter(external_id=external_id).first()
        serializer = self.get_serializer(instance, data={**data, "external_id": external_id}, partial=partial)
        serializer.is_valid(raise_exception=True)
        fields = {k: v for k, v in serializer.validated_data.items() if k != "external_id"}
        recipient, created = recipient_upsert(
            tenant=api_key_of(self.request).tenant, external_id=external_id, fields=fields
        )
        return Response(
            self.get_serializer(recipient).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )

    @extend_schema(
        summary="Create or update a recipient by external id",
        responses={200: RecipientSerializer, 201: RecipientSerializer},
    )
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if not isinstance(request.data, dict):
            return field_error(field="non_field_errors", message="Send a JSON object.")
        external_id = request.data.get("external_id")
        if not isinstance(external_id, str) or not external_id.strip():
            return field_error(field="external_id", message="This field is required.")
        return self._upsert(external_id=external_id, data=request.data, partial=True)

    @extend_schema(
        summary="Create or replace a recipient",
        request=RecipientFieldsSerializer,
        responses={200: RecipientSerializer, 201: RecipientSerializer},
    )
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if not isinstance(request.data, dict):
            return field_error(field="non_field_errors", message="Send a JSON object.")
        partial = kwargs.get("partial", False)
        if partial and not self.get_queryset().filter(external_id=kwargs["external_id"]).exists():
            raise Http404
        return self._upsert(external_id=kwargs["external_id"], data=request.data, partial=partial)


class RecipientScopedView(QueryCheckedView):
    required_scopes = read_write(read=Scope.RECIPIENTS_READ, write=Scope.RECIPIENTS_WRITE)

    def recipient(self, external_id: str) -> Recipient:
        recipient = Recipient.objects.filter(tenant=api_key_of(self.request).tenant, external_id=external_id).first()
        if recipient is None:
            raise Http404(f"No recipient '{external_id}'.")
        return recipient


class RecipientPreferencesView(RecipientScopedView):
    """A recipient's preferences: GET reads them (defaults when never set), PUT replaces them,
    PATCH merges `channels` and `categories` key by key."""

    @extend_schema(responses={200: PreferencesSerializer}, summary="Read a recipient's preferences")
    def get(self, request: Request, external_id: str) -> Response:
        return Response(PreferencesSerializer(preferences_get(recipient=self.recipient(external_id))).data)

    @extend_schema(request=PreferencesSerializer, responses={200: PreferencesSerializer}, summary="Replace preferences")
    def put(self, request: Request, external_id: str) -> Response:
        return self._save(request, external_id=external_id, partial=False)

    @extend_schema(request=PreferencesSerializer, responses={200: PreferencesSerializer}, summary="Change preferences")
    def patch(self, request: Request, external_id: str) -> Response:
        return self._save(request, external_id=external_id, partial=True)

    def _save(self, request: Request, *, external_id: str, partial: bool) -> Response:
        recipient = self.recipient(external_id)
        serializer = PreferencesSerializer(data=body_of(request), partial=partial, context={"tenant": recipient.tenant})
        serializer.is_valid(raise_exception=True)
        for category_key in serializer.validated_data.get("categories") or {}:
            category_check(api_key=api_key_of(request), category_key=category_key, field=f"categories.{category_key}")
        preferences = preferences_update(recipient=recipient, fields=serializer.validated_data, merge=partial)
        return Response(PreferencesSerializer(preferences).data)


class RecipientConsentsView(RecipientScopedView):
    """Marketing consent per channel: GET lists the standing answers, POST records a grant or
    a withdrawal (the history is kept)."""

    @extend_schema(responses={200: ConsentSerializer(many=True)}, summary="A recipient's consents, one per channel")
    def get(self, request: Request, external_id: str) -> Response:
        consents = consents_current(recipient=self.recipient(external_id)).values()
        return Response(ConsentSerializer(consents, many=True).data)

    @extend_schema(request=ConsentSerializer, responses={201: ConsentSerializer}, summary="Grant or withdraw consent")
    def post(self, request: Request, external_id: str) -> Response:
        recipient = self.recipient(external_id)
        serializer = ConsentSerializer(data=body_of(request))
        serializer.is_valid(raise_exception=True)
        consent = consent_record(recipient=recipient, **serializer.validated_data)
        return Response(ConsentSerializer(consent).data, status=status.HTTP_201_CREATED)


class RecipientExportView(RecipientScopedView):
    required_scopes = {"GET": Scope.RECIPIENTS_READ}

    @extend_schema(
        responses={200: RecipientExportSerializer},
        summary="Everything held about a recipient (a data subject's copy of their data)",
        description="Profile, devices, web push subscriptions, preferences, consents, topics, the newest "
        "notifications with their deliveries and history (at most NOTIFY_EXPORT_MAX_NOTIFICATIONS; "
        "`notifications_truncated` says whether there are more), inbox items and suppressions. A key "
        "limited to categories gets only those categories' notifications.",
    )
    def get(self, request: Request, external_id: str) -> Response:
        export = recipient_export(recipient=self.recipient(external_id), categories=api_key_of(request).categories)
        return Response(RecipientExportSerializer(export).data)


class RecipientEraseView(RecipientScopedView):
    required_scopes = {"POST": Scope.RECIPIENTS_WRITE}

    @extend_schema(
        request=None,
        responses={200: ErasureSerializer, 403: ErrorSerializer},
        summary="Erase a recipient's personal data (idempotent)",
        description="Deletes devices, subscriptions, preferences, consents, topic memberships and inbox "
        "items; blanks the profile, the history's provider details and the data of events sent to "
        "this recipient alone. Delivery rows stay, without personal data, for the counts. Suppressed "
        "addresses are kept as a keyed hash, so they stay suppressed. A second call answers the same "
        "and changes nothing. Needs a key that is not limited to categories.",
    )
    def post(self, request: Request, external_id: str) -> Response:
        if api_key_of(request).categories:
            return error_response(
                status_code=status.HTTP_403_FORBIDDEN,
                code="category_limited_key",
                message="Erasing reaches every category: use a key that is not limited to categories.",
            )
        erasure = recipient_erase(recipient=self.recipient(external_id))
        return Response(ErasureSerializer({"external_id": external_id, "erased_at": erasure.erased_at}).data)


class RecipientPreferenceLinkView(RecipientScopedView):
    @extend_schema(
        request=None,
        responses={
            201: inline_serializer(
                name="PreferenceLink", fields={"url": serializers.URLField(), "expires_in": serializers.IntegerField()}
            )
        },
        summary="A signed link to the recipient's hosted preference center (no login needed)",
    )
    def post(self, request: Request, external_id: str) -> Response:
        url = recipient_link(purpose=PREFERENCES, recipient_id=self.recipient(external_id).id)
        expires_in = int(recipient_token_lifetime(purpose=PREFERENCES).total_seconds())
        return Response({"url": url, "expires_in": expires_in}, status=status.HTTP_201_CREATED)


class RecipientFilterSerializer(serializers.Serializer):
    recipient = serializers.CharField(required=False, help_text="Only this recipient's (external id).")


class DeviceViewSet(QueryCheckedView, viewsets.GenericViewSet, mixins.ListModelMixin, mixins.DestroyModelMixin):
    """Mobile push devices. POST registers (or updates) one by its token."""

    required_scopes = read_write(read=Scope.RECIPIENTS_READ, write=Scope.RECIPIENTS_WRITE)

    serializer_class = DeviceSerializer
    pagination_class = CreatedCursorPagination
    lookup_field = "token"
    lookup_value_regex = "[^/]+"
    filter_serializer_class = RecipientFilterSerializer
    queryset = Device.objects.none()

    def get_queryset(self):  # type: ignore[no-untyped-def]
        devices = Device.objects.filter(tenant=api_key_of(self.request).tenant).select_related("recipient")
        recipient = self.filters.get("recipient")
        return devices.filter(recipient__external_id=recipient) if recipient else devices

    @extend_schema(parameters=[RecipientFilterSerializer], summary="List devices")
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(
        summary="Register a device (upsert by token)", responses={200: DeviceSerializer, 201: DeviceSerializer}
    )
    def create(self, request: Request) -> Response:
        serializer = DeviceSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        tenant = api_key_of(request).tenant
        recipient = recipient_named(tenant=tenant, external_id=serializer.validated_data["recipient"]["external_id"])
        if isinstance(recipient, Response):
            return recipient
        device, created = device_register(
            tenant=tenant,
            recipient=recipient,
            token=serializer.validated_data["token"],
            platform=serializer.validated_data["platform"],
            app=serializer.validated_data.get("app", ""),
        )
        return Response(
            DeviceSerializer(device).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


class WebPushSubscriptionViewSet(
    QueryCheckedView, viewsets.GenericViewSet, mixins.ListModelMixin, mixins.DestroyModelMixin
):
    """Web push subscriptions. POST saves (or refreshes) one by its endpoint."""

    required_scopes = read_write(read=Scope.RECIPIENTS_READ, write=Scope.RECIPIENTS_WRITE)

    serializer_class = WebPushSubscriptionSerializer
    pagination_class = CreatedCursorPagination
    filter_serializer_class = RecipientFilterSerializer
    queryset = WebPushSubscription.objects.none()

    def get_queryset(self):  # type: ignore[no-untyped-def]
        subscriptions = WebPushSubscription.objects.filter(tenant=api_key_of(self.request).tenant).select_related(
            "recipient"
        )
        recipient = self.filters.get("recipient")
        return subscriptions.filter(recipient__external_id=recipient) if recipient else subscriptions

    @extend_schema(parameters=[RecipientFilterSerializer], summary="List web push subscriptions")
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(summary="Save a browser's push subscription (upsert by endpoint)")
    def create(self, request: Request) -> Response:
        serializer = WebPushSubscriptionSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        tenant = api_key_of(request).tenant
        recipient = recipient_named(tenant=tenant, external_id=data["recipient"])
        if isinstance(recipient, Response):
            return recipient
        try:
            subscription, created = webpush_subscribe(
                tenant=tenant,
                recipient=recipient,
                endpoint=data["endpoint"],
                p256dh=data["keys"]["p256dh"],
                auth=data["keys"]["auth"],
            )
        except DjangoValidationError as error:
            return field_error(field="endpoint", message=error.message_dict["endpoint"][0])
        return Response(
            WebPushSubscriptionSerializer(subscription).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


@extend_schema_view(
    list=extend_schema(summary="List recurring sends"),
    create=extend_schema(summary="Schedule an event on a cron schedule"),
    retrieve=extend_schema(summary="Read a recurring send"),
    partial_update=extend_schema(summary="Change a recurring send (pause it with enabled: false)"),
    destroy=extend_schema(summary="Stop and delete a recurring send"),
)
class RecurringSendViewSet(QueryCheckedView, viewsets.ModelViewSet):
    """Events the service triggers itself on a cron schedule, through django-celery-beat."""

    required_scopes = read_write(read=Scope.ADMIN, write=Scope.ADMIN)

    serializer_class = RecurringSendSerializer
    pagination_class = CreatedCursorPagination
    queryset = RecurringSend.objects.none()
    http_method_names = ["get", "post", "patch", "delete"]

    def get_queryset(self):  # type: ignore[no-untyped-def]
        key = api_key_of(self.request)
        return recurring_sends_list(tenant=key.tenant, categories=key.categories)

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "tenant": api_key_of(self.request).tenant}

    def perform_create(self, serializer: RecurringSendSerializer) -> None:  # type: ignore[override]
        tenant = api_key_of(self.request).tenant
        category_check(api_key=api_key_of(self.request), category_key=serializer.validated_data["category"].key)
        name = serializer.validated_data["name"]
        if RecurringSend.objects.filter(tenant=tenant, name=name).exists():
            raise serializers.ValidationError({"name": [f"A recurring send named '{name}' exists already."]})
        serializer.instance = recurring_send_save(recurring=RecurringSend(tenant=tenant, **serializer.validated_data))

    def perform_update(self, serializer: RecurringSendSerializer) -> None:  # type: ignore[override]
        recurring = cast(RecurringSend, serializer.instance)
        if "category" in serializer.validated_data:
            category_check(api_key=api_key_of(self.request), category_key=serializer.validated_data["category"].key)
        for name, value in serializer.validated_data.items():
            setattr(recurring, name, value)
        recurring_send_save(recurring=recurring)

    def perform_destroy(self, instance: RecurringSend) -> None:
        recurring_send_delete(recurring=instance)


class InboxTokenRequestSerializer(serializers.Serializer):
    recipient = serializers.CharField(help_text="The recipient's external id.")


class InboxTokenView(QueryCheckedView):
    required_scopes = {"POST": Scope.INBOX_TOKENS}

    @extend_schema(
        request=InboxTokenRequestSerializer,
        responses={
            201: inline_serializer(
                name="InboxToken", fields={"token": serializers.CharField(), "expires_in": serializers.IntegerField()}
            )
        },
        summary="Issue a short-lived token for a recipient's browser to read its inbox",
    )
    def post(self, request: Request) -> Response:
        serializer = InboxTokenRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        recipient = recipient_named(
            tenant=api_key_of(request).tenant, external_id=serializer.validated_data["recipient"]
        )
        if isinstance(recipient, Response):
            return recipient
        token = recipient_token_issue(purpose=INBOX, recipient_id=recipient.id)
        return Response(
            {"token": token, "expires_in": int(recipient_token_lifetime(purpose=INBOX).total_seconds())},
            status=status.HTTP_201_CREATED,
        )
