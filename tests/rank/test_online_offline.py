"""The features the server ranks with equal the ones training and evaluation compute (no train/serve skew)."""

import dataclasses

import numpy as np

from funnel.events.dataset import Dataset
from funnel.events.readers import read_events
from funnel.events.split import leave_last_out
from funnel.rank.business import BusinessTables
from funnel.rank.features import FeatureTables, build_features
from funnel.recall.channels import CoVisitation, Popularity
from funnel.server.engine import Engine
from funnel.server.query import RecommendQuery


def test_served_features_equal_offline_features(tiny_bundle, tiny_log_path):
    engine = Engine.load(tiny_bundle)
    served = []
    features = engine.pipeline.features

    def spy(window, now, user_activity, candidates):
        f = features(window, now, user_activity, candidates)
        served.append((window, now, user_activity, candidates, f))
        return f

    engine.pipeline.features = spy

    # Offline: every table rebuilt from the log exactly as training builds it, not read from the bundle.
    data = Dataset.from_log(read_events(tiny_log_path))
    mask = leave_last_out(data.seqs).train_mask(data.seqs)
    tables = FeatureTables(
        data.item_category,
        Popularity.count_items(data.seqs, mask, data.items.size).counts,
        BusinessTables.fit(data.seqs, mask, data.item_category),
        CoVisitation.count_pairs(data.seqs, mask, data.items.size),
    )
    seqs = data.seqs
    users = np.random.default_rng(0).choice(np.arange(1, seqs.num_users), 12, replace=False)
    now = np.array([seqs.ts.max()])
    cfg = engine.pipeline.ranker.cfg
    for u in users:
        engine.recommend(RecommendQuery(user_id=str(data.users.decode(np.array([u]))[0]), k=10))
        _, served_now, served_activity, cands, online = served[-1]
        window = seqs.user_window(np.array([u]), cfg.history)
        offline = build_features(
            window,
            now,
            cands.items,
            cands.scores,
            cands.channels,
            np.broadcast_to(np.arange(cands.items.shape[1]), cands.items.shape),
            user_activity=seqs.lengths[[u]],
            tables=tables,
            num_gap_buckets=cfg.gap_buckets,
        )
        assert served_now.tolist() == now.tolist() and served_activity.tolist() == [seqs.lengths[u]]
        for field in dataclasses.fields(offline):
            np.testing.assert_array_equal(getattr(online, field.name), getattr(offline, field.name), err_msg=f"user {u}: {field.name}")
        assert (online.dense[online.cand_items > 0] != 0).any()  # the comparison is not between two empty arrays
