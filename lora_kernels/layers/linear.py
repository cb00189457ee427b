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
    """Shape: x [B, ..., in] -> [B, ..., out]. ``A [r, in]``, ``B [out, r]``."""

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
            a, b, scales, ranks = self._stacks(route, weights, x)
            return ops.lora_linear_mixed(x, self.base.weight, self.base.bias, a, b, scales, routing, ranks=ranks)
        y = self.base(x)
        rank = max([g[0][0].shape[0] for g in weights.values() if g] + [1])
        if one_group and gather_pays(routing, x, rank, self.base.out_features):
            # Many tasks: gathered stacks and two bmm beat a per-task loop of small ops.
            a, b, scales, _ = self._stacks(route, weights, x)
            return gathered_delta(y, x, routing, a, b, scales)
        # Few tasks: per-slot weights as they are (no stacking, no rank padding).
        return self.add_slot_terms(y, x, routing, weights)

    def _stacks(self, route: Route, weights: dict, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Zero-padded ``A [T, r, in]``, ``B [T, out, r]``, ``scales [T]`` and true ``ranks [T]`` for the kernels.

        Slots absent from the batch (or from this layer) stay zero. Stacking copies the adapters, so
        without grad the stacks are cached on the layer, keyed by the route's slots and the
        parameters' version counters: steady-state inference copies nothing per forward.
        """
        grad = torch.is_grad_enabled() and any(t.requires_grad for g in weights.values() for t, *_ in g)
        # Under torch.compile the stacking is part of the graph; versions and ids are not traceable.
        cacheable = not grad and not torch.compiler.is_compiling()
        if cacheable:
            key, generation = route.slots, self._cache_generation
            versions = tuple((s, tuple((a._version, b._version, id(a), id(b)) for a, b, *_ in g)) for s, g in weights.items())
            hit = self._stack_cache.get(key)
            if hit is not None and hit[0] == versions:
                return hit[1]
        t = len(route.slots)
        r = max([g[0][0].shape[0] for g in weights.values() if g] + [1])
        w = self.base.weight
        a_rows, b_cols, scales, ranks = [], [], [], []
        for s in range(t):
            g = weights.get(s)
            if g:
                a, b, sc, _ = g[0]
                pad = r - a.shape[0]
                a_rows.append(nn.functional.pad(a, (0, 0, 0, pad)) if pad else a)
                b_cols.append(nn.functional.pad(b, (0, pad)) if pad else b)
                scales.append(sc)
                ranks.append(a.shape[0])
            else:
                a_rows.append(w.new_zeros(r, w.shape[1]))
                b_cols.append(w.new_zeros(w.shape[0], r))
                scales.append(0.0)
                ranks.append(0)
        stacks = (torch.stack(a_rows), torch.stack(b_cols), torch.tensor(scales, dtype=torch.float32, device=w.device),
                  torch.tensor(ranks, dtype=torch.int32, device=w.device))
        if cacheable:
            cache = dict(self._stack_cache)  # copy-on-write: safe against concurrent readers
            if len(cache) >= 8:  # a few distinct slot sets at most; oldest out
                cache.pop(next(iter(cache)))
            cache[key] = (versions, stacks)
            if generation == self._cache_generation:  # a task added/removed meanwhile: don't resurrect the old cache
                self._stack_cache = cache
        return stacks
