"""The deployment files carry no published secret, and the image gets no local state."""

import json
from pathlib import Path

import yaml

from apps.deliveries.checks import is_known_credential, is_sandbox_url

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = (
    "migrate",
    "web",
    "web-critical",
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


def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / "docker" / name).read_text())


def test_every_long_running_service_has_a_healthcheck_and_only_migrate_runs_once():
    services = _compose("compose.yaml")["services"]
    assert set(APP_SERVICES) | {"postgres", "redis"} == set(services)
    for name, service in services.items():
        if name == "migrate":
            # A one-shot: the others wait for it to exit successfully, not to be healthy.
            assert service["restart"] == "no" and "healthcheck" not in service
            continue
        assert service["healthcheck"]["test"], name
        if name in APP_SERVICES:
            assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
            assert service["healthcheck"]["start_period"], name
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert _compose("compose.demo.yaml")["services"]["sandbox"]["healthcheck"]["test"]


def test_the_data_lives_in_named_volumes_and_redis_appends_every_write():
    compose = _compose("compose.yaml")
    services = compose["services"]
    assert services["postgres"]["volumes"] == ["postgres-data:/var/lib/postgresql/data"]
    assert services["redis"]["volumes"] == ["redis-data:/data"]
    assert {"postgres-data", "redis-data"} <= set(compose["volumes"])
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_migrate_creates_the_admin_login_from_required_variables():
    migrate = _compose("compose.yaml")["services"]["migrate"]
    assert "manage.py migrate" in " ".join(migrate["command"])
    assert "manage.py admin_ensure" in " ".join(migrate["command"])
    for variable in ("NOTIFY_ADMIN_USERNAME", "NOTIFY_ADMIN_EMAIL", "NOTIFY_ADMIN_PASSWORD"):
        assert str(migrate["environment"][variable]).startswith(f"${{{variable}:?"), variable
        # The password is for the migrate step alone, not every container's environment.
        assert variable not in _compose("compose.yaml")["services"]["web"]["environment"]


def _required_in(text: str) -> set[str]:
    import re

    return set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))


def test_the_env_example_lists_every_required_secret_with_no_value():
    required = _required_in((ROOT / "docker" / "compose.yaml").read_text())
    assert {"DJANGO_SECRET_KEY", "POSTGRES_PASSWORD", "NOTIFY_ADMIN_PASSWORD"} <= required
    example = {}
    for line in (ROOT / "docker" / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            example[name] = value
    assert set(example) == required
    assert all(value == "" for value in example.values()), example
    # No secret falls back to a default anywhere in the deployment file.
    assert "${POSTGRES_PASSWORD:-" not in (ROOT / "docker" / "compose.yaml").read_text()
    assert "notify:notify@" not in (ROOT / "docker" / "compose.yaml").read_text()


def test_the_demo_env_gives_every_required_value():
    required = _required_in((ROOT / "docker" / "compose.yaml").read_text())
    lines = (ROOT / "docker" / "demo.env").read_text().splitlines()
    given = {line.partition("=")[0] for line in lines if line.strip() and not line.startswith("#")}
    assert required <= given, sorted(required - given)


def test_the_host_network_override_keeps_every_service_on_loopback_away_from_the_usual_ports():
    hostnet = _compose("compose.hostnet.yaml")["services"]
    demo = _compose("compose.demo.yaml")["services"]
    assert set(hostnet) == set(_compose("compose.yaml")["services"]) | set(demo)
    for name, service in hostnet.items():
        assert service["network_mode"] == "host", name
    text = (ROOT / "docker" / "compose.hostnet.yaml").read_text()
    for usual in (":5432/", ":6379/", ":8000", ":8025", ":5672"):
        assert usual not in text, usual
    assert "listen_addresses=127.0.0.1" in hostnet["postgres"]["command"]
    assert hostnet["redis"]["command"][hostnet["redis"]["command"].index("--bind") + 1] == "127.0.0.1"
    for name in ("web", "web-critical", "sandbox"):
        command = hostnet[name]["command"]
        assert command[command.index("--host") + 1] == "127.0.0.1", name


def test_the_stand_ins_are_tagged_as_the_official_images_and_the_dockerfile_keeps_its_base():
    assert (ROOT / "docker" / "Dockerfile").read_text().splitlines()[0] == "FROM python:3.11-slim"
    script = (ROOT / "scripts" / "compose-standins.sh").read_text()
    for image, recipe in (("python:3.11-slim", "python"), ("postgres:15", "postgres"), ("redis:7", "redis")):
        assert f"{image}) recipe={recipe}" in script
        assert (ROOT / "docker" / "standins" / f"{recipe}.Dockerfile").exists()
    images = {service.get("image") for service in _compose("compose.yaml")["services"].values()}
    assert {"postgres:15", "redis:7"} <= images


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
