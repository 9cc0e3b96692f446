"""DIN-style ranking model: target attention of each candidate over the recent behaviour."""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from events.schema import NUM_BEHAVIOR_CODES
from rank.features import NUM_DENSE
from recall.model import lookup


@dataclass
class RankerConfig:
    """Hyper-parameters; saved inside every checkpoint so a loader can rebuild the model."""

    num_items: int
    num_categories: int
    num_channels: int = 4
    dim: int = 48
    history: int = 50
    gap_buckets: int = 24
    hidden: int = 128
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class Ranker(nn.Module):
    """Scores candidates for a user.

    Each candidate attends over the user's recent events (item, category, behaviour
    type and time gap), giving a candidate-specific interest vector; a long-term mean
    of the whole window, the dense features (recall score, popularity, category share,
    activity) and the recall channel join it in an MLP that outputs a click logit.
    """

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.item = nn.Embedding(cfg.num_items, d, padding_idx=0)
        self.category = nn.Embedding(cfg.num_categories, d, padding_idx=0)
        self.behavior = nn.Embedding(NUM_BEHAVIOR_CODES, d, padding_idx=0)
        self.gap = nn.Embedding(cfg.gap_buckets, d, padding_idx=0)
        self.channel = nn.Embedding(cfg.num_channels, 8)
        self.query = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(4 * d + 8 + NUM_DENSE, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden // 2),
            nn.GELU(),
            nn.Linear(cfg.hidden // 2, 1),
        )
        for emb in (self.item, self.category, self.behavior, self.gap):
            nn.init.normal_(emb.weight, std=0.05)

    def forward(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: tensors from :meth:`rank.features.RankFeatures.to_torch`.

        Returns:
            (logits [B, C], attention weights [B, C, L] over the history).
        """
        hist_mask = f["hist_items"] > 0  # [B, L]
        keys = (
            lookup(self.item, f["hist_items"]) + lookup(self.category, f["hist_categories"]) + self.behavior(f["hist_behaviors"]) + self.gap(f["hist_gaps"])
        )  # [B, L, d]
        target = lookup(self.item, f["cand_items"]) + lookup(self.category, f["cand_categories"])  # [B, C, d]
        att = self.query(target) @ self.key(keys).transpose(1, 2) / self.cfg.dim**0.5  # [B, C, L]
        att = att.masked_fill(~hist_mask[:, None, :], float("-inf"))
        weights = torch.nan_to_num(torch.softmax(att, dim=-1), nan=0.0)  # [B, C, L]; empty history → zeros
        interest = weights @ keys  # [B, C, d]
        long_term = (keys * hist_mask[..., None]).sum(1) / hist_mask.sum(1, keepdim=True).clamp_min(1)  # [B, d]
        x = torch.cat(
            [
                target,
                interest,
                target * interest,
                long_term[:, None, :].expand_as(target),
                self.channel(f["cand_channels"]),
                f["dense"],
            ],
            dim=-1,
        )  # [B, C, 4d + 8 + NUM_DENSE]
        return self.mlp(x).squeeze(-1), weights


def ranking_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pointwise log-loss (calibrated probabilities) plus a listwise softmax term per group.

    Args:
        logits: [B, G] scores of each group's items.
        labels: [B, G] 1 for the positive, 0 for negatives; each row has one positive.
        mask: [B, G] real (non-padding) entries.
    """
    pointwise = F.binary_cross_entropy_with_logits(logits[mask], labels[mask].float())
    listwise = F.cross_entropy(logits.masked_fill(~mask, float("-inf")), labels.float().argmax(1))
    return pointwise + listwise
