from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from apps.deliveries.views import twilio_inbound, twilio_status_callback
from apps.recipients import demo_views
from apps.recipients.preference_center import preference_center, preferences_from_email, unsubscribe_page

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("apps.api.urls")),
    path("inbox/v1/", include("apps.inbox.urls")),
    path("anymail/", include("anymail.urls")),
    path("preferences/<str:token>", preference_center, name="preference-center"),
    path("unsubscribe/<str:token>", unsubscribe_page, name="unsubscribe"),
    # A message's preferences link: its unsubscribe link plus /preferences (tokens.email_links).
    path("unsubscribe/<str:token>/preferences", preferences_from_email, name="preferences-from-email"),
    path("webhooks/twilio/status", twilio_status_callback, name="twilio-status"),
    path("webhooks/twilio/inbound", twilio_inbound, name="twilio-inbound"),
    path("demo/inbox/", demo_views.inbox_page, name="demo-inbox"),
    path("demo/inbox/token", demo_views.inbox_token, name="demo-inbox-token"),
    path("demo/webpush/", demo_views.webpush_page, name="demo-webpush"),
    path("demo/webpush/sw.js", demo_views.webpush_service_worker, name="demo-webpush-sw"),
    path("demo/webpush/subscribe", demo_views.webpush_subscribe_demo, name="demo-webpush-subscribe"),
    path("api/schema/", SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[]), name="schema"),
    path(
        "api/docs/",
        SpectacularSwaggerView.as_view(url_name="schema", authentication_classes=[], permission_classes=[]),
        name="api-docs",
    ),
    path(
        "api/redoc/",
        SpectacularRedocView.as_view(url_name="schema", authentication_classes=[], permission_classes=[]),
        name="api-redoc",
    ),
]

handler404 = "apps.api.errors.page_not_found"
