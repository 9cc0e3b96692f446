import numpy as np
import pytest
import torch

from funnel.events.sequences import Window
from funnel.events.split import leave_last_out
from funnel.events.timegap import gap_buckets
from funnel.rank.business import BusinessTables
from funnel.rank.features import FeatureTables, RankFeatures, build_features, dense_names, recall_ranks
from funnel.rank.model import Ranker, RankerConfig, combine_heads, frozen_ranker, head_probabilities, ranking_loss
from funnel.rank.pipeline import TwoStage
from funnel.rank.train import RankerTrainConfig, _GroupTask, head_labels, held_out_view, heads_for, make_groups, train_ranker
from funnel.recall.channels import CoVisitation, Popularity
from funnel.recall.index import IndexSpec, build_index
from funnel.recall.retriever import Retriever
from funnel.recall.train import TwoTowerTrainConfig, item_vectors, known_items, train_two_tower
from funnel.events.sequences import Sequences


def test_gap_buckets_log_scale_and_padding():
    now = np.array([10_000])
    ts = np.array([[0, 10_000 - 60, 10_000, 0]])
    valid = np.array([[False, True, True, True]])
    b = gap_buckets(now, ts, valid, 24)
    # 1 minute → floor(log2(2)) + 1 = 2; 0 minutes → 1; 10,000 s ≈ 167 min → floor(log2(167.7)) + 1 = 8
    assert b.tolist() == [[0, 2, 1, 8]]


def _tables(item_category, item_counts, num_items) -> FeatureTables:
    seqs = Sequences.from_encoded(np.array([0, 0]), np.array([1, 3]), item_category[[1, 3]], np.array([1, 1]), np.array([1, 2]), 1)
    mask = np.ones(len(seqs), bool)
    return FeatureTables(item_category, item_counts, BusinessTables.fit(seqs, mask, item_category), CoVisitation.count_pairs(seqs, mask, num_items))


def test_features_category_share_seen_and_padding():
    w = Window(
        items=np.array([[0, 1, 2]]), categories=np.array([[0, 1, 2]]), behaviors=np.array([[0, 1, 2]]), ts=np.array([[0, 5, 6]]), lengths=np.array([2])
    )
    cat = np.array([0, 1, 2, 1, 3])
    f = build_features(
        w, np.array([10]), np.array([[3, 2, 0]]), np.array([[0.5, 0.2, -np.inf]], np.float32), np.array([[1, 2, 0]]), np.array([[0, 1, 2]]),
        user_activity=np.array([2]), tables=_tables(cat, np.array([0, 1, 1, 3, 7]), 5), num_gap_buckets=8,
    )
    col = {name: i for i, name in enumerate(dense_names())}
    assert f.dense.shape == (1, 3, len(dense_names()))
    assert f.cand_categories.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(f.dense[0, :, col["category_share"]], [0.5, 0.5, 0.0])  # one of two events in each category
    np.testing.assert_allclose(f.dense[0, :, col["seen_share"]], [0.0, 0.5, 0.0])  # item 2 is half the history
    np.testing.assert_allclose(f.dense[0, :, col["seen_cart_fav"]], [0.0, 1.0, 0.0])  # item 2 was carted
    assert f.dense[0, 1, col["covisit_last"]] == 0.0  # item 2 never co-occurs with anything in the tables
    assert f.dense[0, 0, col["covisit_last"]] == 0.0  # the latest event is item 2, not linked to item 3
    assert (f.dense[0, 2] == 0).all()  # padding gets no -inf score nor any other feature


def test_seen_features_match_within_each_user_only():
    w = Window(
        items=np.array([[1, 2], [3, 4]]), categories=np.array([[1, 2], [1, 3]]), behaviors=np.array([[2, 1], [1, 1]]), ts=np.array([[5, 6], [5, 8]]), lengths=np.array([2, 2])
    )
    cat = np.array([0, 1, 2, 1, 3])
    tables = _tables(cat, np.array([0, 1, 1, 3, 7]), 5)
    build = lambda cands: build_features(
        w, np.array([10, 10]), cands, np.zeros(cands.shape, np.float32), np.ones_like(cands), np.zeros_like(cands),
        user_activity=np.array([2, 2]), tables=tables, num_gap_buckets=8,
    )  # fmt: skip
    seen_cols = [dense_names().index(c) for c in ("seen_share", "seen_hours", "seen_cart_fav", "seen_buy")]
    # Each user's candidates are the other user's history: nothing is seen.
    assert (build(np.array([[3, 4], [1, 2]])).dense[..., seen_cols] == 0).all()
    # User 0's candidate 1 is their carted first event; user 1 still sees nothing.
    f = build(np.array([[1, 4], [1, 2]])).dense
    np.testing.assert_allclose(f[0, :, seen_cols].T, [[0.5, np.log1p(5 / 3600) / 10, 1.0, 0.0], [0, 0, 0, 0]], rtol=1e-6)
    assert (f[1][:, seen_cols] == 0).all()


def test_recall_ranks_of_outside_items():
    lst = np.array([[0.9, 0.5, 0.1, -np.inf]], np.float32)
    assert recall_ranks(np.array([[1.0, 0.6, 0.5, -1.0]], np.float32), lst).tolist() == [[0, 1, 1, 3]]


def _feature_dict(b, c, n):
    z = torch.zeros(b, n, dtype=torch.long)
    return {
        "hist_items": z, "hist_categories": z, "hist_behaviors": z, "hist_gaps": z,
        "cand_items": torch.tensor([[1, 2], [3, 0]]), "cand_categories": torch.tensor([[1, 1], [2, 0]]),
        "cand_channels": torch.tensor([[1, 2], [1, 0]]), "dense": torch.zeros(b, c, len(dense_names())),
    }


def test_ranker_forward_masks_empty_history_and_has_one_logit_per_head():
    cfg = RankerConfig(num_items=6, num_categories=4, dim=8, history=3, short=2, hidden=16, heads=("click", "cart_fav", "buy"))
    model = Ranker(cfg).eval()
    f = _feature_dict(2, 2, 3)
    logits, att = model(f)
    assert logits.shape == (2, 2, 3) and torch.isfinite(logits).all() and (att == 0).all()
    labels = torch.zeros(2, 2, 3, dtype=torch.long)
    labels[:, 0, 0] = 1
    labels[0, 0, 2] = 1
    assert torch.isfinite(ranking_loss(logits, labels, f["cand_items"] > 0, cfg.heads))


def test_attention_covers_short_and_long_windows():
    cfg = RankerConfig(num_items=6, num_categories=4, dim=8, history=4, short=2, hidden=16)
    model = Ranker(cfg).eval()
    f = _feature_dict(2, 2, 4)
    f["hist_items"] = torch.tensor([[0, 1, 2, 3], [5, 4, 3, 2]])
    _, att = model(f)
    # Each weight set sums to 1, so their mean does too; padding gets nothing.
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 2))
    assert (att[0, :, 0] == 0).all()


def test_heads_chain_through_click_and_combine_with_weights():
    logits = torch.tensor([[[0.0, 0.0, 2.0]]])
    p = head_probabilities(logits, ("click", "cart_fav", "buy"))
    assert p["click"].item() == pytest.approx(0.5)
    assert p["cart_fav"].item() == pytest.approx(0.25)
    assert p["buy"].item() == pytest.approx(0.5 / (1 + np.exp(-2.0)))
    both = combine_heads(p, {"click": 1.0, "buy": 3.0})
    assert both.item() == pytest.approx((p["click"] + 3 * p["buy"]).item() / 4)
    assert combine_heads(p, {"click": 0.0}).item() == pytest.approx(0.5)  # all-zero weights: the click head decides
    with pytest.raises(ValueError):
        combine_heads(p, {"buy": -1.0})


def test_head_labels_and_heads_for():
    labels = head_labels(np.array([1, 2, 4]), 3, ("click", "cart_fav", "buy"))
    assert labels[:, 0].tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert labels[:, 1:].sum() == 0
    assert heads_for(np.array([1, 1])) == ("click",)
    assert heads_for(np.array([1, 3, 4])) == ("click", "cart_fav", "buy")


@pytest.fixture(scope="module")
def tiny_stages(tiny_data):
    split = leave_last_out(tiny_data.seqs)
    tt, _ = train_two_tower(tiny_data, split, train_config=TwoTowerTrainConfig(epochs=2, batch_size=128, uniform_negatives=64), progress=False)
    vecs = item_vectors(tt, tiny_data, known_items(tiny_data, split))
    mask = split.train_mask(tiny_data.seqs)
    pop = Popularity.count_items(tiny_data.seqs, mask, tiny_data.items.size)
    covisit = CoVisitation.count_pairs(tiny_data.seqs, mask, tiny_data.items.size)
    retriever = Retriever(tt, vecs, build_index(vecs[1:], np.arange(1, len(vecs)), IndexSpec()), [covisit, pop], tiny_data.item_category)
    return split, retriever, pop, BusinessTables.fit(tiny_data.seqs, mask, tiny_data.item_category)


def test_groups_hold_positive_top_and_random_negatives(tiny_data, tiny_stages):
    split, retriever, *_ = tiny_stages
    users, positions = split.train_targets(tiny_data.seqs)
    cfg = RankerTrainConfig(top_negatives=3, hard_negatives=4, random_negatives=2)
    g = make_groups(tiny_data, retriever, users[:200], positions[:200], cfg, np.random.default_rng(0))
    assert g.items.shape[1] == 1 + 3 + 4 + 2
    np.testing.assert_array_equal(g.items[:, 0], tiny_data.seqs.items[g.positions])
    assert not (g.items[:, 1:] == g.items[:, :1]).any()  # the positive is never its own negative
    assert (g.positions < split.train_end[g.users]).all()  # training positions only
    # The top negatives are the best-ranked candidates other than the positive, in list order.
    top = g.ranks[:, 1:4]
    assert (np.diff(top, axis=1) > 0).all() and (top[:, 0] <= 1).all()


def test_held_out_view_features_positions_out_of_sample(tiny_data, tiny_stages):
    split, retriever, _, business = tiny_stages
    seqs = tiny_data.seqs
    view = held_out_view(tiny_data, split, retriever, business, holdout=3)
    # Each user's last 3 training positions (fewer when the training part is shorter).
    starts = seqs.offsets[:-1]
    want = np.minimum(3, np.maximum(split.train_end - starts - 1, 0))
    np.testing.assert_array_equal(np.bincount(view.users, minlength=seqs.num_users), want)
    assert (view.positions < split.train_end[view.users]).all() and (view.positions > starts[view.users]).all()
    # The tables count only events before the held-out positions...
    before = np.ones(len(seqs), bool)
    before[view.positions] = False
    before &= split.train_mask(seqs)
    np.testing.assert_array_equal(view.tables.item_counts, np.bincount(seqs.items[before], minlength=tiny_data.items.size) * (np.arange(tiny_data.items.size) > 0))
    assert (view.tables.covisit.graph != CoVisitation.count_pairs(seqs, before, tiny_data.items.size).graph).nnz == 0
    # ...so the pair (previous item, held-out positive), always linked in the full graph, often is not.
    prev, pos = seqs.items[view.positions - 1], seqs.items[view.positions]
    differ = prev != pos
    linked_full = np.asarray(retriever.channel("covisit").graph[prev, pos]).ravel() > 0
    linked_view = np.asarray(view.tables.covisit.graph[prev, pos]).ravel() > 0
    assert linked_full[differ].mean() > 0.95 and linked_view[differ].mean() < 0.85
    assert view.retriever.model is retriever.model and view.retriever.channel("covisit") is view.tables.covisit
    assert view.tables.business.event_keys is business.event_keys  # time-aware popularity counts only the past anyway


def test_ranker_trains_multi_task_on_tiny_data(tiny_data, tiny_stages):
    split, retriever, pop, business = tiny_stages
    model, history = train_ranker(
        tiny_data, split, retriever, pop.counts, business, train_config=RankerTrainConfig(epochs=3, patience=10, batch_size=64), progress=False
    )
    losses = [e["loss"] for e in history["epochs"]]
    assert losses[-1] < losses[0]
    assert set(history["epochs"][-1]["valid"]) == {"recall", "final"}
    assert model.cfg.heads == heads_for(tiny_data.seqs.behaviors[split.train_mask(tiny_data.seqs)])
    assert len(model.cfg.heads) == 3  # the synthetic log has every behaviour type

    users, pos = split.targets("valid")
    seqs = tiny_data.seqs
    pipe = TwoStage(retriever, model, pop.counts, business)
    window = seqs.window(pos[:8], pipe.history, seqs.offsets[users[:8]])
    out = pipe.recommend(window, seqs.ts[pos[:8]], pos[:8] - seqs.offsets[users[:8]], seqs.history_matrix(users[:8], pos[:8], tiny_data.items.size))
    ranked = out.ranked
    assert out.recall_s > 0 and out.rank_s > 0 and out.candidates.items.shape == ranked.items.shape
    real = ranked.items > 0
    assert set(ranked.head_scores) == set(model.cfg.heads)
    assert (np.diff(np.where(real, ranked.scores, -1), axis=1) <= 0).all()  # sorted by the final score
    assert ranked.attention is None  # computed only when asked for (explanations)
    explained = pipe.recommend(window, seqs.ts[pos[:8]], pos[:8] - seqs.offsets[users[:8]], seqs.history_matrix(users[:8], pos[:8], tiny_data.items.size), attention=True).ranked
    assert explained.attention.shape == (*ranked.items.shape, pipe.ranker.cfg.history)
    np.testing.assert_array_equal(explained.items, ranked.items)
    assert ranked.history_behaviors.shape == ranked.history_items.shape == ranked.history_ts.shape
    buy_only = pipe.recommend(window, seqs.ts[pos[:8]], pos[:8] - seqs.offsets[users[:8]], seqs.history_matrix(users[:8], pos[:8], tiny_data.items.size), head_weights={"click": 0.0, "cart_fav": 0.0, "buy": 1.0}).ranked
    assert (np.diff(np.where(real, buy_only.head_scores["buy"], -1), axis=1) <= 0).all()  # per-call weights reorder the list


def test_prefetched_features_serve_the_next_loss_of_the_same_batch_only():
    rng = np.random.default_rng(0)
    ids = ("hist_items", "hist_categories", "hist_behaviors", "hist_gaps", "cand_items", "cand_categories", "cand_channels")
    feats = RankFeatures(**{name: rng.integers(1, 5, (16, 3)) for name in ids}, dense=rng.random((16, 3, 2), dtype=np.float32))  # 16 groups of 3
    seen = []

    def trainer(batch):
        seen.append(batch)
        return torch.zeros(len(batch["cand_items"]), 3, 1), None  # [b, G, H] logits, no attention

    task = _GroupTask(trainer, feats, np.zeros((16, 3, 1), np.float32), ("click",), 1.0, torch.device("cpu"), None)
    idx, other = np.arange(4), np.arange(4, 8)
    task.prefetch(idx)
    ready = task._ready.held[1]
    task.loss(idx)
    assert seen[-1] is ready  # gathered while the ranks exchanged gradients, not again
    task.loss(idx)
    assert seen[-1] is not ready and all(torch.equal(seen[-1][k], ready[k]) for k in ready)  # used once
    task.prefetch(idx)
    task.loss(other)
    assert torch.equal(seen[-1]["cand_items"], torch.from_numpy(feats.cand_items[other])) and task._ready.held is None  # another batch: gathered anew


def test_frozen_ranker_scores_like_the_module_at_any_shape():
    torch.manual_seed(0)
    cfg = RankerConfig(num_items=50, num_categories=6, history=12, short=4, dim=8, heads=("click", "buy"))
    model = Ranker(cfg).eval()
    frozen = frozen_ranker(model)
    g = torch.Generator().manual_seed(1)
    b, c, n = 3, 7, cfg.history
    f = {
        "hist_items": torch.randint(0, 50, (b, n), generator=g), "hist_categories": torch.randint(0, 6, (b, n), generator=g),
        "hist_behaviors": torch.randint(0, 5, (b, n), generator=g), "hist_gaps": torch.randint(0, cfg.gap_buckets, (b, n), generator=g),
        "cand_items": torch.randint(0, 60, (b, c), generator=g), "cand_categories": torch.randint(0, 6, (b, c), generator=g),
        "cand_channels": torch.randint(0, 4, (b, c), generator=g), "dense": torch.randn(b, c, cfg.num_dense, generator=g),
    }  # fmt: skip
    f["hist_items"][0] = 0  # a user with no history
    with torch.no_grad():
        (want, want_att), (got, got_att) = model(f), frozen(f)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_att, want_att)
    assert got.shape == (b, c, 2)
