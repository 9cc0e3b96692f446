import torch

from funnel.recall.model import TwoTower, TwoTowerConfig
from funnel.recall.warm import freeze_rows, grown


def test_grown_copies_every_weight_and_keeps_fresh_rows_for_new_ids():
    torch.manual_seed(0)
    small = TwoTower(TwoTowerConfig(num_items=10, num_categories=4, num_tags=1, dim=8, hidden=16))
    big = grown(small, TwoTowerConfig(num_items=15, num_categories=5, num_tags=1, dim=8, hidden=16))
    for name, weight in small.state_dict().items():
        assert torch.equal(big.state_dict()[name][: len(weight)], weight), name
    assert big.item_tower.item.weight.shape == (15, 8)
    assert big.item_tower.item.weight[10:].abs().sum() > 0  # initialised, not zero


def test_freeze_rows_keeps_old_rows_fixed_under_sparse_and_dense_gradients():
    for sparse in (True, False):
        table = torch.nn.Embedding(6, 3, sparse=sparse)
        before = table.weight.detach().clone()
        freeze_rows(table, 4)
        opt = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(table.parameters(), lr=0.1)
        table(torch.tensor([1, 3, 4, 5])).sum().backward()
        opt.step()
        assert torch.equal(table.weight[:4], before[:4])
        assert not torch.equal(table.weight[4:], before[4:])
