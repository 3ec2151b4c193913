import os

from django.core.wsgi import get_wsgi_application

from apps.deliveries.checks import configuration_verify
from config.memory import garbage_collector_tune
from notify.observability.tracing import tracing_setup

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
tracing_setup(process_kind="web")
application = get_wsgi_application()
configuration_verify()
garbage_collector_tune()
