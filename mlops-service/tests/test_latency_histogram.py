"""The response-time histogram (mlops/latency_histogram.py): buckets, midpoints, percentiles.

The bucket of a value is checked at and around every bound, in Python
(``bucket_of``) and in Postgres (``BUCKET_SQL``, which the rollups use): a
plain ``SELECT`` of the expression over literal values, on the run's
Postgres server, needs no table and no test database.
"""

from __future__ import annotations

import math

import conftest
import psycopg2
import pytest

from mlops.latency_histogram import (
    BUCKET_SQL,
    GROWTH,
    LAST,
    RELATIVE_ERROR,
    bucket_of,
    midpoint,
    percentile,
)

# Bucket i >= 1 holds [GROWTH^(i-1), GROWTH^i): its lower bound, for i = 1 .. LAST.
LOWER_BOUNDS = {i: GROWTH ** (i - 1) for i in range(1, LAST + 1)}
# Relative distance from a bound at which both mappings must place a value on its side.
NEAR = 1e-9


@pytest.fixture(scope="module")
def sql_buckets():
    """``sql_buckets(values)``: BUCKET_SQL of each value (as double precision), in Postgres."""
    conn = psycopg2.connect(conftest.ADMIN_URL, connect_timeout=3)

    def buckets(values: list[float]) -> list[int]:
        with conn.cursor() as cur:
            cur.execute(f"SELECT {BUCKET_SQL} FROM unnest(%s::float8[]) WITH ORDINALITY "
                        "AS v(response_time_ms, n) ORDER BY n", (values,))
            return [row[0] for row in cur.fetchall()]

    yield buckets
    conn.close()


@pytest.mark.parametrize(("value", "bucket"), [
    (0.0, 0), (0.5, 0), (math.nextafter(1.0, 0.0), 0),
    (1.0, 1), (1.05, 1), (math.nextafter(1.1, 0.0), 1),
    (1.1000001, 2), (1.2, 2), (1.21 * (1 + NEAR), 3),
    (10.0, 25), (100.0, 49), (1000.0, 73), (1e10, 242),  # the schema's ceiling
    (GROWTH ** 242 * (1 + NEAR), LAST), (1e12, LAST), (1e300, LAST),  # capped
])
def test_bucket_of_a_value(value, bucket):
    assert bucket_of(value) == bucket


@pytest.mark.parametrize("bucket", range(2, LAST + 1))
def test_each_bound_starts_its_bucket(bucket):
    bound = LOWER_BOUNDS[bucket]
    assert bucket_of(bound * (1 - NEAR)) == bucket - 1
    assert bucket_of(bound * (1 + NEAR)) == bucket
    assert bucket_of(bound) in (bucket - 1, bucket)  # GROWTH**k is itself rounded


def test_python_and_sql_agree_near_every_bound(sql_buckets):
    values = [0.0, 0.5, math.nextafter(1.0, 0.0), 1.0, 1e10, 2e10, 1e300]
    for bound in LOWER_BOUNDS.values():
        values += [bound * (1 - NEAR), bound * (1 + NEAR), bound * 0.98, bound * 1.02]
    expected = [bucket_of(v) for v in values]
    assert sql_buckets(values) == expected
    assert set(expected) == set(range(LAST + 1))  # every bucket was reached


def test_python_and_sql_agree_at_every_bound_to_the_last_digit(sql_buckets):
    values = []
    for bound in LOWER_BOUNDS.values():
        values += [math.nextafter(bound, 0.0), bound, math.nextafter(bound, math.inf)]
    assert sql_buckets(values) == [bucket_of(v) for v in values]



@pytest.mark.parametrize(("bucket", "value"), [
    (0, 0.5), (1, 1.0488088481701516), (4, 1.3959645769144722), (10, 2.4730364018431805),
    (LAST, 10907523337.567545),
])
def test_midpoint(bucket, value):
    assert midpoint(bucket) == pytest.approx(value, rel=1e-15)


@pytest.mark.parametrize("bucket", range(1, LAST + 1))
def test_a_midpoint_is_within_the_relative_error_of_its_bucket(bucket):
    low, high = GROWTH ** (bucket - 1), GROWTH ** bucket
    mid = midpoint(bucket)
    assert mid / low - 1 == pytest.approx(RELATIVE_ERROR, rel=1e-9)
    assert 1 - mid / high == pytest.approx(1 - 1 / (1 + RELATIVE_ERROR), rel=1e-9)
    assert bucket_of(mid) == bucket


def test_the_relative_error():
    assert math.isclose(RELATIVE_ERROR, 0.04880884817015163, rel_tol=1e-15)


@pytest.mark.parametrize("histogram", [[], [(3, 0)], [(0, 0), (LAST, 0)]])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.95, 1.0])
def test_the_percentile_of_nothing_is_zero(histogram, q):
    assert percentile(histogram, q) == 0.0


@pytest.mark.parametrize("q", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize(("histogram", "value"), [
    ([(0, 1)], 0.5),
    ([(10, 5)], 2.4730364018431805),
    ([(LAST, 7)], 10907523337.567545),  # all in the last bucket
    ([(4, 2), (9, 0)], 1.3959645769144722),  # an empty bucket counts for nothing
])
def test_one_bucket_gives_its_midpoint_at_every_q(histogram, q, value):
    assert percentile(histogram, q) == pytest.approx(value, rel=1e-15)


@pytest.mark.parametrize(("histogram", "q", "value"), [
    # n = 4, rank 1.5: halfway between the 2nd (bucket 0) and the 3rd (bucket 4).
    ([(0, 2), (4, 2)], 0.5, 0.9479822884572361),
    ([(4, 2), (0, 2)], 0.5, 0.9479822884572361),  # the order of the pairs does not matter
    ([(4, 1), (0, 3)], 0.25, 0.5),
    ([(4, 1), (0, 3)], 1.0, 1.3959645769144722),
    ([(0, 1), (4, 1), (0, 1), (4, 1)], 0.5, 0.9479822884572361),  # nor repeated buckets
    ([(0, 1), (1, 1)], 0.5, 0.7744044240850758),
    # n = 3, rank 1.5 between midpoint(7) and midpoint(9).
    ([(5, 1), (7, 1), (9, 1)], 0.75, 2.053121881319845),
    ([(5, 1), (7, 1), (9, 1)], 0.5, 1.1 ** 6.5),  # rank 1: no interpolation
    ([(5, 1), (7, 1), (9, 1)], 0.0, 1.1 ** 4.5),
    ([(5, 1), (7, 1), (9, 1)], 1.0, 1.1 ** 8.5),
    # n = 4, rank 2 exactly: the 3rd value, in the upper bucket.
    ([(0, 2), (4, 2)], 2 / 3, 1.3959645769144722),
    # n = 100, p95: rank 94.05, 5% of the way from bucket 0 to bucket 10.
    ([(0, 95), (10, 5)], 0.95, 0.5986518200921535),
    ([(0, 3), (1, 1)], 0.5, 0.5),  # rank 1.5 between two values of bucket 0
])
def test_percentiles_interpolate_between_order_statistics(histogram, q, value):
    assert percentile(histogram, q) == pytest.approx(value, rel=1e-12)
