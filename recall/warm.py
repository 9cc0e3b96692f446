"""Warm starts: a trained model grown to larger vocabularies, and embedding rows held fixed while it trains on."""

import torch
from torch import nn


def grown(model: nn.Module, config) -> nn.Module:
    """A new model of ``model``'s class built from ``config``, holding ``model``'s weights.

    Tables sized by a vocabulary may have grown (ids keep their numbers when a
    vocabulary is extended, see :meth:`events.vocab.Vocab.extend`): their first rows are
    copied and the added rows keep the new model's initialisation.

    Args:
        model: the trained model (its class is built as ``type(model)(config)``).
        config: the new model's config, every table at least as large as ``model``'s.

    Returns:
        The grown model, on ``model``'s device.

    Raises:
        ValueError: a weight that is neither the same shape nor a table grown along its first axis.
    """
    device = next(model.parameters()).device
    new = type(model)(config).to(device)
    state = new.state_dict()
    for name, old in model.state_dict().items():
        target = state[name]
        if target.shape == old.shape:
            state[name] = old.clone()
        elif target.dim() == old.dim() and target.shape[1:] == old.shape[1:] and target.shape[0] >= old.shape[0]:
            target[: old.shape[0]] = old
        else:
            raise ValueError(f"{name}: cannot grow a weight of shape {tuple(old.shape)} into {tuple(target.shape)}")
    new.load_state_dict(state)
    return new


def freeze_rows(table: nn.Embedding, rows: int) -> torch.utils.hooks.RemovableHandle:
    """Keep the first ``rows`` rows of ``table`` fixed while the rest trains.

    Their gradient is removed (sparse gradients lose those rows' entries, so a lazy Adam
    never touches them; dense ones get zeros there, which a fresh Adam turns into no
    step). Weight decay must be off for the table, as it is for sparse tables.

    Args:
        table: the embedding table.
        rows: how many leading rows stay fixed.

    Returns:
        The hook's handle; ``.remove()`` lets every row train again.
    """

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if grad.is_sparse:
            grad = grad.coalesce()
            keep = grad.indices()[0] >= rows  # [nnz]
            return torch.sparse_coo_tensor(grad.indices()[:, keep], grad.values()[keep], grad.shape, check_invariants=False)
        grad = grad.clone()
        grad[:rows] = 0
        return grad

    return table.weight.register_hook(hook)
