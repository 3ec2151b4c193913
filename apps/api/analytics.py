"""Engagement analytics over the API: rates per channel, category or template version, from the
hourly rollups (apps/ops/dashboard.py)."""

from typing import Any

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.errors import field_error
from apps.api.query import QueryCheckedView
from apps.api.scopes import category_check
from apps.api.views import api_key_of
from apps.catalog.models import Category
from apps.ops.dashboard import ANALYTICS_GROUPS, ENGAGEMENT_OUTCOMES, engagement_rates
from apps.tenants.models import Scope

# A longer span would read too many hourly rows for one request.
MAX_SPAN_DAYS = 92


class AnalyticsQuerySerializer(serializers.Serializer):
    category = serializers.SlugField(required=False, help_text="Only this category (its key).")
    # `from` is a keyword in Python: the field is renamed below.
    from_ = serializers.DateTimeField(help_text="Start of the period (ISO 8601), rounded down to the hour.")
    to = serializers.DateTimeField(help_text="End of the period (ISO 8601, excluded), rounded down to the hour.")
    group_by = serializers.MultipleChoiceField(
        choices=sorted(ANALYTICS_GROUPS),
        required=False,
        help_text="Comma-separated: channel, category, template_version. Default: channel.",
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["from"] = fields.pop("from_")
        return fields

    def to_internal_value(self, data: Any) -> Any:
        data = dict(data)
        if isinstance(data.get("group_by"), str):
            data["group_by"] = [part.strip() for part in data["group_by"].split(",") if part.strip()]
        return super().to_internal_value(data)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since, until = attrs["from"], attrs["to"]
        if until <= since:
            raise serializers.ValidationError({"to": ["Must be later than `from`."]})
        if (until - since).days > MAX_SPAN_DAYS:
            raise serializers.ValidationError({"to": [f"The period is at most {MAX_SPAN_DAYS} days."]})
        return attrs


_RATES: dict[str, serializers.Field] = {name: serializers.FloatField(allow_null=True) for name in ENGAGEMENT_OUTCOMES}
_COUNTS: dict[str, serializers.Field] = {name: serializers.IntegerField() for name in ("sent", *ENGAGEMENT_OUTCOMES)}
_GROUP: dict[str, serializers.Field] = {
    "channel": serializers.CharField(required=False),
    "category": serializers.CharField(required=False, help_text="The category's key."),
    "template_version": serializers.IntegerField(required=False, help_text="The template version's id."),
}


class AnalyticsView(QueryCheckedView):
    required_scopes = {"GET": Scope.ANALYTICS_READ}
    query_serializer_class = AnalyticsQuerySerializer

    @extend_schema(
        parameters=[AnalyticsQuerySerializer],
        responses={
            200: inline_serializer(
                name="Analytics",
                fields={
                    "from": serializers.DateTimeField(),
                    "to": serializers.DateTimeField(),
                    "group_by": serializers.ListField(child=serializers.CharField()),
                    "results": inline_serializer(
                        name="AnalyticsGroup",
                        fields={
                            **_GROUP,
                            **_COUNTS,
                            "rates": inline_serializer(name="AnalyticsRates", fields=_RATES),
                        },
                        many=True,
                    ),
                },
            )
        },
        summary="Delivery and engagement rates over a period, per channel, category or template version",
    )
    def get(self, request: Request) -> Response:
        api_key = api_key_of(request)
        since = self.filters["from"].replace(minute=0, second=0, microsecond=0)
        until = self.filters["to"].replace(minute=0, second=0, microsecond=0)
        group_by = sorted(self.filters.get("group_by") or {"channel"})
        category_id = None
        categories = dict(Category.objects.filter(tenant=api_key.tenant).values_list("id", "key"))
        if api_key.categories and "category" not in self.filters:
            return field_error(field="category", message="This API key is limited to categories: name one.")
        if "category" in self.filters:
            key = self.filters["category"]
            category_check(api_key=api_key, category_key=key)
            category_id = next((pk for pk, name in categories.items() if name == key), None)
            if category_id is None:
                return field_error(field="category", message=f"No category '{key}'.")
        results = engagement_rates(
            tenant_id=api_key.tenant_id, since=since, until=until, group_by=group_by, category_id=category_id
        )
        for result in results:
            if "category" in result:
                result["category"] = categories.get(result["category"], "")
        return Response({"from": since, "to": until, "group_by": group_by, "results": results})
