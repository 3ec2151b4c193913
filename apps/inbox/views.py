"""The recipient-facing inbox API, authenticated by a signed recipient token (never an API key)."""

from datetime import datetime, timedelta
from typing import Any, cast
from uuid import UUID

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import authentication, exceptions, generics, permissions, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.query import CheckedCursorPagination, QueryCheckedView
from apps.catalog.models import Severity
from apps.inbox.live import inbox_counts_changed, inbox_item_changed
from apps.inbox.models import InboxItem
from apps.inbox.serializers import InboxItemSerializer
from apps.inbox.services import (
    MARKS,
    InboxFilter,
    inbox_archive_read,
    inbox_counts,
    inbox_item_mark,
    inbox_item_snooze,
    inbox_items,
    inbox_mark_all_read,
    inbox_profile,
)
from apps.recipients.tokens import INBOX, RecipientTokenInvalid, recipient_token_read


class InboxTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <inbox token>`; request.auth becomes the recipient's id."""

    def authenticate(self, request: Request) -> tuple[None, UUID] | None:
        scheme, _, token = authentication.get_authorization_header(request).decode(errors="replace").partition(" ")
        if not token:
            return None
        if scheme != "Bearer":
            raise exceptions.AuthenticationFailed("Use the header 'Authorization: Bearer <inbox token>'.")
        try:
            return None, recipient_token_read(purpose=INBOX, token=token.strip()).recipient_id
        except RecipientTokenInvalid as error:
            raise exceptions.AuthenticationFailed(f"{error}; ask the application for a new one.")

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"


class InboxTokenScheme(OpenApiAuthenticationExtension):
    target_class = InboxTokenAuthentication
    name = "inboxToken"

    def get_security_definition(self, auto_schema):  # type: ignore[no-untyped-def]
        return {"type": "http", "scheme": "bearer", "description": "A recipient token from POST /api/v1/inbox-tokens."}


COUNTS = inline_serializer(
    name="InboxCounts",
    fields={
        "unread": serializers.IntegerField(help_text="Bounded: above `limit` means more than `limit`."),
        "unseen": serializers.IntegerField(help_text="Bounded: above `limit` means more than `limit`."),
        "limit": serializers.IntegerField(),
        "severity": serializers.ChoiceField(choices=Severity.choices, allow_null=True, help_text="Highest unread."),
    },
)


UPDATED = inline_serializer(name="InboxUpdated", fields={"updated": serializers.IntegerField()})
MAX_SNOOZE = timedelta(days=365)


class HasInboxToken(permissions.BasePermission):
    def has_permission(self, request: Request, view: object) -> bool:
        return isinstance(request.auth, UUID)


class InboxView(QueryCheckedView):
    authentication_classes = [InboxTokenAuthentication]
    permission_classes = [HasInboxToken]

    def recipient_id(self) -> UUID:
        return cast(UUID, self.request.auth)


class NewestFirst(CheckedCursorPagination):
    ordering = ("-sort_at", "-id")
    page_size = 20


class InboxTabSerializer(serializers.Serializer):
    category = serializers.CharField(required=False, default="", max_length=100, help_text="A category's key.")
    tag = serializers.CharField(required=False, default="", max_length=64, help_text="A tag of the event.")


class InboxFilterSerializer(InboxTabSerializer):
    archived = serializers.BooleanField(default=False, help_text="The archived items instead.")
    read = serializers.BooleanField(required=False, allow_null=True, default=None, help_text="Read or unread only.")


class SnoozeSerializer(serializers.Serializer):
    until = serializers.DateTimeField(help_text="When the item comes back.")

    def validate_until(self, value: datetime) -> datetime:
        if value <= timezone.now():
            raise serializers.ValidationError("Give a time in the future.")
        if value > timezone.now() + MAX_SNOOZE:
            raise serializers.ValidationError(f"Snooze for at most {MAX_SNOOZE.days} days.")
        return value


class InboxItemsView(InboxView, generics.ListAPIView):
    serializer_class = InboxItemSerializer
    pagination_class = NewestFirst
    filter_serializer_class = InboxFilterSerializer
    queryset = InboxItem.objects.none()

    def get_queryset(self):  # type: ignore[no-untyped-def]
        return inbox_items(recipient_id=self.recipient_id(), tab=InboxFilter(**self.filters))

    @extend_schema(parameters=[InboxFilterSerializer], summary="The inbox, newest first (cursor pages)")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class InboxCountsView(InboxView):
    query_serializer_class = InboxTabSerializer

    @extend_schema(parameters=[InboxTabSerializer], responses=COUNTS, summary="A tab's unread and unseen counts")
    def get(self, request: Request) -> Response:
        return Response(inbox_counts(recipient_id=self.recipient_id(), tab=InboxFilter(**self.filters)))


class InboxItemMarkView(InboxView):
    @extend_schema(
        request=None,
        responses=InboxItemSerializer,
        parameters=[
            OpenApiParameter("item_id", str, OpenApiParameter.PATH),
            OpenApiParameter("mark", str, OpenApiParameter.PATH, enum=list(MARKS)),
        ],
        summary="Mark one item read, seen or archived",
    )
    def post(self, request: Request, item_id: str, mark: str) -> Response:
        if mark not in MARKS:
            raise Http404
        try:
            item = inbox_item_mark(recipient_id=self.recipient_id(), item_id=UUID(item_id), mark=mark)
        except (InboxItem.DoesNotExist, ValueError, DjangoValidationError):
            raise Http404
        inbox_item_changed(item=item)
        return Response(InboxItemSerializer(item).data)


class InboxReadAllView(InboxView):
    query_serializer_class = InboxTabSerializer

    @extend_schema(
        request=None,
        parameters=[InboxTabSerializer],
        responses=UPDATED,
        summary="Mark every item of a tab read (the whole inbox without parameters)",
    )
    def post(self, request: Request, **kwargs: Any) -> Response:
        updated = inbox_mark_all_read(recipient_id=self.recipient_id(), tab=InboxFilter(**self.filters))
        inbox_counts_changed(recipient_id=self.recipient_id())
        return Response({"updated": updated})


class InboxArchiveReadView(InboxView):
    query_serializer_class = InboxTabSerializer

    @extend_schema(request=None, parameters=[InboxTabSerializer], responses=UPDATED, summary="Archive every read item")
    def post(self, request: Request, **kwargs: Any) -> Response:
        updated = inbox_archive_read(recipient_id=self.recipient_id(), tab=InboxFilter(**self.filters))
        inbox_counts_changed(recipient_id=self.recipient_id())
        return Response({"updated": updated})


class InboxItemSnoozeView(InboxView):
    @extend_schema(
        request=SnoozeSerializer,
        responses=InboxItemSerializer,
        parameters=[OpenApiParameter("item_id", str, OpenApiParameter.PATH)],
        summary="Hide an item until a time, when it comes back",
    )
    def post(self, request: Request, item_id: str) -> Response:
        body = SnoozeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            item = inbox_item_snooze(
                recipient_id=self.recipient_id(), item_id=UUID(item_id), until=body.validated_data["until"]
            )
        except (InboxItem.DoesNotExist, ValueError, DjangoValidationError):
            raise Http404
        inbox_item_changed(item=item)
        return Response(InboxItemSerializer(item).data)


class InboxProfileView(InboxView):
    @extend_schema(
        responses=inline_serializer(
            name="InboxProfile",
            fields={"locale": serializers.CharField(), "preferences_url": serializers.URLField()},
        ),
        summary="The recipient's locale and a link to their preference center, for the widget",
    )
    def get(self, request: Request) -> Response:
        return Response(inbox_profile(recipient_id=self.recipient_id()))
