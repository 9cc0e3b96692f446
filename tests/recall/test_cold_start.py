"""Cold items: a catalogue item with no interactions is recommendable from its side
features alone; an item known only from held-out events is not (it would leak the targets)."""

import faiss
import numpy as np
import scipy.sparse as sp

from funnel.bundle import load_bundle
from funnel.rank.train import RankerTrainConfig
from funnel.recall.retriever import TWO_TOWER, RecallConfig, Retriever
from funnel.recall.train import TwoTowerTrainConfig
from funnel.tools.train import train


def test_cold_item_reaches_users_of_its_category(tiny_log_path, tiny_data, tmp_path):
    seqs = tiny_data.seqs
    # A user whose recent behaviour sits in one category: the new item goes there.
    user = int(np.argmax(seqs.lengths))
    hi = seqs.offsets[user + 1]
    category = tiny_data.categories.decode(np.array([np.bincount(seqs.categories[hi - 10 : hi]).argmax()]))[0]
    catalogue = tmp_path / "items.csv"
    catalogue.write_text(f"item_id,category_id,title\ncold-1,{category},Brand new\n")
    version = train(
        events=tiny_log_path,
        out=str(tmp_path / "bundle"),
        items=str(catalogue),
        two_tower=TwoTowerTrainConfig(epochs=4, batch_size=128, uniform_negatives=64),
        ranker=RankerTrainConfig(epochs=1, batch_size=128),
        progress=False,
    )
    b = load_bundle(version)
    data = b.data
    cold = int(data.items.encode(["cold-1"])[0])
    assert cold > 0 and b.popularity.counts[cold] == 0 and data.item_title[cold] == "Brand new"

    user_id = tiny_data.users.decode(np.array([user]))[0]
    u = int(data.users.encode([user_id])[0])
    window = data.seqs.user_window(np.array([u]), b.two_tower.cfg.history)
    now = data.seqs.ts[data.seqs.offsets[u + 1] - 1 : data.seqs.offsets[u + 1]]
    assert b.recommendable[cold]
    retriever = Retriever(b.two_tower, b.item_vecs, b.index, b.channels, data.item_category, RecallConfig({TWO_TOWER: 50}), b.recommendable)
    seen = data.seqs.history_matrix(np.array([u]), data.seqs.offsets[u + 1 : u + 2], data.items.size)
    candidates = retriever.retrieve(window, now, seen, channels=(TWO_TOWER,))
    assert cold in candidates.items[0]

    # And it outscores almost every item of the other categories for this user.
    uv = retriever.user_vectors(window, now)[0]
    scores = b.item_vecs @ uv
    others = np.flatnonzero((data.item_category != data.item_category[cold]) & (np.arange(len(scores)) > 0))
    assert scores[cold] > np.quantile(scores[others], 0.9)


def test_items_only_in_held_out_events_are_not_recommendable(tiny_bundle):
    b = load_bundle(tiny_bundle)
    data = b.data
    held_out_only = np.flatnonzero((b.popularity.counts == 0) & (np.arange(data.items.size) > 0))
    assert len(held_out_only) > 0, "the tiny log should have items seen only in validation/test targets"
    assert not b.recommendable[held_out_only].any()
    indexed = faiss.vector_to_array(faiss.downcast_index(b.index).id_map)
    assert not np.isin(held_out_only, indexed).any()

    # Not through the exact per-category path either.
    retriever = b.pipeline().retriever
    users = np.flatnonzero(data.seqs.lengths > 0)[:20]
    window = data.seqs.user_window(users, b.two_tower.cfg.history)
    now = data.seqs.ts[data.seqs.offsets[users + 1] - 1]
    none_seen = sp.csr_matrix((len(users), data.items.size))
    for category in np.unique(data.item_category[held_out_only]):
        candidates = retriever.retrieve(window, now, none_seen, category=int(category), channels=(TWO_TOWER,))
        assert not np.isin(held_out_only, candidates.items).any()
