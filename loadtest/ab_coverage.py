"""Coverage harness of the A/B statistics: simulated A/A and A/B experiments with a known truth.

    python -m loadtest.ab_coverage [--experiments 1000] [--days 14] [--out FILE]

Each experiment draws new users every day (users per day ~ 2 x `users_per_arm`, each assigned to
control or treatment by a fair coin, so the sample-ratio check sees real binomial noise). A user
has x ~ Geometric(q) impressions, a CTR p ~ Beta (heterogeneous users) and y ~ Binomial(x, p)
downloads (a download is this product's click: CTR = downloads / impressions). In A/B
experiments the treatment's Beta has its mean times 1 + uplift, so the true relative uplift of
CTR (E[y]/E[x] = E[p]) and of CVR (downloads per user, E[p]/q) are both exactly `uplift`; in A/A
experiments they are 0.

After every day the cumulative per-user sums of each arm become an `ArmStats` (the sums of
`ArmStats.from_user_arrays`, computed for all experiments at once with numpy) and go through the
report's own functions: `ctr_uplift` / `cvr_uplift` (fixed-horizon), `sequential_uplift`
(always-valid) and `sample_ratio_check`. Written out, for both intervals and both metrics:
coverage of the true uplift at each look, at the end and at all looks at once; the A/A
false-positive rate read once at the end and read daily (rejected on any look); the A/B power at
the last look and by the last look when read daily; and the sample-ratio check's false alarms.
It exercises the statistics only, not the counting path through Redis.
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

from service.experiments.stats import (
    SRM_ALPHA,
    ArmStats,
    Uplift,
    ctr_uplift,
    cvr_uplift,
    sample_ratio_check,
    sequential_uplift,
)

METRICS = {"ctr": ctr_uplift, "cvr": cvr_uplift}
INTERVALS = ("fixed", "sequential")
WEIGHTS = {"control": 0.5, "treatment": 0.5}
TARGET_FPR, TARGET_COVERAGE = 0.05, 0.95


@dataclass(frozen=True)
class World:
    """The simulated users (the world of tests/test_stats.py: true CTR 5%, 20 impressions each)."""

    users_per_arm: int = 400  # new users per arm and day, on average
    q: float = 0.05  # impressions ~ Geometric(q): mean 1/q, long tail
    control_beta: tuple[float, float] = (0.5, 9.5)  # per-user CTR; a + b = 10: strongly mixed
    uplift: float = 0.10  # true relative CTR (and CVR) uplift of the A/B experiments

    def treatment_beta(self, uplift: float) -> tuple[float, float]:
        a, b = self.control_beta
        mean = a / (a + b) * (1.0 + uplift)
        return mean * (a + b), (1.0 - mean) * (a + b)


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
    results = {m: {i: _summary(looks, m, i, config.world.uplift) for i in INTERVALS}
               for m in METRICS}
    srm = np.concatenate([looks["aa"]["srm"], looks["ab"]["srm"]])
    return {
        "config": {**asdict(config), "tuned_for_units": config.tuned_for},
        "results": results,
        "srm": {"experiments": int(srm.shape[0]), "alpha": SRM_ALPHA, **_rates(srm)},
        "targets": _targets(results),
        "seconds": round(time.perf_counter() - started, 2),
    }


# --- simulation (numpy, all experiments at once) -----------------------------------------------


def _simulate(rng: np.random.Generator, config: Config, uplift: float) -> dict[str, np.ndarray]:
    """Cumulative user-level sums per arm: {arm: array (experiments, days, 6)} in the field
    order of `ArmStats` (users, impressions, downloads, Σx², Σy², Σxy)."""
    w = config.world
    betas = {"control": w.control_beta, "treatment": w.treatment_beta(uplift)}
    shape = (config.experiments, 2 * w.users_per_arm)
    daily: dict[str, list[np.ndarray]] = {arm: [] for arm in betas}
    for _ in range(config.days):
        in_treatment = rng.random(shape) < 0.5
        x = rng.geometric(w.q, shape)
        p = np.where(in_treatment, rng.beta(*betas["treatment"], shape),
                     rng.beta(*betas["control"], shape))
        y = rng.binomial(x, p)
        for arm, mask in (("control", ~in_treatment), ("treatment", in_treatment)):
            daily[arm].append(user_sums(x, y, mask))
    return {arm: np.cumsum(np.stack(days, axis=1), axis=1) for arm, days in daily.items()}


def user_sums(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, the sums `ArmStats.from_user_arrays` takes of the users where `mask` is true."""
    xm, ym = x * mask, y * mask
    return np.stack([mask.sum(-1), xm.sum(-1), ym.sum(-1), (xm * x).sum(-1), (ym * y).sum(-1),
                     (xm * y).sum(-1)], axis=-1)


# --- analysis through the report's functions ---------------------------------------------------


def _analyse(sums: dict[str, np.ndarray], config: Config) -> dict[str, np.ndarray]:
    """Per experiment and look: each metric's fixed and sequential (lo, hi), and the SRM flag."""
    n_exp, n_days = sums["control"].shape[:2]
    out = {f"{m}_{i}": np.full((n_exp, n_days, 2), np.nan) for m in METRICS for i in INTERVALS}
    out["srm"] = np.zeros((n_exp, n_days), dtype=bool)
    for e in range(n_exp):
        for d in range(n_days):
            c = ArmStats(*sums["control"][e, d].tolist())
            t = ArmStats(*sums["treatment"][e, d].tolist())
            for m, uplift in METRICS.items():
                fixed = uplift(t, c, config.confidence)
                out[f"{m}_fixed"][e, d] = fixed.lo, fixed.hi
                out[f"{m}_sequential"][e, d] = _sequential(fixed, t.users + c.users, config)
            out["srm"][e, d] = sample_ratio_check(
                {"control": c.users, "treatment": t.users}, WEIGHTS).flagged
    return out


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


def _rates(hits: np.ndarray) -> dict[str, float]:
    """Share of experiments with a hit at the last look, and at any look (read daily)."""
    return {"end": float(hits[:, -1].mean()), "any_look": float(hits.any(axis=1).mean())}


def _targets(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for m in METRICS:
        seq = results[m]["sequential"]
        out[f"{m}_sequential_fpr_daily_looks"] = {
            "value": seq["fpr"]["any_look"], "bound": f"<= {TARGET_FPR}",
            "met": seq["fpr"]["any_look"] <= TARGET_FPR}
        out[f"{m}_sequential_coverage_every_look"] = {
            "value": seq["coverage_min_look"], "bound": f">= {TARGET_COVERAGE}",
            "met": seq["coverage_min_look"] >= TARGET_COVERAGE}
    return out


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: one row per metric and interval, then SRM and the targets."""
    cfg, days = result["config"], result["config"]["days"]
    header = ["metric", "interval", "cov end", "cov min/look", "cov all looks", "FPR end",
              f"FPR {days} looks", f"power d{days}", f"power by d{days}"]
    rows = [header]
    for m, by_interval in result["results"].items():
        for i, s in by_interval.items():
            rows.append([m.upper(), i] + [_pct(v) for v in (
                s["coverage_end"], s["coverage_min_look"], s["coverage_all_looks"],
                s["fpr"]["end"], s["fpr"]["any_look"], s["power"]["end"],
                s["power"]["any_look"])])
    srm = result["srm"]
    lines = [_title(cfg), *_columns(rows),
             f"SRM check (p < {srm['alpha']}): false alarms {_pct(srm['end'])} at the end, "
             f"{_pct(srm['any_look'])} on any of {days} looks ({srm['experiments']:,} experiments)"]
    lines += [f"target {name}: {t['value']:.1%} {t['bound']}: {'met' if t['met'] else 'NOT MET'}"
              for name, t in result["targets"].items()]
    mc = math.sqrt(0.05 * 0.95 / cfg["experiments"])
    lines.append(f"({result['seconds']:.1f} s; Monte Carlo standard error about {mc:.1%} at a "
                 "5% rate)")
    return "\n".join(lines)


def _title(cfg: dict[str, Any]) -> str:
    w = cfg["world"]
    return (f"{cfg['experiments']:,} A/A + {cfg['experiments']:,} A/B experiments, "
            f"{cfg['days']} daily looks, ~{w['users_per_arm']} new users per arm a day, true "
            f"uplift {w['uplift']:+.0%} (CTR and CVR) in A/B; sequential tuned for "
            f"n* = {cfg['tuned_for_units']:,.0f} users; cov = coverage of the true uplift (A/B), "
            "FPR from A/A, power = interval above 0 in A/B")


def _pct(v: float) -> str:
    return f"{v:.1%}"


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                      for j, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.ab_coverage",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", type=int, default=1000, help="of each kind, A/A and A/B")
    p.add_argument("--days", type=int, default=14, help="daily looks")
    p.add_argument("--users-per-arm", type=int, default=World.users_per_arm,
                   help="new users per arm and day, on average")
    p.add_argument("--uplift", type=float, default=World.uplift, help="true uplift in A/B")
    p.add_argument("--planned-units", type=float, default=None,
                   help="n* the sequential interval is tuned for (default: users at the end)")
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--out", type=Path, default=Path("bench-out/ab_coverage.json"))
    args = p.parse_args(argv)
    if args.experiments < 1 or args.days < 1 or args.users_per_arm < 2:
        p.error("--experiments and --days must be >= 1, --users-per-arm >= 2")
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    world = replace(World(), users_per_arm=args.users_per_arm, uplift=args.uplift)
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
