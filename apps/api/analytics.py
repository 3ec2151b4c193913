"""Engagement analytics over the API: rates per channel, category, template version or A/B
variant, from the hourly rollups (apps/ops/dashboard.py); an A/B test's variants compared
(apps/ops/experiments.py), and its winner promoted."""

from typing import Any

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from apps.api.errors import field_error
from apps.api.query import QueryCheckedView
from apps.api.scopes import category_check
from apps.api.views import api_key_of
from apps.catalog.models import Category, Channel, TemplateVersion
from apps.catalog.services import PromoteError, template_variant_promote
from apps.ops.dashboard import ANALYTICS_GROUPS, ENGAGEMENT_OUTCOMES, engagement_rates
from apps.ops.experiments import METRICS, variants_compare
from apps.tenants.models import ApiKey, Scope

# A longer span would read too many hourly rows for one request.
MAX_SPAN_DAYS = 92


class PeriodQuerySerializer(serializers.Serializer):
    # `from` is a keyword in Python: the field is renamed below.
    from_ = serializers.DateTimeField(help_text="Start of the period (ISO 8601), rounded down to the hour.")
    to = serializers.DateTimeField(help_text="End of the period (ISO 8601, excluded), rounded down to the hour.")

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["from"] = fields.pop("from_")
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since, until = attrs["from"], attrs["to"]
        if until <= since:
            raise serializers.ValidationError({"to": ["Must be later than `from`."]})
        if (until - since).days > MAX_SPAN_DAYS:
            raise serializers.ValidationError({"to": [f"The period is at most {MAX_SPAN_DAYS} days."]})
        return attrs


class AnalyticsQuerySerializer(PeriodQuerySerializer):
    category = serializers.SlugField(required=False, help_text="Only this category (its key).")
    group_by = serializers.MultipleChoiceField(
        choices=sorted(ANALYTICS_GROUPS),
        required=False,
        help_text="Comma-separated: channel, category, template_version, variant. Default: channel.",
    )

    def to_internal_value(self, data: Any) -> Any:
        data = dict(data)
        if isinstance(data.get("group_by"), str):
            data["group_by"] = [part.strip() for part in data["group_by"].split(",") if part.strip()]
        return super().to_internal_value(data)


_RATES: dict[str, serializers.Field] = {name: serializers.FloatField(allow_null=True) for name in ENGAGEMENT_OUTCOMES}
_COUNTS: dict[str, serializers.Field] = {name: serializers.IntegerField() for name in ("sent", *ENGAGEMENT_OUTCOMES)}
_GROUP: dict[str, serializers.Field] = {
    "channel": serializers.CharField(required=False),
    "category": serializers.CharField(required=False, help_text="The category's key."),
    "template_version": serializers.IntegerField(required=False, help_text="The template version's id."),
    "variant": serializers.CharField(required=False, help_text="The A/B variant's key; empty: no test."),
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


class VariantsQuerySerializer(PeriodQuerySerializer):
    category = serializers.SlugField(help_text="The category (its key) whose template's variants to compare.")
    version = serializers.IntegerField(
        required=False, min_value=1, help_text="The template's version number. Default: its newest."
    )
    channel = serializers.ChoiceField(choices=Channel.choices, help_text="The channel whose variants to compare.")
    metric = serializers.ChoiceField(
        choices=METRICS, default="opened", help_text="The rate the test compares: opened or clicked."
    )


class VariantPromoteSerializer(serializers.Serializer):
    category = serializers.SlugField(help_text="The category (its key) whose template the variant is in.")
    version = serializers.IntegerField(min_value=1, help_text="The template version number holding the test.")
    channel = serializers.ChoiceField(choices=Channel.choices)
    variant = serializers.SlugField(max_length=20, help_text="The winning variant's key.")


def _category_version(
    *, api_key: ApiKey, category_key: str, number: int | None
) -> tuple[Category, TemplateVersion] | Response:
    """The key's category and its template's version (the newest when no number is given), or
    the 400 that names the field at fault."""
    category_check(api_key=api_key, category_key=category_key)
    category = Category.objects.filter(tenant=api_key.tenant, key=category_key).select_related("template").first()
    if category is None:
        return field_error(field="category", message=f"No category '{category_key}'.")
    versions = TemplateVersion.objects.filter(template=category.template).select_related("template")
    version = versions.filter(number=number).first() if number else versions.order_by("-number").first()
    if version is None:
        return field_error(field="version", message=f"Template '{category.template.key}' has no version {number}.")
    return category, version


_VARIANT_COUNTS: dict[str, serializers.Field] = {name: serializers.IntegerField() for name in METRICS}


class VariantComparisonView(QueryCheckedView):
    required_scopes = {"GET": Scope.ANALYTICS_READ}
    query_serializer_class = VariantsQuerySerializer

    @extend_schema(
        parameters=[VariantsQuerySerializer],
        responses={
            200: inline_serializer(
                name="VariantComparison",
                fields={
                    "from": serializers.DateTimeField(),
                    "to": serializers.DateTimeField(),
                    "category": serializers.CharField(),
                    "version": serializers.IntegerField(),
                    "channel": serializers.CharField(),
                    "metric": serializers.CharField(),
                    "variants": inline_serializer(
                        name="VariantFigures",
                        fields={
                            "variant": serializers.CharField(help_text="Its key; empty: sent outside the test."),
                            "control": serializers.BooleanField(),
                            "sent": serializers.IntegerField(help_text="The sample size."),
                            "delivered": serializers.IntegerField(),
                            **_VARIANT_COUNTS,
                            "rates": inline_serializer(
                                name="VariantRates",
                                fields={
                                    name: serializers.FloatField(allow_null=True) for name in ("delivered", *METRICS)
                                },
                            ),
                            "test": inline_serializer(
                                name="VariantTest",
                                allow_null=True,
                                fields={
                                    "difference": serializers.FloatField(),
                                    "z": serializers.FloatField(),
                                    "p_value": serializers.FloatField(),
                                },
                            ),
                        },
                        many=True,
                    ),
                },
            )
        },
        summary="An A/B test's variants side by side, each tested against the control",
    )
    def get(self, request: Request) -> Response:
        api_key = api_key_of(request)
        found = _category_version(
            api_key=api_key, category_key=self.filters["category"], number=self.filters.get("version")
        )
        if isinstance(found, Response):
            return found
        category, version = found
        channel, metric = self.filters["channel"], self.filters["metric"]
        if not version.variants.filter(channel=channel).exists():
            return field_error(field="channel", message=f"{version} has no content for {channel}.")
        since = self.filters["from"].replace(minute=0, second=0, microsecond=0)
        until = self.filters["to"].replace(minute=0, second=0, microsecond=0)
        variants = variants_compare(
            tenant_id=api_key.tenant_id,
            template_version_id=version.pk,
            channel=channel,
            metric=metric,
            since=since,
            until=until,
        )
        return Response(
            {
                "from": since,
                "to": until,
                "category": category.key,
                "version": version.number,
                "channel": channel,
                "metric": metric,
                "variants": variants,
            }
        )


class VariantPromoteView(QueryCheckedView):
    required_scopes = {"POST": Scope.ADMIN}

    @extend_schema(
        request=VariantPromoteSerializer,
        responses={
            201: inline_serializer(
                name="VariantPromoted",
                fields={"template": serializers.CharField(), "version": serializers.IntegerField()},
            )
        },
        summary="Promote an A/B test's winner: a new template version with only its content on the channel",
    )
    def post(self, request: Request) -> Response:
        api_key = api_key_of(request)
        body = VariantPromoteSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        found = _category_version(
            api_key=api_key, category_key=body.validated_data["category"], number=body.validated_data["version"]
        )
        if isinstance(found, Response):
            return found
        _, version = found
        try:
            promoted = template_variant_promote(
                version=version, channel=body.validated_data["channel"], key=body.validated_data["variant"]
            )
        except PromoteError as error:
            return field_error(field=error.field, message=error.message)
        return Response({"template": version.template.key, "version": promoted.number}, status=201)
