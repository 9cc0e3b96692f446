"""Ranking model: short- and long-term target attention, a cross network, and one head per behaviour.

Each candidate attends (DIN-style) over the user's recent events, built from item,
category, behaviour-type and time-gap embeddings, twice: once over the last ``short``
events (what the user is doing now) and once over the whole ``history`` window (what
the user likes), with separate projections, so the two interests are separate inputs.
Those interests, the candidate's embedding, its recall channel and the dense features
(recall score and rank, co-visitation, popularity, business features) feed a DCN-v2
cross network beside a deep MLP; their joint output is a shared bottom for the heads.

Heads (ESMM-style, so the sparse deeper behaviours borrow the click head's signal):
``p_click = σ(z_click)``, ``p_cart_fav = p_click · σ(z_cart_fav)``, ``p_buy = p_click · σ(z_buy)``.
"""

from dataclasses import asdict, dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from funnel.events.schema import BEHAVIORS, NUM_BEHAVIOR_CODES
from funnel.rank.contract import register_ranker
from funnel.rank.features import dense_names
from funnel.recall.model import frozen_for_inference, lookup, masked_softmax
from funnel.recall.runtime import export_onnx

ArrayLike = TypeVar("ArrayLike", torch.Tensor, np.ndarray)

HEADS: tuple[str, ...] = ("click", "cart_fav", "buy")
"""Head names in order; single-behaviour logs train only ``click``."""

HEAD_BEHAVIORS: dict[str, tuple[str, ...]] = {"click": BEHAVIORS, "cart_fav": ("cart", "fav"), "buy": ("buy",)}
"""Which behaviours are a positive for each head (a cart or a buy implies a click)."""

DEFAULT_HEAD_WEIGHTS: dict[str, float] = {"click": 1.0, "cart_fav": 2.0, "buy": 4.0}
"""Default weights of :func:`combine_heads`: a buy is worth more than a cart/fav, which is worth more than a click."""


@dataclass
class RankerConfig:
    """Hyper-parameters; saved inside every checkpoint so a loader can rebuild the model.

    Attributes:
        num_items, num_categories: embedding table sizes.
        num_channels: recall channel ids: 0 = none, then the retriever's channels (:attr:`recall.retriever.Retriever.channel_names`).
        num_dense: dense feature count (default: every registered feature, :func:`rank.schema.dense_names`).
        dim: embedding width.
        history: events in the long-term window (the model's input length).
        short: the latest events in the short-term window.
        gap_buckets: time-gap buckets.
        cross_layers: DCN-v2 cross layers.
        cross_rank: rank of each cross layer's weight matrix.
        hidden: width of the deep tower.
        dropout: dropout in the deep tower and on the attention interests.
        heads: which heads the model has (a prefix-free subset of :data:`HEADS`, ``click`` first).
        head_weights: default weights of the final score (:func:`combine_heads`).
    """

    num_items: int
    num_categories: int
    num_channels: int = 4
    num_dense: int = field(default_factory=lambda: len(dense_names()))
    dim: int = 32
    history: int = 100
    short: int = 10
    gap_buckets: int = 24
    cross_layers: int = 2
    cross_rank: int = 32
    hidden: int = 64
    dropout: float = 0.2
    heads: tuple[str, ...] = ("click",)
    head_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_HEAD_WEIGHTS))

    def __post_init__(self):
        self.heads = tuple(self.heads)
        if not self.heads or self.heads[0] != "click" or any(h not in HEADS for h in self.heads):
            raise ValueError(f"heads must start with 'click' and name only {HEADS}, got {self.heads}")

    def to_dict(self) -> dict:
        return asdict(self)


class CrossNetwork(nn.Module):
    """DCN-v2 cross layers: ``x_{l+1} = x_0 ⊙ (U_l V_l x_l + b_l) + x_l`` (explicit feature interactions).

    ``W_l = U_l V_l`` has rank ``rank`` (DCN-v2's low-rank form): at a width of about
    200 a rank of 32 costs a third of the full matrix per candidate, which is most of
    the ranker's forward pass.
    """

    def __init__(self, width: int, layers: int, rank: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width)) for _ in range(layers))
        for down, up in self.layers:
            nn.init.zeros_(up.bias)
            nn.init.normal_(down.weight, std=0.05)
            nn.init.normal_(up.weight, std=0.02)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Args: x0 [..., width]. Returns [..., width]."""
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class TargetAttention(nn.Module):
    """Scaled dot-product attention of candidates over events, with its own projections."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.scale = dim**-0.5

    def forward(self, target: torch.Tensor, events: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: target [B, C, d], events [B, L, d], mask [B, L].

        Returns:
            (interest [B, C, d], weights [B, C, L]; all zero for an empty history).
        """
        att = (self.query(target) * self.scale) @ self.key(events).transpose(1, 2)  # [B, C, L]
        weights = masked_softmax(att, mask[:, None, :])  # [B, C, L]
        return weights @ events, weights


class Ranker(nn.Module):
    """Scores candidates for a user; see the module docstring for the architecture and :mod:`rank.contract` for the call."""

    kind = "din"

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.item = nn.Embedding(cfg.num_items, d, padding_idx=0)
        self.category = nn.Embedding(cfg.num_categories, d, padding_idx=0)
        self.behavior = nn.Embedding(NUM_BEHAVIOR_CODES, d, padding_idx=0)
        self.gap = nn.Embedding(cfg.gap_buckets, d, padding_idx=0)
        self.channel = nn.Embedding(cfg.num_channels, 4)
        self.short_att = TargetAttention(d)
        self.long_att = TargetAttention(d)
        self.dense_norm = nn.LayerNorm(cfg.num_dense)
        width = 5 * d + 4 + cfg.num_dense
        self.cross = CrossNetwork(width, cfg.cross_layers, cfg.cross_rank)
        self.deep = nn.Sequential(
            nn.Linear(width, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden // 2),
            nn.GELU(),
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.heads = nn.Linear(width + cfg.hidden // 2, len(cfg.heads))
        for emb in (self.item, self.category, self.behavior, self.gap):
            nn.init.normal_(emb.weight, std=0.05)

    def forward(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: tensors from :meth:`rank.features.RankFeatures.to_torch`.

        Returns:
            (logits [B, C, H] per head in ``cfg.heads`` order, attention [B, C, L]: the
            mean of the short-term weights (on the last ``short`` events) and the
            long-term weights over the window).
        """
        s = self.cfg.short
        mask = f["hist_items"] > 0  # [B, L]
        events = (
            lookup(self.item, f["hist_items"]) + lookup(self.category, f["hist_categories"]) + self.behavior(f["hist_behaviors"]) + self.gap(f["hist_gaps"])
        )  # [B, L, d]
        target = lookup(self.item, f["cand_items"]) + lookup(self.category, f["cand_categories"])  # [B, C, d]
        short, w_short = self.short_att(target, events[:, -s:], mask[:, -s:])  # [B, C, d], [B, C, s]
        long, w_long = self.long_att(target, events, mask)  # [B, C, d], [B, C, L]
        short, long = self.drop(short), self.drop(long)
        x0 = torch.cat(
            [target, short, long, target * short, target * long, self.channel(f["cand_channels"]), self.dense_norm(f["dense"])], dim=-1
        )  # [B, C, 5d + 4 + num_dense]
        b, c, width = x0.shape
        # One row per candidate: ONNX Runtime fuses a 2-D MatMul and its bias into one Gemm, not a 3-D one.
        x0 = x0.reshape(b * c, width)  # [B * C, width]
        logits = self.heads(torch.cat([self.cross(x0), self.deep(x0)], dim=-1)).reshape(b, c, -1)  # [B, C, H]
        attention = 0.5 * (F.pad(w_short, (w_long.shape[-1] - w_short.shape[-1], 0)) + w_long)  # [B, C, L]
        return logits, attention


def frozen_ranker(model: Ranker) -> nn.Module:
    """The ranker traced and frozen for serving (:func:`recall.model.frozen_for_inference`).

    Returns:
        A module with the same inputs and outputs as :meth:`Ranker.forward`, for any
        batch size and candidate count.
    """
    return frozen_for_inference(model, (example_inputs(model, 1, 2),), optimize=True)


def example_inputs(model: Ranker, batch: int, candidates: int) -> dict[str, torch.Tensor]:
    """Inputs of :meth:`Ranker.forward` for tracing or export: ids 1, dense features 0, on the model's device.

    Returns:
        ``hist_*`` [batch, cfg.history], ``cand_*`` [batch, candidates], ``dense`` [batch, candidates, num_dense].
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    ids = lambda *shape: torch.ones(shape, dtype=torch.long, device=device)
    hist = {name: ids(batch, cfg.history) for name in ("hist_items", "hist_categories", "hist_behaviors", "hist_gaps")}
    cand = {name: ids(batch, candidates) for name in ("cand_items", "cand_categories", "cand_channels")}
    return {**hist, **cand, "dense": torch.zeros(batch, candidates, cfg.num_dense, device=device)}


def export_ranker(model: Ranker, path: str) -> None:
    """Write the ranker as ONNX: inputs named like :class:`rank.features.RankFeatures`' fields, outputs ``logits``, ``attention``.

    Batch, candidate count and history length are dynamic (history at least ``cfg.short``).
    """
    example = example_inputs(model, 2, 3)
    batch, cand, history = Dim("batch"), Dim("cand"), Dim("history", min=model.cfg.short)
    dynamic = {name: ({0: batch, 1: history} if name.startswith("hist_") else {0: batch, 1: cand}) for name in example}
    export_onnx(model, example, dynamic, ["logits", "attention"], path, as_dict="f")


def head_probabilities(logits: ArrayLike, heads: tuple[str, ...]) -> dict[str, ArrayLike]:
    """Per-head probabilities from :meth:`Ranker.forward` logits [B, C, H] (ESMM chain through ``click``).

    Logits may be torch tensors (training) or numpy arrays (serving, where a torch call
    per request would cost more than this arithmetic).
    """
    sigmoid = torch.sigmoid if isinstance(logits, torch.Tensor) else _sigmoid
    each = sigmoid(logits)  # [B, C, H]: every head at once, a few array calls rather than a few per head
    click = each[..., 0]  # [B, C]
    return {name: click if i == 0 else click * each[..., i] for i, name in enumerate(heads)}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # overflow-free for large |x|, unlike 1 / (1 + exp(-x))


def combine_heads(probs: dict[str, ArrayLike], weights: dict[str, float]) -> ArrayLike:
    """The final score: ``Σ_h w_h · p_h / Σ_h w_h`` over the model's heads.

    Heads missing from ``weights`` weigh 0; if every weight is 0 the click head decides.

    Args:
        probs: head name -> [B, C] probabilities (torch tensors or numpy arrays).
        weights: head name -> non-negative weight.

    Returns:
        [B, C] scores in [0, 1], of the same kind as ``probs``.
    """
    bad = {h: w for h, w in weights.items() if not w >= 0}
    if bad:
        raise ValueError(f"head weights must be non-negative numbers, got {bad}")
    used = {h: float(weights.get(h, 0.0)) for h in probs}
    total = sum(used.values())
    if total == 0:
        return probs["click"]
    return sum(w * probs[h] for h, w in used.items() if w) / total


def ranking_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, heads: tuple[str, ...], listwise_weight: float = 1.0) -> torch.Tensor:
    """Listwise softmax over each group on the click logit plus pointwise log-loss on every head.

    Args:
        logits: [B, G, H] scores of each group's items.
        labels: [B, G, H] 0/1 per head; column 0 of the group (the positive) is the
            only item with a click label.
        mask: [B, G] real (non-padding) entries.
        heads: head names in ``logits`` order.
        listwise_weight: weight of the listwise term.

    Returns:
        The scalar loss.
    """
    probs = head_probabilities(logits, heads)
    pointwise = sum(F.binary_cross_entropy(probs[h][mask].clamp(1e-7, 1 - 1e-7), labels[..., i][mask].float()) for i, h in enumerate(heads))
    click = logits[..., 0].masked_fill(~mask, float("-inf"))  # [B, G]
    listwise = F.cross_entropy(click, labels[..., 0].float().argmax(1))
    return pointwise + listwise_weight * listwise


register_ranker(Ranker, RankerConfig)
