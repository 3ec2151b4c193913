"""The recipient-facing inbox API, authenticated by a signed recipient token (never an API key)."""

from typing import Any, cast
from uuid import UUID

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import authentication, exceptions, generics, permissions, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.query import CheckedCursorPagination, QueryCheckedView
from apps.inbox.live import inbox_counts_changed, inbox_item_changed
from apps.inbox.models import InboxItem
from apps.inbox.serializers import InboxItemSerializer
from apps.inbox.services import MARKS, inbox_counts, inbox_item_mark, inbox_items, inbox_mark_all_read
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
    name="InboxCounts", fields={"unread": serializers.IntegerField(), "unseen": serializers.IntegerField()}
)


class HasInboxToken(permissions.BasePermission):
    def has_permission(self, request: Request, view: object) -> bool:
        return isinstance(request.auth, UUID)


class InboxView(QueryCheckedView):
    authentication_classes = [InboxTokenAuthentication]
    permission_classes = [HasInboxToken]

    def recipient_id(self) -> UUID:
        return cast(UUID, self.request.auth)


class NewestFirst(CheckedCursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 20


class InboxFilterSerializer(serializers.Serializer):
    archived = serializers.BooleanField(default=False, help_text="The archived items instead.")


class InboxItemsView(InboxView, generics.ListAPIView):
    serializer_class = InboxItemSerializer
    pagination_class = NewestFirst
    filter_serializer_class = InboxFilterSerializer
    queryset = InboxItem.objects.none()

    def get_queryset(self):  # type: ignore[no-untyped-def]
        return inbox_items(recipient_id=self.recipient_id(), archived=self.filters["archived"])

    @extend_schema(parameters=[InboxFilterSerializer], summary="The inbox, newest first (cursor pages)")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class InboxCountsView(InboxView):
    @extend_schema(responses=COUNTS, summary="Unread and unseen counts")
    def get(self, request: Request) -> Response:
        return Response(inbox_counts(recipient_id=self.recipient_id()))


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
    @extend_schema(
        request=None,
        responses=inline_serializer(name="InboxReadAll", fields={"updated": serializers.IntegerField()}),
        summary="Mark every item read",
    )
    def post(self, request: Request, **kwargs: Any) -> Response:
        updated = inbox_mark_all_read(recipient_id=self.recipient_id())
        inbox_counts_changed(recipient_id=self.recipient_id())
        return Response({"updated": updated})
