"""Producers' webhook endpoints: register, list, change, delete, and rotate the signing secret."""

from typing import Any, cast

from drf_spectacular.utils import extend_schema, extend_schema_view, inline_serializer
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.query import QueryCheckedView
from apps.api.scopes import category_check, read_write
from apps.api.views import CreatedCursorPagination, api_key_of
from apps.catalog.models import Category
from apps.tenants.models import Scope
from apps.webhooks.models import EVENT_TYPES, WebhookEndpoint
from apps.webhooks.services import endpoint_create, endpoint_secret_rotate, endpoints_enable, endpoints_list


class WebhookEndpointSerializer(serializers.ModelSerializer):
    """A URL that receives signed events of the chosen types (docs/webhooks.md)."""

    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=EVENT_TYPES), min_length=1, max_length=len(EVENT_TYPES)
    )
    category = serializers.SlugRelatedField(
        slug_field="key",
        queryset=Category.objects.none(),
        required=False,
        allow_null=True,
        help_text="Only events about this category's notifications; null: every category.",
    )

    class Meta:
        model = WebhookEndpoint
        fields = [
            "id",
            "url",
            "event_types",
            "category",
            "description",
            "alert_email",
            "enabled",
            "disabled_reason",
            "created_at",
        ]
        read_only_fields = ["id", "disabled_reason", "created_at"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "tenant" in self.context:  # not while the OpenAPI schema is generated
            self.fields["category"].queryset = Category.objects.filter(tenant=self.context["tenant"])  # type: ignore[attr-defined]


class WebhookEndpointCreatedSerializer(WebhookEndpointSerializer):
    secret = serializers.CharField(read_only=True, help_text="The signing secret: shown this once, never again.")

    class Meta(WebhookEndpointSerializer.Meta):
        fields = [*WebhookEndpointSerializer.Meta.fields, "secret"]


@extend_schema_view(
    list=extend_schema(summary="List the webhook endpoints"),
    create=extend_schema(
        summary="Register a webhook endpoint (the answer holds its signing secret, once)",
        responses={201: WebhookEndpointCreatedSerializer},
    ),
    retrieve=extend_schema(summary="Read a webhook endpoint"),
    partial_update=extend_schema(summary="Change a webhook endpoint (enabled, event types, category, url)"),
    destroy=extend_schema(summary="Delete a webhook endpoint and its undelivered messages"),
)
class WebhookEndpointViewSet(QueryCheckedView, viewsets.ModelViewSet):
    """Where the service tells producers about deliveries, recipients and broadcasts."""

    required_scopes = read_write(read=Scope.WEBHOOKS_MANAGE, write=Scope.WEBHOOKS_MANAGE)
    serializer_class = WebhookEndpointSerializer
    pagination_class = CreatedCursorPagination
    queryset = WebhookEndpoint.objects.none()
    http_method_names = ["get", "post", "patch", "delete"]

    def get_queryset(self):  # type: ignore[no-untyped-def]
        return endpoints_list(tenant=api_key_of(self.request).tenant)

    def get_serializer_context(self) -> dict[str, Any]:
        return {**super().get_serializer_context(), "tenant": api_key_of(self.request).tenant}

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if data.get("category") is not None:
            category_check(api_key=api_key_of(request), category_key=data["category"].key)
        endpoint = endpoint_create(
            tenant=api_key_of(request).tenant,
            url=data["url"],
            event_types=data["event_types"],
            category=data.get("category"),
            description=data.get("description", ""),
            alert_email=data.get("alert_email", ""),
        )
        return Response(WebhookEndpointCreatedSerializer(endpoint).data, status=status.HTTP_201_CREATED)

    def perform_update(self, serializer: WebhookEndpointSerializer) -> None:  # type: ignore[override]
        endpoint = cast(WebhookEndpoint, serializer.instance)
        was_enabled = endpoint.enabled
        if serializer.validated_data.get("category") is not None:
            category_check(api_key=api_key_of(self.request), category_key=serializer.validated_data["category"].key)
        serializer.save()
        if endpoint.enabled and not was_enabled:
            endpoints_enable(endpoints=[endpoint])

    @extend_schema(
        request=None,
        responses=inline_serializer(name="WebhookSecret", fields={"secret": serializers.CharField()}),
        summary="Replace the endpoint's signing secret (the answer holds the new one, once)",
    )
    @action(detail=True, methods=["post"], url_path="rotate-secret")
    def rotate_secret(self, request: Request, pk: str) -> Response:
        return Response({"secret": endpoint_secret_rotate(endpoint=self.get_object())})
