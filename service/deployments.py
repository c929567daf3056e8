"""Deployment state in Redis: which bundle each arm of each experiment serves, and its history.

    ctrserve:deploy:<E>                hash   arm -> bundle name
    ctrserve:deploy:<E>:prev:<arm>     list   bundles the arm served before, newest last
    ctrserve:deploy:version            int    +1 on every deploy and rollback (scorers poll it)
    ctrserve:deploy:history            list   JSON records, oldest first

The scorer seeds the hash from its experiments file (missing arms only), so the file gives the
initial state and a state already in Redis wins. `deploy` and `rollback` verify the bundle
(files, hash, parity record) before one Lua script changes the arm, bumps the version and
appends the record, all or nothing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import redis
import redis.asyncio as aioredis

from bundles import BundleError
from bundles.load import verify_files
from ctrserve.errors import UserError

PREFIX = "ctrserve:deploy:"
VERSION_KEY = PREFIX + "version"
HISTORY_KEY = PREFIX + "history"

# KEYS: state, prev list, version, history. ARGV: arm, bundle ("" = pop prev), expected
# current bundle ("" = any), record JSON. Returns the record, or an error string.
CHANGE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return redis.error_reply('UNKNOWN') end
if ARGV[3] ~= '' and current ~= ARGV[3] then return redis.error_reply('CHANGED') end
local to = ARGV[2]
if to == '' then
  to = redis.call('RPOP', KEYS[2])
  if not to then return redis.error_reply('NOPREV') end
else
  if to == current then return redis.error_reply('SAME') end
  redis.call('RPUSH', KEYS[2], current)
end
redis.call('HSET', KEYS[1], ARGV[1], to)
local record = cjson.decode(ARGV[4])
record['from'] = current
record['to'] = to
record['version'] = redis.call('INCR', KEYS[3])
local text = cjson.encode(record)
redis.call('RPUSH', KEYS[4], text)
return text
"""


class DeploymentError(UserError):
    """A deploy or rollback that was refused; nothing changed."""


def state_key(experiment: str) -> str:
    return f"{PREFIX}{experiment}"


def prev_key(experiment: str, arm: str) -> str:
    return f"{PREFIX}{experiment}:prev:{arm}"


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def check_bundle(registry: Path, bundle: str) -> None:
    """The bundle is a name in the registry whose files pass verification."""
    path = registry / bundle
    if Path(bundle).name != bundle or not path.is_dir():
        raise DeploymentError(f"{bundle}: no such bundle in the registry {registry}")
    try:
        verify_files(path)
    except BundleError as exc:
        raise DeploymentError(f"{bundle}: refused: {exc}") from None


def current(client: redis.Redis, experiment: str, arm: str) -> str | None:
    return _text(client.hget(state_key(experiment), arm))


def deploy(client: redis.Redis, experiment: str, arm: str, bundle: str, who: str, why: str,
           *, registry: Path) -> dict[str, Any]:
    """Make `arm` of `experiment` serve `bundle`; returns the history record."""
    check_bundle(registry, bundle)
    return _change(client, experiment, arm, bundle, "", _record("deploy", experiment, arm,
                                                                  who, why))


def rollback(client: redis.Redis, experiment: str, arm: str, who: str, why: str,
             *, registry: Path) -> dict[str, Any]:
    """Return `arm` to the bundle it served before its last deploy; returns the record."""
    serving = current(client, experiment, arm)
    before = _text(client.lindex(prev_key(experiment, arm), -1))
    if serving is None:
        _unknown(experiment, arm)
    if before is None:
        raise DeploymentError(f"{experiment}/{arm}: no earlier bundle to roll back to "
                              f"(serves {serving})")
    check_bundle(registry, before)
    record = _record("rollback", experiment, arm, who, why)
    return _change(client, experiment, arm, "", serving, record)


def history(client: redis.Redis, experiment: str | None = None) -> list[dict[str, Any]]:
    """Every deploy and rollback record, oldest first (of one experiment when given)."""
    records = [json.loads(r) for r in client.lrange(HISTORY_KEY, 0, -1)]
    return [r for r in records if experiment is None or r["experiment"] == experiment]


def format_history(records: list[dict[str, Any]]) -> str:
    """One line per record, oldest first."""
    if not records:
        return "no deployments recorded"
    return "\n".join(f"{r['when']}  v{r['version']:<4} {r['kind']:<8} {r['experiment']}/"
                     f"{r['arm']}: {r['from']} -> {r['to']}  by {r['who']}"
                     + (f"  ({r['why']})" if r["why"] else "") for r in records)


def _record(kind: str, experiment: str, arm: str, who: str, why: str) -> dict[str, Any]:
    when = datetime.now(UTC).isoformat(timespec="seconds")
    return {"kind": kind, "who": who, "when": when, "experiment": experiment, "arm": arm,
            "why": why}


def _change(client: redis.Redis, experiment: str, arm: str, bundle: str, expected: str,
            record: dict[str, Any]) -> dict[str, Any]:
    keys = [state_key(experiment), prev_key(experiment, arm), VERSION_KEY, HISTORY_KEY]
    try:
        text = client.eval(CHANGE, len(keys), *keys, arm, bundle, expected, json.dumps(record))
    except redis.ResponseError as exc:
        reason = str(exc)
        if reason == "UNKNOWN":
            _unknown(experiment, arm)
        if reason == "SAME":
            raise DeploymentError(f"{experiment}/{arm} already serves {bundle}; nothing "
                                  "changed") from None
        if reason == "NOPREV":
            raise DeploymentError(f"{experiment}/{arm}: no earlier bundle to roll back "
                                  "to") from None
        if reason == "CHANGED":
            raise DeploymentError(f"{experiment}/{arm} changed meanwhile; try again") from None
        raise
    return json.loads(text)


def _unknown(experiment: str, arm: str) -> NoReturn:
    raise DeploymentError(f"{experiment}/{arm}: no such deployed arm (a scorer records its "
                          "experiments' arms when it starts)")


# ---- the scorer's side (async) -------------------------------------------------------------
async def seed(client: aioredis.Redis, arms: dict[str, dict[str, str]]) -> None:
    """Record {experiment: {arm: bundle}} for the arms that have no state yet."""
    pipe = client.pipeline(transaction=True)
    for experiment, bundles in arms.items():
        for arm, bundle in bundles.items():
            pipe.hsetnx(state_key(experiment), arm, bundle)
    await pipe.execute()


async def read_version(client: aioredis.Redis) -> int:
    return int(await client.get(VERSION_KEY) or 0)


async def read_state(client: aioredis.Redis, experiments: list[str]
                     ) -> tuple[int, dict[str, dict[str, str]]]:
    """The version and {experiment: {arm: bundle}} of these experiments, read together."""
    pipe = client.pipeline(transaction=True)
    pipe.get(VERSION_KEY)
    for name in experiments:
        pipe.hgetall(state_key(name))
    version, *hashes = await pipe.execute()
    state = {name: {_text(k): _text(v) for k, v in h.items()}
             for name, h in zip(experiments, hashes, strict=True)}
    return int(version or 0), state
