"""The deployment files carry no published secret, and the image gets no local state."""

from pathlib import Path

import yaml

from apps.deliveries.checks import is_known_credential, is_sandbox_url

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("migrate", "web", "worker-critical", "worker-normal", "worker-bulk", "worker-maintenance", "beat")


def test_the_compose_file_falls_back_to_no_sandbox_secret_or_url():
    text = (ROOT / "docker" / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    for name in APP_SERVICES:
        environment = compose["services"][name]["environment"]
        for variable, value in environment.items():
            # "${NAME:-fallback}": the fallback is what runs when nothing is set.
            fallback = str(value or "").partition(":-")[2].rstrip("}")
            assert not is_known_credential(fallback) and not is_sandbox_url(fallback), (name, variable)
        for required in ("DJANGO_SECRET_KEY", "NOTIFY_PUBLIC_URL", "DJANGO_ALLOWED_HOSTS"):
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
    for group in ("critical", "normal", "bulk", "maintenance"):
        service = services[f"worker-{group}"]
        assert f"-n {group}@%h" in " ".join(service["command"])
        assert f"ping -d {group}@$$HOSTNAME" in " ".join(service["healthcheck"]["test"])
    assert "beat_health" in services["beat"]["healthcheck"]["test"]
