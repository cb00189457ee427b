"""``nn.Embedding``: gather rows of ``Aᵀ`` then ``·Bᵀ``; ``padding_idx`` rows get no delta."""

from __future__ import annotations

import torch.nn.functional as F
import torch
from torch import Tensor, nn

from ..ops.reference import GATHER_MIN_TASKS
from ..ops.routing import Routing
from .base import Adapter, LoRALayer
from .routing import Route


class LoRAEmbedding(LoRALayer):
    """Shape: ids [B, ...] (int) -> [B, ..., dim]. ``A [r, num_embeddings]``, ``B [dim, r]`` (PEFT's layout).

    LoRA dropout does not apply (its input is integer ids), as in PEFT.
    """

    pooled = True

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

    def forward_mixed(self, route: Route, x: Tensor) -> Tensor:
        """Many tasks: one gather of each token's row of its task's ``Aᵀ`` and one ``bmm`` with the
        gathered ``B``s (the gathered-expand path), instead of a loop over task segments."""
        routing = self.check_batch(route, x)
        weights = {s: self.mix_weights(route.slots[s]) for s in routing.present}
        y = self.base(x)
        if len(routing.present) < GATHER_MIN_TASKS or not all(len(g) <= 1 for g in weights.values()) or x.dim() < 2:
            return self.add_slot_terms(y, x, routing, weights)
        a, b, scales, _, rows = self.stacks(route, routing, weights)  # [T, r, num], [T, dim, r], [T]
        return y.index_add_(0, rows.active_rows, self._gathered(x, rows, a, b, scales).to(y.dtype))

    def _gathered(self, x: Tensor, routing: Routing, a: Tensor, b: Tensor, scales: Tensor) -> Tensor:
        rows = routing.active_rows
        slots = routing.cached("active_ids", lambda: routing.task_ids.index_select(0, rows))
        ids = x.index_select(0, rows)  # [n, S...] token ids
        n, r = ids.shape[0], a.shape[1]
        per_token = slots.view(n, *([1] * (ids.dim() - 1))).expand_as(ids)
        h = a.transpose(1, 2)[per_token, ids]  # [n, S..., r]: row ids[i, s] of A[slot i]ᵀ
        keep = scales.index_select(0, slots).to(h.dtype).view(n, *([1] * ids.dim()))
        if self.base.padding_idx is not None:
            keep = keep * (ids != self.base.padding_idx).unsqueeze(-1).to(h.dtype)
        h = (h * keep).reshape(n, -1, r)
        return torch.bmm(h, b.index_select(0, slots).mT).reshape(*ids.shape, -1)
