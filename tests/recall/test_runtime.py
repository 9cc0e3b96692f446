"""ONNX Runtime sessions over exported modules: the whole graph, or the part some outputs need."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

from funnel.recall.runtime import OnnxModel, export_onnx


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.linear(x)  # [B, 3]
        return h.sum(-1), torch.softmax(h, -1)  # [B], [B, 3]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("onnx") / "two.onnx")
    export_onnx(TwoOutputs(), {"x": torch.randn(2, 4)}, {"x": {0: Dim("batch")}}, ["total", "probs"], path)
    return path


def test_a_session_for_some_outputs_computes_them_alike(exported):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    total, probs = OnnxModel(exported)(x=x)
    assert probs.shape == (5, 3)
    (alone,) = OnnxModel(exported, outputs=("total",))(x=x)
    np.testing.assert_array_equal(alone, total)


def test_unknown_outputs_and_bad_files_are_refused_naming_the_file(exported, tmp_path):
    with pytest.raises(ValueError, match=r"two\.onnx.*no output 'attention'"):
        OnnxModel(exported, outputs=("attention",))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"bad\.onnx: not a model"):
        OnnxModel(str(bad))
