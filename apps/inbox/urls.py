from django.urls import path

from apps.inbox.views import (
    InboxArchiveReadView,
    InboxCountsView,
    InboxItemMarkView,
    InboxItemSnoozeView,
    InboxItemsView,
    InboxProfileView,
    InboxReadAllView,
)

urlpatterns = [
    path("items", InboxItemsView.as_view(), name="inbox-items"),
    path("counts", InboxCountsView.as_view(), name="inbox-counts"),
    path("profile", InboxProfileView.as_view(), name="inbox-profile"),
    path("items/read-all", InboxReadAllView.as_view(), name="inbox-read-all"),
    path("items/archive-read", InboxArchiveReadView.as_view(), name="inbox-archive-read"),
    path("items/<str:item_id>/snooze", InboxItemSnoozeView.as_view(), name="inbox-item-snooze"),
    path("items/<str:item_id>/<str:mark>", InboxItemMarkView.as_view(), name="inbox-item-mark"),
]
