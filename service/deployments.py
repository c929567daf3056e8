"""Deployment state in Redis: which bundle each arm of each experiment serves, and its history.

    ctrserve:{deploy}:<E>              hash   arm -> bundle name
    ctrserve:{deploy}:<E>:canary       hash   arm -> JSON {"bundle", "share"}: the arm's canary
    ctrserve:{deploy}:<E>:prev:<arm>   list   bundles the arm served before, newest last
    ctrserve:{deploy}:version          int    +1 on every change below (scorers poll it)
    ctrserve:{deploy}:history          list   JSON records, oldest first
    ctrserve:{deploy}:config:experiments  hash  config: JSON {"config", "id", "base"}, the
                                       config last put through PUT /admin/experiments;
                                       version: the deployment version it made

All share the hash tag {deploy}: on a Redis Cluster they live in one slot, so one script or
transaction may touch any of them.

The scorer seeds the hash from its experiments file (missing arms only), so the file gives the
initial state and a state already in Redis wins. `deploy` and `rollback` verify the bundle
(files, hash, parity record) before one Lua script changes the arm, bumps the version and
appends the record, all or nothing.

A canary (`deploy(..., canary=share)`, 0 < share < 1) leaves the arm's bundle as it is and serves
the canary bundle to that share of the arm's users (service/experiments/assignment.py says
which). `promote` makes the canary the arm's bundle (rollback then returns to the bundle before
it), `rollback` during a canary removes the canary only, and a plain deploy ends it. Records:
kind deploy, rollback, canary or promote; those of a canary carry its `share`, a canary that
replaced another `replaced`, a deploy that ended one `ended_canary` ({"bundle", "share"}).

The admin API writes here too, so that every worker process follows it (service/workers.py):
`POST /admin/swap` is a deploy that keeps the arm's canary (kind `swap`), and
`PUT /admin/experiments` stores its config with the arms' bundles (kind `config`, a record per
arm whose bundle it changed). The stored config names its `base`, the experiments file (or the
single bundle) it replaced: a scorer started on that same base follows the stored config, one
started on a changed file serves the file.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import redis
import redis.asyncio as aioredis

from ctrserve.bundles import BundleError
from ctrserve.bundles.load import verify_files
from ctrserve.bundles.registry import known_bundles, registry_entry
from ctrserve.common.errors import UserError
from ctrserve.common.keys import (
    CONFIG_KEY,
    HISTORY_KEY,
    VERSION_KEY,
    canary_state_key,
    prev_key,
    state_key,
)
from ctrserve.service.experiments.assignment import canary_share_ok

# KEYS: state, prev list, version, history, canaries. ARGV: arm, bundle ("" = pop prev),
# expected current bundle ("" = any), record JSON, expected canary ("*" = any, ended; "=" = any,
# kept; "" = none; else that canary's JSON, ended: a promote). Returns the record, or an error
# string.
CHANGE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return redis.error_reply('UNKNOWN') end
if ARGV[3] ~= '' and current ~= ARGV[3] then return redis.error_reply('CHANGED') end
local canary = false
if ARGV[5] ~= '=' then
  canary = redis.call('HGET', KEYS[5], ARGV[1])
  if ARGV[5] ~= '*' and (canary or '') ~= ARGV[5] then
    if not canary then return redis.error_reply('NOCANARY') end
    return redis.error_reply('CHANGED')
  end
end
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
if canary then
  redis.call('HDEL', KEYS[5], ARGV[1])
  local ended = cjson.decode(canary)
  if record['kind'] == 'promote' then record['share'] = ended['share']
  else record['ended_canary'] = ended end
end
record['from'] = current
record['to'] = to
record['version'] = redis.call('INCR', KEYS[3])
local text = cjson.encode(record)
redis.call('RPUSH', KEYS[4], text)
return text
"""

# KEYS: state, canaries, version, history. ARGV: arm, canary JSON ("" = remove the canary),
# expected canary JSON ("" = any), record JSON. Returns the record, or an error string.
CANARY = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return redis.error_reply('UNKNOWN') end
local old = redis.call('HGET', KEYS[2], ARGV[1])
if ARGV[3] ~= '' and old ~= ARGV[3] then return redis.error_reply('CHANGED') end
local record = cjson.decode(ARGV[4])
if ARGV[2] == '' then
  if not old then return redis.error_reply('NOCANARY') end
  local removed = cjson.decode(old)
  redis.call('HDEL', KEYS[2], ARGV[1])
  record['from'], record['to'], record['share'] = removed['bundle'], current, removed['share']
else
  local canary = cjson.decode(ARGV[2])
  if canary['bundle'] == current then return redis.error_reply('CANARYSAME') end
  if old == ARGV[2] then return redis.error_reply('SAMECANARY') end
  if old then record['replaced'] = cjson.decode(old) end
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  record['from'], record['to'], record['share'] = current, canary['bundle'], canary['share']
end
record['version'] = redis.call('INCR', KEYS[3])
local text = cjson.encode(record)
redis.call('RPUSH', KEYS[4], text)
return text
"""

# KEYS: config, version, history, then the state hash of each experiment. ARGV: stored config
# JSON, record JSON, JSON [[experiment, arm, bundle, n], ...] of every arm of the config (n: its
# experiment's state hash is KEYS[3 + n]). Sets each arm's bundle, a record per arm it changed;
# returns the new version.
CONFIG = """
local version = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'config', ARGV[1], 'version', version)
for _, change in ipairs(cjson.decode(ARGV[3])) do
  local key = KEYS[3 + change[4]]
  local current = redis.call('HGET', key, change[2])
  if current ~= change[3] then
    redis.call('HSET', key, change[2], change[3])
    local record = cjson.decode(ARGV[2])
    record['experiment'], record['arm'] = change[1], change[2]
    record['from'], record['to'], record['version'] = current or '', change[3], version
    redis.call('RPUSH', KEYS[3], cjson.encode(record))
  end
end
return version
"""


class DeploymentError(UserError):
    """A deploy, canary, promote or rollback that was refused; nothing changed."""


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def check_bundle(registry: Path, bundle: str) -> None:
    """The bundle is a name in the registry whose files pass verification."""
    path = registry_entry(registry, bundle)
    if path is None:
        raise DeploymentError(f"{bundle}: no such bundle in the registry {registry} (a name "
                              f"there, not leading outside it); bundles: "
                              f"{known_bundles(registry)}")
    try:
        verify_files(path)
    except BundleError as exc:
        raise DeploymentError(f"{bundle}: refused: {exc}") from None


def check_share(share: float, name: str = "canary share") -> None:
    """A canary share lies strictly between 0 and 1 (a share of 1 is a plain deploy)."""
    if not canary_share_ok(share):
        raise DeploymentError(f"{name} {share!r} is out of range: it must lie strictly between "
                              "0 and 1 (0.0001 to 0.9999; a share of 1 is a plain deploy)")


def current(client: redis.Redis, experiment: str, arm: str) -> str | None:
    """The arm's own bundle (what its users outside a canary get)."""
    return _text(client.hget(state_key(experiment), arm))


def canary(client: redis.Redis, experiment: str, arm: str) -> dict[str, Any] | None:
    """The arm's canary, {"bundle", "share"}, or None."""
    text = _text(client.hget(canary_state_key(experiment), arm))
    return json.loads(text) if text else None


def canaries(client: redis.Redis, experiments: list[str]) -> list[dict[str, Any]]:
    """The active canaries of these experiments: {experiment, arm, bundle, share, serving}."""
    found = []
    for experiment in sorted(set(experiments)):
        for arm, text in sorted(client.hgetall(canary_state_key(experiment)).items()):
            arm = _text(arm)
            found.append({"experiment": experiment, "arm": arm, **json.loads(text),
                          "serving": current(client, experiment, arm)})
    return found


def deploy(client: redis.Redis, experiment: str, arm: str, bundle: str, who: str, why: str,
           *, registry: Path, canary: float | None = None) -> dict[str, Any]:
    """Make `arm` of `experiment` serve `bundle` (ending its canary, if any); with `canary`,
    serve it to that share of the arm's users only. Returns the history record."""
    if canary is not None:
        check_share(canary)
    check_bundle(registry, bundle)
    if canary is None:
        record = _record("deploy", experiment, arm, who, why)
        return _change(client, experiment, arm, bundle, "", "*", record)
    value = json.dumps({"bundle": bundle, "share": canary})
    record = _record("canary", experiment, arm, who, why)
    return _set_canary(client, experiment, arm, value, "", record)


def promote(client: redis.Redis, experiment: str, arm: str, who: str, why: str,
            *, registry: Path) -> dict[str, Any]:
    """Make the arm's canary bundle its bundle for all its users; returns the record."""
    serving = current(client, experiment, arm)
    if serving is None:
        _unknown(experiment, arm)
    text = _text(client.hget(canary_state_key(experiment), arm))
    if text is None:
        _no_canary(experiment, arm, serving, "promote")
    bundle = json.loads(text)["bundle"]
    check_bundle(registry, bundle)
    record = _record("promote", experiment, arm, who, why)
    return _change(client, experiment, arm, bundle, serving, text, record)


def rollback(client: redis.Redis, experiment: str, arm: str, who: str, why: str,
             *, registry: Path) -> dict[str, Any]:
    """Remove the arm's canary if it has one, else return it to the bundle it served before
    its last deploy; returns the record."""
    serving = current(client, experiment, arm)
    if serving is None:
        _unknown(experiment, arm)
    record = _record("rollback", experiment, arm, who, why)
    active = _text(client.hget(canary_state_key(experiment), arm))
    if active is not None:
        return _set_canary(client, experiment, arm, "", active, record)
    before = _text(client.lindex(prev_key(experiment, arm), -1))
    if before is None:
        raise DeploymentError(f"{experiment}/{arm}: no earlier bundle to roll back to "
                              f"(serves {serving})")
    check_bundle(registry, before)
    return _change(client, experiment, arm, "", serving, "", record)


def history(client: redis.Redis, experiment: str | None = None) -> list[dict[str, Any]]:
    """Every record, oldest first (of one experiment when given)."""
    records = [json.loads(r) for r in client.lrange(HISTORY_KEY, 0, -1)]
    return [r for r in records if experiment is None or r["experiment"] == experiment]


def format_history(records: list[dict[str, Any]]) -> str:
    """One line per record, oldest first."""
    if not records:
        return "no deployments recorded"
    return "\n".join(f"{r['when']}  v{r['version']:<4} {r['kind']:<8} {r['experiment']}/"
                     f"{r['arm']}: {r['from']} -> {r['to']}{_canary_note(r)}  by {r['who']}"
                     + (f"  ({r['why']})" if r["why"] else "") for r in records)


def format_canaries(active: list[dict[str, Any]]) -> str:
    """One line per active canary."""
    return "\n".join(f"canary   {c['experiment']}/{c['arm']}: {c['bundle']} serves "
                     f"{_percent(c['share'])} of the arm's users ({c['serving']} the rest)"
                     for c in active)


def _percent(share: float) -> str:
    return f"{round(share * 100, 2):g}%"


def _canary_note(r: dict[str, Any]) -> str:
    if "ended_canary" in r:
        ended = r["ended_canary"]
        return f" (ends the canary {ended['bundle']} at {_percent(ended['share'])})"
    if "share" not in r:
        return ""
    if r["kind"] == "canary":
        old = r.get("replaced")
        was = f", was {old['bundle']} at {_percent(old['share'])}" if old else ""
        return f" (canary at {_percent(r['share'])}{was})"
    if r["kind"] == "promote":
        return f" (canary at {_percent(r['share'])} promoted)"
    return f" (canary at {_percent(r['share'])} removed)"


def _record(kind: str, experiment: str, arm: str, who: str, why: str) -> dict[str, Any]:
    when = datetime.now(UTC).isoformat(timespec="seconds")
    return {"kind": kind, "who": who, "when": when, "experiment": experiment, "arm": arm,
            "why": why}


def _change(client: redis.Redis, experiment: str, arm: str, bundle: str, expected: str,
            expected_canary: str, record: dict[str, Any]) -> dict[str, Any]:
    keys = [state_key(experiment), prev_key(experiment, arm), VERSION_KEY, HISTORY_KEY,
            canary_state_key(experiment)]
    return _run(client, CHANGE, keys, [arm, bundle, expected, json.dumps(record),
                                       expected_canary], experiment, arm, bundle)


def _set_canary(client: redis.Redis, experiment: str, arm: str, value: str, expected: str,
                record: dict[str, Any]) -> dict[str, Any]:
    keys = [state_key(experiment), canary_state_key(experiment), VERSION_KEY, HISTORY_KEY]
    bundle = json.loads(value)["bundle"] if value else ""
    return _run(client, CANARY, keys, [arm, value, expected, json.dumps(record)], experiment,
                arm, bundle)


def _run(client: redis.Redis, script: str, keys: list[str], args: list[str], experiment: str,
         arm: str, bundle: str) -> dict[str, Any]:
    try:
        return json.loads(client.eval(script, len(keys), *keys, *args))
    except redis.ResponseError as exc:
        _refused(exc, experiment, arm, bundle)


def _refused(exc: redis.ResponseError, experiment: str, arm: str, bundle: str) -> NoReturn:
    reason = str(exc)
    if reason == "UNKNOWN":
        _unknown(experiment, arm)
    message = REFUSALS.get(reason)
    if message is None:
        raise exc
    raise DeploymentError(message.format(where=f"{experiment}/{arm}", bundle=bundle)) from None


REFUSALS = {
    "SAME": "{where} already serves {bundle}; nothing changed",
    "CANARYSAME": "{where} already serves {bundle}; a canary needs another bundle",
    "SAMECANARY": "{where} already has this canary of {bundle}; nothing changed",
    "NOPREV": "{where}: no earlier bundle to roll back to",
    "NOCANARY": "{where}: no canary (it was promoted or rolled back meanwhile)",
    "CHANGED": "{where} changed meanwhile; try again",
}


def _unknown(experiment: str, arm: str) -> NoReturn:
    raise DeploymentError(f"{experiment}/{arm}: no such deployed arm (a scorer records its "
                          "experiments' arms when it starts)")


def _no_canary(experiment: str, arm: str, serving: str, action: str) -> NoReturn:
    raise DeploymentError(f"{experiment}/{arm}: no canary to {action} (serves {serving}; start "
                          "one with deploy --canary SHARE)")


# ---- the scorer's side (async) -------------------------------------------------------------
async def seed(client: aioredis.Redis, arms: dict[str, dict[str, str]]) -> None:
    """Record {experiment: {arm: bundle}} for the arms that have no state yet."""
    pipe = client.pipeline(transaction=True)
    for experiment, bundles in arms.items():
        for arm, bundle in bundles.items():
            pipe.hsetnx(state_key(experiment), arm, bundle)
    await pipe.execute()


async def record_swap(client: aioredis.Redis, experiment: str, arm: str, bundle: str,
                      who: str) -> dict[str, Any] | None:
    """Record that `arm` serves `bundle` (POST /admin/swap, already loaded by the worker that
    took it), its canary kept; None when the state already said so."""
    keys = [state_key(experiment), prev_key(experiment, arm), VERSION_KEY, HISTORY_KEY,
            canary_state_key(experiment)]
    record = json.dumps(_record("swap", experiment, arm, who, ""))
    try:
        return json.loads(await client.eval(CHANGE, len(keys), *keys, arm, bundle, "", record,
                                            "="))
    except redis.ResponseError as exc:
        if str(exc) == "SAME":
            return None
        _refused(exc, experiment, arm, bundle)


async def publish_config(client: aioredis.Redis, stored: dict[str, Any], arms: DeployState,
                         who: str) -> int:
    """Store a config (PUT /admin/experiments, already loaded by the worker that took it:
    {"config", "id", "base"}) and its arms' bundles ({experiment: {arm: bundle}}) in one step;
    returns the new version, which every scorer follows."""
    names = list(arms)
    keys = [CONFIG_KEY, VERSION_KEY, HISTORY_KEY, *(state_key(e) for e in names)]
    changes = [[e, arm, bundle, i + 1] for i, e in enumerate(names)
               for arm, bundle in arms[e].items()]
    record = {"kind": "config", "who": who, "why": "",
              "when": datetime.now(UTC).isoformat(timespec="seconds")}
    return int(await client.eval(CONFIG, len(keys), *keys, json.dumps(stored),
                                 json.dumps(record), json.dumps(changes)))


async def read_version(client: aioredis.Redis) -> int:
    return int(await client.get(VERSION_KEY) or 0)


DeployState = dict[str, dict[str, str]]  # {experiment: {arm: bundle}}
CanaryState = dict[str, dict[str, dict[str, Any]]]  # {experiment: {arm: {"bundle", "share"}}}


async def read_config(client: aioredis.Redis) -> dict[str, Any] | None:
    """The config last stored by PUT /admin/experiments ({"config", "id", "base", "version"}),
    or None."""
    text, version = await client.hmget(CONFIG_KEY, ["config", "version"])
    return {**json.loads(text), "version": int(version)} if text else None


async def read_state(client: aioredis.Redis, experiments: list[str]
                     ) -> tuple[int, DeployState, CanaryState]:
    """The version, the arms' bundles and the arms' canaries of these experiments, read
    together."""
    pipe = client.pipeline(transaction=True)
    pipe.get(VERSION_KEY)
    for name in experiments:
        pipe.hgetall(state_key(name))
        pipe.hgetall(canary_state_key(name))
    version, *hashes = await pipe.execute()
    state = {name: {_text(k): _text(v) for k, v in h.items()}
             for name, h in zip(experiments, hashes[::2], strict=True)}
    canaries = {name: {_text(k): _decode(v) for k, v in h.items()}
                for name, h in zip(experiments, hashes[1::2], strict=True)}
    return int(version or 0), state, canaries


def _decode(text: bytes | str) -> dict[str, Any]:
    """A canary value; one that is not a JSON object comes back as {} (refused later)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
