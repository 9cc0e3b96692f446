import numpy as np
import torch

from events.sequences import Window
from events.split import leave_last_out
from events.timegap import gap_buckets
from rank.features import build_features
from rank.model import Ranker, RankerConfig, ranking_loss
from rank.train import RankerTrainConfig, train_ranker
from recall.channels import CoVisitation, Popularity
from recall.index import IndexSpec, build_index
from recall.retriever import Retriever
from recall.train import TwoTowerTrainConfig, item_vectors, known_items, train_two_tower


def test_gap_buckets_log_scale_and_padding():
    now = np.array([10_000])
    ts = np.array([[0, 10_000 - 60, 10_000, 0]])
    valid = np.array([[False, True, True, True]])
    b = gap_buckets(now, ts, valid, 24)
    # 1 minute → floor(log2(2)) + 1 = 2; 0 minutes → 1; 10,000 s ≈ 167 min → floor(log2(167.7)) + 1 = 8
    assert b.tolist() == [[0, 2, 1, 8]]


def test_features_category_share_and_padding():
    w = Window(
        items=np.array([[0, 1, 2]]), categories=np.array([[0, 1, 2]]), behaviors=np.array([[0, 1, 1]]), ts=np.array([[0, 5, 6]]), lengths=np.array([2])
    )
    f = build_features(
        w, np.array([10]), np.array([[3, 4, 0]]), np.array([[0.5, 0.2, -np.inf]], np.float32), np.array([[1, 2, 0]]),
        item_category=np.array([0, 1, 2, 1, 3]), item_counts=np.array([0, 1, 1, 3, 7]), user_activity=np.array([2]), num_gap_buckets=8,
    )
    assert f.cand_categories.tolist() == [[1, 3, 0]]
    np.testing.assert_allclose(f.dense[0, :, 2], [0.5, 0.0, 0.0])  # half the history is in category 1
    assert f.dense[0, 2, 0] == 0.0  # padding gets no -inf score


def test_ranker_forward_masks_empty_history():
    cfg = RankerConfig(num_items=6, num_categories=4, dim=8, history=3, hidden=16)
    model = Ranker(cfg)
    z = torch.zeros(2, 3, dtype=torch.long)
    f = {
        "hist_items": z, "hist_categories": z, "hist_behaviors": z, "hist_gaps": z,
        "cand_items": torch.tensor([[1, 2], [3, 0]]), "cand_categories": torch.tensor([[1, 1], [2, 0]]),
        "cand_channels": torch.tensor([[1, 2], [1, 0]]), "dense": torch.zeros(2, 2, 4),
    }
    logits, att = model(f)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all() and (att == 0).all()
    labels = torch.tensor([[1, 0], [1, 0]])
    assert torch.isfinite(ranking_loss(logits, labels, f["cand_items"] > 0))


def test_ranker_loss_falls_on_tiny_data(tiny_data):
    split = leave_last_out(tiny_data.seqs)
    tt, _ = train_two_tower(tiny_data, split, train_config=TwoTowerTrainConfig(epochs=2, batch_size=128, uniform_negatives=64), progress=False)
    vecs = item_vectors(tt, tiny_data, known_items(tiny_data, split))
    mask = split.train_mask(tiny_data.seqs)
    pop = Popularity.fit(tiny_data.seqs, mask, tiny_data.items.size)
    retriever = Retriever(
        tt, vecs, build_index(vecs[1:], np.arange(1, len(vecs)), IndexSpec()), CoVisitation.fit(tiny_data.seqs, mask, tiny_data.items.size), pop, tiny_data.item_category
    )
    _, history = train_ranker(tiny_data, split, retriever, pop.counts, train_config=RankerTrainConfig(epochs=3, patience=10, batch_size=64), progress=False)
    losses = [e["loss"] for e in history["epochs"]]
    assert losses[-1] < losses[0]
    assert set(history["epochs"][-1]["valid"]) == {"recall", "final"}
