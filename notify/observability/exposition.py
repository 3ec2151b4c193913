"""Where metrics are kept and served: prometheus-client's multiprocess mode and each
worker's own port (the web /metrics' registry is in gauges.py, beside the stored gauges it
adds, so that this module, which every metric imports, imports nothing of the pipeline).

Every process counts into memory-mapped files under PROMETHEUS_MULTIPROC_DIR (the web
server's workers and Celery's prefork children are separate processes, whose counts a
scrape must add up). The mode is chosen when prometheus_client is first imported, so
`multiprocess_directory_default()` runs first thing in config/celery.py, which every process
imports before anything else of ours.

Two ways to read a worker's counts:
- one host (the demo, `make run`, the tests): workers write into the web processes' directory
  and the web /metrics serves them all;
- NOTIFY_WORKER_METRICS_PORT set (containers, several hosts): each worker's main process
  keeps its own directory, below the shared one, and serves it on that port; Prometheus
  scrapes every worker, since no directory is shared across hosts."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_directory_default() -> None:
    """Point prometheus-client's multiprocess mode at a directory (unless the environment
    names one) and make sure it exists. Must run before prometheus_client is imported."""
    directory = Path(os.environ.setdefault(MULTIPROC_ENV, str(Path(tempfile.gettempdir()) / "notify-metrics")))
    directory.mkdir(parents=True, exist_ok=True)


def worker_metrics_serve(*, port: int, address: str) -> Path:
    """Give this worker (its main process, before the pool forks) a directory of its own,
    emptied, and serve it on the port; return the directory. Its children inherit it."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    base = Path(os.environ[MULTIPROC_ENV])
    _stale_worker_directories_remove(base=base)
    directory = base / f"worker-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    start_http_server(port, addr=address, registry=registry)
    logger.info("worker metrics on http://%s:%d/metrics", address, port)
    return directory


def _stale_worker_directories_remove(*, base: Path) -> None:
    # Left by workers that were killed on this host: their counts died with them.
    for directory in base.glob("worker-*"):
        try:
            os.kill(int(directory.name.removeprefix("worker-")), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's


def process_exited(*, pid: int) -> None:
    """A pool child exited: drop its live gauges' files (its counters stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
