"""The deployment files carry no published secret, and the image gets no local state."""

import json
from pathlib import Path

import yaml

from apps.deliveries.checks import is_known_credential, is_sandbox_url

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = (
    "migrate",
    "web",
    "worker-critical",
    "worker-normal",
    "worker-bulk",
    "worker-maintenance",
    "worker-webhooks",
    "beat",
)


def test_the_compose_file_falls_back_to_no_sandbox_secret_or_url():
    text = (ROOT / "docker" / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    for name in APP_SERVICES:
        environment = compose["services"][name]["environment"]
        for variable, value in environment.items():
            # "${NAME:-fallback}": the fallback is what runs when nothing is set.
            fallback = str(value or "").partition(":-")[2].rstrip("}")
            assert not is_known_credential(fallback) and not is_sandbox_url(fallback), (name, variable)
        for required in ("DJANGO_SECRET_KEY", "NOTIFY_PUBLIC_URL", "DJANGO_ALLOWED_HOSTS", "NOTIFY_ENCRYPTION_KEYS"):
            assert str(environment[required]).startswith(f"${{{required}:?"), required
    assert "sandbox" not in compose["services"]
    assert "sandbox-token" not in text and "sandbox-webhook-secret" not in text


def test_the_demo_override_runs_with_debug_on():
    demo = yaml.safe_load((ROOT / "docker" / "compose.demo.yaml").read_text())
    for name in APP_SERVICES:
        assert demo["services"][name]["environment"]["DJANGO_DEBUG"] == "1"
    assert demo["services"]["sandbox"]["ports"] == ["127.0.0.1:8025:8025"]


def test_the_image_gets_no_history_virtualenv_or_local_state():
    context = (ROOT / "docker" / "compose.yaml").read_text()
    assert "context: .." in context  # the repository root, where .dockerignore must be
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "var", "**/__pycache__", ".env", "**/*.env"} <= ignored


def test_the_compose_file_probes_web_readiness_each_worker_by_its_own_name_and_beat():
    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    assert any("/readyz" in part for part in services["web"]["healthcheck"]["test"])
    for group in ("critical", "normal", "bulk", "maintenance", "webhooks"):
        service = services[f"worker-{group}"]
        assert f"-n {group}@%h" in " ".join(service["command"])
        assert f"ping -d {group}@$$HOSTNAME" in " ".join(service["healthcheck"]["test"])
    assert "beat_health" in services["beat"]["healthcheck"]["test"]


OBSERVABILITY = ROOT / "docker" / "observability"


def _metric_names_declared() -> set[str]:
    """Every series name notify/observability/metrics.py defines, with the suffixes
    Prometheus adds to counters and histograms."""
    from prometheus_client import Counter, Histogram

    from notify.observability import metrics

    names = set(metrics.DB_GAUGES)
    for metric in vars(metrics).values():
        if isinstance(metric, Counter):
            names.add(f"{metric._name}_total")
        elif isinstance(metric, Histogram):
            names.update(f"{metric._name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        elif hasattr(metric, "_name") and hasattr(metric, "_type"):
            names.add(metric._name)
    return names


def _metric_names_referenced(text: str) -> set[str]:
    import re

    return set(re.findall(r"\bnotify_[a-z_]+\b", text)) - {"notify_web", "notify_workers"}


def test_the_alert_rules_and_the_dashboard_parse_and_name_only_metrics_that_exist():
    declared = _metric_names_declared()
    rules = yaml.safe_load((OBSERVABILITY / "prometheus-rules.yaml").read_text())
    alerts = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    for name in (
        "NotifyProviderFailureRateHigh",
        "NotifyDeadLettersGrowing",
        "NotifyCriticalQueueTooOld",
        "NotifyCircuitOpen",
        "NotifyCanaryFailing",
        "NotifyRunawayGuardHolding",
    ):
        assert name in alerts
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    referenced = _metric_names_referenced(" ".join([*alerts.values(), *expressions]))
    assert referenced, "no metric referenced"
    assert referenced <= declared, sorted(referenced - declared)
    titles = " ".join(panel["title"] for panel in dashboard["panels"])
    for panel in ("Events accepted", "Deliveries by state", "success rate", "P50 / P99", "Queue depth"):
        assert panel in titles
    for metric in ("notify_oldest_queued_delivery_seconds", "notify_dead_letters_pending", "notify_circuit_state"):
        assert metric in " ".join(expressions)
    config = yaml.safe_load((OBSERVABILITY / "prometheus.yaml").read_text())
    assert config["rule_files"] == ["prometheus-rules.yaml"]
    assert {job["job_name"] for job in config["scrape_configs"]} == {"notify-web", "notify-workers"}


def test_the_compose_file_requires_the_metrics_token_and_gives_each_container_its_metrics_directory():
    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert str(environment["NOTIFY_METRICS_TOKEN"]).startswith("${NOTIFY_METRICS_TOKEN:?")
        assert any(mount.startswith(environment["PROMETHEUS_MULTIPROC_DIR"]) for mount in services[name]["tmpfs"])
    for group in ("critical", "normal", "bulk", "maintenance", "webhooks"):
        assert services[f"worker-{group}"]["environment"]["NOTIFY_WORKER_METRICS_PORT"] == "9100"
    assert "NOTIFY_WORKER_METRICS_PORT" not in services["web"]["environment"]
