"""The run and test commands' set-up (scripts/lib.sh) on machines that lack a service: as root on
Debian it installs it (scripts/bare-machine-check.sh proves that on a bare machine); anywhere
else it names the one command that installs it and stops, without a traceback. Where the
services run, it does nothing; a database it may not use is an error, never a traceback. Each
case is a real machine state: a user namespace for "not root", a mount namespace for another
distribution or a missing PostgreSQL, a PATH that holds only the base system's tools."""

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
# What the set-up runs besides bash builtins and the project's Python; no redis-server, no apt-get.
BASE_TOOLS = ("dirname", "id", "uname", "cat", "ls", "sort", "tail", "seq", "sleep", "sha256sum", "cut")

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root to make namespaces (util-linux unshare)"
)


@pytest.fixture
def base_path(tmp_path):
    """A directory of the base system's tools only, for PATH."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for name in BASE_TOOLS:
        (directory / name).symlink_to(tool(name))
    return str(directory)


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, name
    return path


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def set_up(
    function: str, *, env: dict[str, str], namespace: list[str], prelude: str = ""
) -> subprocess.CompletedProcess:
    """Run one of lib.sh's functions in a shell made as `namespace` says."""
    script = f'{prelude}source scripts/lib.sh; {function}; echo "{function}: done"'
    return subprocess.run(
        [*namespace, tool("bash"), "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@needs_namespaces
def test_not_root_on_debian_a_missing_redis_is_named_with_its_install_command(base_path):
    env = {"PATH": base_path, "CELERY_BROKER_URL": f"redis://127.0.0.1:{closed_port()}/0"}
    user = [tool("unshare"), "--user", "--map-user=1000", "--map-group=1000"]
    result = set_up("redis_ensure", env=env, namespace=user)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "redis is needed for the broker, caps and limits and is not installed." in result.stderr
    assert "Install it: sudo apt-get install -y redis-server" in result.stderr
    assert "done" not in result.stdout and "Traceback" not in result.stderr


@needs_namespaces
def test_as_root_on_another_distribution_a_missing_postgresql_is_named_with_its_install_command(base_path, tmp_path):
    fedora = tmp_path / "os-release"
    fedora.write_text('NAME="Fedora Linux"\nID=fedora\nVERSION_ID=41\n')
    # This machine's PostgreSQL hidden under an empty directory, and a Fedora release file.
    mount_command = tool("mount")
    prelude = (
        f"{mount_command} -t tmpfs empty /usr/lib/postgresql && {mount_command} --bind {fedora} /etc/os-release && "
    )
    env = {"PATH": base_path, "DATABASE_URL": f"postgres://postgres@127.0.0.1:{closed_port()}/notify"}
    private = [tool("unshare"), "--mount", "--propagation", "private"]
    result = set_up("postgres_ensure", env=env, namespace=private, prelude=prelude)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "postgresql is needed for the database and is not installed. Install it: dnf install -y postgresql-server"
        in (result.stderr)
    )
    assert "done" not in result.stdout and "Traceback" not in result.stderr


def test_a_redis_elsewhere_is_not_installed_here(base_path):
    env = {"PATH": base_path, "CELERY_BROKER_URL": "redis://192.0.2.1:6379/0"}
    result = set_up("redis_ensure", env=env, namespace=[])
    assert result.returncode == 1
    assert "Redis is not reachable at redis://192.0.2.1:6379/0. Start it there" in result.stderr
    assert "installing" not in result.stdout


def test_where_the_services_run_the_set_up_does_nothing_and_takes_no_time(base_path):
    # No apt-get on PATH: the set-up must not need it.
    env = {
        "PATH": base_path,
        "DATABASE_URL": os.environ["DATABASE_URL"],
        "CELERY_BROKER_URL": os.environ["CELERY_BROKER_URL"],
    }
    started = time.monotonic()
    result = set_up("redis_ensure; postgres_ensure", env=env, namespace=[])
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "redis_ensure; postgres_ensure: done\n" and result.stderr == ""
    # A few Python starts on a loaded machine; an install or a wait for a service takes far longer.
    assert elapsed < 10, elapsed


def test_an_installed_redis_that_is_not_running_is_started_on_the_port_its_url_names():
    port = closed_port()
    env = {**os.environ, "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0"}
    try:
        result = set_up("redis_ensure", env=env, namespace=[])
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"starting Redis on 127.0.0.1:{port}" in result.stdout
        assert redis.Redis(port=port).ping()
    finally:
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=port).shutdown(nosave=True)


def test_a_database_user_that_may_not_create_the_database_gets_an_error_not_a_traceback():
    admin = os.environ["DATABASE_URL"]
    parts = urlsplit(admin)
    role = f"setup_check_{os.getpid()}"
    with psycopg.connect(admin, autocommit=True) as connection:
        # With a password, so that it logs in whatever pg_hba.conf asks of it.
        connection.execute(f"create role \"{role}\" login password '{role}'")
    try:
        limited = urlunsplit(
            parts._replace(netloc=f"{role}:{role}@{parts.hostname}:{parts.port or 5432}", path=f"/{role}")
        )
        result = set_up("database_create", env={**os.environ, "DATABASE_URL": limited}, namespace=[])
        assert result.returncode == 1
        assert f"error: cannot create the database {role} as {role}: permission denied" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'drop role "{role}"')
