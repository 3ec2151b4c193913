from django.urls import path

from apps.inbox.views import InboxCountsView, InboxItemMarkView, InboxItemsView, InboxReadAllView

urlpatterns = [
    path("items", InboxItemsView.as_view(), name="inbox-items"),
    path("counts", InboxCountsView.as_view(), name="inbox-counts"),
    path("items/read-all", InboxReadAllView.as_view(), name="inbox-read-all"),
    path("items/<str:item_id>/<str:mark>", InboxItemMarkView.as_view(), name="inbox-item-mark"),
]
