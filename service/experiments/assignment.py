"""Assignment of users to arms: a stable hash into 10,000 buckets, arms owning bucket ranges.

The hash, so that any language can reproduce it:

    bucket = fmix64(FNV-1a-64(UTF-8 bytes of f"{salt}:{user_id}")) mod 10000

FNV-1a 64: h = 0xcbf29ce484222325; for each byte b: h = ((h XOR b) * 0x100000001b3) mod 2^64.
fmix64 (MurmurHash3's finalizer), all mod 2^64: h ^= h >> 33; h *= 0xff51afd7ed558ccd;
h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53; h ^= h >> 33.
Example: salt "exp1", user "u00001" hashes "exp1:u00001" (tests/test_experiments.py has more).
Why the finalizer: FNV-1a's low bits mix poorly, and plain FNV-1a mod 10000 of sequential ids
("u000001", "user-2", ...) is far from uniform (chi-square over 100 bins of 100,000 ids:
p < 1e-27 for every salt tried), enough to trip a sample-ratio check on its own.

Ranges: with a holdout share h, the arms share the first N = 10000 - floor(h * 10000 + 1/2)
buckets and the holdout takes [N, 10000). Arm i (config order) owns [end(i-1), end(i)) with
end(i) = floor(W_i * N + 1/2), W_i the sum of the weights of arms 0..i computed exactly (the
decimal weights as written), and the last arm ends at N. Raising one arm's weight therefore
moves only the buckets between the old and the new boundaries; a new salt reshuffles everyone.
Forced assignments (QA allowlists) win over the hash. Python's hash() is never used: it differs
between processes.

Canaries (`ctrserve deploy --canary SHARE`): a user of arm A (holdout users excepted) gets A's
canary bundle when, with the same hash over another text,

    fmix64(FNV-1a-64(f"{salt}:canary:{A}:{user_id}")) mod 10000 < round(SHARE * 10000)

a choice per user independent of the arm assignment; raising SHARE only adds users.

Namespaces (mutually exclusive experiments, as GrowthBook's): an experiment may take the range
[start, end) of a namespace, fractions of its buckets. The namespace bucket hashes the same way
with the namespace's own salt, `namespace:{name}`:

    fmix64(FNV-1a-64(f"namespace:{name}:{user_id}")) mod 10000

and the experiment owns the namespace buckets [floor(start * 10000 + 1/2), floor(end * 10000
+ 1/2)) (start and end exact as written). A user whose namespace bucket lies outside is not in
the experiment: served by control, flagged holdout (so not counted) and `in_experiment` false.
Inside, arms split the user with the experiment's salt exactly as above. Disjoint ranges of one
namespace never share a user; namespaces of different names hash independently of each other
and of every experiment's salt (config.py refuses an experiment salt equal to a namespace's),
so their experiments are orthogonal. Forced users win over the
namespace too. An experiment without a namespace takes every user, as before.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np

from ctrserve.features.hashing import fnv1a64, fnv1a64_str

BUCKETS = 10_000
MASK = 0xFFFFFFFFFFFFFFFF
FMIX = (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53)


def fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * FMIX[0]) & MASK
    h ^= h >> 33
    h = (h * FMIX[1]) & MASK
    return h ^ (h >> 33)


def fmix64_array(h: np.ndarray) -> np.ndarray:
    shift = np.uint64(33)
    with np.errstate(over="ignore"):
        h = h ^ (h >> shift)
        h = h * np.uint64(FMIX[0])
        h = h ^ (h >> shift)
        h = h * np.uint64(FMIX[1])
        return h ^ (h >> shift)


def bucket(salt: str, user_id: str) -> int:
    """The bucket of one user (the score path: one user per request)."""
    return fmix64(fnv1a64_str(f"{salt}:{user_id}")) % BUCKETS


def canary_bucket(salt: str, arm: str, user_id: str) -> int:
    """The bucket deciding whether a user of `arm` gets the arm's canary."""
    return fmix64(fnv1a64_str(f"{salt}:canary:{arm}:{user_id}")) % BUCKETS


def canary_cutoff(share: float) -> int:
    """Users whose canary bucket is below this get the canary."""
    return round(share * BUCKETS)


def canary_share_ok(share: object) -> bool:
    """A canary share strictly between 0 and 1 that gives the canary at least one bucket and
    leaves the arm's bundle at least one."""
    return (isinstance(share, int | float) and not isinstance(share, bool)
            and 0 < share < 1 and 0 < canary_cutoff(share) < BUCKETS)


def buckets(salt: str, user_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """The buckets of many users at once (vectorised FNV-1a), as int64."""
    keys = np.array([f"{salt}:{u}" for u in user_ids], dtype=object)
    return (fmix64_array(fnv1a64(keys)) % np.uint64(BUCKETS)).astype(np.int64)


def namespace_salt(name: str) -> str:
    """The salt of a namespace's buckets."""
    return f"namespace:{name}"


def _exact(value: float) -> Fraction:
    return Fraction(repr(value))  # 0.1 stays 1/10, so 0.1 + 0.2 is exactly 3/10


def _half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def holdout_start(holdout: float) -> int:
    """First bucket of the holdout; BUCKETS when there is none."""
    return BUCKETS - _half_up(_exact(holdout) * BUCKETS)


def bucket_ends(weights: Sequence[float], holdout: float = 0.0) -> list[int]:
    """Exclusive end bucket of each arm, in order; the last ends where the holdout starts."""
    n = holdout_start(holdout)
    total, ends = Fraction(0), []
    for w in weights:
        total += _exact(w)
        ends.append(min(_half_up(total * n), n))
    ends[-1] = n
    return ends


def range_buckets(start: float, end: float) -> tuple[int, int]:
    """[start, end) of a namespace range's buckets, from its fractions."""
    return _half_up(_exact(start) * BUCKETS), _half_up(_exact(end) * BUCKETS)


@dataclass(frozen=True)
class NamespaceRange:
    """The namespace buckets [start, end) an experiment takes."""

    name: str
    start: int
    end: int

    @property
    def salt(self) -> str:
        return namespace_salt(self.name)

    def bucket(self, user_id: str) -> int:
        return bucket(self.salt, user_id)

    def holds(self, namespace_bucket: int) -> bool:
        return self.start <= namespace_bucket < self.end

    def outside(self, user_ids: Sequence[str]) -> np.ndarray:
        """True for the users whose namespace bucket lies outside the range."""
        b = buckets(self.salt, user_ids)
        return (b < self.start) | (b >= self.end)


@dataclass(frozen=True)
class Assignment:
    experiment: str
    arm: str
    bucket: int
    holdout: bool = False  # served by control, not counted (holdout or outside the namespace)
    forced: bool = False
    canary: bool = False  # served by the arm's canary bundle
    namespace: str | None = None
    namespace_bucket: int | None = None
    in_experiment: bool = True  # false outside the experiment's namespace range


@dataclass
class Splitter:
    """One experiment's arms over the buckets: lookups are a bisect over the arm ends."""

    experiment: str
    salt: str
    arms: list[str]
    ends: list[int]
    control: str
    forced: dict[str, str] = field(default_factory=dict)
    namespace: NamespaceRange | None = None

    @property
    def holdout_from(self) -> int:
        return self.ends[-1]

    def ranges(self) -> dict[str, tuple[int, int]]:
        """[start, end) of each arm."""
        starts = [0, *self.ends[:-1]]
        return {a: (s, e) for a, s, e in zip(self.arms, starts, self.ends, strict=True)}

    def arm_of(self, b: int) -> str | None:
        """The arm owning bucket `b`; None in the holdout."""
        i = bisect.bisect_right(self.ends, b)
        return self.arms[i] if i < len(self.arms) else None

    def assign(self, user_id: str) -> Assignment:
        a = self._assign_arm(user_id)
        space = self.namespace
        if space is None:
            return a
        nb = space.bucket(user_id)
        a = replace(a, namespace=space.name, namespace_bucket=nb)
        if a.forced or space.holds(nb):
            return a
        return replace(a, arm=self.control, holdout=True, in_experiment=False)

    def anonymous(self) -> Assignment:
        """A request without a user: the control serves it, outside the experiment (it has no
        unit to count it by, as in GrowthBook without the hash attribute)."""
        return Assignment(self.experiment, self.control, -1, holdout=True, in_experiment=False)

    def _assign_arm(self, user_id: str) -> Assignment:
        b = bucket(self.salt, user_id)
        forced = self.forced.get(user_id)
        if forced is not None:
            return Assignment(self.experiment, forced, b, forced=True)
        arm = self.arm_of(b)
        if arm is None:
            return Assignment(self.experiment, self.control, b, holdout=True)
        return Assignment(self.experiment, arm, b)

    def arms_of(self, user_ids: Sequence[str]) -> np.ndarray:
        """Arm names of many users (forced ones included); "" marks the holdout and the users
        outside the namespace range."""
        index = np.searchsorted(np.asarray(self.ends), buckets(self.salt, user_ids),
                                side="right")
        names = np.array([*self.arms, ""], dtype=object)[index]
        if self.namespace is not None:
            names[self.namespace.outside(user_ids)] = ""
        for i, user in enumerate(user_ids):
            if user in self.forced:
                names[i] = self.forced[user]
        return names
