from django.urls import path
from rest_framework.routers import SimpleRouter

from apps.api.views import (
    DeviceViewSet,
    EventBatchView,
    EventView,
    InboxTokenView,
    NotificationViewSet,
    RecipientViewSet,
    WebPushSubscriptionViewSet,
)

router = SimpleRouter(trailing_slash=False)
router.register("notifications", NotificationViewSet, basename="notification")
router.register("recipients", RecipientViewSet, basename="recipient")
router.register("devices", DeviceViewSet, basename="device")
router.register("webpush-subscriptions", WebPushSubscriptionViewSet, basename="webpush-subscription")

urlpatterns = [
    path("events", EventView.as_view(), name="events"),
    path("events/batch", EventBatchView.as_view(), name="events-batch"),
    path("inbox-tokens", InboxTokenView.as_view(), name="inbox-tokens"),
    *router.urls,
]
