"""The ranker contract: what training, the pipeline, the bundle and the server need of a ranking model.

A ranking model is a ``torch.nn.Module`` that scores a batch of candidates:

``model(inputs) -> (logits [B, C, H], attention [B, C, L])``

where ``inputs`` are the arrays of :class:`rank.features.RankFeatures` as tensors
(``hist_*`` [B, L], ``cand_*`` [B, C], ``dense`` [B, C, F]), ``H`` is one logit per head
in ``cfg.heads`` order (chained by :func:`rank.model.head_probabilities`), and
``attention`` weighs the user's recent events for each candidate (0 on padding; the
server's explanations read it). Its ``cfg`` says what the features must look like, and
saves into the bundle so a loader can rebuild the model. Each model class has a
``kind``, recorded in the manifest; a bundle of a kind the code has not registered is
refused by name.
"""

from typing import ClassVar, Protocol, runtime_checkable

import torch


class RankerSettings(Protocol):
    """The parts of a ranker's config the rest of Funnel reads."""

    num_items: int
    num_categories: int
    num_channels: int
    num_dense: int
    history: int
    short: int
    gap_buckets: int
    heads: tuple[str, ...]
    head_weights: dict[str, float]

    def to_dict(self) -> dict: ...


@runtime_checkable
class RankerModel(Protocol):
    """A ranking model: see the module docstring for the call's inputs and outputs."""

    kind: ClassVar[str]
    cfg: RankerSettings

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...


_KINDS: dict[str, tuple[type, type]] = {}


def register_ranker(model_cls: type, config_cls: type) -> None:
    """Make ranker kind ``model_cls.kind`` loadable from bundles: ``model_cls(config_cls(**saved_config))``.

    Raises:
        ValueError: the kind is taken by another class.
    """
    if _KINDS.get(model_cls.kind, (model_cls,))[0] is not model_cls:
        raise ValueError(f"ranker kind {model_cls.kind!r} is taken by {_KINDS[model_cls.kind][0].__qualname__}")
    _KINDS[model_cls.kind] = (model_cls, config_cls)


def ranker_classes(kind: str) -> tuple[type, type]:
    """(model class, config class) of a registered ranker kind.

    Raises:
        KeyError: naming the kind and the registered ones.
    """
    if kind not in _KINDS:
        raise KeyError(f"ranker kind {kind!r} is not registered (registered: {', '.join(_KINDS) or 'none'})")
    return _KINDS[kind]
