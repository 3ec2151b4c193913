"""Several "hosts" on one machine, for the multi-host test and benchmark: Linux network
namespaces on a private subnet of their own, each joined by a veth pair to a bridge on the
machine's side, whose address (SUBNET.1) stands for the database and broker host.

PostgreSQL and Redis stay where they are, listening on 127.0.0.1, and are reached on the
bridge's address through a small TCP forwarder (`python -m tests.hosts forward ...`) rather
than an iptables DNAT with route_localnet: a DNAT keeps the namespace's source address, which
PostgreSQL's pg_hba (trust on 127.0.0.1) and Redis' protected mode refuse, whereas the
forwarder connects from loopback, and it needs neither iptables nor a change to either server.

Every name made here starts with NAME_PREFIX; `Network.up()` first removes what a crashed
earlier run left, and `Network.down()` removes it all. One run at a time holds the names (a
lock that the kernel releases when its holder dies), so that two test runs or a test and a
benchmark on one machine wait for each other instead of removing each other's hosts. Needs
root and iproute2's `ip netns`."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
NAME_PREFIX = "ntfh"
BRIDGE = f"{NAME_PREFIX}-br"
SUBNET = "10.231.7"  # a /24 that this machine's networks do not use
LOCK_PATH = Path("/run/lock") / f"{NAME_PREFIX}-hosts.lock"
# What each host needs of the source tree: its own copy, so that a file one host writes under
# the project's directory (var/) is not there for another.
SOURCE = ("apps", "config", "notify", "templates", "manage.py")


def netns_unavailable() -> str:
    """Why the hosts cannot be made here, or "" when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    if not shutil.which("ip"):
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    probe = f"{NAME_PREFIX}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    """One namespace: its address on the subnet and a working directory of its own."""

    name: str
    address: str
    directory: Path

    @property
    def namespace(self) -> str:
        return f"{NAME_PREFIX}-{self.name}"

    def command(self, *args: str) -> list[str]:
        """The command, run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def environment(self) -> dict[str, str]:
        """What makes the host's processes keep their files to themselves."""
        tmp = self.directory / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return {
            "TMPDIR": str(tmp),
            "HOME": str(self.directory),
            "PROMETHEUS_MULTIPROC_DIR": str(self.directory / "metrics"),
            "PYTHONPATH": str(self.directory),
        }


class Network:
    """The bridge, one namespace per host name, and the forwarder to PostgreSQL and Redis."""

    def __init__(self, *, names: list[str], directory: Path, forward_ports: tuple[int, ...] = (5432, 6379)) -> None:
        self.gateway = f"{SUBNET}.1"
        self.directory = directory
        self.forward_ports = forward_ports
        self.hosts = {
            name: Host(name=name, address=f"{SUBNET}.{index + 2}", directory=directory / name)
            for index, name in enumerate(names)
        }
        self.forwarder: subprocess.Popen | None = None
        self._lock: int | None = None

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def reach(self, url: str) -> str:
        """A URL of a server on this machine's loopback (PostgreSQL, Redis), as the hosts reach
        it: on the gateway, through the forwarder."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@{self.gateway}" if credentials else self.gateway
        return urlunsplit(parts._replace(netloc=f"{netloc}:{parts.port}" if parts.port else netloc))

    def up(self, *, wait_seconds: float = 300.0) -> Network:
        self._lock_take(wait_seconds=wait_seconds)
        self._remove()
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for host in self.hosts.values():
            outside = f"{host.namespace}-h"[:15]  # an interface name has at most 15 characters
            _ip("netns", "add", host.namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
            _ip("link", "set", outside, "master", BRIDGE, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            self._source_copy(host)
        routes = [f"{self.gateway}:{port}=127.0.0.1:{port}" for port in self.forward_ports]
        # In a session of its own: a benchmark counts its CPU apart (by process group).
        self.forwarder = subprocess.Popen(
            [sys.executable, "-m", "tests.hosts", "forward", *routes], cwd=ROOT, start_new_session=True
        )
        for port in self.forward_ports:
            _wait_listening(self.gateway, port, process=self.forwarder)
        return self

    def down(self) -> None:
        """Remove every namespace and the bridge, and let the next run have them."""
        try:
            self._remove()
        finally:
            if self._lock is not None:
                os.close(self._lock)  # closing it releases the lock
                self._lock = None

    def _lock_take(self, *, wait_seconds: float) -> None:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._lock)
                    self._lock = None
                    raise RuntimeError(
                        f"another run has held the test hosts for {wait_seconds:.0f}s ({LOCK_PATH}); "
                        "wait for it to finish, or end it"
                    ) from None
                time.sleep(0.2)

    def _remove(self) -> None:
        """Remove every namespace and the bridge of this or an earlier run, ending the
        processes left inside those namespaces (they were started in them by a run of this)."""
        if self.forwarder is not None and self.forwarder.poll() is None:
            self.forwarder.terminate()
            self.forwarder.wait(timeout=10)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
        ours = [line.split()[0] for line in listed if line.startswith(f"{NAME_PREFIX}-")]
        for namespace in ours:
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        if self.forwarder is None:
            self._stale_forwarder_end()

    def _stale_forwarder_end(self) -> None:
        # A crashed run's forwarder still holds the gateway's ports: find it by what it listens on.
        for pid, command in _forwarders():
            if any(f"{self.gateway}:{port}=" in command for port in self.forward_ports):
                os.kill(pid, signal.SIGTERM)

    @staticmethod
    def _source_copy(host: Host) -> None:
        shutil.rmtree(host.directory, ignore_errors=True)
        host.directory.mkdir(parents=True)
        for name in SOURCE:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, host.directory / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, host.directory / name)


def _forwarders() -> list[tuple[int, str]]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "tests.hosts forward" in command:
            found.append((int(entry.name), command))
    return found


def _wait_listening(address: str, port: int, *, process: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the forwarder exited ({process.returncode}) before listening on {address}:{port}")
        with socket.socket() as probe:
            if probe.connect_ex((address, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {address}:{port} after {timeout}s")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _forward(routes: list[tuple[str, int, str, int]]) -> None:
    async def serve(listen: tuple[str, int], target: tuple[str, int]) -> asyncio.Server:
        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*target)
            except OSError:
                writer.close()
                return
            for sock in (writer.get_extra_info("socket"), upstream_writer.get_extra_info("socket")):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

        return await asyncio.start_server(connected, *listen, reuse_address=True)

    servers = [await serve((host, port), (to_host, to_port)) for host, port, to_host, to_port in routes]
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    """python -m tests.hosts forward LISTEN_ADDRESS:PORT=TARGET_ADDRESS:PORT ..."""
    if sys.argv[1:2] != ["forward"] or len(sys.argv) < 3:
        raise SystemExit("usage: python -m tests.hosts forward LISTEN_ADDRESS:PORT=TARGET_ADDRESS:PORT ...")
    routes = []
    for route in sys.argv[2:]:
        listen, _, target = route.partition("=")
        host, _, port = listen.rpartition(":")
        to_host, _, to_port = target.rpartition(":")
        routes.append((host, int(port), to_host, int(to_port)))
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    asyncio.run(_forward(routes))


if __name__ == "__main__":
    main()
