"""Telemetry: a group's histogram values counted per bucket equal observing them one by one."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from mlops.telemetry import RESPONSE_TIME_BUCKETS, observe_all

BOUNDS = (0.0, 0.5, 1.0, 2.5, 10.0)


def samples(histogram: Histogram) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for family in histogram.collect() for s in family.samples
            if not s.name.endswith("_created")]


def same(a: list, b: list) -> bool:
    """Sample lists equal, NaN equal to NaN (a sum that took a NaN)."""
    return len(a) == len(b) and all(
        x[:2] == y[:2] and (x[2] == y[2] or (math.isnan(x[2]) and math.isnan(y[2])))
        for x, y in zip(a, b, strict=True))


def pair(buckets, labels=()):
    """Two identical histograms in their own registries: one per event, one in bulk."""
    return [Histogram("h", "h", list(labels), buckets=buckets, registry=CollectorRegistry())
            for _ in range(2)]


values = st.lists(st.floats() | st.sampled_from(BOUNDS) | st.integers(-5, 20), max_size=40)


@given(values)
@example([math.nan, 0.0, math.inf, -1.0, 0.5, 0.50001])
def test_observe_all_counts_like_observe_each(observed):
    one_by_one, in_bulk = pair(BOUNDS)
    for value in observed:
        one_by_one.observe(value)
    observe_all(in_bulk, observed)
    assert same(samples(one_by_one), samples(in_bulk))


@given(st.lists(st.floats(min_value=0, max_value=120), max_size=60))
def test_observe_all_with_the_response_time_buckets_and_a_labelled_child(observed):
    one_by_one, in_bulk = pair(RESPONSE_TIME_BUCKETS, labels=("model",))
    child = one_by_one.labels("m")
    for value in observed:
        child.observe(value)
    observe_all(in_bulk.labels("m"), observed)
    assert same(samples(one_by_one), samples(in_bulk))


def test_observe_all_refuses_a_labelled_parent_like_observe():
    _, in_bulk = pair(BOUNDS, labels=("model",))
    with pytest.raises(ValueError, match="missing label values"):
        observe_all(in_bulk, [1.0])
