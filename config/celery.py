"""The Celery application: configured from Django settings (CELERY_* names)."""

import os

from celery import Celery
from celery.signals import worker_init, worker_process_init

from config.memory import garbage_collector_tune

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("notify")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["notify"])


@worker_init.connect
@worker_process_init.connect
def _garbage_collector_tune(**_: object) -> None:
    # In the main process before the pool forks (its children share the frozen objects'
    # pages), and again in each child for what the child made as it started.
    garbage_collector_tune()
