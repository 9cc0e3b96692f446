"""GPU index paths; skipped where faiss sees no GPU (CI). Run on a GPU machine with faiss-gpu."""

import numpy as np
import pytest

from funnel.recall.index import IndexSpec, build_index, gpu_available, load_index, save_index, search
from funnel.recall.scoring import exact_topk
from tests.recall.test_index import clustered, overlap

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="faiss sees no GPU")]


@pytest.mark.parametrize("text,min_recall", [("flat", 0.99), ("ivf:nlist=32,nprobe=8", 0.9), ("ivfpq:nlist=32,m=8,nprobe=8", 0.5)])
def test_gpu_index_matches_cpu_exact_search(text, min_recall):
    x, q = clustered()
    index = build_index(x, np.arange(1, len(x) + 1), IndexSpec.parse(text))
    got, scores = search(index, q, 20)
    exact, exact_scores = exact_topk(q, np.vstack([np.zeros((1, x.shape[1]), np.float32), x]), 20)
    assert overlap(got, exact) >= min_recall
    if text == "flat":
        np.testing.assert_allclose(scores, exact_scores, rtol=1e-3, atol=1e-3)


def test_index_built_on_gpu_loads_on_cpu(tmp_path):
    x, q = clustered()
    spec = IndexSpec.parse("ivf:nlist=32,nprobe=8")
    index = build_index(x, np.arange(1, len(x) + 1), spec)
    path = str(tmp_path / "index.faiss")
    save_index(index, path)
    cpu = load_index(path, IndexSpec.parse("ivf:nlist=32,nprobe=8,gpu=never"))
    assert cpu.ntotal == len(x)
    got_gpu, _ = search(index, q, 20)
    got_cpu, _ = search(cpu, q, 20)
    assert overlap(got_cpu, got_gpu) >= 0.95
