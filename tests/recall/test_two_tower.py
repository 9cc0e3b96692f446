import time

import numpy as np

import torch

from funnel.events.split import leave_last_out
from funnel.recall.loop import EpochClock, SparseTableOptimizer
from funnel.recall.model import TwoTower, TwoTowerConfig, frozen_for_inference, masked_softmax, sampled_softmax_loss
from funnel.recall.train import TwoTowerTrainConfig, _NextItemTask, evaluate_targets, known_items, train_two_tower


def test_sampled_softmax_masks_duplicate_targets():
    user = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    item = user.clone()
    ids = torch.tensor([7, 7, 9])
    log_q = torch.zeros(3)
    masked = sampled_softmax_loss(user, item, ids, log_q, 1.0)
    unmasked = sampled_softmax_loss(user, item, torch.tensor([7, 8, 9]), log_q, 1.0)
    assert masked < unmasked  # the duplicate 7 is no longer a negative for row 0/1


def test_masked_softmax_is_the_softmax_of_the_real_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 7, generator=g) * torch.tensor([1.0, 30.0, 300.0, 1.0])[:, None, None]  # [4, 3, 7]
    mask = torch.rand(4, 1, 7, generator=g) > 0.3
    mask[3] = False  # an all-padding row
    mask[:3, :, 0] = True
    got = masked_softmax(logits, mask)  # [4, 3, 7]
    want = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    assert torch.allclose(got, want, atol=1e-6)
    assert (got[3] == 0).all() and torch.allclose(got[:3].sum(-1), torch.ones(3, 3))


def test_masked_softmax_floors_underflow_but_keeps_the_order():
    logits = torch.tensor([[0.0, -50.0, -100.0, -1000.0]])
    got = masked_softmax(logits, torch.ones(1, 4, dtype=torch.bool))
    assert got[0, 0] > 0.999 and got[0, 1] > got[0, 2] > 0 and got[0, 2] == got[0, 3]  # both floored at exp(-80)


def test_user_tower_handles_empty_history():
    model = TwoTower(TwoTowerConfig(num_items=10, num_categories=3, dim=8, history=4, hidden=16))
    zeros = torch.zeros(2, 4, dtype=torch.long)
    out = model.user_tower(zeros, zeros, zeros, zeros)
    assert out.shape == (2, 8) and torch.isfinite(out).all()


def test_frozen_user_tower_encodes_like_the_module_at_any_shape():
    torch.manual_seed(0)
    tower = TwoTower(TwoTowerConfig(num_items=30, num_categories=4, dim=8, history=6, short=3, hidden=16)).user_tower.eval()
    frozen = frozen_for_inference(tower, tuple(torch.ones(1, 6, dtype=torch.long) for _ in range(4)))
    g = torch.Generator().manual_seed(1)
    for b, n in ((1, 6), (5, 6), (3, 9)):
        x = (torch.randint(0, 30, (b, n), generator=g), torch.randint(0, 4, (b, n), generator=g), torch.randint(1, 5, (b, n), generator=g), torch.randint(1, 20, (b, n), generator=g))
        x[0][0] = 0  # a user with no history
        with torch.no_grad():
            torch.testing.assert_close(frozen(*x), tower(*x))


def test_two_tower_loss_falls_and_beats_chance(tiny_data):
    split = leave_last_out(tiny_data.seqs)
    cfg = TwoTowerTrainConfig(epochs=4, batch_size=128, patience=10, uniform_negatives=64)
    model, history = train_two_tower(tiny_data, split, train_config=cfg, progress=False)
    losses = [e["loss"] for e in history["epochs"]]
    assert losses[-1] < losses[0]
    users, pos = split.targets("valid")
    metrics = evaluate_targets(model, tiny_data, users, pos, known_items(tiny_data, split), k=50)
    chance = 50 / len(tiny_data.items)
    assert metrics["hr@50"] > 2 * chance


def test_sampled_epochs_and_a_spent_budget_bound_the_samples(tiny_data):
    split = leave_last_out(tiny_data.seqs)
    base = dict(uniform_negatives=16, batch_size=32, max_valid_users=20)
    _, sampled = train_two_tower(tiny_data, split, train_config=TwoTowerTrainConfig(epochs=2, patience=5, samples_per_epoch=40, **base), progress=False)
    assert [e["samples"] for e in sampled["epochs"]] == [40, 40] and sampled["samples"] == 80
    # A budget already spent: one epoch still runs (early stopping needs a model), cut after its first batch.
    model, spent = train_two_tower(tiny_data, split, train_config=TwoTowerTrainConfig(epochs=5, max_seconds=1e-9, **base), progress=False)
    assert [e["samples"] for e in spent["epochs"]] == [32] and model is not None


def test_prefetched_inputs_serve_the_next_loss_of_the_same_batch_only(tiny_data):
    users, positions = leave_last_out(tiny_data.seqs).train_targets(tiny_data.seqs)
    targets = tiny_data.seqs.items[positions]
    task = _NextItemTask(lambda *inputs: inputs, tiny_data, users, positions, targets, 5, torch.device("cpu"), 0, lambda: None)
    idx, other = np.arange(8), np.arange(8)
    task.prefetch(idx)
    ready = task._ready.held[1]
    used = task.loss(idx)
    assert used[0] is ready[0] and used[1] is ready[1]  # built while the ranks exchanged gradients, not again
    fresh = task.loss(idx)  # used once
    assert fresh[0] is not ready[0] and all(torch.equal(a, b) for a, b in zip(fresh[0], ready[0]))
    task.prefetch(idx)
    ready = task._ready.held[1]
    assert task.loss(other)[0] is not ready[0] and task._ready.held is None  # another batch: built anew, the prefetch dropped


def test_sparse_table_clipping_matches_dense_clipping():
    def grads(sparse: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Linear(4, 1))
        opt = SparseTableOptimizer(model, [model[0]] if sparse else [], lr=1e-2, weight_decay=0.0)
        opt.zero_grad()
        (model(torch.tensor([1, 2, 2, 7])).sum() * 10).backward()  # a repeated row: its gradient entries must add up
        if sparse:
            opt.clip_grad_norm(0.5)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        out = [p.grad.to_dense() for p in model.parameters()]
        opt.step()
        opt.finish()
        return out, model

    (dense, _), (sparse, model) = grads(False), grads(True)
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not model[0].sparse


def test_epoch_clock_counts_preparation_and_cuts_what_is_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = EpochClock(80.0, 4)
    now[0] += 40.0  # preparation spends half the budget
    clock.start_epoch()
    assert clock.slice == 10.0 and not clock.epoch_over()
    now[0] += 10.0
    assert clock.epoch_over() and not clock.spent()
    now[0] += 30.0
    assert clock.spent() and clock.left() == ", budget 0.0 min left"


def test_epoch_clock_keeps_a_quarter_of_the_budget_after_an_overrun(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = EpochClock(80.0, 2)
    now[0] = 100.0  # preparation overran the whole budget
    clock.start_epoch()
    assert clock.slice == 10.0 and not clock.spent()
    now[0] = 120.0
    assert clock.spent()
    assert not EpochClock(0.0, 2).epoch_over()  # no budget: epochs run to their end
