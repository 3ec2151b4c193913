"""Producer API for audiences and broadcasts: topics and their subscribers, segments, and
broadcasts with their controls."""

import uuid
from typing import Any

from django.http import Http404
from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_view, inline_serializer
from rest_framework import generics, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.errors import error_response, field_error
from apps.api.query import CheckedCursorPagination, QueryCheckedView
from apps.api.scopes import read_write
from apps.api.serializers import ErrorSerializer, RecipientRefField, StrictModelSerializer, replace_key_field
from apps.api.views import CreatedCursorPagination, api_key_of, body_of
from apps.audiences.models import Broadcast, Segment, Topic, TopicMembership
from apps.audiences.services import topic_subscribe, topic_unsubscribe
from apps.tenants.models import Scope
from notify.pipeline.audience import AudienceError, audience_recipients, segment_filter_compile
from notify.pipeline.broadcast import (
    BroadcastRequest,
    NotControllable,
    broadcast_cancel,
    broadcast_create,
    broadcast_estimate,
    broadcast_pause,
    broadcast_resume,
)
from notify.pipeline.ingest import CategoryNotAllowed, IdempotencyConflict, IngestError
from notify.pipeline.plan import LocalSendTime

MAX_SUBSCRIBERS_PER_CALL = 10_000


class TopicSerializer(StrictModelSerializer):
    class Meta:
        model = Topic
        fields = ["key", "name", "description", "created_at", "updated_at"]
        read_only_fields = ["created_at", "updated_at"]


@extend_schema_view(
    list=extend_schema(summary="List topics"),
    create=extend_schema(summary="Create a topic"),
    retrieve=extend_schema(summary="Read a topic"),
    partial_update=extend_schema(summary="Rename or describe a topic"),
    destroy=extend_schema(summary="Delete a topic and its subscriptions"),
)
class TopicViewSet(QueryCheckedView, viewsets.ModelViewSet):
    required_scopes = read_write(read=Scope.RECIPIENTS_READ, write=Scope.RECIPIENTS_WRITE)
    serializer_class = TopicSerializer
    pagination_class = CreatedCursorPagination
    lookup_field = "key"
    queryset = Topic.objects.none()
    http_method_names = ["get", "post", "patch", "delete"]

    def get_queryset(self):  # type: ignore[no-untyped-def]
        return Topic.objects.filter(tenant=api_key_of(self.request).tenant)

    def perform_create(self, serializer: TopicSerializer) -> None:  # type: ignore[override]
        tenant = api_key_of(self.request).tenant
        key = serializer.validated_data["key"]
        if Topic.objects.filter(tenant=tenant, key=key).exists():
            raise serializers.ValidationError({"key": [f"A topic '{key}' exists already."]})
        serializer.save(tenant=tenant)

    def perform_update(self, serializer: TopicSerializer) -> None:  # type: ignore[override]
        if "key" in serializer.validated_data and serializer.validated_data["key"] != self.kwargs["key"]:
            raise serializers.ValidationError({"key": ["A topic's key cannot change: create a new topic."]})
        serializer.save()


class SubscribersSerializer(serializers.Serializer):
    recipients = serializers.ListField(
        child=RecipientRefField(),
        min_length=1,
        max_length=MAX_SUBSCRIBERS_PER_CALL,
        help_text="External ids, or recipient objects (upserted as in events).",
    )


class SubscriberSerializer(serializers.ModelSerializer):
    external_id = serializers.CharField(source="recipient.external_id")

    class Meta:
        model = TopicMembership
        fields = ["external_id", "created_at"]


class MembershipCursorPagination(CheckedCursorPagination):
    ordering = "id"  # unique and ever-growing: a stable cursor even for rows added together
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


class TopicSubscribersView(QueryCheckedView, generics.ListAPIView):
    required_scopes = read_write(read=Scope.RECIPIENTS_READ, write=Scope.RECIPIENTS_WRITE)
    serializer_class = SubscriberSerializer
    pagination_class = MembershipCursorPagination

    def topic(self, key: str) -> Topic:
        topic = Topic.objects.filter(tenant=api_key_of(self.request).tenant, key=key).first()
        if topic is None:
            raise Http404(f"No topic '{key}'.")
        return topic

    def get_queryset(self):  # type: ignore[no-untyped-def]
        return TopicMembership.objects.filter(topic=self.topic(self.kwargs["key"])).select_related("recipient")

    @extend_schema(summary="List a topic's subscribers")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=SubscribersSerializer,
        responses={200: inline_serializer(name="Subscribed", fields={"added": serializers.IntegerField()})},
        summary="Subscribe up to 10,000 recipients to a topic",
    )
    def post(self, request: Request, key: str) -> Response:
        topic = self.topic(key)
        serializer = SubscribersSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            added = topic_subscribe(tenant=topic.tenant, topic=topic, refs=serializer.validated_data["recipients"])
        except IngestError as error:
            return field_error(field=error.field, message=error.message)
        return Response({"added": added})

    @extend_schema(
        request=SubscribersSerializer,
        responses={200: inline_serializer(name="Unsubscribed", fields={"removed": serializers.IntegerField()})},
        summary="Unsubscribe recipients from a topic",
    )
    def delete(self, request: Request, key: str) -> Response:
        topic = self.topic(key)
        serializer = SubscribersSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        external_ids = [ref.external_id for ref in serializer.validated_data["recipients"]]
        return Response({"removed": topic_unsubscribe(tenant=topic.tenant, topic=topic, external_ids=external_ids)})


class SegmentSerializer(StrictModelSerializer):
    filter = serializers.JSONField(help_text="A clause, or all/any/not of clauses; see docs/audiences.md.")

    class Meta:
        model = Segment
        fields = ["key", "name", "filter", "created_at", "updated_at"]
        read_only_fields = ["created_at", "updated_at"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "filter" in attrs:
            try:
                segment_filter_compile(tenant=self.context["tenant"], filter=attrs["filter"])
            except AudienceError as error:
                # Named by the clause's path (filter.all[1].gt), not only by the field.
                raise serializers.ValidationError({error.field: [error.message]}) from error
        return attrs


@extend_schema_view(
    list=extend_schema(summary="List segments"),
    create=extend_schema(summary="Save a segment: a filter over recipients"),
    retrieve=extend_schema(summary="Read a segment"),
    partial_update=extend_schema(summary="Change a segment's name or filter"),
    destroy=extend_schema(summary="Delete a segment"),
)
class SegmentViewSet(QueryCheckedView, viewsets.ModelViewSet):
    required_scopes = read_write(read=Scope.RECIPIENTS_READ, write=Scope.RECIPIENTS_WRITE)
    serializer_class = SegmentSerializer
    pagination_class = CreatedCursorPagination
    lookup_field = "key"
    queryset = Segment.objects.none()
    http_method_names = ["get", "post", "patch", "delete"]

    def get_queryset(self):  # type: ignore[no-untyped-def]
        return Segment.objects.filter(tenant=api_key_of(self.request).tenant)

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "tenant": api_key_of(self.request).tenant}

    def perform_create(self, serializer: SegmentSerializer) -> None:  # type: ignore[override]
        tenant = api_key_of(self.request).tenant
        key = serializer.validated_data["key"]
        if Segment.objects.filter(tenant=tenant, key=key).exists():
            raise serializers.ValidationError({"key": [f"A segment '{key}' exists already."]})
        serializer.save(tenant=tenant)

    def perform_update(self, serializer: SegmentSerializer) -> None:  # type: ignore[override]
        if "key" in serializer.validated_data and serializer.validated_data["key"] != self.kwargs["key"]:
            raise serializers.ValidationError({"key": ["A segment's key cannot change: create a new segment."]})
        serializer.save()

    @extend_schema(
        responses=inline_serializer(name="SegmentCount", fields={"count": serializers.IntegerField()}),
        summary="How many recipients the segment matches now",
    )
    @action(detail=True, methods=["get"])
    def count(self, request: Request, key: str) -> Response:
        segment = self.get_object()
        audience = audience_recipients(tenant=segment.tenant, audience={"segment": segment.key})
        return Response({"count": audience.count()})


class BroadcastCreateSerializer(serializers.Serializer):
    category = serializers.CharField()
    audience = serializers.JSONField(
        help_text='{"topic": key}, {"topics": [keys]}, {"segment": key} or {"all": true}, '
        'optionally with "exclude": another audience.'
    )
    data = serializers.DictField(required=False, default=dict)  # type: ignore[assignment]  # a field, not Serializer.data
    idempotency_key = serializers.CharField(max_length=255, required=False)
    replace_key = replace_key_field()
    send_at = serializers.DateTimeField(required=False)
    send_at_local = serializers.CharField(
        required=False, help_text="'09:00' (the next one) or '2026-12-01T09:00', in each recipient's timezone."
    )
    max_per_second = serializers.IntegerField(required=False, min_value=1, max_value=1_000_000)
    spread_over_seconds = serializers.IntegerField(required=False, min_value=1, max_value=7 * 86400)

    def validate_send_at_local(self, value: str) -> str:
        try:
            LocalSendTime.parse(value)
        except ValueError as error:
            raise serializers.ValidationError(f"Give 'HH:MM' or 'YYYY-MM-DDTHH:MM' without an offset ({error}).")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "send_at" in attrs and "send_at_local" in attrs:
            raise serializers.ValidationError(
                {"send_at_local": ["Give either 'send_at' or 'send_at_local', not both."]}
            )
        if "max_per_second" in attrs and "spread_over_seconds" in attrs:
            raise serializers.ValidationError(
                {"spread_over_seconds": ["Give either 'max_per_second' or 'spread_over_seconds', not both."]}
            )
        paced = "max_per_second" in attrs or "spread_over_seconds" in attrs
        if paced and "send_at_local" in attrs:
            field = "max_per_second" if "max_per_second" in attrs else "spread_over_seconds"
            raise serializers.ValidationError(
                {field: ["A local-time broadcast is spread by the timezones already: give no pace."]}
            )
        return attrs


class BroadcastSerializer(serializers.ModelSerializer):
    category = serializers.CharField(source="category.key")
    counts = serializers.SerializerMethodField()
    estimated_finish_at = serializers.SerializerMethodField()

    class Meta:
        model = Broadcast
        fields = [
            "id",
            "state",
            "category",
            "audience",
            "data",
            "idempotency_key",
            "send_at",
            "send_at_local",
            "max_per_second",
            "spread_over_seconds",
            "counts",
            "created_at",
            "started_at",
            "fanned_out_at",
            "finished_at",
            "estimated_finish_at",
            "counts_at",
            "note",
        ]

    def get_counts(self, broadcast: Broadcast) -> dict[str, int | None]:
        rollup = broadcast.counts or {}
        return {
            "audience": broadcast.audience_count,
            "planned": broadcast.planned_count,
            **{name: rollup.get(name, 0) for name in ("sent", "delivered", "failed", "suppressed", "deferred")},
            "cancelled": rollup.get("cancelled", 0),
        }

    def get_estimated_finish_at(self, broadcast: Broadcast) -> str | None:
        estimate = broadcast_estimate(broadcast=broadcast, now=timezone.now())
        return estimate.isoformat() if estimate else None


class BroadcastViewSet(QueryCheckedView, viewsets.GenericViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    # Reading a broadcast's progress is reading notifications; starting or stopping one is sending.
    required_scopes = {"GET": Scope.NOTIFICATIONS_READ, "POST": Scope.EVENTS_SEND}
    serializer_class = BroadcastSerializer
    pagination_class = CreatedCursorPagination
    queryset = Broadcast.objects.none()

    def get_queryset(self):  # type: ignore[no-untyped-def]
        key = api_key_of(self.request)
        broadcasts = Broadcast.objects.filter(tenant=key.tenant).select_related("category")
        return broadcasts.filter(category__key__in=key.categories) if key.categories else broadcasts

    def get_object(self) -> Broadcast:
        broadcast = self.get_queryset().filter(pk=_uuid_or_404(self.kwargs["pk"])).first()
        if broadcast is None:
            raise Http404
        self.check_object_permissions(self.request, broadcast)
        return broadcast

    @extend_schema(
        request=BroadcastCreateSerializer,
        responses={202: BroadcastSerializer},
        summary="Broadcast a notification to a topic, a segment or everyone",
    )
    def create(self, request: Request) -> Response:
        serializer = BroadcastCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        attrs = serializer.validated_data
        try:
            accepted = broadcast_create(
                api_key=api_key_of(request),
                request=BroadcastRequest(
                    category_key=attrs["category"],
                    audience=attrs["audience"],
                    data=attrs["data"],
                    idempotency_key=attrs.get("idempotency_key"),
                    replace_key=attrs.get("replace_key"),
                    send_at=attrs.get("send_at"),
                    send_at_local=attrs.get("send_at_local"),
                    max_per_second=attrs.get("max_per_second"),
                    spread_over_seconds=attrs.get("spread_over_seconds"),
                    body=body_of(request),
                ),
            )
        except CategoryNotAllowed as error:
            return error_response(
                status_code=status.HTTP_403_FORBIDDEN,
                code="category_not_allowed",
                message=error.message,
                fields={error.field: [error.message]},
            )
        except IngestError as error:
            return field_error(field=error.field, message=error.message)
        except IdempotencyConflict as error:
            return error_response(
                status_code=status.HTTP_409_CONFLICT,
                code="idempotency_conflict",
                message=str(error),
                fields={"idempotency_key": [str(error)]},
            )
        response = Response(BroadcastSerializer(accepted.broadcast).data, status=status.HTTP_202_ACCEPTED)
        if accepted.replayed:
            response["Idempotent-Replayed"] = "true"
        return response

    def _control(self, control: Any) -> Response:
        try:
            broadcast = control(broadcast=self.get_object())
        except NotControllable as error:
            return error_response(status_code=status.HTTP_409_CONFLICT, code="not_controllable", message=str(error))
        return Response(BroadcastSerializer(broadcast).data)

    @extend_schema(request=None, responses={200: BroadcastSerializer, 409: ErrorSerializer}, summary="Pause")
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str) -> Response:
        return self._control(broadcast_pause)

    @extend_schema(request=None, responses={200: BroadcastSerializer, 409: ErrorSerializer}, summary="Resume")
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str) -> Response:
        return self._control(broadcast_resume)

    @extend_schema(
        request=None, responses={200: BroadcastSerializer, 409: ErrorSerializer}, summary="Cancel what is not sent"
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        return self._control(broadcast_cancel)


def _uuid_or_404(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise Http404
