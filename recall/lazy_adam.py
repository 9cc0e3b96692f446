"""Lazy Adam for embedding tables with sparse gradients: the update of :class:`torch.optim.SparseAdam`, computed row-wise.

``SparseAdam`` builds sparse tensors for every intermediate (``sparse_mask``, sparse
adds into the dense moments), which on a CPU costs more than the arithmetic: 24 ms a
step for the 14,000 rows a two-tower batch touches in an 870k-item table. Gathering the
touched rows, updating them densely and scattering them back gives the same numbers in
about half the time. Moments of rows a step does not touch wait, as in ``SparseAdam``;
the bias correction counts the table's steps, not the row's.
"""

import math

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
                grad = p.grad.coalesce()  # repeated rows summed
                self._update_rows(p, group, grad.indices()[0], grad.values())

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
        m = exp_avg.index_select(0, rows)  # [n, d]
        m += (grad - m).mul_(1 - beta1)
        v = exp_avg_sq.index_select(0, rows)  # [n, d]
        v += (grad * grad).sub_(v).mul_(1 - beta2)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)
        step = state["step"]
        step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        param.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)
