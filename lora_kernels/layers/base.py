"""The wrapper every adapted module becomes, and the per-task adapter it holds.

A :class:`LoRALayer` keeps the original module as ``base`` (untouched: same parameters, same
forward) and one adapter per task in ``adapters``. Built-in types (Linear, Embedding, Conv) hold
an :class:`Adapter` with ``lora_A`` / ``lora_B`` and compute ``base(x) + scale * B(A(dropout(x)))``
without ever materialising ``W + B·A``. Custom types registered with
:func:`lora_kernels.register_base_module_wrapper` hold whatever module their constructor builds;
that module computes the layer's whole output for its task (the seed's semantics).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..ops.reference import segmented_delta
from ..ops.routing import Routing
from .slots import LayerSlots
from .routing import Mix, Route, call_in_flight, current_route

INITS = ("paper", "gaussian", "kaiming_both")


class Adapter(nn.Module):
    """One task's low-rank pair for one layer: ``lora_A`` then ``lora_B``, scaled by ``scale``.

    The state-dict keys are ``lora_A.weight`` and ``lora_B.weight`` (PEFT's names).
    """

    def __init__(self, lora_a: nn.Module, lora_b: nn.Module, rank: int, alpha: float, rslora: bool, dropout: float):
        super().__init__()
        self.lora_A = lora_a
        self.lora_B = lora_b
        self.rank = rank
        self.alpha = float(alpha)
        self.rslora = bool(rslora)
        self.dropout = float(dropout)
        self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)

    def reset(self, init: str) -> None:
        """Initialise: ``paper`` (A Kaiming-uniform, B = 0), ``gaussian`` (A ~ N(0, 1/r), B = 0),
        ``kaiming_both`` (the seed's: both Kaiming-uniform, so the task starts away from the base)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.rank)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init == "kaiming_both":
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, rslora={self.rslora}, dropout={self.dropout:g}"


class TaskDict(nn.ModuleDict):
    """A ModuleDict that accepts any task name without '.', including names of Module methods.

    ``nn.ModuleDict`` refuses keys such as ``"double"`` or ``"train"`` because they shadow methods;
    tasks are only ever looked up by ``[name]``, so the check does not apply here.
    """

    def __setitem__(self, key: str, module: nn.Module) -> None:
        if not isinstance(key, str) or not key or "." in key:
            raise KeyError(f"invalid task name {key!r}")
        self._modules[key] = module


class LoRALayer(nn.Module):
    """Base class of the wrappers: ``base`` plus ``adapters[task]``, routed per call.

    Subclasses for built-in types implement :meth:`make_adapter`, :meth:`dims`, :meth:`delta`
    (the LoRA term for given ``A``, ``B``) and may override :meth:`forward_single` /
    :meth:`forward_mixed` with fused ops.
    """

    #: number of groups the rank is split into (grouped convs); 1 elsewhere.
    groups: int = 1
    #: the task folded into ``base``'s weights by :func:`lora_kernels.io.merge.merge` (set on every
    #: layer of the model while merged), or None.
    merged_task: str | None = None

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = TaskDict()
        self.path = ""  # set by Model: the module's path in the original model, for errors and keys
        # The tasks' storage when ``pooled`` (see layers/slots.py): one pool per (rank, dtype, device),
        # so every task's views are contiguous. The dict is replaced whole, never mutated: a call
        # reads one consistent snapshot.
        self._pools: dict[tuple, LayerSlots] = {}
        # rank -> slots reserved by a serving pool (lk.AdapterPool): that rank's storage is built with
        # exactly that capacity (not doubled), and kept (never shrunk or dropped) while tasks come and go.
        self._reserved: dict[int, int] = {}

    #: whether the tasks' A/B live in stacked storage (:class:`LayerSlots`) that the stacked
    #: kernels read directly. Set by the types whose mixed batches use stacks (Linear, Embedding).
    pooled: bool = False

    # --- task storage --------------------------------------------------------------------------
    @staticmethod
    def _kind(adapter: nn.Module) -> tuple:
        a = adapter.lora_A.weight
        return a.shape[0], a.dtype, a.device

    def pool_of(self, name: str) -> LayerSlots | None:
        """The pool holding task ``name``'s slot, or None (unpooled layer type)."""
        return next((p for p in self._pools.values() if name in p.index), None)

    def reserve_slots(self, rank: int, count: int) -> None:
        """Keep the storage of rank-``rank`` tasks at exactly ``count`` slots (``a [count, rank, K]``,
        ``b [count, N, rank]``): the serving pool (:class:`lora_kernels.AdapterPool`) bounds its device
        memory with it, and adding or removing tasks then never reallocates while at most ``count``
        tasks of that rank are held. More tasks than that still fit (the storage then grows as usual)."""
        self._reserved = {**self._reserved, int(rank): int(count)}

    def _capacity(self, rank: int, n: int) -> int:
        """Slots to allocate for ``n`` tasks of ``rank``: room to grow (doubling), or the reservation."""
        return max(self._reserved[rank], n) if rank in self._reserved else 2 * n

    def attach(self, name: str, adapter: nn.Module) -> None:
        """Add ``adapter`` as task ``name`` (its parameters move into a pool, values kept)."""
        self.commit(self.prepare(name, adapter))

    def prepare(self, name: str, adapter: nn.Module) -> tuple:
        """Everything of :meth:`attach` that can fail (allocating a bigger pool), changing nothing
        visible: the model prepares every layer, then commits them all (which cannot fail)."""
        if not self.pooled:
            return name, adapter, None, None, ()
        kind = self._kind(adapter)
        a, b = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
        old = self._pools.get(kind)
        pool = old.with_task(name, a, b) if old is not None else None
        if pool is not None:
            return name, adapter, kind, pool, (name,)
        # No free slot: a new pool with room to grow (doubling), built from copies of the live slots.
        live = [(n, *self._values(n)) for n in old.index] if old is not None else []
        pool = LayerSlots.build(live + [(name, a, b)], spare=self._capacity(kind[0], len(live) + 1) - len(live) - 1)
        return name, adapter, kind, pool, tuple(pool.index)

    def commit(self, plan: tuple) -> None:
        name, adapter, kind, pool, point = plan
        self.adapters[name] = adapter
        if pool is not None:
            self._point(pool, point)
            self._pools = {**self._pools, kind: pool}

    def detach(self, name: str) -> None:
        """Remove task ``name``; its parameters get storage of their own (an optimizer still holding
        them must never write into the slot a later task reuses), and a mostly free pool shrinks."""
        adapter = self.adapters[name]
        del self.adapters[name]
        if not self.pooled:
            return
        with torch.no_grad():
            for p in (adapter.lora_A.weight, adapter.lora_B.weight):
                p.data = p.data.clone()
        kind = next((k for k, p in self._pools.items() if name in p.index), None)
        if kind is None:
            return
        pool, pools = self._pools[kind], dict(self._pools)
        rest = [n for n in pool.index if n != name]
        if kind[0] in self._reserved:  # reserved storage stays (the next task of this rank reuses the slot)
            pools[kind] = pool.without_task(name)
        elif not rest:
            del pools[kind]
        elif len(rest) * 4 <= pool.capacity:  # mostly free: give the memory back
            pools[kind] = LayerSlots.build([(n, *self._values(n)) for n in rest], spare=len(rest))
            self._point(pools[kind], rest)
        else:
            pools[kind] = pool.without_task(name)
        self._pools = pools

    def _repool(self) -> None:
        """Rebuild every pool from the parameters' current values and point them into it."""
        if not self.pooled:
            return
        groups: dict[tuple, list] = {}
        for n, ad in self.adapters.items():
            groups.setdefault(self._kind(ad), []).append((n, ad.lora_A.weight.detach(), ad.lora_B.weight.detach()))
        pools = {kind: LayerSlots.build(live, spare=self._capacity(kind[0], len(live)) - len(live)) for kind, live in groups.items()}
        for pool in pools.values():
            self._point(pool, list(pool.index))
        self._pools = pools

    def _values(self, name: str) -> tuple[Tensor, Tensor]:
        # The parameters' current values: a parameter rebound away from its slot (p.data = ...)
        # holds the newer value, so a rebuilt pool copies from the parameters, never the old slots.
        ad = self.adapters[name]
        return ad.lora_A.weight.detach(), ad.lora_B.weight.detach()

    def _point(self, pool: LayerSlots, names) -> None:
        with torch.no_grad():
            for n in names:
                ad = self.adapters[n]
                va, vb = pool.views(n)
                ad.lora_A.weight.data = va
                ad.lora_B.weight.data = vb

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .half() give each parameter new storage: rebuild the pools from them.
        out = super()._apply(fn, recurse)
        self._repool()
        return out

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_pools"] = {}  # rebuilt from the parameters on load (deepcopy clones them one by one)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._repool()

    def __getattr__(self, name: str) -> Any:
        """Transparent wrapper: any attribute of the base module reads through (``.weight``,
        ``.stride``, ``.in_features``, ...), as code that inspects the original model expects."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "_modules", "_parameters", "_buffers"):  # not built yet (init, unpickling)
                raise
            return getattr(self.base, name)

    # --- built by subclasses -------------------------------------------------------------------
    def dims(self) -> tuple[int, int]:
        """(in, out) sizes that bound the rank."""
        raise NotImplementedError

    def make_adapter(self, rank: int, alpha: float, rslora: bool, dropout: float) -> Adapter:
        raise NotImplementedError

    def delta(self, x: Tensor, a: Tensor, b: Tensor, scale: float, dropout_p: float) -> Tensor:
        """The LoRA term ``scale * B(A(dropout(x)))`` for weights ``a``, ``b`` (any rank)."""
        raise NotImplementedError

    def default_rank(self) -> int:
        """The seed's rule: ``int(sqrt(min(in, out)))``, rounded up to a multiple of the groups."""
        r = max(1, int(math.sqrt(min(self.dims()))))
        return -(-r // self.groups) * self.groups

    def check_rank(self, rank: int) -> None:
        """A positive int (a multiple of the groups). Ranks above ``min(in, out)`` are allowed, as in
        PEFT (a 2-label head, a 3-channel patch conv), with a warning: they add no expressiveness."""
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank {rank!r} out of range for layer '{self.path}': a positive int")
        if rank > min(self.dims()):
            warnings.warn(f"rank {rank} for layer '{self.path}' exceeds min of its in/out sizes {self.dims()}: the extra "
                          "rank adds parameters but no expressiveness", stacklevel=4)
        if rank % self.groups:
            raise ValueError(f"rank {rank} for layer '{self.path}' must be a multiple of its groups ({self.groups})")

    # --- weights of a mix ----------------------------------------------------------------------
    def mix_weights(self, mix: Mix) -> list[tuple[Tensor, Tensor, float, float]]:
        """``[(A, B, scale, dropout_p), ...]`` computing the weighted sum of the mix's tasks.

        Tasks are concatenated along the rank (``A = [A_a; A_b]``, ``B = [w_a s_a B_a, w_b s_b B_b]``,
        scale 1), so a mix costs one LoRA call; tasks whose dropout differs (in training) get
        their own group so each keeps its own mask. A single task with weight 1 returns its own
        parameters untouched (no copy).
        """
        present = [(self.adapters[n], w) for n, w in mix if n in self.adapters]
        if not present:
            return []
        p_of = (lambda ad: ad.dropout) if self.training else (lambda ad: 0.0)
        if len(present) == 1 and present[0][1] == 1.0:
            ad = present[0][0]
            return [(ad.lora_A.weight, ad.lora_B.weight, ad.scale, p_of(ad))]
        groups: dict[float, list] = {}
        for ad, w in present:
            groups.setdefault(p_of(ad), []).append((ad, w))
        out = []
        for p, members in groups.items():
            if len(members) == 1:
                ad, w = members[0]
                out.append((ad.lora_A.weight, ad.lora_B.weight, ad.scale * w, p))
                continue
            g = self.groups
            # Grouped layers keep each group's rank channels together: [group j: task 1's, task 2's, ...].
            a = torch.cat([ad.lora_A.weight.unflatten(0, (g, -1)) for ad, _ in members], dim=1).flatten(0, 1)
            b = torch.cat([ad.lora_B.weight * (ad.scale * w) for ad, w in members], dim=1)
            out.append((a, b, 1.0, p))
        return out

    # --- forward -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        route = current_route()
        if self.merged_task is not None:  # the base weights already hold that task: never add it again
            check_merged_route(route, self.merged_task, self.path)
            return self.base(*args, **kwargs)
        if route is None or not self.adapters:
            if route is None and self.adapters and not call_in_flight() and torch._C._current_graph_task_id() != -1:
                raise RuntimeError(
                    f"layer '{self.path}' is being recomputed in backward (activation checkpointing) outside any model "
                    "call, so which task ran is unknown. Enable checkpointing with model.gradient_checkpointing_enable() "
                    "(it keeps the routing), or call backward inside `with model.using(task=...)` with the forward's task.")
            return self.base(*args, **kwargs)
        if route.mix is not None:
            return self.forward_single(route.mix, *args, **kwargs)
        if not any(n in self.adapters for n in route.task_names()):
            return self.base(*args, **kwargs)  # none of the call's tasks adapts this layer: nothing to route
        if args and isinstance(args[0], Tensor):
            args, route = self.batch_rows(route, args[0], args[1:])
        return self.forward_mixed(route, *args, **kwargs)

    def batch_rows(self, route: Route, x: Tensor, rest: tuple) -> tuple[tuple, Route]:
        """Map ``x``'s dim 0 to the samples of a per-sample route, by this layer's learnt layout.

        ``batch``: dim 0 is ``B`` or ``B * block`` (batch-major) and rows follow their sample;
        ``broadcast``: dim 0 is 1 (position ids): ``x`` is expanded to the batch, so the output
        holds each sample's own delta; ``unbatched``: 1-D ids with no batch dim get one (output
        ``[B, S, H]`` where the model broadcasts ``[S, H]``); anything else raises rather than guess.
        """
        kinds = frozenset({"batch"}) if route.layout is None else route.layout.get(self.path, frozenset())
        # route.layout None: a route built without the Model's probe (torch.compile, direct use):
        # every layer's dim 0 is then the batch by contract.
        b, d = route.batch, (x.shape[0] if x.dim() else 0)
        if kinds & {"fixed", "varies"}:
            pass  # refused below: rows cannot be told apart from a coincidence
        elif "broadcast" in kinds and d == 1:
            return (x.expand(b, *x.shape[1:]), *rest), route
        elif "unbatched" in kinds and x.dim() == 1 and not x.is_floating_point():
            return (x.unsqueeze(0).expand(b, d), *rest), route
        elif "batch" in kinds and d and d % b == 0:
            block = d // b
            return (x, *rest), route if block == 1 else Route(slots=route.slots, routing=route.rows_routing(block),
                                                              layout=route.layout, _blocks=route._blocks)
        kind = "+".join(sorted(kinds)) or "unknown"
        raise ValueError(unroutable_message([self.path], route, f"got input of shape {tuple(x.shape)} (layout: {kind})"))

    def forward_single(self, mix: Mix, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = self.base(x, *args, **kwargs)
        for a, b, s, p in self.mix_weights(mix):
            y = y + self.delta(x, a, b, s, p)
        return y

    def check_batch(self, route: Route, x: Tensor) -> Routing:
        if x.dim() == 0 or x.shape[0] != route.batch:
            raise ValueError(f"layer '{self.path}' ({type(self.base).__name__}) got input of shape {tuple(x.shape)}: a per-sample "
                             f"task list needs dim 0 to be the batch ({route.batch} samples) in every adapted layer")
        return route.routing.to(x.device)

    def forward_mixed(self, route: Route, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Base output for all rows, then each slot's LoRA term added into its rows only."""
        routing = self.check_batch(route, x)
        y = self.base(x, *args, **kwargs)
        return self.add_slot_terms(y, x, routing, {s: self.mix_weights(route.slots[s]) for s in routing.present})

    def stacks(self, route: Route, routing: Routing, weights: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Routing]:
        """Zero-padded ``A [T, r, ...]``, ``B [T, out, r, ...]``, ``scales [T]``, true ``ranks [T]``
        and the routing whose ids index them.

        For the kernels and the gathered CPU paths (Linear: ``A [T, r, in]``, ``B [T, out, r]``;
        Embedding: ``A [T, r, num]``, ``B [T, dim, r]``); ``weights`` is one ``(A, B, scale, p)``
        per present slot (:meth:`mix_weights`), empty for a slot whose tasks skip this layer.

        Inference on tasks that live in the pool gets the pool itself (no copy, live weights) and a
        routing from slots to pool slots; otherwise (training, mixes of several tasks in one slot,
        a parameter that cannot be re-adopted, torch.compile) the stacks are built from the
        parameters for this call (differentiable), indexed by the route's slots.
        """
        got = self._pool_stacks(route, routing, weights)
        if got is not None:
            return got
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
                a_rows.append(w.new_zeros(r, self.dims()[0]))
                b_cols.append(w.new_zeros(self.dims()[1], r))
                scales.append(0.0)
                ranks.append(0)
        return (torch.stack(a_rows), torch.stack(b_cols), torch.tensor(scales, dtype=torch.float32, device=w.device),
                torch.tensor(ranks, dtype=torch.int32, device=w.device), routing)

    def _pool_stacks(self, route: Route, routing: Routing, weights: dict) -> tuple | None:
        """The pool as the stacks of this call, or None when it cannot serve it (see :meth:`stacks`)."""
        if not self._pools or torch.compiler.is_compiling():
            return None
        pools = self._pools
        grad = torch.is_grad_enabled()
        pool, mapping, pairs = None, [], {}
        for s, mix in enumerate(route.slots):
            present = [(n, w) for n, w in mix if n in self.adapters]
            if s not in weights or not present:
                mapping.append(-1)  # absent from the batch, or its tasks skip this layer: no delta
                continue
            if len(present) != 1:
                return None  # a weighted sum of tasks in one slot is a rank concatenation: built per call
            name, w = present[0]
            ad = self.adapters[name]
            a, b = ad.lora_A.weight, ad.lora_B.weight
            if grad and (a.requires_grad or b.requires_grad):
                return None  # training: the stacks must carry gradients to the parameters
            mine = pools.get(self._kind(ad))
            if mine is None or name not in mine.index or (pool is not None and mine is not pool):
                return None  # tasks of different ranks (or dtypes) in one batch: stacked per call
            pool = mine
            if not pool.holds(name, a, b) and not self._readopt(pool, name, a, b):
                return None
            slot, scale = pool.index[name], ad.scale * w
            if pairs.setdefault(slot, scale) != scale:
                return None  # one task at two weights in one batch: two slots needed
            mapping.append(slot)
        if pool is None:
            return None
        mapping = tuple(mapping)
        # Depends on the slot layout only: layers whose pools share it (tasks added in the same
        # order, the usual case) share one remapped routing per batch.
        pooled = routing.cached(("pool", mapping, pool.capacity), lambda: _remap(routing, mapping, pool.capacity))
        return pool.a, pool.b, pool.scales(tuple(sorted(pairs.items()))), pool.ranks, pooled

    @staticmethod
    def _readopt(pool: LayerSlots, name: str, a: Tensor, b: Tensor) -> bool:
        """Copy a parameter rebound away from its slot (``p.data = ...``, ``vector_to_parameters``)
        back into the slot and point it there. Only plain tensors of the pool's dtype and device;
        anything else (a DTensor of FSDP, a cast adapter) is left alone and stacked per call."""
        va, vb = pool.views(name)
        for p, v in ((a, va), (b, vb)):
            if type(p.data) is not torch.Tensor or p.dtype != v.dtype or p.device != v.device or p.shape != v.shape:
                return False
        with torch.no_grad():
            for p, v in ((a, va), (b, vb)):
                v.copy_(p.data)  # (a no-op copy when p already is the view)
                p.data = v
        return pool.holds(name, a, b)

    def add_slot_terms(self, y: Tensor, x: Tensor, routing: Routing, slot_weights: dict[int, list]) -> Tensor:
        """Add each present slot's LoRA term (from its :meth:`mix_weights`) into its rows of ``y``."""

        def delta(s: int, xs: Tensor) -> Tensor:
            terms = [self.delta(xs, a, b, sc, p) for a, b, sc, p in slot_weights[s]]
            if not terms:  # none of this slot's tasks adapts this layer
                return y.new_zeros((xs.shape[0], *y.shape[1:]))
            return sum(terms[1:], terms[0])

        return segmented_delta(y, x, routing, delta)


def unroutable_message(paths: list[str], route: Route, detail: str = "") -> str:
    """The error for layers whose dim 0 cannot be mapped to the samples of a per-sample task list."""
    return (f"a per-sample task list ({route.batch} samples) cannot be routed through layer(s) {paths}{': ' + detail if detail else ''}. "
            "Their input's dim 0 is not the batch (e.g. T5's relative-attention bias sees [q, k]; MoE experts see a "
            "router's picks). Ways out: add the tasks without these layers (add_task(..., modules=[...])), pass "
            "explicit per-sample position_ids= where a position embedding is meant, or run one call per task.")


def check_merged_route(route: Route | None, merged: str, path: str) -> None:
    """While ``merged`` is folded into the base weights, only calls that select exactly that task
    (or no task: the merged base) can run; anything else would apply it twice or need it removed."""
    if route is None or route.mix == ((merged, 1.0),):
        return
    asked = route.mix if route.mix is not None else "a per-sample task list"
    raise RuntimeError(f"layer '{path}': task {merged!r} is merged into the base weights, so only task={merged!r} (or no "
                       f"task) can run; got {asked}. Call unmerge() first to use other tasks, mixes or per-sample lists.")


class CustomLayer(LoRALayer):
    """A registered custom type: ``adapters[task]`` is built by the user's constructor from the base
    module and computes the whole output for its task. Mixes and per-sample batches combine those
    outputs (``base + sum_t w_t (f_t(x) - base(x))``; per-sample: one call per slot segment)."""

    def __init__(self, base: nn.Module, constructor: Callable[[nn.Module], nn.Module]):
        super().__init__(base)
        self.constructor = constructor

    def own_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """The task module's parameters that are not the base module's (those stay the base's)."""
        shared = {id(p) for p in self.base.parameters()}
        return [(k, p) for k, p in self.adapters[name].named_parameters() if id(p) not in shared]

    def own_state(self, name: str, keep_vars: bool = False) -> dict[str, Tensor]:
        return self.own_state_of(self.adapters[name], keep_vars)

    def own_state_of(self, module: nn.Module, keep_vars: bool = True) -> dict[str, Tensor]:
        """``module``'s state entries that are not the base module's (those stay the base's)."""
        shared = {id(t) for t in self.base.state_dict(keep_vars=True).values()}
        return {k: v if keep_vars else v.detach() for k, v in module.state_dict(keep_vars=True).items() if id(v) not in shared}

    def forward_single(self, mix: Mix, *args: Any, **kwargs: Any) -> Any:
        present = [(self.adapters[n], w) for n, w in mix if n in self.adapters]
        if len(present) == 1 and present[0][1] == 1.0:
            return present[0][0](*args, **kwargs)
        y = base = self.base(*args, **kwargs)
        for module, w in present:
            y = y + w * (module(*args, **kwargs) - base)
        return y

    def forward_mixed(self, route: Route, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        routing = self.check_batch(route, x)
        y = self.base(*args, **kwargs)
        if not isinstance(y, Tensor):
            raise TypeError(f"layer '{self.path}': per-sample task lists need the custom module to return a tensor, got {type(y).__name__}")
        batch = x.shape[0]

        def take(v, rows):
            return v.index_select(0, rows) if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch else v

        parts = []
        for s in routing.present:
            rows = routing.rows(s)
            sub_args = [take(v, rows) for v in args]
            sub_kwargs = {k: take(v, rows) for k, v in kwargs.items()}
            parts.append(self.forward_single(route.slots[s], *sub_args, **sub_kwargs))
        if not parts:
            return y
        return y.index_copy(0, routing.active_rows, torch.cat(parts).to(y.dtype))


def _remap(routing: Routing, mapping: tuple[int, ...], capacity: int) -> Routing:
    """``routing`` (ids = the route's slots) re-expressed with pool slots as ids: slot ``s`` ->
    ``mapping[s]`` (``-1``: no delta). Counts on the host from the routing's; no device sync."""
    lut = torch.tensor((-1, *mapping), dtype=torch.int64, device=routing.task_ids.device)
    ids = lut.index_select(0, routing.task_ids + 1)
    counts = [routing.starts[0]] + [0] * capacity
    for s, c in enumerate(routing.counts):
        counts[mapping[s] + 1] += c
    new = Routing.__new__(Routing)
    new.task_ids = ids
    new.order = torch.sort(ids, stable=True).indices
    new._set_counts(capacity, counts)
    return new
