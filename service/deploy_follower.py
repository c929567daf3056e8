"""The scorer follows the deployment state in Redis.

Every `deploy_poll_s` it reads the version counter; when it moved, it reads the config last
put through `PUT /admin/experiments` and the state of the experiments it serves, canaries
included, and hands them to `Routing.follow` (load, verify, warm beside, swap). A
bundle that fails is refused and logged, the old one keeps serving, and the refusal shows in
`GET /v1/models` (`deployment.error`) until a later version applies cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import redis.asyncio as aioredis

from ctrserve.bundles import BundleError
from ctrserve.service.deployments import read_config, read_state, read_version
from ctrserve.service.experiments.config import ExperimentConfigError
from ctrserve.service.routing import Routing
from ctrserve.service.schemas import DeploymentStatus
from ctrserve.service.tasks import stop_task

log = logging.getLogger("ctrserve.deployments")


class DeploymentFollower:
    def __init__(self, routing: Routing, client: aioredis.Redis, poll_s: float):
        self.routing, self.client, self.poll_s = routing, client, poll_s
        self.version: int | None = None
        self.applied_at = ""
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def sync(self) -> None:
        """Apply the state when its version differs from the last one seen."""
        version = await read_version(self.client)
        if version != self.version:
            await self.apply(version)

    async def apply(self, version: int) -> None:
        """Apply the state as of `version` (read first: a change after it bumps it again)."""
        stored = await read_config(self.client)
        _, state, canaries = await read_state(self.client, self.routing.names(stored))
        try:
            changed = await self.routing.follow(state, canaries, stored)
        except (ExperimentConfigError, BundleError) as exc:
            self.error = f"deployment version {version} refused, the old bundles keep " \
                         f"serving: {exc}"
            log.error("%s", self.error)
        else:
            self.error = None
            if changed:
                self.applied_at = datetime.now(UTC).isoformat(timespec="seconds")
                log.info("deployment version %d applied", version)
        self.version = version

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="deploy-follower")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync()
            except Exception as exc:  # Redis away for a moment: keep serving, try again
                log.warning("deployment state not read: %r", exc)

    async def stop(self) -> None:
        await stop_task(self._task, log)

    def status(self) -> DeploymentStatus:
        return DeploymentStatus(version=self.version or 0, applied_at=self.applied_at,
                                error=self.error)
