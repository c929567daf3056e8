"""The scorers' online state as the offline jobs (training/, the retrain) use it.

The retrain reads which arms an experiment has and what each serves, deploys what it trained,
reads the item records the scorers read, and reads the drained logs. This module is that
interface; the layers above the service import it instead of the service's internals
(tests/test_package.py keeps training/ to it).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from ctrserve.common.keys import item_key, state_key
from ctrserve.service.deployments import current, deploy
from ctrserve.service.event_log import read_log, read_serve_log
from ctrserve.service.feature_store import mget_sync

__all__ = ["arms_of", "current", "deploy", "item_records", "read_log", "read_serve_log"]


def arms_of(client: redis.Redis, experiment: str) -> list[str]:
    """The arms with deployment state in Redis, in name order."""
    return sorted(k.decode() for k in client.hkeys(state_key(experiment)))


def item_records(client: redis.Redis, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The feature store's records of these items (those it has), by id."""
    raws = mget_sync(client, [item_key(i) for i in ids]) if ids else []
    return {i: json.loads(r) for i, r in zip(ids, raws, strict=True) if r}
