"""``nn.Linear``: ``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` through the dispatched fused ops."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.dispatch import resolve
from ..ops.reference import gather_pays, gathered_delta, low_rank
from .base import Adapter, LoRALayer
from .routing import Mix, Route


class LoRALinear(LoRALayer):
    """Shape: x [B, ..., in] -> [B, ..., out]. ``A [r, in]``, ``B [out, r]`` (views of the pool)."""

    pooled = True

    def dims(self) -> tuple[int, int]:
        return self.base.in_features, self.base.out_features

    def make_adapter(self, rank: int, alpha: float, rslora: bool, dropout: float) -> Adapter:
        w = self.base.weight
        kw = dict(bias=False, device=w.device, dtype=w.dtype)
        return Adapter(nn.Linear(self.base.in_features, rank, **kw), nn.Linear(rank, self.base.out_features, **kw),
                       rank, alpha, rslora, dropout)

    def delta(self, x: Tensor, a: Tensor, b: Tensor, scale: float, dropout_p: float) -> Tensor:
        if dropout_p:
            x = nn.functional.dropout(x, dropout_p, training=True)
        return low_rank(x, a, b, scale)

    def forward_single(self, mix: Mix, x: Tensor) -> Tensor:
        groups = self.mix_weights(mix)
        if not groups:
            return self.base(x)
        (a, b, s, p), rest = groups[0], groups[1:]
        y = ops.lora_linear(x, self.base.weight, self.base.bias, a, b, s, dropout_p=p)
        for a, b, s, p in rest:
            y = y + self.delta(x, a, b, s, p)
        return y

    def forward_mixed(self, route: Route, x: Tensor) -> Tensor:
        routing = self.check_batch(route, x)
        weights = {s: self.mix_weights(route.slots[s]) for s in routing.present}
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for g in weights.values() for t, *_ in g))
        # One (A, B) per slot and no dropout: the stacked paths apply (a slot whose tasks skip this layer stacks zeros).
        one_group = all(len(g) <= 1 and (not g or g[0][3] == 0.0) for g in weights.values())
        if one_group and resolve(None, x, needs_grad) != "torch":
            a, b, scales, ranks, rows = self.stacks(route, routing, weights)
            return ops.lora_linear_mixed(x, self.base.weight, self.base.bias, a, b, scales, rows, ranks=ranks)
        y = self.base(x)
        rank = max([g[0][0].shape[0] for g in weights.values() if g] + [1])
        if one_group and gather_pays(routing, x, rank, self.base.out_features):
            # Many tasks: gathered stacks and two bmm beat a per-task loop of small ops.
            a, b, scales, _, rows = self.stacks(route, routing, weights)
            return gathered_delta(y, x, rows, a, b, scales)
        # Few tasks: per-slot weights as they are (no stacking, no rank padding).
        return self.add_slot_terms(y, x, routing, weights)
