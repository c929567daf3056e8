"""Coverage harness of the A/B statistics: simulated A/A and A/B experiments with a known truth.

    python -m ctrserve.loadtest.ab_coverage [--experiments 1000] [--days 14] [--out FILE]

Each experiment draws new users every day (users per day ~ 2 x `users_per_arm`, each assigned to
control or treatment by a fair coin, so the sample-ratio check sees real binomial noise). A user
has an activity level a ~ Exponential(mean (1 − q)/q) and x = 1 + Poisson(a) impressions
(Geometric(q) overall), a CTR propensity p0 ~ Beta (heterogeneous users) and y ~ Binomial(x, p)
downloads (a download is this product's click: CTR = downloads / impressions), p = p0 in the
control and p0·(1 + uplift) (at most 1) in the treatment of A/B experiments. The true relative
uplift of CTR (E[y]/E[x] = E[p]) and of CVR (downloads per user, E[p]·E[x]) is
E[min(1, p0·(1 + uplift))]/E[p0] − 1 (`true_uplift`: `uplift` less ~1e-10 at +10%); 0 in A/A.

CUPED's pre-period: a share `new_share` of the users is new (no pre-period); the others had
1 + Poisson(a·`pre_activity`) impressions before the experiment and Binomial(that, p0)
downloads: the same activity and propensity, untouched by the treatment.

After every day the cumulative per-user sums of each arm (Σw·wᵀ, w = (1, x, y, pre-period x and
y, has a pre-period), computed for all experiments at once with numpy) go through the report's
own functions: as `ArmStats` through `ctr_uplift` / `cvr_uplift` (fixed-horizon),
`sequential_uplift` (always-valid) and `sample_ratio_check`; as `CupedStats` sums through
`cuped.fit` (the fit behind the report's CUPED entries), with the same fixed and always-valid
intervals around the adjusted estimate. Written out, for the four intervals (fixed, sequential,
CUPED fixed, CUPED sequential) and both metrics: coverage of the true uplift at each look, at
the end and at all looks at once; the A/A false-positive rate read once at the end and read
daily (rejected on any look); the A/B power at the last look and by the last look when read
daily; CUPED's variance reduction per look, as reported (1 − var_adjusted/var_plain, mean over
experiments) and as measured (1 − the variance of the adjusted estimates over the experiments
/ the plain ones'); and the sample-ratio check's false alarms. It exercises the statistics only,
not the counting path through Redis.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import special

from ctrserve.service.experiments import cuped, sequential
from ctrserve.service.experiments.stats import (
    SRM_ALPHA,
    ArmStats,
    Uplift,
    ctr_uplift,
    cvr_uplift,
    sample_ratio_check,
    sequential_uplift,
    z_value,
)

METRICS = {"ctr": ctr_uplift, "cvr": cvr_uplift}
INTERVALS = ("fixed", "sequential", "cuped", "cuped_sequential")
WEIGHTS = {"control": 0.5, "treatment": 0.5}
TARGET_FPR, TARGET_COVERAGE = 0.05, 0.95


@dataclass(frozen=True)
class World:
    """The simulated users (the world of tests/test_stats.py: true CTR 5%, 20 impressions each)."""

    users_per_arm: int = 400  # new users per arm and day, on average
    q: float = 0.05  # impressions ~ Geometric(q): mean 1/q, long tail
    control_beta: tuple[float, float] = (0.5, 9.5)  # per-user CTR; a + b = 10: strongly mixed
    uplift: float = 0.10  # relative CTR (and CVR) uplift of each treatment user in A/B
    new_share: float = 0.3  # users without a pre-period
    pre_activity: float = 1.0  # pre-period impressions per user / in-experiment ones

    def true_uplift(self, uplift: float) -> float:
        """E[min(1, p0·(1 + uplift))]/E[p0] − 1, p0 ~ Beta(a, b): the clipping at 1, exactly."""
        a, b = self.control_beta
        factor = 1.0 + uplift
        if factor <= 1.0:
            return uplift
        cut = 1.0 / factor  # E[p0; p0 < cut] = E[p0]·I_cut(a + 1, b)
        clipped = factor * special.betainc(a + 1.0, b, cut) \
            + special.betaincc(a, b, cut) * (a + b) / a
        return float(clipped - 1.0)


@dataclass(frozen=True)
class Config:
    experiments: int = 1000  # of each kind, A/A and A/B
    days: int = 14
    seed: int = 20240614
    confidence: float = 0.95
    planned_units: float | None = None  # n* of the sequential interval; None: expected users
    world: World = field(default_factory=World)

    @property
    def tuned_for(self) -> float:
        """Users of both arms at the last look: what a team would plan the experiment for."""
        return self.planned_units or 2 * self.world.users_per_arm * self.days


def run(config: Config) -> dict[str, Any]:
    """Simulate, analyse and summarise; the JSON-able result (see the module docstring)."""
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    looks = {kind: _analyse(_simulate(rng, config, uplift), config)
             for kind, uplift in (("aa", 0.0), ("ab", config.world.uplift))}
    truth = config.world.true_uplift(config.world.uplift)
    results = {m: {**{i: _summary(looks, m, i, truth) for i in INTERVALS},
                   "variance_reduction": _reduction(looks["ab"], m),
                   "estimate_end": _estimates(looks["ab"], m, truth)} for m in METRICS}
    srm = np.concatenate([looks["aa"]["srm"], looks["ab"]["srm"]])
    return {
        "config": {**asdict(config), "tuned_for_units": config.tuned_for,
                   "true_uplift": truth},
        "results": results,
        "srm": {"experiments": int(srm.shape[0]), "alpha": SRM_ALPHA, **_rates(srm)},
        "targets": _targets(results, config.experiments),
        "seconds": round(time.perf_counter() - started, 2),
    }


# --- simulation (numpy, all experiments at once) -----------------------------------------------


def _simulate(rng: np.random.Generator, config: Config, uplift: float) -> dict[str, np.ndarray]:
    """Cumulative Gram matrices Σw·wᵀ per arm: {arm: array (experiments, days, 6, 6)}, w in the
    order of `cuped.FIELDS`."""
    daily: dict[str, list[np.ndarray]] = {"control": [], "treatment": []}
    for _ in range(config.days):
        in_treatment = rng.random((config.experiments, 2 * config.world.users_per_arm)) < 0.5
        w = user_vectors(rng, config.world, uplift, in_treatment)
        for arm, mask in (("control", ~in_treatment), ("treatment", in_treatment)):
            daily[arm].append(user_grams(w, mask))
    return {arm: np.cumsum(np.stack(days, axis=1), axis=1) for arm, days in daily.items()}


def user_vectors(rng: np.random.Generator, world: World, uplift: float,
                 in_treatment: np.ndarray) -> np.ndarray:
    """w = (1, x, y, pre_x, pre_y, has_pre) per user, shape (*in_treatment.shape, 6)."""
    shape = in_treatment.shape
    activity = rng.exponential((1.0 - world.q) / world.q, shape)
    x = 1 + rng.poisson(activity)  # an exponential mixture of Poissons: Geometric(q) overall
    p0 = rng.beta(*world.control_beta, shape)
    y = rng.binomial(x, np.where(in_treatment, np.minimum(p0 * (1.0 + uplift), 1.0), p0))
    has_pre = rng.random(shape) >= world.new_share
    pre_x = np.where(has_pre, 1 + rng.poisson(activity * world.pre_activity), 0)
    pre_y = rng.binomial(pre_x, p0)
    return np.stack([np.ones(shape), x, y, pre_x, pre_y, has_pre], axis=-1).astype(float)


def user_grams(w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, Σw·wᵀ over the users where `mask` is true: (..., 6, 6), exact integers."""
    return np.swapaxes(w * mask[..., None], -1, -2) @ w


def arm_stats(gram: np.ndarray) -> ArmStats:
    """The report's sums of one arm from its Gram matrix."""
    g = gram.astype(np.int64)
    x, y = cuped.X, cuped.Y
    return ArmStats(g[0, 0], g[0, x], g[0, y], g[x, x], g[y, y], g[x, y])


# --- analysis through the report's functions ---------------------------------------------------


def _analyse(grams: dict[str, np.ndarray], config: Config) -> dict[str, np.ndarray]:
    """Per experiment and look: each metric's (lo, hi) of the four intervals, the plain and
    CUPED log ratios, CUPED's reported variance reduction, and the SRM flag."""
    n_exp, n_days = grams["control"].shape[:2]
    out = {f"{m}_{i}": np.full((n_exp, n_days, 2), np.nan) for m in METRICS for i in INTERVALS}
    out["srm"] = np.zeros((n_exp, n_days), dtype=bool)
    for e in range(n_exp):
        for d in range(n_days):
            c, t = arm_stats(grams["control"][e, d]), arm_stats(grams["treatment"][e, d])
            for m, uplift in METRICS.items():
                fixed = uplift(t, c, config.confidence)
                out[f"{m}_fixed"][e, d] = fixed.lo, fixed.hi
                out[f"{m}_sequential"][e, d] = _sequential(fixed, t.users + c.users, config)
            out["srm"][e, d] = sample_ratio_check(
                {"control": c.users, "treatment": t.users}, WEIGHTS).flagged
    for m in METRICS:
        out.update(_cuped_looks(grams, m, config))
    return out


def _cuped_looks(grams: dict[str, np.ndarray], metric: str, config: Config
                 ) -> dict[str, np.ndarray]:
    """CUPED for every experiment and look at once: the fit behind the report's entries, with
    the report's fixed and always-valid intervals around it (on the log scale, as there)."""
    fit = cuped.fit(grams["treatment"], grams["control"], metric)
    half = z_value(config.confidence) * fit.se_log
    seq = sequential.interval(fit.log_ratio, fit.se_log, fit.units, config.tuned_for,
                              1.0 - config.confidence)
    return {
        f"{metric}_cuped": np.expm1(np.stack([fit.log_ratio - half, fit.log_ratio + half], -1)),
        f"{metric}_cuped_sequential": np.expm1(np.stack(seq, axis=-1)),
        f"{metric}_log_plain": fit.plain_log_ratio,
        f"{metric}_log_cuped": fit.log_ratio,
        f"{metric}_reduction": fit.variance_reduction,
    }


def _sequential(fixed: Uplift, units: int, config: Config) -> tuple[float, float]:
    seq = sequential_uplift(fixed, units, config.confidence, config.tuned_for)
    return seq.lo, seq.hi


# --- summaries ----------------------------------------------------------------------------------


def _summary(looks: dict[str, dict[str, np.ndarray]], metric: str, interval: str,
             uplift: float) -> dict[str, Any]:
    aa, ab = looks["aa"][f"{metric}_{interval}"], looks["ab"][f"{metric}_{interval}"]
    covers = (ab[..., 0] <= uplift) & (uplift <= ab[..., 1])
    by_look = covers.mean(axis=0)
    return {
        "coverage_by_look": [round(float(v), 4) for v in by_look],
        "coverage_min_look": float(by_look.min()),
        "coverage_end": float(by_look[-1]),
        "coverage_all_looks": float(covers.all(axis=1).mean()),
        "aa_coverage_min_look": float(((aa[..., 0] <= 0) & (aa[..., 1] >= 0)).mean(axis=0).min()),
        "fpr": _rates((aa[..., 0] > 0) | (aa[..., 1] < 0)),
        "power": _rates(ab[..., 0] > 0),  # the right sign only
    }


def _reduction(ab: dict[str, np.ndarray], metric: str) -> dict[str, Any]:
    """CUPED's variance reduction per look in A/B: as reported (mean over the experiments) and
    as measured (1 − var over the experiments of the adjusted log ratio / of the plain one)."""
    reported = np.nanmean(ab[f"{metric}_reduction"], axis=0)
    measured = 1.0 - np.nanvar(ab[f"{metric}_log_cuped"], axis=0, ddof=1) \
        / np.nanvar(ab[f"{metric}_log_plain"], axis=0, ddof=1)
    return {"reported_by_look": [round(float(v), 4) for v in reported],
            "measured_by_look": [round(float(v), 4) for v in measured],
            "reported_end": float(reported[-1]), "measured_end": float(measured[-1])}


def _estimates(ab: dict[str, np.ndarray], metric: str, truth: float) -> dict[str, float]:
    """Mean uplift estimate at the last look over the A/B experiments, against the truth."""
    return {"true": truth,
            "plain_mean": float(np.nanmean(np.expm1(ab[f"{metric}_log_plain"][:, -1]))),
            "cuped_mean": float(np.nanmean(np.expm1(ab[f"{metric}_log_cuped"][:, -1])))}


def _rates(hits: np.ndarray) -> dict[str, float]:
    """Share of experiments with a hit at the last look, and at any look (read daily)."""
    return {"end": float(hits[:, -1].mean()), "any_look": float(hits.any(axis=1).mean())}


def _targets(results: dict[str, Any], experiments: int) -> dict[str, Any]:
    out = {}
    for m in METRICS:
        for i in ("sequential", "cuped_sequential"):
            seq = results[m][i]
            out[f"{m}_{i}_fpr_daily_looks"] = _target(seq["fpr"]["any_look"], "<=", TARGET_FPR)
            out[f"{m}_{i}_coverage_every_look"] = _target(seq["coverage_min_look"], ">=",
                                                          TARGET_COVERAGE)
        # a fixed-horizon interval covers 95% exactly, not more: met within Monte Carlo error
        limit = TARGET_COVERAGE - 2.0 * math.sqrt(TARGET_COVERAGE * (1 - TARGET_COVERAGE)
                                                  / experiments)
        out[f"{m}_cuped_coverage_end"] = _target(results[m]["cuped"]["coverage_end"], ">=",
                                                 round(limit, 4))
    return out


def _target(value: float, op: str, limit: float) -> dict[str, Any]:
    met = value <= limit if op == "<=" else value >= limit
    return {"value": value, "bound": f"{op} {limit}", "limit": limit, "met": met}


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: one row per metric and interval, then SRM and the targets."""
    cfg, days = result["config"], result["config"]["days"]
    header = ["metric", "interval", "cov end", "cov min/look", "cov all looks", "FPR end",
              f"FPR {days} looks", f"power d{days}", f"power by d{days}", "var red",
              "var red MC"]
    rows = [header]
    for m, by_interval in result["results"].items():
        red = by_interval["variance_reduction"]
        for i in INTERVALS:
            s = by_interval[i]
            rows.append([m.upper(), i.replace("_", " ")] + [_pct(v) for v in (
                s["coverage_end"], s["coverage_min_look"], s["coverage_all_looks"],
                s["fpr"]["end"], s["fpr"]["any_look"], s["power"]["end"],
                s["power"]["any_look"])] + (
                [_pct(red["reported_end"]), _pct(red["measured_end"])]
                if i.startswith("cuped") else ["", ""]))
    srm = result["srm"]
    lines = [_title(cfg), *_columns(rows), *_daily(result),
             f"SRM check (p < {srm['alpha']}): false alarms {_pct(srm['end'])} at the end, "
             f"{_pct(srm['any_look'])} on any of {days} looks ({srm['experiments']:,} experiments)"]
    lines += [f"target {name}: {t['value']:.1%} {t['bound']}: {'met' if t['met'] else 'NOT MET'}"
              for name, t in result["targets"].items()]
    mc = math.sqrt(0.05 * 0.95 / cfg["experiments"])
    lines.append(f"({result['seconds']:.1f} s; Monte Carlo standard error about {mc:.1%} at a "
                 "5% rate)")
    return "\n".join(lines)


def _daily(result: dict[str, Any]) -> list[str]:
    """Per look: coverage of the plain and CUPED fixed intervals, CUPED's variance reduction."""
    header = ["look"] + [f"{m.upper()} {c}" for m in result["results"]
                         for c in ("cov fixed", "cov CUPED", "var red", "var red MC")]
    rows = [header]
    for d in range(result["config"]["days"]):
        row = [f"day {d + 1}"]
        for by_interval in result["results"].values():
            red = by_interval["variance_reduction"]
            row += [_pct(v) for v in (by_interval["fixed"]["coverage_by_look"][d],
                                      by_interval["cuped"]["coverage_by_look"][d],
                                      red["reported_by_look"][d], red["measured_by_look"][d])]
        rows.append(row)
    return ["By look (A/B; var red = CUPED's variance reduction, reported mean and measured "
            "over the experiments):", *_columns(rows, left=1)]


def _title(cfg: dict[str, Any]) -> str:
    w = cfg["world"]
    return (f"{cfg['experiments']:,} A/A + {cfg['experiments']:,} A/B experiments, "
            f"{cfg['days']} daily looks, ~{w['users_per_arm']} new users per arm a day, true "
            f"uplift {cfg['true_uplift']:+.0%} (CTR and CVR) in A/B; sequential tuned for "
            f"n* = {cfg['tuned_for_units']:,.0f} users; CUPED with {w['new_share']:.0%} of the "
            "users new (no pre-period); cov = coverage of the true uplift (A/B), FPR from A/A, "
            "power = interval above 0 in A/B, var red = CUPED's variance reduction at the end, "
            "reported (mean) and measured over the experiments (MC)")


def _pct(v: float) -> str:
    return f"{v:.1%}"


def _columns(rows: list[list[str]], left: int = 2) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if j < left else c.rjust(w)
                      for j, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.ab_coverage",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", type=int, default=1000, help="of each kind, A/A and A/B")
    p.add_argument("--days", type=int, default=14, help="daily looks")
    p.add_argument("--users-per-arm", type=int, default=World.users_per_arm,
                   help="new users per arm and day, on average")
    p.add_argument("--uplift", type=float, default=World.uplift,
                   help="relative uplift of each treatment user's CTR in A/B")
    p.add_argument("--new-users", type=float, default=World.new_share, metavar="SHARE",
                   help="share of users without a pre-period (CUPED)")
    p.add_argument("--pre-activity", type=float, default=World.pre_activity, metavar="RATIO",
                   help="pre-period impressions per user over in-experiment ones (CUPED)")
    p.add_argument("--planned-units", type=float, default=None,
                   help="n* the sequential interval is tuned for (default: users at the end)")
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--out", type=Path, default=Path("bench-out/ab_coverage.json"))
    args = p.parse_args(argv)
    if args.experiments < 1 or args.days < 1 or args.users_per_arm < 2:
        p.error("--experiments and --days must be >= 1, --users-per-arm >= 2")
    if not (0.0 <= args.new_users <= 1.0 and args.pre_activity >= 0.0 and args.uplift > -1.0):
        p.error("--new-users must be in [0, 1], --pre-activity >= 0, --uplift > -1")
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    world = replace(World(), users_per_arm=args.users_per_arm, uplift=args.uplift,
                    new_share=args.new_users, pre_activity=args.pre_activity)
    return Config(experiments=args.experiments, days=args.days, seed=args.seed,
                  planned_units=args.planned_units, world=world)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(config_from_args(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
