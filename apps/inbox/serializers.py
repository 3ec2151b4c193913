from rest_framework import serializers

from apps.inbox.models import InboxItem


class InboxItemSerializer(serializers.ModelSerializer):
    seen = serializers.SerializerMethodField()
    read = serializers.SerializerMethodField()
    archived = serializers.SerializerMethodField()

    class Meta:
        model = InboxItem
        fields = ["id", "title", "body", "link", "data", "created_at", "seen", "read", "archived"]

    def get_seen(self, item: InboxItem) -> bool:
        return item.seen_at is not None

    def get_read(self, item: InboxItem) -> bool:
        return item.read_at is not None

    def get_archived(self, item: InboxItem) -> bool:
        return item.archived_at is not None
