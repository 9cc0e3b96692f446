import multiprocessing
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from funnel.recall import exchange as shm
from funnel.recall.distributed import World

ROWS, DIM, STEPS = 50, 3, 6


def _sparse(rows: list[int], values: np.ndarray) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows], dtype=torch.long), torch.from_numpy(values), (ROWS, DIM), is_coalesced=True)


def _rank_inputs(rank: int, step: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """What rank ``rank`` sends at ``step``: sorted distinct rows (more each step), their values, a dense bucket."""
    rng = np.random.default_rng(10 * step + rank)
    rows = sorted(rng.choice(ROWS, 4 + 8 * step, replace=False).tolist())
    return rows, rng.normal(size=(len(rows), DIM)).astype(np.float32), rng.normal(size=7).astype(np.float32)


def _expected(step: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """The mean over both ranks: row -> values, and the dense bucket."""
    sums: dict[int, np.ndarray] = {}
    dense = np.zeros(7, np.float32)
    for rank in range(2):
        rows, values, bucket = _rank_inputs(rank, step)
        for r, v in zip(rows, values):
            sums[r] = sums.get(r, 0) + v
        dense += bucket
    return {r: v / 2 for r, v in sums.items()}, dense / 2


class _Bucket:
    """What DDP hands a communication hook: a flat gradient buffer and its index."""

    def __init__(self, buffer: torch.Tensor):
        self._buffer = buffer

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return 0


def _exchange_rank(rank: int, init: str, directory: str, out: str) -> None:
    shm.MIN_SLOT_BYTES = 64  # so the messages outgrow the first file and the files are replaced
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        ex = shm.SharedMemoryExchange(World(rank, 2), "float32", directory=directory)
        table = torch.nn.Parameter(torch.zeros(ROWS, DIM))
        weight = torch.nn.Parameter(torch.zeros(7))
        results = []
        waited = []

        def record() -> None:
            results.append((table.grad.indices()[0].tolist(), table.grad.values().numpy().copy(), weight.grad.numpy().copy(), ex._own.generation))

        for step in range(STEPS):
            rows, values, dense = _rank_inputs(rank, step)
            if rank == 1 and step == 2:
                time.sleep(0.3)  # rank 0 runs ahead into the next exchange and waits there
            weight.grad = torch.from_numpy(dense.copy())
            table.grad = _sparse(rows, values)
            averaged = ex.exchange([weight], [table], while_waiting=lambda: waited.append(step))
            assert averaged == (step > 0)
            if step == 0:
                assert table.grad is None and weight.grad is None  # nothing to apply before a previous step
            else:
                record()  # the mean of the step before
        assert waited == list(range(STEPS))
        assert ex.flush([table])
        record()
        assert not ex.flush([table])
        ex.close()
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_each_steps_mean_a_step_late_through_growing_files_and_leave_none(tmp_path):
    ctx = multiprocessing.get_context("fork")
    directory = tmp_path / "shm"
    directory.mkdir()
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    procs = [ctx.Process(target=_exchange_rank, args=(r, str(tmp_path / "init"), str(directory), outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(o, weights_only=False) for o in outs]
    assert len(ranks[0]) == STEPS
    for step in range(STEPS):
        rows, dense = _expected(step)
        for got in ranks:
            got_rows, got_values, got_dense, _ = got[step]
            assert got_rows == sorted(rows)
            np.testing.assert_allclose(got_values, np.array([rows[r] for r in sorted(rows)]), rtol=1e-6)
            np.testing.assert_allclose(got_dense, dense, rtol=1e-6)
        assert np.array_equal(ranks[0][step][1], ranks[1][step][1]) and np.array_equal(ranks[0][step][2], ranks[1][step][2])  # the same bits on both
    assert ranks[0][-1][3] > 0  # the files were replaced as the messages grew
    assert os.listdir(directory) == []


def test_the_ddp_hook_leaves_each_bucket_as_computed():
    buffer = torch.arange(5.0)
    assert shm.SharedMemoryExchange.defer(None, _Bucket(buffer)).wait() is buffer
    assert torch.equal(buffer, torch.arange(5.0))


def test_a_world_of_one_needs_no_shared_memory():
    assert not shm.shared_memory_usable(World())


def test_an_unknown_transport_is_refused(monkeypatch):
    from funnel.recall.loop import SparseTableOptimizer

    model = torch.nn.Embedding(4, 2)
    with pytest.raises(ValueError, match="transport"):
        SparseTableOptimizer(model, [model], lr=0.1, weight_decay=0.0, transport="shm")
    monkeypatch.setenv(shm.TRANSPORT_ENV, "tcp")
    with pytest.raises(ValueError, match=shm.TRANSPORT_ENV):
        SparseTableOptimizer(model, [model], lr=0.1, weight_decay=0.0)


def test_a_full_directory_is_an_error_that_says_what_to_do(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm.os, "posix_fallocate", full)
    ex = object.__new__(shm.SharedMemoryExchange)
    ex.world, ex._own, ex._fresh, ex._prefix = World(0, 2), None, [], str(tmp_path / "funnel-grad-x")
    with pytest.raises(RuntimeError, match=f"No space left on device.*--shm-size.*{shm.TRANSPORT_ENV}=gloo"):
        ex._grow(10, 0)
