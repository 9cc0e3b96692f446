"""Time gaps between past events and the request time, bucketed on a log scale.

Both stages use these buckets (the user tower and the ranker), so they live with the
behaviour log.
"""

import numpy as np

GAP_BUCKETS = 24
"""Bucket 0 is padding; 1 is "under a minute"; each further bucket doubles the gap."""


def gap_buckets(now: np.ndarray, ts: np.ndarray, valid: np.ndarray, num_buckets: int = GAP_BUCKETS) -> np.ndarray:
    """Bucket the time from each event to ``now`` on a log2 scale of minutes.

    Args:
        now: [B] request (or target) times in seconds.
        ts: [B, L] event times.
        valid: [B, L] which events are real.
        num_buckets: bucket count including 0 (padding).

    Returns:
        int64 [B, L] in ``1..num_buckets-1`` for real events, 0 for padding.
    """
    minutes = np.maximum(now[:, None] - ts, 0) / 60.0
    bucket = np.floor(np.log2(1.0 + minutes)).astype(np.int64) + 1  # >= 1, as minutes >= 0
    return np.where(valid, np.minimum(bucket, num_buckets - 1), 0)
