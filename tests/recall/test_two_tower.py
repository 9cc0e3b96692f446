import torch

from events.split import leave_last_out
from recall.model import TwoTower, TwoTowerConfig, sampled_softmax_loss
from recall.train import TwoTowerTrainConfig, evaluate_targets, known_items, train_two_tower


def test_sampled_softmax_masks_duplicate_targets():
    user = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    item = user.clone()
    ids = torch.tensor([7, 7, 9])
    log_q = torch.zeros(3)
    masked = sampled_softmax_loss(user, item, ids, log_q, 1.0)
    unmasked = sampled_softmax_loss(user, item, torch.tensor([7, 8, 9]), log_q, 1.0)
    assert masked < unmasked  # the duplicate 7 is no longer a negative for row 0/1


def test_user_tower_handles_empty_history():
    model = TwoTower(TwoTowerConfig(num_items=10, num_categories=3, dim=8, history=4, hidden=16))
    zeros = torch.zeros(2, 4, dtype=torch.long)
    out = model.user_tower(zeros, zeros, zeros, zeros)
    assert out.shape == (2, 8) and torch.isfinite(out).all()


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
