from django.urls import path
from rest_framework.routers import SimpleRouter

from apps.api.analytics import AnalyticsView, VariantComparisonView, VariantPromoteView
from apps.api.audiences import BroadcastViewSet, SegmentViewSet, TopicSubscribersView, TopicViewSet
from apps.api.imports import RecipientImportDetailView, RecipientImportView
from apps.api.keys import ApiKeyRotateView, ApiKeySelfView
from apps.api.views import (
    DeviceViewSet,
    EventBatchView,
    EventView,
    InboxTokenView,
    NotificationViewSet,
    RecipientConsentsView,
    RecipientEraseView,
    RecipientExportView,
    RecipientPreferenceLinkView,
    RecipientPreferencesView,
    RecipientViewSet,
    RecurringSendViewSet,
    WebPushSubscriptionViewSet,
)
from apps.api.webhooks import WebhookEndpointViewSet

router = SimpleRouter(trailing_slash=False)
router.register("notifications", NotificationViewSet, basename="notification")
router.register("recipients", RecipientViewSet, basename="recipient")
router.register("devices", DeviceViewSet, basename="device")
router.register("webpush-subscriptions", WebPushSubscriptionViewSet, basename="webpush-subscription")
router.register("recurring-sends", RecurringSendViewSet, basename="recurring-send")
router.register("topics", TopicViewSet, basename="topic")
router.register("segments", SegmentViewSet, basename="segment")
router.register("broadcasts", BroadcastViewSet, basename="broadcast")
router.register("webhook-endpoints", WebhookEndpointViewSet, basename="webhook-endpoint")

urlpatterns = [
    path("events", EventView.as_view(), name="events"),
    path("analytics", AnalyticsView.as_view(), name="analytics"),
    path("analytics/variants", VariantComparisonView.as_view(), name="analytics-variants"),
    path("analytics/variants/promote", VariantPromoteView.as_view(), name="analytics-variants-promote"),
    path("events/batch", EventBatchView.as_view(), name="events-batch"),
    path("inbox-tokens", InboxTokenView.as_view(), name="inbox-tokens"),
    path("topics/<slug:key>/subscribers", TopicSubscribersView.as_view(), name="topic-subscribers"),
    path("api-keys/self", ApiKeySelfView.as_view(), name="api-key-self"),
    path("api-keys/self/rotate", ApiKeyRotateView.as_view(), name="api-key-rotate"),
    # Before the router: its recipient route takes any external id, slashes included.
    path("recipients/import", RecipientImportView.as_view(), name="recipient-import"),
    path("recipients/imports/<uuid:import_id>", RecipientImportDetailView.as_view(), name="recipient-import-detail"),
    path("recipients/<path:external_id>/preferences", RecipientPreferencesView.as_view(), name="preferences"),
    path("recipients/<path:external_id>/consents", RecipientConsentsView.as_view(), name="consents"),
    path("recipients/<path:external_id>/export", RecipientExportView.as_view(), name="recipient-export"),
    path("recipients/<path:external_id>/erase", RecipientEraseView.as_view(), name="recipient-erase"),
    path(
        "recipients/<path:external_id>/preference-link",
        RecipientPreferenceLinkView.as_view(),
        name="preference-link",
    ),
    *router.urls,
]
