"""Hypothesis properties of the three parts whose contracts are laws rather than examples: the
feature encoder (round trip through the bundle manifest, out-of-vocabulary tokens), the A/B
assignment (the documented hash, stickiness, uniformity, ramps) and the A/B statistics (the
delta method against a user-level bootstrap). Example-based tests of the same parts live in
test_encoder.py, test_experiments.py and test_stats.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from ctrserve.bundles.load import read_manifest
from ctrserve.bundles.manifest import Manifest, Parity, content_version
from ctrserve.features import DatasetSpec, FeatureEncoder, FieldSpec
from ctrserve.features.spec import TRANSFORMS
from ctrserve.service.experiments.assignment import BUCKETS, bucket, buckets
from ctrserve.service.experiments.config import ExperimentSet, parse_experiments
from ctrserve.service.experiments.stats import ArmStats, ctr_interval, ctr_uplift, cvr_interval

REPO = Path(__file__).resolve().parents[1]
# 2 shared cores: no deadline, and generation may be slow (the file runs in seconds anyway)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIGMAS = 5.0  # a binomial band that a fair hash leaves once in millions of draws

# Tokens as a request or a training table can carry them. Excluded, each for a stated reason:
# lone surrogates (Cs) cannot be UTF-8, and JSON bodies with them are refused before any
# encoding; NUL, because numpy's fixed-width str arrays drop trailing NULs, so "a\x00" is
# encoded, hashed and bucketed as "a" (a defect of features/, reported, not tested here).
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
TOKENS = st.text(CHARS, max_size=6)


# ---- the feature encoder ------------------------------------------------------------------

@st.composite
def encoder_worlds(draw: st.DrawFn) -> dict[str, Any]:
    """A spec with every kind of field (vocabulary and hashed, one and many tokens, numeric),
    training rows drawn from small token pools (so tokens repeat and min_count matters), and
    query rows mixing training tokens with new ones."""
    pool = draw(st.lists(TOKENS, min_size=1, max_size=8, unique=True))
    token = st.one_of(st.sampled_from(pool), TOKENS)
    fields = (
        FieldSpec("cat", "categorical", min_count=draw(st.integers(1, 3))),
        FieldSpec("hcat", "categorical", hash_buckets=draw(st.integers(1, 40))),
        FieldSpec("tags", "multi", min_count=draw(st.integers(1, 2)),
                  max_len=draw(st.integers(1, 4))),
        FieldSpec("htags", "multi", hash_buckets=draw(st.integers(1, 40)),
                  max_len=draw(st.integers(1, 4))),
        FieldSpec("num", "numeric", transform=draw(st.sampled_from(TRANSFORMS))),
    )
    # numbers a feature holds; not beyond about 1e154, whose squares overflow the fitted
    # variance to inf, which manifest.json cannot hold (a defect of features/, reported)
    number = st.one_of(st.none(), st.floats(-1e9, 1e9), st.just(math.nan))

    def rows(n: int, tok: st.SearchStrategy[str], one: st.SearchStrategy) -> dict[str, list]:
        return {
            "cat": draw(st.lists(one, min_size=n, max_size=n)),
            "hcat": draw(st.lists(one, min_size=n, max_size=n)),
            "tags": draw(st.lists(st.lists(tok, max_size=5), min_size=n, max_size=n)),
            "htags": draw(st.lists(st.lists(tok, max_size=5), min_size=n, max_size=n)),
            "num": draw(st.lists(number, min_size=n, max_size=n)),
        }

    train = rows(draw(st.integers(1, 25)), st.sampled_from(pool), st.sampled_from(pool))
    # a categorical cell may be missing (None): it is encoded as the empty token
    query = rows(draw(st.integers(1, 10)), token, st.one_of(token, st.none()))
    return {"spec": DatasetSpec(fields, label="y"), "train": train, "query": query}


def through_a_manifest(encoder: FeatureEncoder) -> FeatureEncoder:
    """The encoder as a served bundle gets it: in manifest.json, read back by bundles.load."""
    manifest = Manifest(
        version="0" * 16, model_type="lr", hyperparameters={}, encoder=encoder.to_dict(),
        inputs=[], outputs=[], data={}, metrics={}, parity=Parity(rows=1, max_abs_diff=0.0),
        sha256="0" * 64, created_at="2026-01-01T00:00:00Z")
    with tempfile.TemporaryDirectory() as directory:
        manifest.write(Path(directory))
        return FeatureEncoder.from_dict(read_manifest(directory).encoder)


@FAST
@given(world=encoder_worlds())
def test_the_encoder_survives_the_bundle_manifest(world: dict[str, Any]) -> None:
    encoder = FeatureEncoder.fit(world["spec"], [world["train"]])
    loaded = through_a_manifest(encoder)
    assert loaded.to_dict() == json.loads(json.dumps(encoder.to_dict()))
    # the scorer re-derives the bundle's version from the manifest's encoder: it must not move
    assert content_version("0" * 64, loaded.to_dict()) == content_version("0" * 64,
                                                                          encoder.to_dict())
    assert loaded.layout() == encoder.layout()
    for batch in (world["train"], world["query"]):
        ours, theirs = encoder.transform(batch), loaded.transform(batch)
        assert ours.keys() == theirs.keys()
        for name, array in ours.items():
            assert array.dtype == theirs[name].dtype
            np.testing.assert_array_equal(array, theirs[name], err_msg=name)


def expected_id(token: str, field: FieldSpec, counts: Counter, vocab: list[str]) -> int:
    """The id the encoder's docstring promises, from the training counts alone."""
    reserved = 2 if field.kind == "multi" else 1
    if field.hash_buckets:
        return reserved + fnv1a64_reference(token) % field.hash_buckets
    if counts[token] >= field.min_count:
        return reserved + vocab.index(token)
    return reserved - 1  # the OOV slot


def fnv1a64_reference(text: str) -> int:
    """FNV-1a 64 as published, independent of features/hashing.py."""
    h = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h


@FAST
@given(world=encoder_worlds())
def test_known_tokens_decode_and_others_take_the_oov_slot(world: dict[str, Any]) -> None:
    spec, train, query = world["spec"], world["train"], world["query"]
    encoder = through_a_manifest(FeatureEncoder.fit(spec, [train]))
    out = encoder.transform(query)  # never raises, whatever the tokens
    layout = encoder.layout()
    for j, field in enumerate(f for f in spec.fields if f.kind == "categorical"):
        counts = Counter(train[field.name])
        vocab = sorted(t for t, c in counts.items() if c >= field.min_count)
        tokens = ["" if t is None else t for t in query[field.name]]
        ids = out["cat_ids"][:, j].tolist()
        assert ids == [expected_id(t, field, counts, vocab) for t in tokens]
        assert all(0 <= i < layout["categorical"][j][1] for i in ids)
        if not field.hash_buckets:  # a vocabulary: a known id decodes to its token
            state = encoder.states[field.name]
            assert all(i == 0 or state.vocab[i - 1] == t for t, i in zip(tokens, ids,
                                                                          strict=True))
    for j, field in enumerate(f for f in spec.fields if f.kind == "multi"):
        counts = Counter(t for row in train[field.name] for t in row)
        vocab = sorted(t for t, c in counts.items() if c >= field.min_count)
        for row, ids in zip(query[field.name], out["multi_ids"][:, j, :].tolist(), strict=True):
            kept = row[:field.max_len]
            assert ids[:len(kept)] == [expected_id(t, field, counts, vocab) for t in kept]
            assert all(i == 0 for i in ids[len(kept):]), "padding after the row's tokens"
            assert all(i < layout["multi"][j][1] for i in ids)


@FAST
@given(world=encoder_worlds(), unseen=st.lists(TOKENS, min_size=1, max_size=20, unique=True))
def test_unseen_tokens_never_take_a_known_tokens_id(world: dict[str, Any],
                                                    unseen: list[str]) -> None:
    """Tokens never seen in training get the OOV slot (0; 1 in a multi field, 0 being its
    padding), which no known token has: the known ones have 1..len(vocab) (2.. in a multi)."""
    spec, train = world["spec"], world["train"]
    seen = set(train["cat"]) | {t for row in train["tags"] for t in row}
    unseen = [t for t in unseen if t not in seen]
    assume(unseen)
    encoder = FeatureEncoder.fit(spec, [train])
    cat, tags = encoder.states["cat"].vocab.tolist(), encoder.states["tags"].vocab.tolist()
    n = max(len(unseen), len(cat), len(tags))
    rows = {name: [values[0]] * n for name, values in train.items()}

    def ids(cats: list[str], multi: list[str]) -> tuple[list[int], list[int]]:
        out = encoder.transform({**rows, "cat": (cats * n)[:n],
                                 "tags": [[t] for t in (multi * n)[:n]]})
        return out["cat_ids"][:, 0].tolist(), out["multi_ids"][:, 0, 0].tolist()

    unseen_cat, unseen_tags = ids(unseen, unseen)
    assert set(unseen_cat) == {0} and set(unseen_tags) == {1}
    if cat:
        assert sorted(set(ids(cat, tags or [""])[0])) == list(range(1, len(cat) + 1))
    if tags:
        assert sorted(set(ids(cat or [""], tags)[1])) == list(range(2, len(tags) + 2))


# ---- the A/B assignment ---------------------------------------------------------------------

SALTS = st.text(CHARS, min_size=1, max_size=12).filter(lambda s: s.strip())
USER_IDS = st.text(CHARS, max_size=16)


@st.composite
def weight_lists(draw: st.DrawFn, arms: int | None = None) -> list[float]:
    """Weights as a config writes them: decimals with three places that add up to 1."""
    k = arms or draw(st.integers(2, 5))
    cuts = sorted(draw(st.lists(st.integers(0, 1000), min_size=k - 1, max_size=k - 1)))
    parts = np.diff([0, *cuts, 1000])
    return [int(p) / 1000 for p in parts]


def config(weights: list[float], salt: str, holdout: float = 0.0,
           forced: dict[str, str] | None = None) -> dict[str, Any]:
    return {"experiments": [{
        "name": "exp", "salt": salt, "holdout": holdout, "forced": forced or {},
        "arms": [{"name": f"arm{i}", "weight": w, "bundle": f"b{i}", "control": i == 0}
                 for i, w in enumerate(weights)]}]}


def experiment(weights: list[float], salt: str, holdout: float = 0.0,
               forced: dict[str, str] | None = None) -> ExperimentSet:
    return parse_experiments(config(weights, salt, holdout, forced), registry=None)


def reference_bucket(salt: str, user_id: str) -> int:
    """The recipe of assignment.py's docstring, written out again."""
    mask = 2**64 - 1
    h = fnv1a64_reference(f"{salt}:{user_id}")
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & mask
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & mask
    return (h ^ (h >> 33)) % 10_000


@FAST
@given(salt=SALTS, weights=weight_lists(), holdout=st.sampled_from([0.0, 0.05, 0.1, 0.5]),
       users=st.lists(USER_IDS, min_size=1, max_size=30, unique=True))
def test_assignment_is_the_documented_hash_and_sticky(salt: str, weights: list[float],
                                                      holdout: float,
                                                      users: list[str]) -> None:
    first, again = experiment(weights, salt, holdout), experiment(weights, salt, holdout)
    split = first.splitter("exp")
    vectorised = split.arms_of(users)
    for user, arm in zip(users, vectorised, strict=True):
        a, key = first.assign(None, user)
        assert a.bucket == reference_bucket(salt, user) == bucket(salt, user)
        assert (a, key) == first.assign("exp", user) == again.assign(None, user)
        start, end = split.ranges()[a.arm] if not a.holdout else (split.holdout_from, BUCKETS)
        assert start <= a.bucket < end
        assert arm == ("" if a.holdout else a.arm)
        assert a.holdout == (a.bucket >= split.holdout_from)
        assert not a.holdout or a.arm == "arm0"  # the holdout is served by the control
    assert buckets(salt, users).tolist() == [reference_bucket(salt, u) for u in users]


def test_assignment_is_the_same_in_another_process() -> None:
    """Nothing process-dependent (Python's hash(), its seed) enters an assignment."""
    rng = np.random.default_rng(16)
    users = ["", "ü-ñ", "🙂 emoji", *(f"u{i:05d}" for i in range(50)),
             *("".join(map(chr, rng.integers(32, 0x2FFF, 8))) for _ in range(50))]
    data = config([0.2, 0.3, 0.5], "cross-process", holdout=0.1, forced={"u00007": "arm2"})
    here = experiment([0.2, 0.3, 0.5], "cross-process", 0.1, {"u00007": "arm2"})
    code = ("import json, sys; from ctrserve.service.experiments.config import "
            "parse_experiments; data, users = json.loads(sys.stdin.read()); "
            "e = parse_experiments(data, None); "
            "print(json.dumps([list(e.assign(None, u)[0].__dict__.values()) for u in users]))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps([data, users]),
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "4242"})
    assert json.loads(out.stdout) == [list(here.assign(None, u)[0].__dict__.values())
                                      for u in users]


ID_STYLES = {
    "padded": lambda i: f"u{i:06d}",
    "prefixed": lambda i: f"user-{i}",
    "plain": str,
    "uuid-like": lambda i: f"{(i * 0x9E3779B97F4A7C15) % 2**64:016x}-{i % 97}",
}


@settings(FAST, max_examples=20)
@given(salt=SALTS, weights=weight_lists(), holdout=st.sampled_from([0.0, 0.05, 0.2]),
       style=st.sampled_from(sorted(ID_STYLES)), offset=st.integers(0, 10**6))
def test_arms_get_their_weights_of_many_users(salt: str, weights: list[float], holdout: float,
                                              style: str, offset: int) -> None:
    n = 20_000
    users = [ID_STYLES[style](offset + i) for i in range(n)]
    split = experiment(weights, salt, holdout).splitter("exp")
    arms = split.arms_of(users)
    shares = {a: (end - start) / BUCKETS for a, (start, end) in split.ranges().items()}
    shares[""] = (BUCKETS - split.holdout_from) / BUCKETS
    for arm, w in zip(split.arms, weights, strict=True):
        # the arm's buckets are its weight of the buckets outside the holdout, to one bucket
        assert abs(shares[arm] - w * (1 - holdout)) <= 1 / BUCKETS + 1e-12
    assert shares[""] == pytest.approx(holdout)
    for arm, p in shares.items():
        observed = float(np.mean(arms == arm))
        assert abs(observed - p) <= SIGMAS * math.sqrt(p * (1 - p) / n) + 1e-12, (arm, p)
    # and the buckets are as level as chance makes them, across the range and in their low
    # digits: a chi-square in neither tail (plain FNV-1a spreads sequential ids too evenly)
    b = buckets(salt, users)
    for bins in (b // 100, b % 100):
        chi2 = stats.chisquare(np.bincount(bins, minlength=100)).statistic
        assert 1e-6 < stats.chi2.cdf(chi2, 99) < 1 - 1e-6, chi2


@st.composite
def ramps(draw: st.DrawFn) -> tuple[list[float], list[float]]:
    """Weights before and after a few ramps, each moving some weight from one arm to another."""
    thousandths = [round(w * 1000) for w in draw(weight_lists(arms=5))]
    before = [t / 1000 for t in thousandths]
    for _ in range(draw(st.integers(1, 3))):
        giver, taker = draw(st.permutations(range(5)))[:2]
        amount = draw(st.integers(0, thousandths[giver]))
        thousandths[giver] -= amount
        thousandths[taker] += amount
    return before, [t / 1000 for t in thousandths]


@FAST
@given(salt=SALTS, weights=ramps(), holdout=st.sampled_from([0.0, 0.1]),
       forced=st.dictionaries(USER_IDS, st.sampled_from([f"arm{i}" for i in range(5)]),
                              max_size=3))
def test_ramps_move_users_only_off_ranges_that_lost_their_bucket(
        salt: str, weights: tuple[list[float], list[float]], holdout: float,
        forced: dict[str, str]) -> None:
    before, after = weights
    users = [f"u{i:05d}" for i in range(5_000)] + list(forced)
    old = experiment(before, salt, holdout, forced).splitter("exp")
    new = experiment(after, salt, holdout, forced).splitter("exp")
    old_arms, new_arms = old.arms_of(users), new.arms_of(users)
    old_ranges, new_ranges = old.ranges(), new.ranges()
    # an arm keeps its range exactly when the weights before it and through it keep their sums
    cum_old = np.cumsum([0, *(round(w * 1000) for w in before)])
    cum_new = np.cumsum([0, *(round(w * 1000) for w in after)])
    for k, arm in enumerate(old.arms):
        kept = cum_old[k] == cum_new[k] and cum_old[k + 1] == cum_new[k + 1]
        assert (old_ranges[arm] == new_ranges[arm]) == kept, (arm, before, after)
    b = buckets(salt, users)
    for i, user in enumerate(users):
        a, z = old_arms[i], new_arms[i]
        if user in forced:
            assert a == z == forced[user], "a forced user is never moved"
        elif a != z:  # a mover: from a range that lost its bucket to one that won it
            assert a and z, "the holdout keeps its buckets while its share stays"
            assert not new_ranges[a][0] <= b[i] < new_ranges[a][1], f"{user} left {a}"
            assert not old_ranges[z][0] <= b[i] < old_ranges[z][1], f"{user} joined {z}"
    for arm in old.arms:  # an arm whose range grew or stayed keeps every user it had
        (s0, e0), (s1, e1) = old_ranges[arm], new_ranges[arm]
        if s1 <= s0 and e0 <= e1:
            assert (new_arms[old_arms == arm] == arm).all(), arm


@FAST
@given(salt=SALTS, weights=weight_lists(arms=4), arm=st.integers(0, 2),
       step=st.integers(-1000, 1000), direction=st.booleans())
def test_a_ramp_between_two_arms_moves_no_other_user(salt: str, weights: list[float], arm: int,
                                                     step: int, direction: bool) -> None:
    """Weight moved from one arm to its neighbour: every other arm keeps its exact range, no user
    of theirs moves, and the users who move go from the losing arm to the gaining one."""
    i, j = (arm, arm + 1) if direction else (arm + 1, arm)
    thousandths = [round(w * 1000) for w in weights]
    delta = max(-thousandths[j], min(thousandths[i], step))  # what i gives j (< 0: j gives i)
    thousandths[i] -= delta
    thousandths[j] += delta
    after = [t / 1000 for t in thousandths]
    users = [f"ramp-{k}" for k in range(10_000)]
    old = experiment(weights, salt).splitter("exp")
    new = experiment(after, salt).splitter("exp")
    others = [a for k, a in enumerate(old.arms) if k not in (i, j)]
    assert all(old.ranges()[a] == new.ranges()[a] for a in others)
    old_arms, new_arms = old.arms_of(users), new.arms_of(users)
    moved = old_arms != new_arms
    losing, gaining = (old.arms[i], old.arms[j]) if delta >= 0 else (old.arms[j], old.arms[i])
    assert set(old_arms[moved]) <= {losing} and set(new_arms[moved]) <= {gaining}
    p = abs(delta) / 1000
    assert abs(moved.mean() - p) <= SIGMAS * math.sqrt(p * (1 - p) / len(users)) + 1e-12


# ---- the A/B statistics ---------------------------------------------------------------------

BOOT = 2000


@st.composite
def arm_data(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """Per-user impressions and downloads of a few hundred heterogeneous users: impressions
    geometric (a long tail), each user's own CTR from a beta (concentration small: strongly
    clustered downloads, large: nearly binomial)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(300, 1200))
    mean_x = draw(st.floats(3, 30))
    ctr = draw(st.floats(0.03, 0.4))
    concentration = draw(st.floats(0.5, 100))
    x = rng.geometric(1 / mean_x, n)
    y = rng.binomial(x, rng.beta(ctr * concentration, (1 - ctr) * concentration, n))
    # the delta method is a CLT over users: it needs downloads, and from more than a handful of
    # users (with a concentration of 0.5 and a CTR of 3%, a few users make all the downloads)
    assume(y.sum() >= 100 and np.count_nonzero(y) >= 50)
    return x, y, rng


def bootstrap(x: np.ndarray, y: np.ndarray, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """BOOT resamples of the users: the CTR and the downloads per user of each."""
    idx = rng.integers(0, x.size, size=(BOOT, x.size))
    xs, ys = x[idx].sum(1), y[idx].sum(1)
    return ys / xs, ys / x.size


# The bootstrap's own standard error is off by about 1/sqrt(2·BOOT) = 1.6% (sd), the delta
# method's by O(1/n) in relative terms: 12% is several times both, and far less than the gap
# a naive binomial interval leaves for clustered users.
REL = 0.12


@settings(FAST, max_examples=20)
@given(data=arm_data())
def test_delta_method_standard_errors_agree_with_a_user_bootstrap(
        data: tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    x, y, rng = data
    arm = ArmStats.from_user_arrays(x, y)
    ctrs, cvrs = bootstrap(x, y, rng)
    assert ctr_interval(arm).se == pytest.approx(ctrs.std(ddof=1), rel=REL)
    assert cvr_interval(arm).se == pytest.approx(cvrs.std(ddof=1), rel=REL)


@settings(FAST, max_examples=15)
@given(treatment=arm_data(), control=arm_data())
def test_the_uplifts_log_standard_error_agrees_with_a_bootstrap(
        treatment: tuple[np.ndarray, np.ndarray, np.random.Generator],
        control: tuple[np.ndarray, np.ndarray, np.random.Generator]) -> None:
    (xt, yt, rng), (xc, yc, _) = treatment, control
    up = ctr_uplift(ArmStats.from_user_arrays(xt, yt), ArmStats.from_user_arrays(xc, yc))
    log_ratios = np.log(bootstrap(xt, yt, rng)[0]) - np.log(bootstrap(xc, yc, rng)[0])
    assert up.se_log == pytest.approx(log_ratios.std(ddof=1), rel=REL)
    assert up.value == pytest.approx((yt.sum() / xt.sum()) / (yc.sum() / xc.sum()) - 1)
