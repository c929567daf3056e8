"""The score request's two parsers agree: whatever the orjson fast path accepts, pydantic accepts
as the same request, and every refusal is pydantic's, naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ctrserve.service.errors import InvalidBody
from ctrserve.service.request_parser import parse_request, plain_fields
from ctrserve.service.schemas import ScoreRequest

MAX_CANDIDATES = 4

def mostly(valid: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """Nine times in ten a valid value, so that a request is often valid but for one field."""
    return st.integers(0, 9).flatmap(lambda k: valid if k else other)


ids = mostly(st.text(min_size=1, max_size=4) | st.text(min_size=250, max_size=256),
             st.just("") | st.text(min_size=257, max_size=260) | st.integers() | st.floats()
             | st.booleans() | st.none())
scalars = st.one_of(st.text(max_size=3), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(), st.booleans(), st.none())
values = mostly(scalars, st.lists(st.one_of(st.text(max_size=2), st.integers(),
                                            st.booleans(), st.floats()), max_size=2)
                | st.dictionaries(st.text(max_size=1), st.integers(), max_size=1))
features = mostly(st.none() | st.dictionaries(st.text(max_size=3), values, max_size=3),
                  st.lists(st.integers(), max_size=1) | st.text(max_size=2))
candidate = mostly(
    st.fixed_dictionaries({"item_id": ids}),
    st.fixed_dictionaries({"item_id": ids}, optional={"features": features,
                                                      "extra": st.integers()})
    | st.fixed_dictionaries({}, optional={"features": features})
    | scalars | st.lists(st.text(max_size=2), max_size=2))
timestamps = mostly(st.none() | st.floats(min_value=0, max_value=4e9)
                    | st.integers(min_value=0, max_value=2**33)
                    | st.sampled_from(["2026-01-05T10:00:00Z", "2026-01-05T10:00:00+02:00"]),
                    st.floats() | st.integers(max_value=-1) | st.integers(min_value=2**38)
                    | st.booleans() | st.sampled_from(["2026-01-05", "x", ""]))
top_k = mostly(st.none() | st.integers(min_value=1, max_value=3),
               st.integers(min_value=-1, max_value=6) | st.floats() | st.booleans()
               | st.text(max_size=1))
requests = st.fixed_dictionaries(
    {"candidates": mostly(st.lists(candidate, min_size=1, max_size=MAX_CANDIDATES),
                          st.lists(candidate, max_size=MAX_CANDIDATES + 1) | scalars)},
    optional={"user_id": ids, "request_id": ids, "experiment": ids, "user_features": features,
              "context": features, "top_k": top_k, "ts": timestamps,
              "unknown": st.integers()})


def pydantic_parse(body: bytes) -> ScoreRequest | None:
    try:
        return ScoreRequest.model_validate_json(body, context={"max_candidates": MAX_CANDIDATES})
    except ValidationError:
        return None


@settings(max_examples=1500, deadline=None)
@given(requests)
def test_the_fast_path_accepts_only_what_pydantic_accepts_and_reads_it_alike(
        request: dict[str, Any]) -> None:
    body = json.dumps(request).encode()  # NaN and Infinity as JS literals: invalid JSON
    fast, slow = plain_fields(body, MAX_CANDIDATES), pydantic_parse(body)
    event("fast path" if fast is not None else "valid" if slow is not None else "refused")
    if fast is not None:
        assert slow is not None, body
        fields, ids = fast
        assert ScoreRequest.model_construct(**fields).model_dump() == slow.model_dump()
        assert ids == [c["item_id"] for c in slow.candidates]
    if slow is None:
        with pytest.raises(InvalidBody):
            parse_request(body, MAX_CANDIDATES)
    else:
        assert parse_request(body, MAX_CANDIDATES).model_dump() == slow.model_dump()


def test_plain_requests_take_the_fast_path() -> None:
    plain = [
        {"user_id": "u1", "candidates": [{"item_id": "a1"}, {"item_id": "a2"}]},
        {"user_id": "u1", "context": {"hour": 9, "weekday": 2, "ratio": 0.5, "new": True,
                                      "tz": "CET", "gone": None},
         "user_features": {"age": 30}, "candidates": [{"item_id": "a1"}], "top_k": 1,
         "request_id": "r1", "experiment": "ranker", "ts": "2026-01-05T10:00:00Z"},
        {"candidates": [{"item_id": "x" * 256}], "ts": 1767607200},
    ]
    for request in plain:
        fast = plain_fields(json.dumps(request).encode(), MAX_CANDIDATES)
        assert fast is not None, request
        fields, ids = fast
        assert ids == [c["item_id"] for c in request["candidates"]]
    assert fields["ts"] == 1767607200.0 and isinstance(fields["ts"], float)


@pytest.mark.parametrize(("request_", "loc"), [
    ({"user_id": "u1", "candidates": []}, ["body", "candidates"]),
    ({"user_id": "", "candidates": [{"item_id": "a"}]}, ["body", "user_id"]),
    ({"candidates": [{"item_id": "a"}] * 5}, ["body", "candidates"]),
    ({"candidates": [{"item_id": "a"}], "top_k": 2}, ["body", "top_k"]),
    ({"candidates": [{"item_id": "a", "price": 1}]}, ["body", "candidates", 0, "price"]),
    ({"candidates": [{"item_id": "a"}], "context": {"hour": [1.5]}},
     ["body", "context", "hour"]),
    ({"candidates": [{"item_id": "a"}], "ts": "2026-01-05"}, ["body", "ts"]),
])
def test_refusals_name_the_field(request_: dict[str, Any], loc: list[Any]) -> None:
    with pytest.raises(InvalidBody) as refused:
        parse_request(json.dumps(request_).encode(), MAX_CANDIDATES)
    assert [item["loc"][: len(loc)] for item in refused.value.items()][0] == loc
