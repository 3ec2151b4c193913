"""ASGI entry point: Django's HTTP application, and the inbox WebSocket through Channels."""

import logging
import os

from django.core.asgi import get_asgi_application

from notify.observability.tracing import tracing_setup

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# Requests share pooled database connections (see DATABASE_POOL in config/settings.py). The
# settings read it as Django is set up, here; it is not left in the environment, where the
# processes this one starts (a test's workers) would inherit it.
pool_default = "DATABASE_POOL" not in os.environ
os.environ.setdefault("DATABASE_POOL", "true")
# Before Django loads its middleware, which the Django instrumentation adds to (when on).
tracing_setup(process_kind="web")
# Uvicorn's --log-level is on its logger "uvicorn.error", which Django's logging config (it
# configures "uvicorn") resets to inherit; put it back, or every WebSocket logs lines at INFO
# whatever the level asked for: two a connection, a fifth of what opening one costs.
uvicorn_level = logging.getLogger("uvicorn.error").level
# Django is set up here, before the imports below touch models.
http_application = get_asgi_application()
logging.getLogger("uvicorn.error").setLevel(uvicorn_level)
if pool_default:
    del os.environ["DATABASE_POOL"]

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from apps.api.middleware import AsgiRequestBodyLimit  # noqa: E402
from apps.deliveries.checks import configuration_verify  # noqa: E402
from apps.inbox.consumers import InboxConsumer  # noqa: E402
from config.memory import garbage_collector_tune  # noqa: E402

configuration_verify()

# No Origin check on the WebSocket: the inbox widget is embedded in other sites by design, and
# the connection is authorised by its signed recipient token, never by a cookie.
application = ProtocolTypeRouter(
    {
        # Django reads a whole body before its middleware runs: the limit is kept out here.
        "http": AsgiRequestBodyLimit(http_application),
        "websocket": URLRouter([path("inbox/v1/ws", InboxConsumer.as_asgi())]),
    }
)
garbage_collector_tune()
