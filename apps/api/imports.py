"""Bulk recipient import over the API: upload a file, then follow its progress."""

from typing import IO, Any, cast
from uuid import UUID

from django.conf import settings
from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiRequest, OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.errors import error_response
from apps.api.query import QueryCheckedView
from apps.api.views import api_key_of
from apps.audiences.models import Topic
from apps.recipients.imports import ImportRefused, ImportTooLarge, recipient_import_start
from apps.recipients.models import ImportFormat, RecipientImport
from apps.tenants.models import Scope

CONTENT_TYPES = {
    "application/x-ndjson": ImportFormat.NDJSON,
    "application/ndjson": ImportFormat.NDJSON,
    "application/jsonl": ImportFormat.NDJSON,
    "text/csv": ImportFormat.CSV,
}


class RefusalSerializer(serializers.Serializer):
    line = serializers.IntegerField(help_text="The line number in the file, from 1 (a CSV header is line 1).")
    reason = serializers.CharField()


class RecipientImportOptionsSerializer(serializers.Serializer):
    topic = serializers.SlugField(
        max_length=100, required=False, help_text="Also subscribe every imported recipient to this topic (its key)."
    )


class RecipientImportSerializer(serializers.ModelSerializer):
    """An import's state, counts and the first refused lines."""

    topic: serializers.SlugRelatedField[Topic] = serializers.SlugRelatedField(
        slug_field="key", read_only=True, help_text="The topic every imported recipient is subscribed to."
    )

    progress = serializers.FloatField(read_only=True, help_text="Share of rows processed, 0 to 1.")
    refusals = serializers.SerializerMethodField()
    refusals_listed = serializers.SerializerMethodField(
        help_text="How many refusals are listed; the rest are only counted in `refused`."
    )

    class Meta:
        model = RecipientImport
        fields = [
            "id",
            "status",
            "format",
            "topic",
            "rows_total",
            "rows_processed",
            "progress",
            "created",
            "updated",
            "unchanged",
            "refused",
            "refusals_listed",
            "refusals",
            "error",
            "created_at",
            "started_at",
            "finished_at",
        ]

    @extend_schema_field(RefusalSerializer(many=True))
    def get_refusals(self, instance: RecipientImport) -> list[dict[str, Any]]:
        return [
            {"line": line, "reason": reason} for line, reason in instance.refusals.values_list("line_number", "reason")
        ]

    def get_refusals_listed(self, instance: RecipientImport) -> int:
        return min(instance.refused, settings.NOTIFY_IMPORT_REFUSALS_KEPT)


class RecipientImportView(QueryCheckedView):
    required_scopes = {"POST": Scope.RECIPIENTS_WRITE}
    query_serializer_class = RecipientImportOptionsSerializer

    @extend_schema(
        parameters=[RecipientImportOptionsSerializer],
        request={
            "application/x-ndjson": OpenApiRequest(OpenApiTypes.STR),
            "text/csv": OpenApiRequest(OpenApiTypes.STR),
        },
        responses={
            202: RecipientImportSerializer,
            415: OpenApiResponse(description="Neither NDJSON nor CSV."),
        },
        summary="Import recipients in bulk",
        description="Upload NDJSON (`application/x-ndjson`: one recipient object a line) or CSV "
        "(`text/csv`: a header line naming the columns external_id, email, phone, locale, timezone, "
        "attributes, then one recipient a line). The body is streamed into the database and "
        "processed in the background; follow it at GET /recipients/imports/{id}. Lines that fail "
        "validation are refused one by one, with their line number and reason.",
    )
    def post(self, request: Request) -> Response:
        content_type = (request.content_type or "").split(";")[0].strip().lower()
        file_format = CONTENT_TYPES.get(content_type)
        if file_format is None:
            message = f"Send the file as {', '.join(CONTENT_TYPES)}; got '{content_type or 'none'}'."
            return error_response(
                status_code=status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                code="unsupported_media_type",
                message=message,
                fields={"Content-Type": [message]},
            )
        key = api_key_of(request)
        topic = None
        if "topic" in self.filters:
            topic = Topic.objects.filter(tenant=key.tenant, key=self.filters["topic"]).first()
            if topic is None:
                message = f"No topic with the key '{self.filters['topic']}'; create it first (POST /api/v1/topics)."
                return error_response(
                    status_code=status.HTTP_400_BAD_REQUEST,
                    code="invalid",
                    message=message,
                    fields={"topic": [message]},
                )
        try:
            # The Django request reads the body as a stream; DRF's parsers never see it.
            recipient_import = recipient_import_start(
                tenant=key.tenant,
                file_format=file_format,
                stream=cast(IO[bytes], request._request),
                source=f"API key {key.name} ({key.lookup})",
                topic=topic,
            )
        except ImportTooLarge as error:
            return error_response(status_code=413, code="request_too_large", message=error.message)
        except ImportRefused as error:
            return error_response(
                status_code=status.HTTP_400_BAD_REQUEST,
                code="invalid",
                message=error.message,
                fields={error.field: [error.message]},
            )
        response = Response(RecipientImportSerializer(recipient_import).data, status=status.HTTP_202_ACCEPTED)
        response["Location"] = f"/api/v1/recipients/imports/{recipient_import.id}"
        return response


class RecipientImportDetailView(QueryCheckedView):
    required_scopes = {"GET": Scope.RECIPIENTS_READ}

    @extend_schema(responses={200: RecipientImportSerializer}, summary="Follow an import")
    def get(self, request: Request, import_id: UUID) -> Response:
        recipient_import = RecipientImport.objects.filter(id=import_id, tenant=api_key_of(request).tenant).first()
        if recipient_import is None:
            raise Http404
        return Response(RecipientImportSerializer(recipient_import).data)
