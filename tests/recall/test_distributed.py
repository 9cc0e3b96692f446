import multiprocessing

import numpy as np
import pytest
import torch
import torch.distributed as dist

from funnel.recall import distributed
from funnel.recall.distributed import World
from funnel.recall.loop import SparseTableOptimizer


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


ROWS, DIM, STEPS = 40, 4, 4


class _Toy(torch.nn.Module):
    """A shared id table read twice per forward (like the two-tower's history and targets) and a dense head."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(ROWS, DIM)
        self.head = torch.nn.Linear(DIM, 1)

    def forward(self, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        user = self.table(history).mean(1)  # [B, d]
        return (self.head(user * self.table(targets)).squeeze(-1) - 1.0).pow(2).mean()


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)
    # Rank 1 reads only the low rows, so some rows are touched by one rank and some by both.
    high = ROWS if rank == 0 else ROWS // 2
    return [(torch.randint(0, high, (6, 5), generator=gen), torch.randint(0, high, (6,), generator=gen)) for _ in range(STEPS)]


def _toy(seed: int = 0) -> _Toy:
    torch.manual_seed(seed)
    return _Toy()


def _train_rank(rank: int, init: str, out: str, clip: float, exchange: str, transport: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        torch.save(_trained_on_rank(World(rank, 2), clip, exchange, transport), out)
    finally:
        # After the DDP wrapper is gone, as in training: a process group destroyed under a
        # live wrapper can hang the process on exit, in gloo's thread joins.
        dist.destroy_process_group()


def _trained_on_rank(world: World, clip: float, exchange: str, transport: str) -> dict:
    model = _toy(seed=world.rank)  # different starting tables: wrap must copy rank 0's to the others
    opt = SparseTableOptimizer(model, [model.table], lr=0.05, weight_decay=0.0, world=world, exchange=exchange, transport=transport)
    assert (opt.shared is not None) == (transport == "shared")
    trainer = distributed.wrap(model, world, ignore=opt.sparse_parameters, comm_hook=opt.comm_hook)
    for history, targets in _batches(world.rank):
        opt.zero_grad()
        trainer(history, targets).backward()
        opt.reduce_gradients()
        _apply(opt, clip)
    if opt.flush_gradients():
        _apply(opt, clip)
    opt.finish()
    return model.state_dict()


def _train_alone(clip: float, late: bool) -> dict:
    """One process on both ranks' batches; ``late``: each step applies the previous step's gradients, as the shared-memory exchange does."""
    model = _toy()
    params = list(model.parameters())
    opt = SparseTableOptimizer(model, [model.table], lr=0.05, weight_decay=0.0)
    held = [None] * len(params)
    for (h0, t0), (h1, t1) in zip(_batches(0), _batches(1)):
        opt.zero_grad()
        ((model(h0, t0) + model(h1, t1)) / 2).backward()  # DDP's average of the two processes' losses
        opt.reduce_gradients()
        if late:
            held, grads = [p.grad for p in params], held
            for p, g in zip(params, grads):
                p.grad = g
        _apply(opt, clip)
    if late:
        for p, g in zip(params, held):
            p.grad = g
        _apply(opt, clip)
    opt.finish()
    return model.state_dict()


def _apply(opt: SparseTableOptimizer, clip: float) -> None:
    """Clip and step, as :func:`recall.loop.train_loop` does."""
    if clip:
        opt.clip_grad_norm(clip)
    opt.step()


@pytest.mark.parametrize("transport", ["gloo", "shared"])
@pytest.mark.parametrize("clip, exchange, atol", [(0.0, "float32", 1e-6), (0.05, "float32", 1e-6), (0.0, "bfloat16", 2e-3)])
def test_two_processes_take_the_single_process_steps(tmp_path, clip, exchange, atol, transport):
    ctx = multiprocessing.get_context("fork")  # the children need only this module's functions
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    procs = [ctx.Process(target=_train_rank, args=(r, str(tmp_path / "init"), outs[r], clip, exchange, transport)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(o) for o in outs]
    alone = _train_alone(clip, late=transport == "shared")
    for name, value in alone.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every process ends with the same model
        # bfloat16 rounds the table's gradients, so its steps are close to the single process's, not equal.
        assert torch.allclose(ranks[0][name], value, atol=atol), name
    assert not torch.allclose(alone["table.weight"], _toy().table.weight)  # the steps did move the table
    if transport == "shared":  # a step late is not the same training: the comparison can tell them apart
        assert not torch.allclose(_train_alone(clip, late=False)["table.weight"], ranks[0]["table.weight"], atol=atol)


def test_outside_torchrun_gradients_are_left_as_they_are():
    grad = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3]]), torch.ones(3, 2), (5, 2), check_invariants=True)
    assert distributed.average_sparse_gradient(grad, World()) is grad


def test_merge_rows_sums_shared_rows_and_keeps_the_others_in_order():
    ids = (np.array([1, 4, 7]), np.array([4, 5]))
    values = (np.array([[1, 2], [3, 4], [5, 6]], np.float32), np.array([[10, 20], [30, 40]], np.float32))
    rows, means = distributed.merge_rows(ids, values, np.float32(0.5))
    assert rows.tolist() == [1, 4, 5, 7]
    assert means.tolist() == [[0.5, 1.0], [6.5, 12.0], [15.0, 20.0], [2.5, 3.0]]


def test_merge_rows_of_empty_runs_is_empty():
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    rows, means = distributed.merge_rows(empty, (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)), np.float32(0.5))
    assert rows.shape == (0,) and means.shape == (0, 3)


def test_an_unknown_exchange_dtype_is_refused():
    model = _toy()
    with pytest.raises(ValueError, match="exchange must be .auto. or one of"):
        SparseTableOptimizer(model, [model.table], lr=0.05, weight_decay=0.0, exchange="float16")
