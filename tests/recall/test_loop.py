import numpy as np
import torch

from funnel.recall.distributed import World
from funnel.recall.loop import EpochClock, LoopConfig, SparseTableOptimizer, Validation, train_loop


class ScriptedTask:
    """A one-weight model whose validation scores are scripted per epoch; records what the loop asked."""

    def __init__(self, model: torch.nn.Module, scores: list[float]):
        self.model, self.scores, self.batches, self.weights = model, list(scores), [], []

    def epoch_order(self, rng):
        return rng.permutation(10)

    def loss(self, idx):
        self.batches.append(len(idx))
        return (self.model.weight.sum() - 1.0) ** 2

    def validate(self):
        self.weights.append(self.model.weight.detach().clone())
        score = self.scores.pop(0)
        return Validation({"score": score}, {"score": score}, score)


def test_loop_stops_on_patience_and_restores_the_best_epoch():
    model = torch.nn.Linear(1, 1, bias=False)
    task = ScriptedTask(model, [0.1, 0.3, 0.2, 0.25, 0.9])
    history = {"epochs": []}
    cfg = LoopConfig("toy", "samples", "score", epochs=10, patience=2, batch_size=4)
    opt = SparseTableOptimizer(model, [], 0.1, 0.0)
    out = train_loop(model, task, opt, cfg, clock=EpochClock(0, 1), world=World(), rng=np.random.default_rng(0), history=history, progress=False)
    assert [e["valid"]["score"] for e in history["epochs"]] == [0.1, 0.3, 0.2, 0.25]  # two epochs without a better score stop it
    assert task.batches == [4, 4, 2] * 4  # every example once per epoch, in batches
    assert history["kept_epoch"] == 2 and history["samples"] == 40
    torch.testing.assert_close(out.weight, task.weights[1])  # the second epoch's weights are back
    assert not out.training
