import numpy as np
import torch

from funnel.recall import distributed
from funnel.recall.distributed import World


def test_outside_torchrun_the_world_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = distributed.init_from_env()
    assert world == World() and world.main and not world.distributed
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap(module, world) is module
    assert distributed.any_rank(True, world) and not distributed.any_rank(False, world)
    assert distributed.from_main(0.25, world) == 0.25
    assert distributed.sparse_gradients_supported()


def test_shards_are_disjoint_equal_and_drop_the_remainder():
    order = np.random.default_rng(0).permutation(11)
    shards = [distributed.shard(order, World(rank, 3)) for rank in range(3)]
    assert {len(s) for s in shards} == {3}
    joined = np.concatenate(shards)
    assert len(set(joined.tolist())) == 9 and set(joined.tolist()) <= set(order.tolist())
    assert distributed.shard(order, World()) is order
