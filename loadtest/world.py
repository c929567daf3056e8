"""A seeded synthetic app store whose users download apps according to a hidden ground truth.

The truth is a logistic model over users, apps and context. Its logit is the sum of
- a base rate and first-order effects (popularity, rating, price, size, activity, slot bias);
- small per-user and per-app idiosyncratic effects;
- pairwise interactions (age x category, gender x category, device x price, region x developer,
  hour x category, activity x popularity, personal taste x category, recent categories
  matching the app category);
- planted three-way interactions (age x device x price, weekend x category x activity,
  gender x age x category).
Interaction tables are centred (ANOVA-style) so that each holds only its own order: a model
with first-order terms alone (LR) cannot capture them, a pairwise model (FM) captures the
pairwise part, and only a model with higher-order capacity (DeepFM's DNN) reaches the rest.

Everything is derived from `WorldConfig.seed` through numpy's default_rng, so a world and the
logs drawn from it are identical in every process.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ctrserve.features.spec import DatasetSpec, FieldSpec

AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_P = (0.22, 0.30, 0.22, 0.15, 0.11)
GENDERS = ("female", "male", "unknown")
GENDER_P = (0.47, 0.47, 0.06)
REGIONS = ("north", "south", "east", "west", "central", "coast", "mountain", "islands")
REGION_P = (0.20, 0.18, 0.15, 0.14, 0.12, 0.10, 0.07, 0.04)
DEVICES = ("android_budget", "android_flagship", "iphone", "tablet")
DEVICE_P = (0.40, 0.25, 0.27, 0.08)
ACTIVITIES = ("low", "mid", "high")
ACTIVITY_P = (0.55, 0.30, 0.15)
REDRAWS = 50  # row redraws before the exact draw of the rows still holding a duplicate
ACTIVITY_REQUEST_WEIGHT = (1.0, 3.0, 8.0)  # how often a user of each activity level shows up
RECENT_COUNT_RANGE = ((0, 2), (1, 4), (2, 5))  # inclusive, per activity level
CATEGORIES = (
    "games_casual", "games_action", "social", "photo", "music", "video", "productivity",
    "finance", "shopping", "education", "health", "travel", "news", "tools", "kids",
)  # fmt: skip
CATEGORY_P = (
    0.12, 0.09, 0.06, 0.07, 0.06, 0.06, 0.08, 0.05, 0.06, 0.07, 0.06, 0.04, 0.04, 0.10, 0.04,
)  # fmt: skip
CATEGORY_SIZE_MB = (
    150, 900, 120, 80, 90, 110, 60, 70, 90, 100, 60, 70, 40, 20, 200,
)  # fmt: skip
PRICE_BANDS = ("free", "under_1", "1_to_5", "over_5")
PRICE_P = (0.72, 0.12, 0.11, 0.05)
RATING_BANDS = ("below_3", "3_to_3.5", "3.5_to_4", "4_to_4.5", "4.5_plus")
RATING_CUTS = (0.10, 0.25, 0.50, 0.80)  # quantiles of the rating score between bands
POPULARITY_BANDS = ("niche", "low", "mid", "high", "top")
POPULARITY_CUTS = (0.40, 0.65, 0.83, 0.95)  # quantiles of the popularity score between bands
HOUR_WEIGHT = (
    2, 1, 1, 1, 1, 2, 4, 6, 7, 6, 5, 6, 8, 7, 6, 6, 7, 8, 9, 10, 11, 10, 7, 4,
)  # fmt: skip

# First-order effects on the logit, per band (scaled by WorldConfig.first_order_scale).
POPULARITY_EFFECT = (-0.6, -0.3, 0.0, 0.3, 0.6)
RATING_EFFECT = (-0.6, -0.3, 0.0, 0.2, 0.4)
PRICE_EFFECT = (0.0, -0.4, -0.8, -1.2)
ACTIVITY_EFFECT = (-0.3, 0.0, 0.3)
SIZE_EFFECT = -0.15  # per unit of log(size_mb), centred


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a world; the same config always builds the same world."""

    seed: int = 2026
    n_users: int = 20_000
    n_apps: int = 2_000
    n_developers: int = 200
    slots: int = 10
    base_logit: float = -3.6
    first_order_scale: float = 1.0
    slot_decay: float = 0.5  # logit drop per unit of log(slot)
    id_scale: float = 0.3  # sd of the per-user and per-app effects
    pair_scale: float = 0.3  # sd of each pairwise interaction table
    taste_scale: float = 0.3  # sd of each user's personal category taste
    recent_match: float = 0.3  # bonus when the app's category is among the user's recent ones
    triple_scale: float = 0.5  # sd of each three-way interaction table
    developer_zipf: float = 1.1  # power law of apps per developer

    def __post_init__(self) -> None:
        for name in ("n_users", "n_apps", "n_developers", "slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_apps < self.slots:
            raise ValueError(f"WorldConfig.n_apps ({self.n_apps}) must be >= slots ({self.slots})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown WorldConfig keys {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Requests:
    """Sampled score requests: one user, hour and weekday per request, candidates per request.

    `apps[r, j]` is shown in slot j + 1 of request r.
    """

    day: dt.date
    users: np.ndarray  # (n,) user indices
    hour: np.ndarray  # (n,)
    weekday: np.ndarray  # (n,) 0 = Monday
    second: np.ndarray  # (n,) second within the hour
    apps: np.ndarray  # (n, k) app indices

    def __len__(self) -> int:
        return len(self.users)

    def impressions(self) -> dict[str, np.ndarray]:
        """Flattened to one row per (request, candidate): request, user, app, context, slot."""
        n, k = self.apps.shape
        request = np.repeat(np.arange(n), k)
        return {
            "request": request,
            "user": self.users[request],
            "app": self.apps.ravel(),
            "hour": self.hour[request],
            "weekday": self.weekday[request],
            "second": self.second[request],
            "slot": np.tile(np.arange(1, k + 1), n),
        }


class SyntheticWorld:
    """Users, apps and the hidden download probability of any (user, app, context).

    Users and apps are addressed by index (0..n-1). Their attributes are index arrays into
    the module's band tuples: users `age`, `gender`, `region`, `device`, `activity`,
    `recent` (category indices per user) and `recent_mask` (users x categories); apps
    `category`, `developer`, `price`, `rating`, `popularity` and `size_mb`.
    """

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        rng = np.random.default_rng([self.config.seed, 0])
        self._build_users(rng)
        self._build_apps(rng)
        self._build_truth(rng)
        self._build_recent(rng)

    # ---- construction -------------------------------------------------------------------
    def _build_users(self, rng: np.random.Generator) -> None:
        n = self.config.n_users
        width = max(5, len(str(n - 1)))
        self.user_ids = np.array([f"u{i:0{width}d}" for i in range(n)])
        self.age = rng.choice(len(AGE_BANDS), n, p=AGE_P)
        self.gender = rng.choice(len(GENDERS), n, p=GENDER_P)
        self.region = rng.choice(len(REGIONS), n, p=REGION_P)
        self.device = rng.choice(len(DEVICES), n, p=DEVICE_P)
        self.activity = rng.choice(len(ACTIVITIES), n, p=ACTIVITY_P)
        weight = np.asarray(ACTIVITY_REQUEST_WEIGHT)[self.activity]
        self._user_p = weight / weight.sum()

    def _build_apps(self, rng: np.random.Generator) -> None:
        cfg = self.config
        n = cfg.n_apps
        width = max(4, len(str(n - 1)))
        self.app_ids = np.array([f"a{i:0{width}d}" for i in range(n)])
        dev_width = max(3, len(str(cfg.n_developers - 1)))
        self.developer_names = np.array([f"dev{i:0{dev_width}d}" for i in range(cfg.n_developers)])
        dev_w = 1.0 / np.arange(1, cfg.n_developers + 1) ** cfg.developer_zipf
        self.developer = rng.choice(cfg.n_developers, n, p=dev_w / dev_w.sum())
        # Developers specialise: most of a developer's apps share its main category.
        main_category = rng.choice(len(CATEGORIES), cfg.n_developers, p=CATEGORY_P)
        own = rng.random(n) < 0.6
        self.category = np.where(
            own, main_category[self.developer], rng.choice(len(CATEGORIES), n, p=CATEGORY_P)
        )
        self.price = rng.choice(len(PRICE_BANDS), n, p=PRICE_P)
        quality = rng.normal(size=n)
        rating_score = quality + rng.normal(scale=0.7, size=n)
        self.rating = np.searchsorted(np.quantile(rating_score, RATING_CUTS), rating_score)
        popularity_score = 0.6 * quality - 0.5 * self.price + rng.normal(scale=0.8, size=n)
        cuts = np.quantile(popularity_score, POPULARITY_CUTS)
        self.popularity = np.searchsorted(cuts, popularity_score)
        self._app_p = np.exp(1.2 * popularity_score)
        self._app_p /= self._app_p.sum()
        median_mb = np.asarray(CATEGORY_SIZE_MB, dtype=float)[self.category]
        self.size_mb = np.round(median_mb * np.exp(rng.normal(scale=0.6, size=n)), 1)

    def _build_truth(self, rng: np.random.Generator) -> None:
        cfg = self.config
        n_cat = len(CATEGORIES)
        self._user_effect = rng.normal(scale=cfg.id_scale, size=cfg.n_users)
        self._app_effect = rng.normal(scale=cfg.id_scale, size=cfg.n_apps)
        pair = cfg.pair_scale
        self._age_cat = _interaction(rng, (len(AGE_BANDS), n_cat), pair)
        self._gender_cat = _interaction(rng, (len(GENDERS), n_cat), pair)
        self._device_price = _interaction(rng, (len(DEVICES), len(PRICE_BANDS)), pair)
        self._region_dev = _interaction(rng, (len(REGIONS), cfg.n_developers), pair)
        self._hour_cat = _interaction(rng, (24, n_cat), pair)
        self._activity_pop = _interaction(rng, (len(ACTIVITIES), len(POPULARITY_BANDS)), pair)
        self._taste = _interaction(rng, (cfg.n_users, n_cat), cfg.taste_scale)
        triple = cfg.triple_scale
        self._age_device_price = _interaction(
            rng, (len(AGE_BANDS), len(DEVICES), len(PRICE_BANDS)), triple
        )
        self._weekend_cat_activity = _interaction(rng, (2, n_cat, len(ACTIVITIES)), triple)
        self._gender_age_cat = _interaction(rng, (len(GENDERS), len(AGE_BANDS), n_cat), triple)
        log_size = np.log(self.size_mb)
        self._size_term = SIZE_EFFECT * (log_size - log_size.mean())

    def _build_recent(self, rng: np.random.Generator) -> None:
        """Recently downloaded categories: drawn from each user's true affinity to categories."""
        n, n_cat = self.config.n_users, len(CATEGORIES)
        affinity = (
            np.log(CATEGORY_P)
            + self._age_cat[self.age]
            + self._gender_cat[self.gender]
            + 2.0 * self._taste
        )
        # Gumbel top-k: a weighted draw without replacement, per user, in one shot.
        keys = affinity + rng.gumbel(size=(n, n_cat))
        order = np.argsort(-keys, axis=1)
        lo, hi = np.asarray(RECENT_COUNT_RANGE).T
        count = rng.integers(lo[self.activity], hi[self.activity] + 1)
        self.recent = [order[u, : count[u]].tolist() for u in range(n)]
        kept = np.arange(n_cat) < count[:, None]
        self.recent_mask = np.zeros((n, n_cat), dtype=bool)
        self.recent_mask[np.nonzero(kept)[0], order[kept]] = True

    # ---- the hidden truth ---------------------------------------------------------------
    def logit_parts(
        self,
        users_idx: np.ndarray,
        apps_idx: np.ndarray,
        hour: np.ndarray,
        weekday: np.ndarray,
        slot: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """The true logit split into base, first_order, ids, pairwise and higher_order parts."""
        rows = (users_idx, apps_idx, hour, weekday, slot)
        u, a, h, wd, s = np.broadcast_arrays(*(np.asarray(x) for x in rows))
        cfg = self.config
        age, gender, device, act = self.age[u], self.gender[u], self.device[u], self.activity[u]
        cat, price, pop = self.category[a], self.price[a], self.popularity[a]
        first = cfg.first_order_scale * (
            np.take(POPULARITY_EFFECT, pop)
            + np.take(RATING_EFFECT, self.rating[a])
            + np.take(PRICE_EFFECT, price)
            + np.take(ACTIVITY_EFFECT, act)
            + self._size_term[a]
        ) - cfg.slot_decay * np.log(s)
        pairwise = (
            self._age_cat[age, cat]
            + self._gender_cat[gender, cat]
            + self._device_price[device, price]
            + self._region_dev[self.region[u], self.developer[a]]
            + self._hour_cat[h, cat]
            + self._activity_pop[act, pop]
            + self._taste[u, cat]
            + cfg.recent_match * self.recent_mask[u, cat]
        )
        weekend = (wd >= 5).astype(np.int64)
        higher = (
            self._age_device_price[age, device, price]
            + self._weekend_cat_activity[weekend, cat, act]
            + self._gender_age_cat[gender, age, cat]
        )
        return {
            "base": np.full(u.shape, cfg.base_logit),
            "first_order": first,
            "ids": self._user_effect[u] + self._app_effect[a],
            "pairwise": pairwise,
            "higher_order": higher,
        }

    def click_probability(
        self,
        users_idx: np.ndarray,
        apps_idx: np.ndarray,
        hour: np.ndarray,
        weekday: np.ndarray,
        slot: np.ndarray,
    ) -> np.ndarray:
        """The true download probability of each (user, app, hour, weekday, slot) row."""
        logit = sum(self.logit_parts(users_idx, apps_idx, hour, weekday, slot).values())
        return 1.0 / (1.0 + np.exp(-logit))

    # ---- sampling -----------------------------------------------------------------------
    def sample_requests(
        self, rng: np.random.Generator, n: int, day: dt.date | str, candidates: int | None = None
    ) -> Requests:
        """`n` requests on `day`: activity-weighted users, popularity-weighted distinct apps.

        Candidates are in random order, so slot j + 1 shows `apps[:, j]`; a ranker may reorder.
        """
        day = dt.date.fromisoformat(day) if isinstance(day, str) else day
        k = self.config.slots if candidates is None else candidates
        if not 1 <= k <= self.config.n_apps:
            raise ValueError(f"candidates must be in 1..{self.config.n_apps}, got {k}")
        users = rng.choice(self.config.n_users, n, p=self._user_p)
        hour = rng.choice(24, n, p=np.asarray(HOUR_WEIGHT) / sum(HOUR_WEIGHT))
        second = rng.integers(0, 3600, n)
        order = np.argsort(hour * 3600 + second, kind="stable")  # requests in time order
        users, hour, second = users[order], hour[order], second[order]
        apps = self._distinct_apps(rng, n, k)
        weekday = np.full(n, day.weekday())
        return Requests(day=day, users=users, hour=hour, weekday=weekday, second=second, apps=apps)

    def _distinct_apps(self, rng: np.random.Generator, n: int, k: int) -> np.ndarray:
        """Popularity-weighted draws without replacement within each row: redraw rows with a
        duplicate a few times (enough for short lists), then draw the rows still holding one
        exactly, all at once (long lists: 100 candidates almost never come out distinct)."""
        apps = rng.choice(self.config.n_apps, (n, k), p=self._app_p)
        for _ in range(REDRAWS):
            dup = _duplicate_rows(apps)
            if not dup.any():
                return apps
            apps[dup] = rng.choice(self.config.n_apps, (int(dup.sum()), k), p=self._app_p)
        dup = _duplicate_rows(apps)
        apps[dup] = self._without_replacement(rng, int(dup.sum()), k)
        return apps

    def _without_replacement(self, rng: np.random.Generator, n: int, k: int) -> np.ndarray:
        """n rows of k distinct apps drawn one after another with probability ∝ popularity
        (what `rng.choice(replace=False, p=...)` draws per row), vectorised by the Gumbel top-k
        trick: the k largest of log p + Gumbel noise, in random order."""
        keys = np.log(self._app_p) + rng.gumbel(size=(n, self.config.n_apps))
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        return rng.permuted(top, axis=1)

    @staticmethod
    def sample_downloads(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
        """Bernoulli draws: 1 where the user downloads, as int8."""
        return (rng.random(np.shape(probs)) < probs).astype(np.int8)

    # ---- feature records ----------------------------------------------------------------
    def user_columns(self, users_idx: np.ndarray | None = None) -> dict[str, Any]:
        """User features as columns; recent_categories is a list of lists of category names."""
        u = np.arange(self.config.n_users) if users_idx is None else np.asarray(users_idx)
        cats = np.asarray(CATEGORIES)
        return {
            "user_id": self.user_ids[u],
            "age_band": np.asarray(AGE_BANDS)[self.age[u]],
            "gender": np.asarray(GENDERS)[self.gender[u]],
            "region": np.asarray(REGIONS)[self.region[u]],
            "device": np.asarray(DEVICES)[self.device[u]],
            "activity": np.asarray(ACTIVITIES)[self.activity[u]],
            "recent_categories": [cats[self.recent[i]].tolist() for i in u.tolist()],
        }

    def app_columns(self, apps_idx: np.ndarray | None = None) -> dict[str, Any]:
        """App features as columns."""
        a = np.arange(self.config.n_apps) if apps_idx is None else np.asarray(apps_idx)
        return {
            "app_id": self.app_ids[a],
            "category": np.asarray(CATEGORIES)[self.category[a]],
            "developer": self.developer_names[self.developer[a]],
            "price_band": np.asarray(PRICE_BANDS)[self.price[a]],
            "rating_band": np.asarray(RATING_BANDS)[self.rating[a]],
            "popularity": np.asarray(POPULARITY_BANDS)[self.popularity[a]],
            "size_mb": self.size_mb[a],
        }

    def user_records(self, users_idx: np.ndarray | None = None) -> list[dict[str, Any]]:
        """One dict per user (a feature-store row), keyed by feature name."""
        return _records(self.user_columns(users_idx))

    def app_records(self, apps_idx: np.ndarray | None = None) -> list[dict[str, Any]]:
        """One dict per app (a feature-store row), keyed by feature name."""
        return _records(self.app_columns(apps_idx))

    def feature_columns(
        self,
        users_idx: np.ndarray,
        apps_idx: np.ndarray,
        hour: np.ndarray,
        weekday: np.ndarray,
        slot: np.ndarray,
    ) -> dict[str, Any]:
        """The raw model feature columns (every field of `dataset_spec()`) of these rows."""
        rows = (users_idx, apps_idx, hour, weekday, slot)
        u, a, h, wd, s = np.broadcast_arrays(*(np.asarray(x) for x in rows))
        columns = {**self.user_columns(u), **self.app_columns(a)}
        columns.update(hour=h.astype(np.int64), weekday=wd.astype(np.int64))
        columns["slot"] = s.astype(np.int64)
        return {name: columns[name] for name in self.dataset_spec().names}

    @staticmethod
    def dataset_spec() -> DatasetSpec:
        """The fields a model is trained on, in model order, and the label column."""
        cat = "categorical"
        return DatasetSpec(
            fields=(
                FieldSpec("user_id", cat, min_count=2),
                FieldSpec("age_band", cat),
                FieldSpec("gender", cat),
                FieldSpec("region", cat),
                FieldSpec("device", cat),
                FieldSpec("activity", cat),
                FieldSpec("recent_categories", "multi", max_len=5),
                FieldSpec("app_id", cat, min_count=2),
                FieldSpec("category", cat),
                FieldSpec("developer", cat),
                FieldSpec("price_band", cat),
                FieldSpec("rating_band", cat),
                FieldSpec("popularity", cat),
                FieldSpec("hour", cat),
                FieldSpec("weekday", cat),
                FieldSpec("slot", cat),
                FieldSpec("size_mb", "numeric", transform="log_standard"),
            ),
            label="label",
        )


def _interaction(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """A random table holding a pure interaction of its axes, with entries of sd `scale`.

    Every lower-order marginal is removed (ANOVA decomposition with uniform weights), so the
    table adds nothing that a model of lower order could pick up.
    """
    t = rng.normal(size=shape)
    for axis in range(t.ndim):
        t = t - t.mean(axis=axis, keepdims=True)
    sd = t.std()
    return t * (scale / sd) if sd > 0 else t


def _duplicate_rows(apps: np.ndarray) -> np.ndarray:
    s = np.sort(apps, axis=1)
    return (s[:, 1:] == s[:, :-1]).any(axis=1)


def _records(columns: dict[str, Any]) -> list[dict[str, Any]]:
    names = list(columns)
    values = [c.tolist() if isinstance(c, np.ndarray) else c for c in columns.values()]
    return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]
