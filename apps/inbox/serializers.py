from typing import Any

from rest_framework import serializers

from apps.catalog.models import Severity
from apps.inbox.models import SEVERITY_OF_RANK, InboxItem


class InboxItemSerializer(serializers.ModelSerializer):
    seen = serializers.SerializerMethodField()
    read = serializers.SerializerMethodField()
    archived = serializers.SerializerMethodField()
    severity = serializers.SerializerMethodField()

    class Meta:
        model = InboxItem
        fields = [
            "id",
            "title",
            "body",
            "link",
            "data",
            "created_at",
            "sort_at",
            "seen",
            "read",
            "archived",
            "category",
            "tags",
            "severity",
            "group_key",
            "group_count",
            "actors",
            "expires_at",
            "snoozed_until",
        ]

    def get_seen(self, item: InboxItem) -> bool:
        return item.seen_at is not None

    def get_read(self, item: InboxItem) -> bool:
        return item.read_at is not None

    def get_archived(self, item: InboxItem) -> bool:
        return item.archived_at is not None

    def get_severity(self, item: InboxItem) -> str:
        return SEVERITY_OF_RANK.get(item.severity, Severity.MEDIUM).value


def inbox_item_json(*, item: InboxItem) -> dict[str, Any]:
    return dict(InboxItemSerializer(item).data)


def inbox_items_json(*, items: list[InboxItem]) -> list[dict[str, Any]]:
    """Many items as the API shows them; the serializer's fields are built once, not an item
    (building them is most of a ModelSerializer's cost)."""
    return [dict(data) for data in InboxItemSerializer(items, many=True).data]
