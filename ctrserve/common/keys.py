"""Every Redis key of the online A/B state, in one place.

Each (experiment, arm) owns one Redis Cluster hash slot through the hash tag `{E:A}` (names
match `[A-Za-z0-9_.-]`, so neither ':' nor braces occur in them). Every key that one event
script touches carries that tag, so the script runs on one node of a cluster, and the arms of
an experiment spread over the nodes.

    ctrserve:{E:A}:ab:D:x        hash user -> impressions that day   (until D's events end)
    ctrserve:{E:A}:ab:D:y        hash user -> downloads that day     (until D's events end)
    ctrserve:{E:A}:ab:D:sums     hash users, impressions, downloads, sum_x2, sum_y2, sum_xy
                                 (EXPIRE: retention after D)
    ctrserve:{E:A}:ab:all:x      hash user -> impressions over the experiment  (EXPIRE:
    ctrserve:{E:A}:ab:all:y      hash user -> downloads over the experiment     retention after
    ctrserve:{E:A}:ab:all:sums   the sums over the experiment, each user once   the last event)
    ctrserve:{E:A}:ab:D:guard    hash requests, errors, items, probability, le_<bound>: the
                                 arm's guardrail sums that day (EXPIRE: retention after D)
    ctrserve:{E:A}:ab:days       set of the days D with counts or guardrail sums
    ctrserve:{E:A}:seen:B        hash event-id digest -> 1, dedup bucket B of the dedup window
    ctrserve:{E:A}:log:events    stream: accepted events (event_log.py)
    ctrserve:{E:A}:log:serve     stream: what each scored request served (event_log.py)
    ctrserve:logs                set of the stream names above (the drainer's list)
    ctrserve:exp:E               JSON {"control", "weights", "guardrails"}: the config the
                                 scorer last served
    ctrserve:exp:E:lists         hash D -> JSON {arm: list metrics} for each day of the drained
                                 serve log, `all` -> the whole period's, `meta` -> JSON L,
                                 catalogue, downloads, when and from which logs: the list
                                 metrics the drainer recomputes from the Parquet logs
                                 (list_metrics.py; replaced whole on every recompute; EXPIRE:
                                 retention after the last day or recompute, like `ab:all`)
    ctrserve:attribution:key     the signing key shared by replicas without a configured one

The deployment state (service/deployments.py), under one hash tag because a deploy changes
several of its keys in one script:

    ctrserve:{deploy}:E            hash arm -> bundle the arm serves
    ctrserve:{deploy}:E:canary     hash arm -> JSON canary (bundle, share) of the arm
    ctrserve:{deploy}:E:prev:A     list of the arm's earlier bundles (rollback pops it)
    ctrserve:{deploy}:version      counter: bumped on every change (scorers poll it)
    ctrserve:{deploy}:history      list of JSON deployment records

The feature store (service/feature_store.py):

    ctrserve:fs:user:ID, ctrserve:fs:item:ID   one JSON record per user and per item
    ctrserve:fs:meta                           which fields are user and item fields, counts
"""

from __future__ import annotations

PREFIX = "ctrserve:"
LOGS_KEY = PREFIX + "logs"
SIGNING_KEY = PREFIX + "attribution:key"
LOG_KINDS = ("events", "serve")


def arm_tag(experiment: str, arm: str) -> str:
    return f"{PREFIX}{{{experiment}:{arm}}}"


TOTAL = "all"  # the "day" of the counts over the whole experiment


def arm_key(experiment: str, day: str, arm: str, part: str) -> str:
    """One arm-day (or arm-total, day=TOTAL) count hash: part is x, y or sums (or guard, an
    arm-day's guardrail sums)."""
    return f"{arm_tag(experiment, arm)}:ab:{day}:{part}"


def days_key(experiment: str, arm: str) -> str:
    return f"{arm_tag(experiment, arm)}:ab:days"


def seen_key(experiment: str, arm: str, bucket: int) -> str:
    return f"{arm_tag(experiment, arm)}:seen:{bucket}"


def log_key(experiment: str, arm: str, kind: str) -> str:
    """The stream of accepted events (kind "events") or served requests (kind "serve")."""
    return f"{arm_tag(experiment, arm)}:log:{kind}"


def log_parts(stream: str) -> tuple[str, str, str]:
    """(experiment, arm, kind) of a log_key."""
    tag, _, kind = stream.rpartition(":log:")
    experiment, arm = tag[tag.index("{") + 1 : tag.rindex("}")].split(":", 1)
    return experiment, arm, kind


def config_key(experiment: str) -> str:
    return f"{PREFIX}exp:{experiment}"


def lists_key(experiment: str) -> str:
    """The experiment's list metrics, as the drainer last computed them from the logs."""
    return f"{config_key(experiment)}:lists"


DEPLOY_PREFIX = PREFIX + "{deploy}:"
VERSION_KEY = DEPLOY_PREFIX + "version"
HISTORY_KEY = DEPLOY_PREFIX + "history"
# the experiments config last put through PUT /admin/experiments, which every worker follows
# (":" keeps it apart from the experiments' own keys: their names cannot hold one)
CONFIG_KEY = DEPLOY_PREFIX + "config:experiments"


def state_key(experiment: str) -> str:
    return f"{DEPLOY_PREFIX}{experiment}"


def canary_state_key(experiment: str) -> str:
    return f"{DEPLOY_PREFIX}{experiment}:canary"


def prev_key(experiment: str, arm: str) -> str:
    return f"{DEPLOY_PREFIX}{experiment}:prev:{arm}"


FEATURES_PREFIX = PREFIX + "fs:"
FEATURES_META_KEY = FEATURES_PREFIX + "meta"


def user_key(user_id: str) -> str:
    return f"{FEATURES_PREFIX}user:{user_id}"


def item_key(item_id: str) -> str:
    return f"{FEATURES_PREFIX}item:{item_id}"
