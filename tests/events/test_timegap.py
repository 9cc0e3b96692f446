import numpy as np
import pytest

from funnel.events.timegap import gap_buckets


def _numpy_buckets(now, ts, valid, num_buckets):
    # The definition, step by step in numpy (what earlier bundles were trained with).
    minutes = np.maximum(now[:, None] - ts, 0) / 60.0
    bucket = np.floor(np.log2(1.0 + minutes)).astype(np.int64) + 1
    return np.where(valid, np.minimum(bucket, num_buckets - 1), 0)


@pytest.mark.parametrize("num_buckets", [8, 24, 64])
def test_compiled_buckets_equal_the_numpy_definition(num_buckets):
    rng = np.random.default_rng(0)
    # Random gaps, every gap under a day, events after the request time, and each bucket edge (1 + minutes a power of two) +- 2 s.
    edges = np.array([60 * (2**k - 1) + d for k in range(40) for d in (-2, -1, 0, 1, 2)])
    gaps = np.concatenate([rng.integers(0, 10**9, 200_000), np.arange(86_400), -rng.integers(1, 10**6, 1_000), edges])
    gaps = gaps[: len(gaps) // 50 * 50].reshape(-1, 50)
    now = rng.integers(1_500_000_000, 2_000_000_000, len(gaps))
    ts = (now[:, None] - gaps).astype(np.int32 if num_buckets == 8 else np.int64)  # any integer dtype
    valid = rng.random(ts.shape) < 0.9
    got = gap_buckets(now, ts, valid, num_buckets)
    assert got.dtype == np.int64 and got.shape == ts.shape
    np.testing.assert_array_equal(got, _numpy_buckets(now, ts.astype(np.int64), valid, num_buckets))
    assert len(np.unique(got[valid])) >= min(num_buckets - 1, 24)  # every bucket (of those gaps up to 30 years reach) is exercised
