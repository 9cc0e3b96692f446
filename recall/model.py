"""Two-tower retrieval model: an item tower and a user tower over the behaviour sequence.

Both towers output L2-normalised vectors, so the inner product the FAISS index
searches with is exactly the cosine similarity the model trained on.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from events.schema import NUM_BEHAVIOR_CODES


@dataclass
class TwoTowerConfig:
    """Hyper-parameters; saved inside every checkpoint so a loader can rebuild the model."""

    num_items: int
    num_categories: int
    dim: int = 64
    history: int = 50
    hidden: int = 256
    dropout: float = 0.1
    temperature: float = 0.07

    def to_dict(self) -> dict:
        return asdict(self)


class ItemTower(nn.Module):
    """item id + category embeddings → normalised item vector."""

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.item = nn.Embedding(cfg.num_items, cfg.dim, padding_idx=0)
        self.category = nn.Embedding(cfg.num_categories, cfg.dim, padding_idx=0)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        nn.init.normal_(self.item.weight, std=0.05)
        nn.init.normal_(self.category.weight, std=0.05)

    def embed(self, items: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        """Input-side embedding shared with the user tower's history encoder."""
        return self.item(items) + self.category(categories)  # [..., dim]

    def forward(self, items: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        e = self.embed(items, categories)  # [..., dim]
        return F.normalize(e + self.proj(e), dim=-1)


class UserTower(nn.Module):
    """Pooled recent behaviour → MLP → normalised user vector.

    Each event in the window is weighted by a learned behaviour-type weight (a buy
    says more than a view) and a learned recency weight per position from the end;
    the weighted mean (long view) and the last event (short view) feed an MLP.
    """

    def __init__(self, cfg: TwoTowerConfig, item_tower: ItemTower):
        super().__init__()
        self.items = item_tower
        self.behavior_weight = nn.Embedding(NUM_BEHAVIOR_CODES, 1)
        self.position_weight = nn.Parameter(torch.zeros(cfg.history))
        nn.init.zeros_(self.behavior_weight.weight)
        self.mlp = nn.Sequential(
            nn.Linear(2 * cfg.dim, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.dim),
        )

    def forward(self, items: torch.Tensor, categories: torch.Tensor, behaviors: torch.Tensor) -> torch.Tensor:
        """Args: right-aligned windows [B, n] (0 = padding). Returns: [B, dim]."""
        n = items.shape[1]
        mask = (items > 0).float()  # [B, n]
        e = self.items.embed(items, categories)  # [B, n, dim]
        logw = self.behavior_weight(behaviors).squeeze(-1) + self.position_weight[-n:]  # [B, n]
        w = torch.exp(logw) * mask  # [B, n]
        pooled = (w.unsqueeze(-1) * e).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)  # [B, dim]
        last = e[:, -1]  # [B, dim]; padding embeds to zero for empty histories
        return F.normalize(pooled + self.mlp(torch.cat([pooled, last], dim=-1)), dim=-1)


class TwoTower(nn.Module):
    """The two towers plus the softmax temperature they were trained with."""

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.item_tower = ItemTower(cfg)
        self.user_tower = UserTower(cfg, self.item_tower)

    def item_vectors(self, item_category: torch.Tensor, batch: int = 65536) -> torch.Tensor:
        """Vectors of every item id (row 0 = padding, a zero vector). Returns [num_items, dim]."""
        ids = torch.arange(self.cfg.num_items, device=item_category.device)
        out = torch.cat([self.item_tower(ids[i : i + batch], item_category[i : i + batch]) for i in range(0, len(ids), batch)])
        out[0] = 0
        return out


def sampled_softmax_loss(
    user: torch.Tensor,
    item: torch.Tensor,
    target_ids: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
    extra: torch.Tensor | None = None,
    extra_ids: torch.Tensor | None = None,
    extra_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax with logQ correction, optionally mixed with extra negatives.

    Args:
        user: [B, d] normalised user vectors.
        item: [B, d] normalised vectors of each row's target item.
        target_ids: [B] target item ids; another row with the same target is not a negative.
        log_q: [B] log sampling probability of each target as an in-batch negative.
        temperature: softmax temperature.
        extra: [P, d] vectors of extra (e.g. uniformly sampled) negatives.
        extra_ids: [P] their ids, masked where they equal the row's target.
        extra_log_q: [P] their log sampling probabilities.

    Returns:
        Mean cross-entropy of each row's target against the negatives.
    """
    logits = user @ item.T / temperature - log_q[None, :]  # [B, B]
    same = target_ids[:, None] == target_ids[None, :]  # [B, B]
    eye = torch.eye(len(user), dtype=torch.bool, device=user.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    if extra is not None:
        ext = user @ extra.T / temperature - extra_log_q[None, :]  # [B, P]
        ext = ext.masked_fill(extra_ids[None, :] == target_ids[:, None], float("-inf"))
        logits = torch.cat([logits, ext], dim=1)  # [B, B + P]
    labels = torch.arange(len(user), device=user.device)
    return F.cross_entropy(logits, labels)
