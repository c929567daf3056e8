"""Always-valid confidence sequences for an estimate with a standard error: the normal mixture.

A fixed-horizon interval, estimate ± z·se, covers the truth with probability 1 − α when it is
read once, at a sample size fixed in advance. Read every day and acted on the first day it
excludes 0, it is wrong far more often (about 20% instead of 5% of A/A tests over 14 daily
looks, measured by `loadtest/ab_coverage.py`). A confidence sequence is a family of intervals,
one per sample size, that covers the truth at *every* sample size simultaneously with probability
1 − α, so it can be read as often as one likes and the experiment stopped on any rule.

Method: the two-sided normal-mixture boundary (after Robbins) of Howard, Ramdas, McAuliffe and
Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences", Annals of Statistics
49(2), 1055-1080 (2021), arXiv:1810.08240, applied as an asymptotic confidence sequence around a
CLT estimate with a plug-in variance as justified by Waudby-Smith, Arbour, Sinha, Kennedy and
Ramdas, "Time-uniform central limit theory and asymptotic confidence sequences", Annals of
Statistics (2024), arXiv:2103.06476. It is the mixture SPRT of Johari, Koomen, Pekelis and
Walsh, "Peeking at A/B tests" (KDD 2017) written as an interval, and the form GrowthBook and
Eppo ship.

With n units observed, an estimate θ̂ whose standard error is se (se² ≈ σ²/n), the mixture
precision ρ² > 0 and k = n·ρ², the interval at level 1 − α is

    θ̂ ± se · sqrt( (k + 1)/k · (ln(k + 1) − 2·ln α) ).

Equivalently, the mixture likelihood ratio of θ = 0 with a N(0, τ²) mixing distribution over the
effect, τ² = k·se², is Λ = (k + 1)^(−1/2) · exp(k/(k + 1) · z²/2) with z = θ̂/se, and the interval
excludes 0 exactly when Λ ≥ 1/α: 1/Λ is the always-valid p-value at this look (its running
minimum over the looks is the always-valid p-value of the whole sequence).

Tuning parameter: ρ² sets where the sequence is tightest. Any fixed ρ² > 0 gives a valid
sequence; Howard et al. choose ρ² = η/n* with η = −2·ln α + ln(1 − 2·ln α) to make the boundary
nearly tightest at a planned sample size n* (GrowthBook's "N*", its default 5,000). Here n* is
`planned_units`, the planned number of units (users of both arms of the comparison) at the end
of the experiment; with it the sequence is about 1.55 times as wide as the fixed-horizon
interval at n = n* (95%), wider before and only slowly wider after. ρ² must not be chosen from
the data being tested.

numpy only; every function takes scalars or numpy arrays (broadcasting) and returns an array (0-d
for scalars: float() it), NaN where n or se is not positive and finite.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

PLANNED_UNITS = 10_000  # users of both arms at the planned end: ~2 weeks at 400 per arm a day
ALPHA = 0.05


def tuning_eta(alpha: float = ALPHA) -> float:
    """η = −2·ln α + ln(1 − 2·ln α): k = η at the planned sample size."""
    _check_alpha(alpha)
    return -2.0 * math.log(alpha) + math.log(1.0 - 2.0 * math.log(alpha))


def mixture_precision(planned_units: float = PLANNED_UNITS, alpha: float = ALPHA) -> float:
    """ρ² = η/n*, tuned so that the sequence is nearly tightest at n* = `planned_units`."""
    if not (math.isfinite(planned_units) and planned_units > 0):
        raise ValueError(f"planned_units must be a positive number, got {planned_units!r}")
    return tuning_eta(alpha) / planned_units


def width_factor(
    units: npt.ArrayLike, planned_units: float = PLANNED_UNITS, alpha: float = ALPHA
) -> np.ndarray:
    """The multiplier of se, sqrt((k + 1)/k · (ln(k + 1) − 2·ln α)) with k = n·ρ²."""
    k = _k(units, planned_units, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt((k + 1.0) / k * (np.log1p(k) - 2.0 * math.log(alpha)))


def interval(
    estimate: npt.ArrayLike, se: npt.ArrayLike, units: npt.ArrayLike,
    planned_units: float = PLANNED_UNITS, alpha: float = ALPHA,
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the confidence sequence at this look: estimate ± se·`width_factor`."""
    est = np.asarray(estimate, dtype=float)
    half = np.where(_usable(se), se, np.nan) * width_factor(units, planned_units, alpha)
    return est - half, est + half


def p_value(
    estimate: npt.ArrayLike, se: npt.ArrayLike, units: npt.ArrayLike,
    planned_units: float = PLANNED_UNITS, alpha: float = ALPHA,
) -> np.ndarray:
    """Always-valid p-value of θ = 0 at this look: min(1, 1/Λ), below α iff `interval` excludes 0.

    `alpha` only tunes ρ² (as for the interval), so that the two agree.
    """
    k = _k(units, planned_units, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        z2 = (np.asarray(estimate, dtype=float) / np.where(_usable(se), se, np.nan)) ** 2
        log_inv_lr = 0.5 * np.log1p(k) - k / (k + 1.0) * z2 / 2.0
        return np.minimum(1.0, np.exp(log_inv_lr))


def _k(units: npt.ArrayLike, planned_units: float, alpha: float) -> np.ndarray:
    n = np.asarray(units, dtype=float)
    return np.where(n > 0, n, np.nan) * mixture_precision(planned_units, alpha)


def _usable(se: npt.ArrayLike) -> np.ndarray:
    s = np.asarray(se, dtype=float)
    return np.isfinite(s) & (s > 0)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
