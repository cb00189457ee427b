"""A layer's task slots (:class:`LayerSlots`): one layer's tasks stored in one stacked tensor pair, each task's parameters a view.

A mixed-task batch needs every task's ``A`` and ``B`` as one stack (``A [T, r, K]``,
``B [T, N, r]``) for the segmented kernels. Copying the adapters into a stack per call costs a
copy of every adapter per forward; caching that copy goes stale when a weight is written by a
route that leaves no trace (``p.data = ...``, ``vector_to_parameters``, writes through ``.data``).
So the stack *is* the storage: the pool holds

    a [cap, r_cap, K]     b [cap, N, r_cap]     (zero outside each task's own rank)

and each task's ``lora_A.weight`` / ``lora_B.weight`` is a view of its slot (``a[i, :r]``,
``b[i, :, :r]``). In-place writes, optimizer steps, ``load_state_dict`` and checkpoint loads
write the pool itself, so the kernels read live weights and steady-state inference copies nothing.

Whether a parameter still lives in its slot is checked per call by identity (same storage, same
offset, same strides, dtype and device: :meth:`LayerSlots.holds`), never by a version counter or a
cache key. A parameter rebound away from its slot (``p.data = new``, ``vector_to_parameters``, an
FSDP/DDP storage swap, ``.to()`` of one adapter) fails the check; the caller then re-adopts it
(copies it back into the slot and points it there: inference only) or builds the stacks from the
parameters for that call (training: the stack must be differentiable anyway).

A layer keeps one pool per rank (and dtype/device), so every view is contiguous and dense
(``p.view(-1)``, ``parameters_to_vector``, DDP buckets and safetensors all accept it). A mixed
batch whose tasks have different ranks at a layer therefore stacks per call (a copy); serving many
tasks at one rank reads the pool. (Padding all ranks into one pool would make ``B``'s views
strided, which ``parameters_to_vector`` and ``p.view`` reject.)

A pool object is immutable once published: adding or removing a task builds a new one (sharing
the storage when it still fits) and swaps the layer's pool table in one assignment, so a call reads one
consistent snapshot.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

__all__ = ["LayerSlots"]


class LayerSlots:
    """Slots of one layer's tasks. Shape: ``a [cap, r_cap, *a_tail]``, ``b [cap, N, r_cap]``.

    ``index[task] -> slot``; ``ranks [cap]`` int32 (0 for free slots) on the pool's device.
    """

    __slots__ = ("a", "b", "index", "ranks", "host_ranks", "_scales", "_sig")

    def __init__(self, a: Tensor, b: Tensor, index: dict[str, int]):
        self.a, self.b, self.index = a, b, index
        ranks = [0] * a.shape[0]
        self.ranks = ranks  # filled by the builders below, turned into a tensor once
        self._scales: dict = {}

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, weights: Iterable[tuple[str, Tensor, Tensor]], spare: int = 0) -> "LayerSlots | None":
        """A fresh pool holding copies of ``(task, A [r, K], B [N, r])``, with ``spare`` free slots.

        Returns None when there is nothing to hold or the tasks' dtypes/devices/shapes differ
        (the layer then stacks per call; nothing is wrong, only slower).
        """
        weights = list(weights)
        if not weights:
            return None
        a0, b0 = weights[0][1], weights[0][2]
        same = all(a.dtype == a0.dtype and b.dtype == a0.dtype and a.device == a0.device and b.device == a0.device
                   and a.shape[1:] == a0.shape[1:] and b.shape[0] == b0.shape[0] and a.dim() == 2 and b.dim() == 2
                   for _, a, b in weights)
        if not same:
            return None
        r_cap = max(a.shape[0] for _, a, _ in weights)
        cap = len(weights) + spare
        pool = cls(a0.new_zeros(cap, r_cap, *a0.shape[1:]), a0.new_zeros(cap, b0.shape[0], r_cap), {})
        with torch.no_grad():
            for slot, (name, a, b) in enumerate(weights):
                r = a.shape[0]
                pool.a[slot, :r].copy_(a)
                pool.b[slot, :, :r].copy_(b)
                pool.index[name] = slot
                pool.ranks[slot] = r
        pool._freeze()
        return pool

    def with_task(self, name: str, a: Tensor, b: Tensor) -> "LayerSlots | None":
        """A pool that also holds ``name`` (reusing this storage when a slot is free and the rank
        fits, else None: the caller rebuilds with :meth:`build`). Does not touch live slots."""
        r = a.shape[0]
        if (a.dtype != self.a.dtype or a.device != self.a.device or a.shape[1:] != self.a.shape[2:]
                or b.shape[0] != self.b.shape[1] or r > self.a.shape[1]):
            return None
        used = set(self.index.values())
        free = next((s for s in range(self.a.shape[0]) if s not in used), None)
        if free is None:
            return None
        with torch.no_grad():  # the free slot is referenced by no task in any published pool
            self.a[free].zero_()
            self.b[free].zero_()
            self.a[free, :r].copy_(a)
            self.b[free, :, :r].copy_(b)
        new = LayerSlots(self.a, self.b, {**self.index, name: free})
        new.ranks = [0] * self.a.shape[0]
        for n, s in new.index.items():
            new.ranks[s] = r if n == name else self.host_ranks[s]
        new._freeze(self._sig)
        return new

    def without_task(self, name: str) -> "LayerSlots":
        new = LayerSlots(self.a, self.b, {n: s for n, s in self.index.items() if n != name})
        new.ranks = [0] * self.a.shape[0]
        for n, s in new.index.items():
            new.ranks[s] = self.host_ranks[s]
        new._freeze(self._sig)
        return new

    def _freeze(self, known: dict | None = None) -> None:
        """Publish: host and device ranks, and each task's view signature (``known``: the signatures
        of a pool on the same storage, reused for the tasks it holds, so adding or removing one task
        costs one signature, not one per slot: a serving pool swaps tasks on every miss)."""
        # Ranks on the host for the per-call checks (no device sync), and on the device for the kernels.
        self.host_ranks = tuple(self.ranks)
        self.ranks = torch.tensor(self.host_ranks, dtype=torch.int32, device=self.a.device)
        # Each slot view's address, shape and strides, for the per-call identity check (:meth:`holds`).
        known = known or {}
        self._sig = {}
        for n in self.index:
            sig = known.get(n)
            if sig is None:
                va, vb = self.views(n)
                sig = (va.data_ptr(), va.shape, va.stride(), vb.data_ptr(), vb.shape, vb.stride())
            self._sig[n] = sig

    @property
    def capacity(self) -> int:
        return self.a.shape[0]

    # --- views ---------------------------------------------------------------------------------
    def views(self, name: str) -> tuple[Tensor, Tensor]:
        """Task ``name``'s slot: ``(a[i, :r], b[i, :, :r])``."""
        slot = self.index[name]
        r = self.host_ranks[slot]
        return self.a[slot, :r], self.b[slot, :, :r]

    def holds(self, name: str, a: Tensor, b: Tensor) -> bool:
        """Whether ``a`` and ``b`` are exactly the slot views of ``name``: same address, shape,
        strides and dtype. An identity check, not a cache key: the pool keeps its storage alive, so
        no other memory can have that address, and a rebound parameter always fails it. A few
        attribute reads per task and call (no tensor is created)."""
        sig = self._sig.get(name)
        if sig is None or a.dtype != self.a.dtype or b.dtype != self.a.dtype or a.device != self.a.device:
            return False
        try:
            return (a.data_ptr(), a.shape, a.stride(), b.data_ptr(), b.shape, b.stride()) == sig
        except RuntimeError:  # tensor subclasses without storage (a DTensor of FSDP2, fake tensors)
            return False

    def scales(self, pairs: tuple[tuple[int, float], ...]) -> Tensor:
        """``scales [cap]`` float32: ``scale`` at each ``(slot, scale)`` of ``pairs``, 0 elsewhere.

        A pure function of ``pairs`` (Python numbers), so keeping it costs no staleness; a handful
        of distinct selections are kept (a small tensor each), then the oldest goes.
        """
        hit = self._scales.get(pairs)
        if hit is None:
            values = [0.0] * self.capacity
            for slot, scale in pairs:
                values[slot] = scale
            hit = torch.tensor(values, dtype=torch.float32, device=self.a.device)
            if len(self._scales) >= 16:
                self._scales.clear()  # (not LRU: concurrent callers may race on one entry, never on a value)
            self._scales[pairs] = hit
        return hit

