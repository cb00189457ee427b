"""``nn.Embedding``: gather rows of ``Aᵀ`` then ``·Bᵀ``; ``padding_idx`` rows get no delta."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, LoRALayer


class LoRAEmbedding(LoRALayer):
    """Shape: ids [B, ...] (int) -> [B, ..., dim]. ``A [r, num_embeddings]``, ``B [dim, r]`` (PEFT's layout).

    LoRA dropout does not apply (its input is integer ids), as in PEFT.
    """

    def dims(self) -> tuple[int, int]:
        return self.base.num_embeddings, self.base.embedding_dim

    def make_adapter(self, rank: int, alpha: float, rslora: bool, dropout: float) -> Adapter:
        w = self.base.weight
        kw = dict(bias=False, device=w.device, dtype=w.dtype)
        # nn.Linear as a parameter holder gives the keys lora_A.weight [r, num] / lora_B.weight [dim, r].
        return Adapter(nn.Linear(self.base.num_embeddings, rank, **kw), nn.Linear(rank, self.base.embedding_dim, **kw),
                       rank, alpha, rslora, dropout)

    def delta(self, x: Tensor, a: Tensor, b: Tensor, scale: float, dropout_p: float) -> Tensor:
        h = F.embedding(x, a.t())  # [..., r]: row gather, no one-hot matmul
        if self.base.padding_idx is not None:
            h = h * (x != self.base.padding_idx).unsqueeze(-1).to(h.dtype)
        return F.linear(h * scale, b)
