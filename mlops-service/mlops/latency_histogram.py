"""The response-time histogram kept in the rollups, and percentiles read from it.

Layout (``mlops_rollup_latency.bucket``): bucket 0 holds [0, 1) ms; bucket
``i`` >= 1 holds [GROWTH^(i-1), GROWTH^i) ms, with GROWTH = 1.1, up to bucket
``LAST`` = 243 (GROWTH^242 > 1e10 ms, the schema's ceiling for
``response_time_ms``). A bucket stands for its geometric midpoint
GROWTH^(i-0.5), which is within sqrt(1.1) - 1 = 4.88% of every value in the
bucket; bucket 0 stands for 0.5 ms (absolute error <= 0.5 ms). The scheme is
the log-linear histogram of HdrHistogram / DDSketch (Masson et al., "DDSketch:
a fast and fully-mergeable quantile sketch with relative-error guarantees",
VLDB 2019), which merge by adding counts, as the rollup shards do.

Percentiles follow Postgres's ``percentile_cont`` (linear interpolation
between the order statistics at ranks floor(q(n-1)) and ceil(q(n-1))), with
each order statistic replaced by its bucket's midpoint; a convex combination
of values each within 4.88% of the true ones is within 4.88% of the exact
``percentile_cont`` (plus at most 0.5 ms when values under 1 ms take part).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from decimal import Decimal

GROWTH = 1.1
LAST = 243
RELATIVE_ERROR = math.sqrt(GROWTH) - 1  # 0.0488
# ln(GROWTH) as BUCKET_SQL computes it: the ln of the numeric 1.1, then a double
# (0.09531017980432487). math.log(GROWTH) is the ln of the double nearest 1.1,
# one unit larger in the last digit, which puts values within about 1e-15 of
# some bounds one bucket away from where Postgres puts them.
_LN_GROWTH = float(Decimal(str(GROWTH)).ln())

# The same mapping in SQL, used by the store when it writes rollups.
BUCKET_SQL = (
    "CASE WHEN response_time_ms < 1 THEN 0 "
    f"ELSE least(floor(ln(response_time_ms) / ln({GROWTH}))::int + 1, {LAST}) END"
)


def bucket_of(response_time_ms: float) -> int:
    """The bucket index of one value (mirror of ``BUCKET_SQL``)."""
    if response_time_ms < 1:
        return 0
    return min(math.floor(math.log(response_time_ms) / _LN_GROWTH) + 1, LAST)


def midpoint(bucket: int) -> float:
    """The value (ms) a bucket stands for."""
    return 0.5 if bucket == 0 else GROWTH ** (bucket - 0.5)


def percentile(histogram: Iterable[tuple[int, int]], q: float) -> float:
    """``percentile_cont(q)`` estimated from ``(bucket, count)`` pairs; 0.0 when empty."""
    counts = sorted((b, c) for b, c in histogram if c > 0)
    n = sum(c for _, c in counts)
    if n == 0:
        return 0.0
    rank = q * (n - 1)
    low = math.floor(rank)
    fraction = rank - low

    def value_at(index: int) -> float:
        seen = 0
        for bucket, count in counts:
            seen += count
            if index < seen:
                return midpoint(bucket)
        return midpoint(counts[-1][0])

    below = value_at(low)
    if fraction == 0:
        return below
    return below + fraction * (value_at(low + 1) - below)
