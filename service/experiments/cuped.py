"""CUPED: variance reduction of the uplift with each user's activity before the experiment.

Deng, Xu, Kohavi and Walker, "Improving the sensitivity of online controlled experiments by
utilizing pre-experiment data" (WSDM 2013). A per-user covariate Z_u measured before the
experiment cannot be moved by the treatment, so for any θ the adjusted arm estimate

    m_adj = m − θᵀ(Z̄_arm − Z̄_pool)

has the expectation of m (randomisation gives both arms the same E[Z̄]), while its variance,
var(φ_u − θᵀψ_u)/n with φ_u and ψ_u the per-user influence (linearised) values of the metric and
of the covariate means, is smallest at the regression coefficient of φ on ψ:
θ = Σ_ψψ⁻¹·Σ_ψφ. With one linear covariate the variance shrinks by the factor 1 − ρ², ρ their
correlation.

Here, for user u of an arm, w_u = (1, x_u, y_u, x⁰_u, y⁰_u, h_u): impressions and downloads in the
experiment, impressions and downloads in the pre-period, and h_u = 1 when the user has a
pre-period at all. New users have x⁰ = y⁰ = 0 and h = 0; with h among the covariates they get
their own mean instead of being mistaken for users who were idle before (the usual treatment of
missing pre-experiment data). The covariates are Z_u = (x⁰_u, y⁰_u, h_u) for
both metrics:

- CVR, downloads per user, a mean: φ_u = y_u − ȳ.
- CTR, a ratio of per-user means r = ȳ/x̄: the delta method's linearisation
  φ_u = (y_u − r·x_u)/x̄ (as in Deng, Knoblich and Lu, "Applying the delta method in metric
  analytics", KDD 2018), regressed on the same Z_u. Their span holds the linearised pre-period
  CTR (y⁰_u − r⁰·x⁰_u)/x̄⁰, the covariate of CUPED's ratio form, so the fit is never worse than
  that single covariate.

θ is fitted once per comparison, pooled over its two arms (within-arm cross-products, so the
effect itself does not leak into it), on standardised covariates with a pseudo-inverse: a
covariate without variance (no user has a pre-period, or every user has) gets θ = 0, and with
no pre-period at all the adjusted estimate is the plain one exactly. Z̄_pool is the mean over
both arms. The uplift is t_adj/c_adj − 1 on the log scale like the plain one; its variance is
the delta method over both arms' influence values, including the pooled mean's share in both
(small when t ≈ c). θ is treated as known, which costs O(1/n) (the coverage harness checks it).

The sufficient statistics are the sums Σ w_u·w_uᵀ per arm (`CupedStats`, 21 distinct sums):
they add over disjoint sets of users, come out of one SQL GROUP BY
(service/experiments/sql/cuped_sums.sql), and every function here takes them as arrays of
shape (..., 6, 6), so the coverage harness fits thousands of experiments at once.

numpy only, like the rest of the serving side's statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

FIELDS = ("one", "x", "y", "pre_x", "pre_y", "has_pre")
ONE, X, Y, PRE_X, PRE_Y, HAS_PRE = range(len(FIELDS))
COVARIATES = (PRE_X, PRE_Y, HAS_PRE)
COVARIATE_NAMES = ("pre_impressions", "pre_downloads", "has_pre_period")
PAIRS = tuple((i, j) for i in range(len(FIELDS)) for j in range(i, len(FIELDS)))
# the column of each pair in sql/cuped_sums.sql: users, x, ..., x_x, x_y, ..., has_pre_has_pre
SUM_NAMES = tuple("users" if i == j == ONE else FIELDS[j] if i == ONE
                  else f"{FIELDS[i]}_{FIELDS[j]}" for i, j in PAIRS)
Metric = Literal["ctr", "cvr"]
RCOND = 1e-10  # on standardised covariates: drops only an exactly collinear direction


@dataclass(frozen=True)
class CupedStats:
    """Σ w_u·w_uᵀ over the users of one arm, w_u = (1, x_u, y_u, x⁰_u, y⁰_u, h_u), stored as the
    21 sums of `SUM_NAMES` (the upper triangle). `users` = Σ1, `impressions` = Σx, and so on."""

    users: int
    x: int
    y: int
    pre_x: int
    pre_y: int
    has_pre: int
    x_x: int
    x_y: int
    x_pre_x: int
    x_pre_y: int
    x_has_pre: int
    y_y: int
    y_pre_x: int
    y_pre_y: int
    y_has_pre: int
    pre_x_pre_x: int
    pre_x_pre_y: int
    pre_x_has_pre: int
    pre_y_pre_y: int
    pre_y_has_pre: int
    has_pre_has_pre: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not float(value).is_integer() or value < 0:
                raise ValueError(f"CupedStats.{f.name} must be a non-negative integer, "
                                 f"got {value!r}")
            object.__setattr__(self, f.name, int(value))

    @classmethod
    def from_user_arrays(cls, x: Any, y: Any, pre_x: Any, pre_y: Any, has_pre: Any
                         ) -> CupedStats:
        """The sums of per-user arrays (same length): in-experiment impressions `x` and
        downloads `y`, pre-period `pre_x` and `pre_y`, and `has_pre` (1 for a pre-period)."""
        w = user_vectors(x, y, pre_x, pre_y, has_pre)
        return cls.from_gram(w.T @ w)

    @classmethod
    def from_gram(cls, gram: Any) -> CupedStats:
        """From a 6 x 6 matrix Σ w_u·w_uᵀ (its upper triangle is read)."""
        g = np.asarray(gram)
        return cls(*(g[i, j].item() for i, j in PAIRS))

    @classmethod
    def empty(cls) -> CupedStats:
        return cls(*([0] * len(PAIRS)))

    @property
    def users_with_pre_period(self) -> int:
        return self.has_pre

    def gram(self) -> np.ndarray:
        """The symmetric 6 x 6 matrix Σ w_u·w_uᵀ (float)."""
        return gram_from_sums(np.array(self.sums(), dtype=float))

    def sums(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in SUM_NAMES)

    def __add__(self, other: object) -> CupedStats:
        if not isinstance(other, CupedStats):
            return NotImplemented
        return CupedStats(*(a + b for a, b in zip(self.sums(), other.sums(), strict=True)))

    @classmethod
    def total(cls, parts: Iterable[CupedStats]) -> CupedStats:
        """The sums over disjoint sets of users."""
        out = cls.empty()
        for part in parts:
            out = out + part
        return out


def user_vectors(x: Any, y: Any, pre_x: Any, pre_y: Any, has_pre: Any) -> np.ndarray:
    """w_u per user, shape (users, 6), int64; checks the counts."""
    cols = [np.asarray(v) for v in (x, y, pre_x, pre_y, has_pre)]
    if any(c.ndim != 1 or c.shape != cols[0].shape for c in cols):
        raise ValueError("x, y, pre_x, pre_y and has_pre must be 1-d arrays of one length")
    if any(c.size and (np.any(c < 0) or np.any(np.mod(c, 1) != 0)) for c in cols):
        raise ValueError("the per-user values must be non-negative integer counts")
    if cols[4].size and np.any(cols[4] > 1):
        raise ValueError("has_pre must be 0 or 1")
    return np.column_stack([np.ones_like(cols[0], dtype=np.int64), *cols]).astype(np.int64)


def gram_from_sums(sums: np.ndarray) -> np.ndarray:
    """(..., 21) sums in `SUM_NAMES` order -> (..., 6, 6) symmetric matrices."""
    sums = np.asarray(sums, dtype=float)
    g = np.zeros((*sums.shape[:-1], len(FIELDS), len(FIELDS)))
    for k, (i, j) in enumerate(PAIRS):
        g[..., i, j] = g[..., j, i] = sums[..., k]
    return g


@dataclass(frozen=True)
class CupedFit:
    """The CUPED fit of one comparison (or arrays of them, same shapes).

    `log_ratio` and `se_log`: log(t_adj/c_adj) and its standard error; `plain_log_ratio` and
    `plain_se_log`: the same without adjustment (equal to the plain report's); `theta`: (..., 3),
    in `COVARIATE_NAMES` order; `variance_reduction` = 1 − se_log²/plain_se_log²; `units`: the
    users of both arms; `users_with_pre_period`: those of them with a pre-period.
    """

    log_ratio: np.ndarray
    se_log: np.ndarray
    plain_log_ratio: np.ndarray
    plain_se_log: np.ndarray
    theta: np.ndarray
    variance_reduction: np.ndarray
    units: np.ndarray
    users_with_pre_period: np.ndarray


def fit(treatment: Any, control: Any, metric: Metric) -> CupedFit:
    """CUPED for the relative uplift of `metric` between two arms' Gram matrices (..., 6, 6).

    NaN where undefined: an arm with fewer than two users, no impressions (CTR), or an adjusted
    rate that is not positive.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return _fit(np.asarray(treatment, dtype=float), np.asarray(control, dtype=float), metric)


def _fit(treatment: np.ndarray, control: np.ndarray, metric: Metric) -> CupedFit:
    arms = [_moments(treatment), _moments(control)]
    (n_t, mu_t, cov_t), (n_c, mu_c, cov_c) = arms
    (m_t, c_t), (m_c, c_c) = (_metric(mu, metric) for _, mu, _ in arms)
    theta = _theta([(n_t, cov_t, c_t), (n_c, cov_c, c_c)])
    theta_w = np.zeros(mu_t.shape)
    theta_w[..., list(COVARIATES)] = theta
    share_t = n_t / (n_t + n_c)
    mu_pool = share_t[..., None] * mu_t + (1.0 - share_t)[..., None] * mu_c
    t_adj = m_t - _dot(theta_w, mu_t - mu_pool)
    c_adj = m_c - _dot(theta_w, mu_c - mu_pool)
    # d log(t_adj/c_adj) per arm: the metric's influence and the covariate mean's, which enters
    # its own arm's estimate and, through the pooled mean, the other's: the same factor in both
    pooled = ((1.0 - share_t) / t_adj + share_t / c_adj)[..., None]
    v_t = c_t / t_adj[..., None] - theta_w * pooled
    v_c = -c_c / c_adj[..., None] + theta_w * pooled
    var = _quad(v_t, cov_t) / n_t + _quad(v_c, cov_c) / n_c
    # written as var with θ = 0, so that no pre-period gives a reduction of exactly 0
    plain_var = _quad(c_t / m_t[..., None], cov_t) / n_t + _quad(c_c / m_c[..., None], cov_c) / n_c
    log_ratio = np.log(np.where((t_adj > 0) & (c_adj > 0), t_adj / c_adj, np.nan))
    plain = np.log(np.where((m_t > 0) & (m_c > 0), m_t / m_c, np.nan))
    reduction = np.where(plain_var > 0, 1.0 - var / plain_var, np.nan)
    return CupedFit(
        log_ratio=log_ratio,
        se_log=np.sqrt(np.maximum(var, 0.0)),
        plain_log_ratio=plain,
        plain_se_log=np.sqrt(np.maximum(plain_var, 0.0)),
        theta=theta,
        variance_reduction=reduction,
        units=n_t + n_c,
        users_with_pre_period=mu_t[..., HAS_PRE] * n_t + mu_c[..., HAS_PRE] * n_c,
    )


def _moments(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, means of w, sample covariance of w with divisor n − 1); NaN where n < 2."""
    n = g[..., ONE, ONE]
    usable = np.where(n >= 2, n, np.nan)
    mu = g[..., ONE, :] / usable[..., None]
    cov = (g - usable[..., None, None] * mu[..., :, None] * mu[..., None, :]) \
        / (usable - 1.0)[..., None, None]
    return usable, mu, cov


def _metric(mu: np.ndarray, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """(the arm's value, the coefficients c with φ_u = cᵀ(w_u − w̄))."""
    e = np.eye(len(FIELDS))
    if metric == "cvr":
        return mu[..., Y], np.broadcast_to(e[Y], mu.shape)
    if metric != "ctr":
        raise ValueError(f"metric must be 'ctr' or 'cvr', got {metric!r}")
    x_bar = np.where(mu[..., X] > 0, mu[..., X], np.nan)
    r = mu[..., Y] / x_bar
    return r, (e[Y] - r[..., None] * e[X]) / x_bar[..., None]


def _theta(arms: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """The pooled regression coefficient of φ on ψ, (..., 3); 0 for covariates without
    variance."""
    cov_idx = list(COVARIATES)
    a = sum((n - 1)[..., None, None] * cov[..., cov_idx, :][..., :, cov_idx]
            for n, cov, _ in arms)
    b = sum((n - 1)[..., None] * np.einsum("...ij,...j->...i", cov[..., cov_idx, :], c)
            for n, cov, c in arms)
    scale = np.sqrt(np.clip(np.diagonal(a, axis1=-2, axis2=-1), 0.0, None))
    ok = np.isfinite(a).all(axis=(-2, -1)) & np.isfinite(b).all(axis=-1)
    safe = np.where(scale > 0, scale, 1.0)
    a_std = np.where(ok[..., None, None], a / (safe[..., :, None] * safe[..., None, :]), 0.0)
    b_std = np.where(ok[..., None], b / safe, 0.0)
    # a covariate without variance has a zero row and column here, so the pseudo-inverse gives
    # it θ = 0
    theta = np.einsum("...ij,...j->...i", np.linalg.pinv(a_std, rcond=RCOND), b_std) / safe
    return np.where(ok[..., None], theta, np.nan)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b)


def _quad(v: np.ndarray, cov: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...ij,...j->...", v, cov, v)
