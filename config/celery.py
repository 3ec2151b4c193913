"""The Celery application: configured from Django settings (CELERY_* names)."""

import os
from typing import Any

from notify.observability.exposition import multiprocess_directory_default

# First of all: prometheus-client picks its multiprocess mode when it is first imported, and
# this module is the first of ours that every process (web, worker, beat, manage.py) loads.
multiprocess_directory_default()

from celery import Celery  # noqa: E402
from celery.signals import (  # noqa: E402
    beat_init,
    before_task_publish,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from django.db import close_old_connections  # noqa: E402

from config.memory import garbage_collector_tune  # noqa: E402
from notify.observability import logs, tracing  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("notify")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["notify"])


@worker_init.connect
@beat_init.connect
def _configuration_verify(**_: object) -> None:
    # A worker or beat refuses to start on an unsafe configuration, as the web server does
    # (Celery's own Django fixup runs Django's checks but ignores what they find).
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()
    from apps.deliveries.checks import configuration_verify

    configuration_verify()


@worker_init.connect
def _worker_metrics_serve(**_: object) -> None:
    # In the main process, before the pool forks: the children inherit its metrics directory.
    from django.conf import settings

    from notify.observability.exposition import worker_metrics_serve

    if settings.NOTIFY_WORKER_METRICS_PORT:
        worker_metrics_serve(port=settings.NOTIFY_WORKER_METRICS_PORT, address=settings.NOTIFY_WORKER_METRICS_ADDRESS)


@worker_process_shutdown.connect
def _worker_process_exited(**_: object) -> None:
    from notify.observability.exposition import process_exited

    process_exited(pid=os.getpid())


@worker_init.connect
@worker_process_init.connect
def _garbage_collector_tune(**_: object) -> None:
    # In the main process before the pool forks (its children share the frozen objects'
    # pages), and again in each child for what the child made as it started.
    garbage_collector_tune()


@task_prerun.connect
@task_postrun.connect
def _database_connections_check(*, task: Any = None, **_: object) -> None:
    # What Django does at the start and end of a request: close a connection that has
    # failed, or has outlived CONN_MAX_AGE; the next query opens a new one. Not for a task
    # run eagerly in the caller's process, which may be inside a transaction.
    if task is not None and getattr(task.request, "is_eager", False):
        return
    close_old_connections()


@worker_init.connect
def _tracing_setup_unforked(*, sender: Any, **_: object) -> None:
    # A prefork pool's children set tracing up after the fork (below): the span exporter's
    # thread does not survive one. A solo or threads pool runs tasks in this process.
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool

    if not issubclass(get_implementation(sender.pool_cls), PreforkPool):
        tracing.tracing_setup(process_kind="worker")


@worker_process_init.connect
def _tracing_setup_child(**_: object) -> None:
    tracing.tracing_setup(process_kind="worker")


@beat_init.connect
def _tracing_setup_beat(**_: object) -> None:
    tracing.tracing_setup(process_kind="beat")


@worker_process_shutdown.connect
@worker_shutdown.connect
def _tracing_flush(**_: object) -> None:
    tracing.tracing_shutdown()


@before_task_publish.connect
def _correlation_id_publish(*, headers: dict[str, Any], **_: object) -> None:
    logs.task_publish_annotate(headers=headers)


@task_prerun.connect
def _correlation_id_enter(*, task_id: str, task: Any, **_: object) -> None:
    # A task run eagerly in the caller's process keeps the caller's correlation id.
    if not getattr(task.request, "is_eager", False):
        logs.task_context_enter(task_id=task_id, request=task.request)


@task_postrun.connect
def _correlation_id_leave(*, task: Any, **_: object) -> None:
    if not getattr(task.request, "is_eager", False):
        logs.task_context_leave()
