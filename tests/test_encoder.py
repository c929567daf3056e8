"""The feature encoder through its public interface: fit, transform, save/load, errors."""

import json

import numpy as np
import pyarrow as pa
import pytest

from ctrserve.features import DatasetSpec, FeatureEncoder, FieldSpec
from ctrserve.features.columns import FeatureError
from ctrserve.features.hashing import fnv1a64, fnv1a64_str

SPEC = DatasetSpec(
    (
        FieldSpec("user", "categorical", min_count=2),
        FieldSpec("genres", "multi", max_len=3, separator="|"),
        FieldSpec("count", "numeric", transform="log_standard"),
        FieldSpec("site", "categorical", hash_buckets=11),
    ),
    label="y",
)
TRAIN = {
    "user": ["a", "a", "b", "b", "c"],
    "genres": ["x|y", "", "y|z|w|v", "x", "z"],
    "count": [1.0, 10.0, None, 100.0, 0.0],
    "site": ["s1", "s2", "s3", "s4", "s5"],
}


@pytest.fixture
def encoder() -> FeatureEncoder:
    return FeatureEncoder.fit(SPEC, [TRAIN])


def test_fnv1a_matches_the_published_test_vectors():
    # from the FNV reference test suite (fnv1a64 of "", "a", "foobar")
    assert fnv1a64_str("") == 0xCBF29CE484222325
    assert fnv1a64_str("a") == 0xAF63DC4C8601EC8C
    assert fnv1a64_str("foobar") == 0x85944171F73967E8
    words = ["", "a", "foobar", "héllo wörld", "user:42"]
    assert fnv1a64(words).tolist() == [fnv1a64_str(w) for w in words]


def test_vocabulary_respects_min_count_and_maps_unseen_to_oov(encoder):
    out = encoder.transform({**TRAIN, "user": ["a", "b", "c", "never", ""]})
    user = out["cat_ids"][:, 0]
    assert user[0] != user[1] and user[0] > 0 and user[1] > 0
    assert user[2] == 0, "c appears once, below min_count=2"
    assert user[3] == 0 and user[4] == 0


def test_every_id_is_inside_its_field_table(encoder):
    rng = np.random.default_rng(0)
    junk = [str(x) for x in rng.integers(0, 10**9, 200)]
    batch = {
        "user": junk,
        "genres": [junk[i : i + 5] for i in range(200)],
        "count": rng.normal(size=200) * 1e6,
        "site": junk,
    }
    out = encoder.transform(batch)
    layout = encoder.layout()
    for j, (_, size) in enumerate(layout["categorical"]):
        assert out["cat_ids"][:, j].min() >= 0 and out["cat_ids"][:, j].max() < size
    for j, (_, size) in enumerate(layout["multi"]):
        assert out["multi_ids"][:, j].min() >= 0 and out["multi_ids"][:, j].max() < size


def test_multi_valued_fields_pad_truncate_and_keep_oov_apart_from_padding(encoder):
    out = encoder.transform({**TRAIN, "genres": [["x", "nope"], [], ["y", "z", "w", "v"],
                                                 ["x"], None]})
    g = out["multi_ids"][:, 0, :]
    assert g.shape == (5, 3)
    assert g[0, 0] >= 2 and g[0, 1] == 1 and g[0, 2] == 0  # known, OOV, padding
    assert (g[1] == 0).all() and (g[4] == 0).all()
    assert (g[2] >= 2).all(), "truncated to the first max_len tokens"


def test_numeric_transform_standardises_on_training_data_and_fills_missing(encoder):
    out = encoder.transform(TRAIN)["numeric"][:, 0]
    assert out.dtype == np.float32
    assert out[2] == 0.0, "missing becomes the training mean"
    present = out[[0, 1, 3, 4]]
    assert abs(present.mean()) < 1e-6 and abs(present.std() - 1) < 1e-5


def test_hashed_field_is_stable_and_needs_no_vocabulary(encoder):
    out = encoder.transform({**TRAIN, "site": ["s1", "s1", "zzz", "s1", "s9"]})
    site = out["cat_ids"][:, 1]
    assert site[0] == site[1] == site[3]
    assert site[0] == 1 + fnv1a64_str("s1") % 11


def test_state_round_trips_exactly_through_json(encoder):
    reloaded = FeatureEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())))
    assert reloaded.to_dict() == encoder.to_dict()
    a, b = encoder.transform(TRAIN), reloaded.transform(TRAIN)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_accepts_pyarrow_columns_like_lists(encoder):
    table = pa.table({"user": TRAIN["user"], "genres": [g.split("|") if g else [] for g in
                                                       TRAIN["genres"]],
                      "count": TRAIN["count"], "site": TRAIN["site"]})
    from_arrow = encoder.transform({n: table.column(n) for n in table.column_names})
    from_lists = encoder.transform(TRAIN)
    for key in from_lists:
        np.testing.assert_array_equal(from_arrow[key], from_lists[key])


def test_field_order_is_the_spec_order_within_each_input(encoder):
    assert [n for n, _ in encoder.layout()["categorical"]] == ["user", "site"]
    assert encoder.input_names() == ["cat_ids", "multi_ids", "numeric"]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({k: v for k, v in TRAIN.items() if k != "site"}, "missing field(s) ['site']"),
        ({**TRAIN, "count": ["1", "2", "x", "4", "5"]}, "field 'count': expected numbers"),
        ({**TRAIN, "user": ["a"]}, "different row counts"),
        ({**TRAIN, "genres": [1, 2, 3, 4, 5]}, "field 'genres': expected a list of tokens"),
    ],
)
def test_bad_input_names_the_field(encoder, batch, message):
    with pytest.raises(FeatureError) as info:
        encoder.transform(batch)
    assert message in str(info.value)
