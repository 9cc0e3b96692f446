"""Lazy Adam for embedding tables with sparse gradients: the update of :class:`torch.optim.SparseAdam`, computed row-wise.

``SparseAdam`` builds sparse tensors for every intermediate (``sparse_mask``, sparse
adds into the dense moments), which on a CPU costs more than the arithmetic: 24 ms a
step for the 14,000 rows a two-tower batch touches in an 870k-item table. Moments of rows
a step does not touch wait, as in ``SparseAdam``; the bias correction counts the
table's steps, not the row's.

On the CPU two compiled loops (numba) do the work: one sums a gradient's repeated rows
(``Tensor.coalesce`` took 7-10 ms of the step for 40k looked-up rows), one updates each
touched row's moments and weights in place (torch's row-wise index ops took another
~10 ms), vectorised over the row. Elsewhere (CUDA) the same update runs as torch index ops.
"""

import math

import numba
import numpy as np
import torch


class LazyAdam(torch.optim.Optimizer):
    """Adam over the rows each step's sparse gradient touches (``SparseAdam``'s update).

    Args:
        params: embedding weights whose gradients are sparse (``nn.Embedding(sparse=True)``).
        lr: learning rate.
        betas: moment decay rates.
        eps: added to the root of the second moment.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self._slots: dict[int, np.ndarray] = {}  # per CPU weight: row -> its place among a gradient's distinct rows; -1 between calls

    def coalesce_grad(self, param: torch.Tensor) -> None:
        """Replace ``param``'s sparse gradient by its coalesced form (repeated rows summed, rows sorted)."""
        grad = param.grad
        if grad is None or grad.is_coalesced():
            return
        if grad.device.type != "cpu":
            param.grad = grad.coalesce()
            return
        slots = self._slots.get(id(param))
        if slots is None:
            slots = self._slots[id(param)] = np.full(param.shape[0], -1, np.int64)
        rows, sums = sum_rows(grad._indices()[0].numpy(), np.ascontiguousarray(grad._values().numpy()), slots)
        param.grad = torch.sparse_coo_tensor(torch.from_numpy(rows)[None], torch.from_numpy(sums), grad.shape, is_coalesced=True, check_invariants=False)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """Update every parameter that has a (sparse) gradient, on the rows it touches."""
        if closure is not None:
            raise ValueError("LazyAdam takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("LazyAdam needs sparse gradients (nn.Embedding(sparse=True))")
                self.coalesce_grad(p)
                self._update_rows(p, group, p.grad.indices()[0], p.grad.values())

    def _update_rows(self, param: torch.Tensor, group: dict, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """One Adam step on ``param``'s ``rows`` [n] (distinct) with their gradients ``grad`` [n, d]."""
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        if not len(rows):
            return
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        step = state["step"]
        step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        if param.device.type == "cpu":
            adam_rows(param.detach().numpy(), exp_avg.numpy(), exp_avg_sq.numpy(), rows.numpy(), grad.numpy(), beta1, beta2, group["eps"], step_size)
            return
        m = exp_avg.index_select(0, rows)  # [n, d]
        m += (grad - m).mul_(1 - beta1)
        v = exp_avg_sq.index_select(0, rows)  # [n, d]
        v += (grad * grad).sub_(v).mul_(1 - beta2)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)
        param.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)


@numba.njit(cache=True, nogil=True)
def sum_rows(rows: np.ndarray, values: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``rows`` [n] in ascending order [u], and the sum of each one's ``values`` [u, d].

    ``slots`` [table rows] must hold -1 everywhere; it is scratch space, and holds -1 again on return.
    """
    distinct = np.empty(len(rows), np.int64)
    u = 0
    for i in range(len(rows)):
        if slots[rows[i]] < 0:
            slots[rows[i]] = 0
            distinct[u] = rows[i]
            u += 1
    distinct = np.sort(distinct[:u])
    for j in range(u):
        slots[distinct[j]] = j
    sums = np.zeros((u, values.shape[1]), values.dtype)
    for i in range(len(rows)):
        s = slots[rows[i]]
        for c in range(values.shape[1]):  # element by element: a row-slice add would allocate a temporary per row
            sums[s, c] += values[i, c]
    for j in range(u):
        slots[distinct[j]] = -1
    return distinct, sums


# error_model="numpy": IEEE division (no zero check, which keeps LLVM from vectorising the
# row's loop): 16.8k random rows of a 870k x 64 table took 5.2 ms instead of 10.6.
@numba.njit(cache=True, nogil=True, error_model="numpy")
def adam_rows(
    param: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, rows: np.ndarray, grad: np.ndarray, beta1: float, beta2: float, eps: float, step_size: float
) -> None:
    """Adam on ``rows`` [n] (distinct) of ``param`` [M, d] and its moments, in place, with their gradients ``grad`` [n, d].

    The float32 operations of the torch path, in its order: ``m += (g - m)(1 - β1)``,
    ``v += (g² - v)(1 - β2)``, ``w -= step_size · m / (√v + eps)``.
    """
    one_minus_b1 = np.float32(1 - beta1)
    one_minus_b2 = np.float32(1 - beta2)
    eps32 = np.float32(eps)
    step32 = np.float32(step_size)
    for j in range(len(rows)):
        r = rows[j]
        for c in range(param.shape[1]):
            g = grad[j, c]
            m = exp_avg[r, c]
            m += (g - m) * one_minus_b1
            v = exp_avg_sq[r, c]
            v += (g * g - v) * one_minus_b2
            exp_avg[r, c] = m
            exp_avg_sq[r, c] = v
            param[r, c] -= step32 * (m / (np.sqrt(v) + eps32))
