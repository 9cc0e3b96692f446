import numpy as np
import pytest
import torch

from funnel.recall.lazy_adam import LazyAdam, sum_rows


def _steps(opt_class, steps: int = 5) -> torch.Tensor:
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 8, sparse=True)
    opt = opt_class(table.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 50, (30,), generator=gen)  # repeated ids: rows whose gradients add up
        opt.zero_grad()
        (table(ids) * torch.randn(30, 8, generator=gen)).sum().backward()
        opt.step()
    return table.weight.detach()


def test_lazy_adam_takes_sparse_adams_steps():
    lazy, reference = _steps(LazyAdam), _steps(torch.optim.SparseAdam)
    assert torch.allclose(lazy, reference, rtol=1e-5, atol=1e-6)


def test_untouched_rows_keep_their_weights_and_moments():
    table = torch.nn.Embedding(10, 4, sparse=True)
    before = table.weight.detach().clone()
    opt = LazyAdam(table.parameters(), lr=0.1)
    table(torch.tensor([2, 2, 5])).sum().backward()
    opt.step()
    changed = (table.weight.detach() != before).any(1)
    assert changed.nonzero().flatten().tolist() == [2, 5]
    state = opt.state[table.weight]
    assert state["step"] == 1 and (state["exp_avg"][changed.logical_not()] == 0).all()


def test_dense_gradients_are_refused():
    table = torch.nn.Embedding(10, 4)
    opt = LazyAdam(table.parameters())
    table(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


def test_sum_rows_sums_repeated_rows_in_ascending_order():
    slots = np.full(8, -1, np.int64)
    rows = np.array([5, 2, 5, 0, 2, 5])
    values = np.arange(12, dtype=np.float32).reshape(6, 2)  # row i: [2i, 2i + 1]
    distinct, sums = sum_rows(rows, values, slots)
    assert distinct.tolist() == [0, 2, 5]
    assert sums.tolist() == [[6, 7], [2 + 8, 3 + 9], [0 + 4 + 10, 1 + 5 + 11]]
    assert (slots == -1).all()  # the scratch is left as it was given


def test_coalesce_grad_matches_torch_and_marks_the_gradient_coalesced():
    table = torch.nn.Embedding(20, 3, sparse=True)
    opt = LazyAdam(table.parameters())
    table(torch.tensor([7, 1, 7, 19, 1, 7])).pow(2).sum().backward()
    expected = table.weight.grad.coalesce()
    opt.coalesce_grad(table.weight)
    grad = table.weight.grad
    assert grad.is_coalesced()
    assert torch.equal(grad.indices(), expected.indices()) and torch.allclose(grad.values(), expected.values())
