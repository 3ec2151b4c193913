"""The calling API key itself: read what it may do, and rotate its secret."""

from datetime import timedelta

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.query import QueryCheckedView
from apps.api.scopes import ANY_KEY
from apps.api.serializers import ErrorSerializer
from apps.api.views import api_key_of
from apps.tenants.models import KEY_PREFIX, ApiKey
from apps.tenants.services import ROTATION_GRACE_DEFAULT, ROTATION_GRACE_MAX, api_key_rotate


class ApiKeySerializer(serializers.ModelSerializer):
    prefix = serializers.SerializerMethodField(help_text="The key's public part: ntf_<lookup>_…")

    class Meta:
        model = ApiKey
        fields = [
            "name",
            "prefix",
            "scopes",
            "categories",
            "expires_at",
            "last_used_at",
            "previous_expires_at",
            "created_at",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "scopes": {"help_text": "What the key may do."},
            "categories": {"help_text": "The only categories the key may use; empty: all."},
            "previous_expires_at": {"help_text": "Until when the secret before the last rotation works."},
        }

    def get_prefix(self, key: ApiKey) -> str:
        return f"{KEY_PREFIX}_{key.lookup}_"


class RotatedApiKeySerializer(ApiKeySerializer):
    key = serializers.SerializerMethodField(help_text="The new key. Shown once: it is not stored.")

    class Meta(ApiKeySerializer.Meta):
        fields = ["key", *ApiKeySerializer.Meta.fields]
        read_only_fields = fields

    def get_key(self, key: ApiKey) -> str:
        return str(self.context["raw_key"])


class RotationRequestSerializer(serializers.Serializer):
    grace_period_seconds = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=int(ROTATION_GRACE_MAX.total_seconds()),
        default=int(ROTATION_GRACE_DEFAULT.total_seconds()),
        help_text="How long the current secret keeps working; 0 stops it now.",
    )


class ApiKeySelfView(QueryCheckedView):
    required_scopes = {"GET": ANY_KEY}

    @extend_schema(responses={200: ApiKeySerializer}, summary="The calling API key: its scopes, categories and expiry")
    def get(self, request: Request) -> Response:
        return Response(ApiKeySerializer(api_key_of(request)).data)


class ApiKeyRotateView(QueryCheckedView):
    # Rotating grants nothing new, so any key may rotate itself, e.g. from a deploy pipeline.
    required_scopes = {"POST": ANY_KEY}

    @extend_schema(
        request=RotationRequestSerializer,
        responses={
            201: RotatedApiKeySerializer,
            400: OpenApiResponse(ErrorSerializer, description="A grace period out of range."),
        },
        summary="Rotate the calling key's secret",
        description="Answers the new key once. The current secret keeps working for "
        "`grace_period_seconds` (default a day, at most 7 days); a secret from an earlier rotation "
        "stops now. The key keeps its lookup, scopes, categories, expiry and rate limit.",
    )
    def post(self, request: Request) -> Response:
        serializer = RotationRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = api_key_of(request)
        raw_key = api_key_rotate(
            api_key=key, grace=timedelta(seconds=serializer.validated_data["grace_period_seconds"])
        )
        response = Response(
            RotatedApiKeySerializer(key, context={"raw_key": raw_key}).data, status=status.HTTP_201_CREATED
        )
        response["Cache-Control"] = "no-store"  # the only copy of the new key
        return response
