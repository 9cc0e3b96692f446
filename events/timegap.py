"""Time gaps between past events and the request time, bucketed on a log scale.

Both stages use these buckets (the user tower and the ranker), so they live with the
behaviour log.
"""

import numba
import numpy as np

GAP_BUCKETS = 24
"""Bucket 0 is padding; 1 is "under a minute"; each further bucket doubles the gap."""


def gap_buckets(now: np.ndarray, ts: np.ndarray, valid: np.ndarray, num_buckets: int = GAP_BUCKETS) -> np.ndarray:
    """Bucket the time from each event to ``now`` on a log2 scale of minutes.

    ``floor(log2(1 + minutes)) + 1``, capped at ``num_buckets - 1``, in one compiled
    pass: a request makes this call for each model, and in numpy it was a dozen calls,
    each of which costs tens of microseconds when the caches are cold.

    Args:
        now: [B] request (or target) times in seconds.
        ts: [B, L] event times.
        valid: [B, L] which events are real.
        num_buckets: bucket count including 0 (padding).

    Returns:
        int64 [B, L] in ``1..num_buckets-1`` for real events, 0 for padding.
    """
    return _buckets(np.ascontiguousarray(now, np.int64), np.ascontiguousarray(ts, np.int64), np.ascontiguousarray(valid, np.bool_), num_buckets - 1)


@numba.njit(cache=True, nogil=True)
def _buckets(now: np.ndarray, ts: np.ndarray, valid: np.ndarray, top: int) -> np.ndarray:
    b, length = ts.shape
    out = np.zeros((b, length), np.int64)
    for i in range(b):
        for j in range(length):
            if valid[i, j]:
                minutes = max(now[i] - ts[i, j], 0) / 60.0
                out[i, j] = min(int(np.floor(np.log2(1.0 + minutes))) + 1, top)
    return out
