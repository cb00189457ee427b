"""``Model``: wrap any ``nn.Module``, hold many named LoRA tasks, route each call to them."""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from .layers import CustomLayer, LoRALayer, wrapper_for
from .layers.base import INITS
from .layers.base import unroutable_message
from .layers.routing import Mix, Route, current_route, routed
from .ops.routing import Routing
from .validation import is_num, refuse, stage, state_errors

__all__ = ["Model", "TaskConfig"]

# Guards the in-flight call counts of every Model (module-level: a lock on the model would make it
# impossible to deepcopy or pickle). Held for microseconds per call, and by state changes for the
# duration of their writes (so no call starts half-way through one). Re-entrant: a load may create
# a task inside its change.
_TASKS_LOCK = threading.RLock()
_ALL = ""  # the in-flight key counting every call (task names are never empty)
_MAX_SCALE = 1e30  # far above any real alpha / rank, far below float32's 3.4e38
# Serialises layout probes (they switch the model to eval mode for two small forwards).
_PROBE_LOCK = threading.RLock()
_PROBING: contextvars.ContextVar = contextvars.ContextVar("lora_kernels_probe", default=None)
# Inputs a layout probe does not slice or pass: a KV cache (the probe runs without one) and
# cache positions (dim 0 is the sequence, not the batch).
_PROBE_DROP = ("cache", "past_key_values", "past_key_value", "cache_position", "use_cache", "encoder_outputs")


@dataclass
class TaskConfig:
    """How a task was made: per-layer ranks and alphas (by module path), dropout, rsLoRA, init."""

    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    rslora: bool = False
    init: str = "paper"


def _rule(value, path: str, default):
    """Resolve an int/float-or-mapping option for one layer."""
    if isinstance(value, Mapping):
        return value.get(path, default)
    return default if value is None else value


class Model(nn.Module):
    """Any ``nn.Module`` with LoRA tasks; see the README for the tour.

    Wrapping is lazy: each module of a registered type (``nn.Linear``, ``nn.Embedding``,
    ``nn.Conv1d/2d/3d`` and whatever :func:`register_base_module_wrapper` added) is replaced by a
    wrapper holding it as ``base``, and its sub-graph is left alone. Parameters and buffers of the
    original model stay the same objects, so an optimizer built on them keeps working.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"lora_kernels.Model wraps a torch.nn.Module, got {type(model).__name__}")
        self._layers: dict[str, LoRALayer] = {}
        self._tasks: dict[str, TaskConfig] = {}
        self._in_flight: dict[str, int] = {}  # task -> calls running with it (remove_task refuses those)
        self._skipped: list[str] = []  # subclasses of adaptable types left alone (their forward may differ)
        self._experts: list[str] = []  # MoE experts stored as 3-D parameters (no LoRA)
        # Per-sample routing: the dim-0 layouts each layer showed (see layers.routing.LAYOUTS), learnt
        # by a probe per input signature (_probed); shared with every per-sample Route.
        self._layout: dict[str, frozenset] = {}
        self._probed: set = set()
        self.model = self._wrap(model, "", {})
        if self._skipped:
            warnings.warn(f"lora_kernels.Model leaves {self._skipped} without LoRA: subclasses of Linear/Embedding/Conv "
                          "may compute something else than their parent. If their math is the parent's, register them "
                          "with lk.register_base_module_wrapper(TheType, lk.layers.LoRALinear) (or LoRAEmbedding, ...).",
                          stacklevel=2)
        # Learn the layout of a per-sample call at the first call into the wrapped model (also from
        # pipelines and transformers' generate inside `using`).
        self.model.register_forward_pre_hook(self._pre_call, with_kwargs=True)
        # Paths (with repeats for shared modules) where a wrapper sits: used to map state-dict keys.
        self._wrapper_paths = frozenset(p for p, m in self.model.named_modules(remove_duplicate=False) if isinstance(m, LoRALayer))
        if not self._layers:
            warnings.warn("lora_kernels.Model found no module it can adapt (nn.Linear, nn.Embedding, nn.ConvNd or a "
                          "registered type); tasks will not change the outputs", stacklevel=2)

    def _wrap(self, module: nn.Module, path: str, memo: dict[int, nn.Module]) -> nn.Module:
        if id(module) in memo:  # a module shared between two places gets one wrapper
            return memo[id(module)]
        factory = wrapper_for(module)
        if factory is not None:
            wrapper = memo[id(module)] = factory(module)
            wrapper.path = path
            self._layers[path] = wrapper
            return wrapper
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            self._skipped.append(f"{path} ({type(module).__name__})")
            return module
        if "expert" in type(module).__name__.lower() and any(p.dim() == 3 for p in module.parameters(recurse=False)):
            self._experts.append(path)
        if isinstance(module, nn.MultiheadAttention):
            warnings.warn(f"'{path or type(module).__name__}' (nn.MultiheadAttention) is left without LoRA: it reads "
                          "out_proj.weight directly, so wrapping out_proj would silently do nothing. Register a wrapper "
                          "for nn.MultiheadAttention to adapt it.", stacklevel=3)
            return module
        for name, child in list(module._modules.items()):
            if child is not None:
                new = self._wrap(child, f"{path}.{name}" if path else name, memo)
                if new is not child:
                    module._modules[name] = new
        return module

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) is a new model with no calls running: copying the in-flight
        # counts of a call in progress would make the copy refuse remove_task forever.
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_in_flight"] = {}
        return state

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # e.g. a transformers model's .config

    # --- tasks -----------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """Task names, in insertion order."""
        return list(self._tasks)

    @property
    def layers(self) -> dict[str, LoRALayer]:
        """The adapted layers by their path in the original model."""
        return dict(self._layers)

    @property
    def merged_task(self) -> str | None:
        """The task folded into the base weights by :meth:`merge`, or None."""
        return next((layer.merged_task for layer in self._layers.values() if layer.merged_task is not None), None)

    def task_config(self, task: str) -> TaskConfig:
        self._check_task(task)
        return self._tasks[task]

    def _check_task(self, task: Any) -> None:
        if not isinstance(task, str):
            raise TypeError(f"a task name is a str, got {type(task).__name__}: {task!r}")
        if task not in self._tasks:
            raise ValueError(f"unknown task {task!r}; known tasks: {self.tasks}")

    def add_task(self, name: str, rank: int | Mapping[str, int] | None = None, alpha: float | Mapping[str, float] | None = None,
                 dropout: float = 0.0, init: str = "paper", rslora: bool = False, modules: Iterable[str] | None = None,
                 weights: Mapping[str, Tensor] | None = None) -> "Model":
        """Add a task to every adapted layer (or to ``modules``, a list of layer paths). Returns self.

        ``rank``: an int, a mapping from layer path to int, or None for the seed's rule
        ``int(sqrt(min(in, out)))`` per layer. ``alpha``: scale = alpha / rank (``rslora``:
        alpha / sqrt(rank)); None gives scale 1. ``init``: ``paper`` (B = 0: the task starts equal to
        the base model), ``gaussian`` or ``kaiming_both`` (the seed's). ``weights``: the task's
        initial values under its state-dict keys (exactly its key set; floating point, cast); they
        are written before the task becomes visible, so no call ever sees it half-made. Nothing
        changes if it fails.
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"invalid task name {name!r}: a non-empty str without '.'")
        if name in self._tasks:
            raise ValueError(f"task {name!r} already exists; remove_task it first or pick another name. Tasks: {self.tasks}")
        if not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        if not isinstance(rslora, bool):
            raise TypeError(f"rslora must be a bool, got {rslora!r}")
        paths = self._default_paths() if modules is None else list(modules)
        if self._experts:
            warnings.warn(f"MoE experts stored as 3-D parameters at {self._experts} get no LoRA from this task (only "
                          "nn.Linear-style modules are adapted).", stacklevel=2)
        unknown = [p for p in paths if p not in self._layers]
        if unknown:
            raise ValueError(f"unknown module path(s) {unknown}; adapted layers: {list(self._layers)}")
        for option, value in (("rank", rank), ("alpha", alpha)):
            if isinstance(value, Mapping):
                extra = [p for p in value if p not in paths]
                if extra:
                    raise ValueError(f"{option} mapping names module path(s) {extra} that this task does not adapt")

        config = TaskConfig(dropout=float(dropout), rslora=rslora, init=init)
        built: list[tuple[LoRALayer, nn.Module]] = []
        for path in paths:  # validate and build everything before attaching anything
            layer = self._layers[path]
            if isinstance(layer, CustomLayer):
                built.append((layer, layer.constructor(layer.base)))
                continue
            r = _rule(rank, path, layer.default_rank())
            layer.check_rank(r)
            a = _rule(alpha, path, math.sqrt(r) if rslora else r)
            if not is_num(a) or a == 0:
                raise ValueError(f"alpha for layer '{path}' must be a finite non-zero number, got {a!r}")
            scale = float(a) / (math.sqrt(r) if rslora else r)
            if not abs(scale) <= _MAX_SCALE:  # fp32 scales would overflow and every forward would fail
                raise ValueError(f"alpha {a!r} for layer '{path}' gives scale {scale:g}; |scale| must be at most {_MAX_SCALE:g}")
            adapter = layer.make_adapter(r, float(a), rslora, float(dropout))
            adapter.reset(init)
            config.ranks[path], config.alphas[path] = r, float(a)
            built.append((layer, adapter))
        if weights is not None:
            self._fill(name, built, weights)
        with _TASKS_LOCK:  # two threads adding the same name: exactly one wins
            if name in self._tasks:
                raise ValueError(f"task {name!r} already exists; remove_task it first or pick another name. Tasks: {self.tasks}")
            plans = [layer.prepare(name, adapter) for layer, adapter in built]  # may fail (memory): nothing changed yet
            for (layer, _), plan in zip(built, plans):
                layer.commit(plan)
            self._tasks[name] = config  # published last: calls see the task only once every layer has it
        return self

    def _fill(self, name: str, built: list, weights: Mapping[str, Tensor]) -> None:
        """Validate ``weights`` against the not-yet-attached adapters of ``built`` and copy them in."""
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping of state-dict keys to tensors, got {type(weights).__name__}")
        targets = {}
        for layer, adapter in built:
            own = layer.own_state_of(adapter) if isinstance(layer, CustomLayer) else adapter.state_dict(keep_vars=True)
            for k, v in own.items():
                targets[f"{layer.path}.{k}" if layer.path else k] = v
        self._validate_state(weights, targets, True, f"new task {name!r}")
        with torch.no_grad():
            for k, t in targets.items():
                t.copy_(weights[k])

    def _default_paths(self) -> list[str]:
        """Every adapted layer except those whose weight another module also holds (tied input and
        output embeddings): folding a delta into that tensor would change the other module too, and
        PEFT leaves them out by default as well. ``modules=`` adapts them explicitly."""
        owners: dict[int, set[int]] = {}
        for m in self.model.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), set()).add(id(m))
        tied = [p for p, layer in self._layers.items()
                if isinstance(getattr(layer.base, "weight", None), Tensor) and len(owners.get(id(layer.base.weight), ())) > 1]
        return [p for p in self._layers if p not in tied]

    def remove_task(self, name: str) -> "Model":
        """Remove a task and free its parameters and cached copies. Returns self.

        Refused (and nothing changes) while a call on another thread is using the task: removing
        it half-way through that call would silently drop it from the layers still to run.
        """
        with _TASKS_LOCK:
            self._check_task(name)
            self._refuse_if_merged(f"remove task {name!r}", name)
            if self._in_flight.get(name):
                raise RuntimeError(f"task {name!r} is in use by {self._in_flight[name]} running call(s); remove it between calls")
            for layer in self._layers.values():
                if name in layer.adapters:
                    layer.detach(name)
            del self._tasks[name]
        return self

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        """The task's parameters under its state-dict keys (``<path>.lora_A.weight`` ...)."""
        self._check_task(task)
        out = {}
        for path, layer in self._layers.items():
            if task not in layer.adapters:
                continue
            named = layer.own_parameters(task) if isinstance(layer, CustomLayer) else layer.adapters[task].named_parameters()
            for k, p in named:
                out[f"{path}.{k}" if path else k] = p
        return out

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """The original model's parameters under the original keys."""
        out = {}
        for k, p in self.model.named_parameters():
            o = self._original_key(k)
            if o is not None:
                out[o] = p
        return out

    def requires_grad_(self, requires_grad: bool = True, task: str | None = None) -> "Model":
        """Set ``requires_grad`` on the base parameters, or on one task's. Returns self."""
        params = self.base_parameters() if task is None else self.task_parameters(task)
        for p in params.values():
            p.requires_grad_(requires_grad)
        return self

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, *inputs: Any, task: Any = None, tasks: Any = None, **kwargs: Any) -> Any:
        """Run the model with ``task``: None, a name, a ``{name: weight}`` mix, or one entry per sample.

        ``tasks=[...]`` (the seed's spelling) is the equal-weight sum of the listed tasks. A per-sample
        list maps entry ``i`` to row ``i`` of dim 0 of every adapted layer's input; entries are None,
        a name, or a mix.
        """
        route = self._route(task, tasks, inputs, kwargs)
        with self._in_call(route), routed(route):
            return self.model(*inputs, **kwargs)

    @contextlib.contextmanager
    def _in_call(self, route: Route | None) -> Iterator[None]:
        """Count a call as running (and as using its tasks) for its duration: state changes
        (:meth:`changing`) are refused while a running call uses what they change."""
        if torch.compiler.is_compiling():
            yield
            return
        names = (_ALL, *route.task_names()) if route is not None else (_ALL,)
        self._enter(names)
        try:
            yield
        finally:
            with _TASKS_LOCK:
                for n in names:
                    self._in_flight[n] -= 1
                    if not self._in_flight[n]:
                        del self._in_flight[n]  # only running calls are kept: no growth with task names

    @contextlib.contextmanager
    def changing(self, what: str, tasks: Iterable[str] | None = None) -> Iterator[None]:
        """The concurrency rule of every state change (load, reload, merge, unmerge, remove):
        refused (``RuntimeError``, nothing changed) while a running call uses what it changes:
        ``tasks`` (names), or with ``tasks=None`` the base weights (every call uses them); and no
        call starts until the body of the ``with`` (the writes) is done.
        """
        with _TASKS_LOCK:
            keys = [_ALL] if tasks is None else list(tasks)
            busy = {k: self._in_flight.get(k, 0) for k in keys if self._in_flight.get(k, 0)}
            if busy:
                users = "the base weights" if tasks is None else ", ".join(repr(k) for k in busy)
                raise RuntimeError(f"cannot {what}: {sum(busy.values())} running call(s) use {users}; "
                                   "do it between calls (nothing was changed)")
            yield

    def _enter(self, names: tuple[str, ...]) -> None:
        """Count a call as using ``names``; re-checks them under the lock (a remove may have won)."""
        with _TASKS_LOCK:
            for n in names:
                if n != _ALL and n not in self._tasks:
                    raise ValueError(f"unknown task {n!r} (removed while this call started); known tasks: {self.tasks}")
            for n in names:
                self._in_flight[n] = self._in_flight.get(n, 0) + 1

    def _mix(self, spec: Mapping) -> Mix:
        items = []
        for name, w in spec.items():
            self._check_task(name)
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not -math.inf < w < math.inf:
                raise ValueError(f"weight of task {name!r} must be a finite number, got {w!r}")
            if w != 0:
                items.append((name, float(w)))
        return tuple(sorted(items, key=lambda item: item[0]))  # names are unique; weights may be symbolic under compile

    def _route(self, task: Any, tasks: Any, inputs: tuple, kwargs: dict, check_batch: bool = True) -> Route | None:
        if tasks is not None:
            if task is not None:
                raise ValueError("pass task= or tasks=, not both")
            if isinstance(tasks, str):
                task = tasks
            elif isinstance(tasks, Mapping):  # would silently drop the weights
                raise TypeError("tasks= takes a list of names (an equal-weight sum); for weights pass task={name: weight}")
            else:
                names = list(tasks)
                if len(set(names)) != len(names):
                    raise ValueError(f"tasks={names} lists a task twice; use task={{name: weight}} for weights")
                for n in names:
                    self._check_task(n)
                task = {n: 1.0 for n in names}
        if task is None:
            return None
        if isinstance(task, str):
            self._check_task(task)
            return Route(mix=((task, 1.0),))
        if isinstance(task, Mapping):
            mix = self._mix(task)
            return Route(mix=mix) if mix else None
        if isinstance(task, (list, tuple)):
            return self._per_sample_route(task, inputs, kwargs, check_batch=check_batch)
        raise TypeError(f"task must be None, a task name, a {{name: weight}} dict or a per-sample list, got {type(task).__name__}")

    def _per_sample_route(self, entries: list | tuple, inputs: tuple, kwargs: dict, check_batch: bool = True) -> Route | None:
        first = next((v for v in (*inputs, *kwargs.values()) if isinstance(v, Tensor)), None)
        if check_batch:
            if first is None or first.dim() == 0:
                raise ValueError("a per-sample task list needs a tensor input whose dim 0 is the batch")
            if len(entries) != first.shape[0]:
                raise ValueError(f"per-sample task list has {len(entries)} entries but the batch (dim 0 of the input) has {first.shape[0]}")
        device = first.device if first is not None else next((p.device for p in self.model.parameters()), None)
        slots: dict[Mix, int] = {}
        ids = []
        for entry in entries:
            if entry is None:
                mix: Mix = ()
            elif isinstance(entry, str):
                self._check_task(entry)
                mix = ((entry, 1.0),)
            elif isinstance(entry, Mapping):
                mix = self._mix(entry)
            else:
                raise TypeError(f"per-sample task entries are None, a task name or a {{name: weight}} dict; got {entry!r}")
            ids.append(slots.setdefault(mix, len(slots)) if mix else -1)
        if not slots:
            return None
        if len(slots) == 1 and -1 not in ids:  # the whole batch has one selection
            return Route(mix=next(iter(slots)))
        # Under torch.compile no probe runs (layout None): every layer's dim 0 must then be the batch.
        layout = None if torch.compiler.is_compiling() else self._layout
        return Route(slots=tuple(slots), routing=Routing.from_list(ids, len(slots), device), layout=layout)

    # --- per-sample layouts ----------------------------------------------------------------------
    def _pre_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the wrapped model: before a per-sample call, make sure every layer's
        layout is known for this kind of call, and refuse (naming them all) layers that cannot be routed."""
        route = current_route()
        if route is None or route.routing is None or route.layout is None:
            return None
        self._learn_layout(args, kwargs, route)
        return None

    def _learn_layout(self, args: tuple, kwargs: dict, route: Route) -> None:
        signature = (len(args), tuple(sorted(k for k, v in kwargs.items() if v is not None and k not in _PROBE_DROP)))
        if signature not in self._probed:
            with _PROBE_LOCK:
                if signature not in self._probed:  # another thread may have probed meanwhile
                    try:
                        self._probe(args, kwargs, route.batch)
                    except RuntimeError:
                        # A call the probe cannot replay (a decode step that only has encoder outputs):
                        # fine when an earlier probe saw the layers; unseen layers refuse at run time.
                        if not self._layout:
                            raise
                    self._probed.add(signature)
        used = set(route.task_names())
        bad = [p for p, kinds in self._layout.items() if kinds & {"fixed", "varies"} and used & set(self._layers[p].adapters)]
        if bad:
            raise ValueError(unroutable_message(bad, route))

    def _probe(self, args: tuple, kwargs: dict, batch: int) -> None:
        """Learn how each adapted layer's dim 0 relates to the batch: run the base model (no grad, eval
        mode, RNG untouched) on the first 1 and 2 samples of the call's inputs and compare.

        Per layer and call: dims (1, 2) -> ``batch`` when 2-sample rows ``[:d1]`` equal the
        1-sample input (batch-major), ``(1, 1)`` -> ``broadcast``, ``(d, d)`` -> ``fixed``, else
        ``varies``. Costs about 3/B of a forward, once per input signature (a generate loop probes
        once). Tensors whose dim 0 is the batch are sliced; the KV cache is not passed.
        """
        def sliced(n: int) -> tuple[tuple, dict]:
            cut = lambda v: v[:n] if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch else v
            kw = {k: cut(v) for k, v in kwargs.items() if k not in _PROBE_DROP and "Cache" not in type(v).__name__}
            if "use_cache" in kwargs:
                kw["use_cache"] = False
            return tuple(cut(v) for v in args), kw

        seen: dict[str, list] = {}
        first: dict[str, list] = {}

        token = object()

        def record(n: int):
            def hook(layer: LoRALayer, a: tuple, kw: dict) -> None:
                if _PROBING.get() is not token:  # another thread's call meanwhile: not ours to record
                    return
                x = a[0] if a and isinstance(a[0], Tensor) else next((v for v in kw.values() if isinstance(v, Tensor)), None)
                if x is None or x.dim() == 0:
                    seen.setdefault(layer.path, []).append(None)
                elif n == 1:
                    first.setdefault(layer.path, []).append(x.detach().clone())
                else:
                    i = len(seen.setdefault(layer.path, []))
                    x1 = first.get(layer.path, [])[i] if i < len(first.get(layer.path, [])) else None
                    seen[layer.path].append(self._classify(x1, x))
            return hook

        modes = {m: m.training for m in self.model.modules()}
        devices = sorted({p.device.index for p in self.model.parameters() if p.device.type == "cuda"})
        with _PROBE_LOCK, torch.random.fork_rng(devices=devices), torch.no_grad(), routed(None):
            reset = _PROBING.set(token)
            try:
                self.model.eval()
                for n in (1, 2):
                    handles = [layer.register_forward_pre_hook(record(n), with_kwargs=True) for layer in self._layers.values()]
                    try:
                        a, kw = sliced(n)
                        self.model(*a, **kw)
                    finally:
                        for h in handles:
                            h.remove()
            except Exception as e:
                raise RuntimeError(f"lora_kernels.Model could not learn which layers carry the batch for this per-sample call "
                                   f"(a probe on the first samples failed: {type(e).__name__}: {e}). Call the model once with "
                                   "the per-sample list on plain inputs (no KV cache), e.g. model(ids, task=[...]) or "
                                   "model.generate(ids, task=[...]), before this call.") from e
            finally:
                _PROBING.reset(reset)
                for m, mode in modes.items():
                    m.training = mode
        for path, kinds in seen.items():
            # The kinds a layer shows over all its calls (and earlier probes): at run time the input's
            # shape picks among batch / broadcast / unbatched; fixed or varies refuse per-sample lists.
            new = set(kinds) if len(first.get(path, [])) == len(kinds) else {"varies"}
            self._layout[path] = frozenset(self._layout.get(path, frozenset()) | new)

    @staticmethod
    def _classify(x1: Tensor | None, x2: Tensor) -> str:
        """The layout of one layer call from its input at 1 sample (``x1``) and at 2 samples (``x2``)."""
        if x1 is None or x1.dim() != x2.dim() or x1.shape[1:] != x2.shape[1:]:
            return "varies"
        d1, d2 = x1.shape[0], x2.shape[0]
        if d1 == 1 and d2 == 1:
            return "broadcast" if torch.equal(x1, x2) else "varies"
        if x1.dim() == 1 and d1 == d2 and not x1.is_floating_point() and torch.equal(x1, x2):
            return "unbatched"  # 1-D ids without a batch dim (Whisper's encoder positions): output [S, H] broadcasts
        if d2 == 2 * d1:
            same = torch.equal(x1, x2[:d1]) or (x1.is_floating_point() and torch.allclose(x1, x2[:d1], rtol=1e-3, atol=1e-5))
            return "batch" if same else "varies"
        return "fixed" if d1 == d2 else "varies"

    # --- generation, explicit routing, checkpointing ---------------------------------------------
    @contextlib.contextmanager
    def using(self, task: Any = None, tasks: Any = None):
        """Route every call into the wrapped model inside the ``with`` (pipelines, custom loops,
        ``model.model.generate``, Whisper whose ``task`` argument is taken) as ``model(..., task=)`` would.

        A per-sample list has one entry per sample of every call made inside. Also the way to run
        ``backward`` of a forward that used ``torch.utils.checkpoint`` directly: the recompute then
        sees the same task (call backward inside the same ``using``).
        """
        route = self._route(task, tasks, (), {}, check_batch=False)
        with self._in_call(route), routed(route):
            yield self

    def generate(self, *inputs: Any, task: Any = None, tasks: Any = None, **kwargs: Any) -> Any:
        """The wrapped transformers model's ``generate`` with ``task=`` in any form (a name, a mix, or
        one entry per sample of the prompt batch). The KV-cache decode steps use the same routing."""
        if not hasattr(self.model, "generate"):
            raise TypeError(f"{type(self.model).__name__} has no generate(); call model(..., task=...) instead")
        route = self._route(task, tasks, inputs, kwargs)
        if route is not None and route.routing is not None and route.layout is not None:
            # Encoder-decoder generate calls the encoder directly (not through the wrapped model's
            # forward), so learn the layout of a full forward up front.
            probe_kw = {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
            cfg = getattr(self.model, "config", None)
            if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" not in probe_kw:
                gen = getattr(self.model, "generation_config", None)
                start = getattr(gen, "decoder_start_token_id", None)
                start = getattr(cfg, "decoder_start_token_id", None) if start is None else start
                first = next(v for v in (*inputs, *probe_kw.values()) if isinstance(v, Tensor))
                probe_kw["decoder_input_ids"] = torch.full((route.batch, 1), int(start or 0), dtype=torch.long, device=first.device)
            self._learn_layout(inputs, probe_kw, route)
        with self.using(task=task, tasks=tasks) if route is not None else contextlib.nullcontext():
            if route is not None and route.routing is not None:
                with routed(route):  # the route whose layout was just learnt
                    return self.model.generate(*inputs, **kwargs)
            return self.model.generate(*inputs, **kwargs)

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """transformers' ``gradient_checkpointing_enable`` on the wrapped model, with each layer's
        checkpoint function made to re-enter the call's task routing when backward recomputes."""
        self.model.gradient_checkpointing_enable(*args, **kwargs)
        self._keep_route_in_checkpoints()

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """transformers' ``activation_checkpointing_enable``; see :meth:`gradient_checkpointing_enable`."""
        self.model.activation_checkpointing_enable(*args, **kwargs)
        self._keep_route_in_checkpoints()

    def _keep_route_in_checkpoints(self) -> None:
        for m in self.model.modules():
            func = m.__dict__.get("_gradient_checkpointing_func")
            if func is None or getattr(func, "_lk_keeps_route", False):
                continue

            def keeping(function, *args, _checkpoint=func, **kwargs):
                route = current_route()

                def run(*a, **k):  # runs in forward and again in backward's recompute
                    with routed(route):
                        return function(*a, **k)

                return _checkpoint(run, *args, **kwargs)

            keeping._lk_keeps_route = True
            m._gradient_checkpointing_func = keeping

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """The wrapped transformers model's ``save_pretrained`` under the original keys (tasks
        excluded; while a task is merged, the merged weights), loadable by ``from_pretrained``."""
        if not hasattr(self.model, "save_pretrained"):
            raise TypeError(f"{type(self.model).__name__} has no save_pretrained(); use torch.save(model.state_dict())")
        if "state_dict" in kwargs:
            raise TypeError("Model.save_pretrained writes model.state_dict() itself; do not pass state_dict=")
        self.model.save_pretrained(save_directory, state_dict=self.state_dict(), **kwargs)

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: resizing replaces the embedding modules that the wrappers hold (and their tasks'
        shapes would no longer match). Resize the model before wrapping it."""
        raise RuntimeError("resize_token_embeddings on a wrapped model is not supported: it replaces the embedding "
                           "modules that hold the tasks. Resize first, then wrap: "
                           "inner.resize_token_embeddings(n); model = lk.Model(inner); then add or load the tasks.")

    # --- state dicts -----------------------------------------------------------------------------
    def _original_key(self, key: str) -> str | None:
        """Inner key -> the original model's key; None for adapter entries."""
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[:i]) in self._wrapper_paths:
                if parts[i] == "adapters":
                    return None
                if parts[i] == "base":
                    return ".".join(parts[:i] + parts[i + 1:])
        return key

    def state_dict(self, *args: Any, task: str | None = None, destination: Any = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Tensor]:
        """Base parameters and buffers under the original model's keys, or (``task=``) that task's only."""
        if args:
            raise TypeError("state_dict takes keyword arguments only (task=, destination=, prefix=, keep_vars=)")
        out = OrderedDict() if destination is None else destination
        if task is None:
            for k, v in self.model.state_dict(keep_vars=keep_vars).items():
                o = self._original_key(k)
                if o is not None:
                    out[prefix + o] = v
            return out
        for k, v in self._task_state(task, keep_vars).items():
            out[prefix + k] = v
        return out

    def _task_state(self, task: str, keep_vars: bool = False) -> dict[str, Tensor]:
        self._check_task(task)
        out = {}
        for path, layer in self._layers.items():
            if task not in layer.adapters:
                continue
            sd = layer.own_state(task, keep_vars) if isinstance(layer, CustomLayer) else layer.adapters[task].state_dict(keep_vars=keep_vars)
            for k, v in sd.items():
                if not keep_vars and v.untyped_storage().nbytes() > v.numel() * v.element_size():
                    # A slot of a layer's LayerSlots: a copy of the task alone (torch.save would write the
                    # whole pool, and the dict is the task's values, not a window on other tasks).
                    v = v.clone()
                out[f"{path}.{k}" if path else k] = v
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False,
                        task: str | None = None) -> _IncompatibleKeys:
        """Load base parameters (original keys), or one existing task's (``task=``).

        Every key, shape and dtype is checked before anything is written: a refused load changes
        nothing. Floating-point values are cast to the parameter's dtype (as torch does); other
        dtypes are refused. Task weights are copied in place, so a compiled model keeps its graph.
        Returns torch's ``(missing_keys, unexpected_keys)``.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of str to tensors, got {type(state_dict).__name__}")
        self._refuse_if_merged("load the base weights" if task is None else f"load task {task!r}", task)
        if task is None:
            inner = self.model.state_dict(keep_vars=True)
            targets = {o: v for k, v in inner.items() if (o := self._original_key(k)) is not None}
            inner_key = {self._original_key(k): k for k in inner if self._original_key(k) is not None}
        else:
            targets = self._task_state(task, keep_vars=True)
        what = "task " + repr(task) if task else "base model"
        missing, unexpected = self._validate_state(state_dict, targets, strict, what)
        if task is None:
            # Converted up front (a failing conversion is a refusal): torch's loader writes key by key.
            given = {k: v for k, v in state_dict.items() if k in targets}
            staged = given if assign else stage(given, targets, f"the state dict of the {what}")
            with self.changing("load the base weights"):
                self.model.load_state_dict({inner_key[k]: v for k, v in staged.items()}, strict=False, assign=assign)
        else:
            staged = stage(state_dict, targets, f"the state dict of the {what}")
            with self.changing(f"load task {task!r}", [task]), torch.no_grad():
                for k, v in staged.items():
                    targets[k].copy_(v)
        return _IncompatibleKeys(missing, unexpected)

    @staticmethod
    def state_errors(given: Mapping[str, Any], targets: Mapping[str, Tensor], strict: bool = True) -> tuple[list, list, list[str]]:
        """``(missing, unexpected, errors)`` of loading ``given`` into ``targets``: key set (when
        ``strict``), tensor type, shape, and the dtype policy (floating to floating is cast).
        See :func:`lora_kernels.validation.state_errors`."""
        return state_errors(given, targets, strict)

    @staticmethod
    def _validate_state(given: Mapping[str, Any], targets: Mapping[str, Tensor], strict: bool, what: str) -> tuple[list, list]:
        missing, unexpected, errors = state_errors(given, targets, strict)
        if errors:
            raise refuse(f"the state dict of the {what}", errors)
        return missing, unexpected

    def _refuse_if_merged(self, what: str, task: str | None = None) -> None:
        """Changing the merged task (or, task None, the base) while merged would be undone or lost by unmerge()."""
        merged = self.merged_task
        if merged is not None and (task is None or task == merged):
            raise RuntimeError(f"cannot {what} while task {merged!r} is merged into the base weights; call unmerge() first")

    # --- checkpoints, PEFT, merging: see lora_kernels.io -------------------------------------------
    def save_task(self, path: str, task: str) -> None:
        """Write one task to a safetensors file with its config as metadata."""
        from .io.checkpoint import save_task

        save_task(self, path, task)

    def load_task(self, path: str, task: str) -> "Model":
        """Load a task from a safetensors file (created from the file's config when absent)."""
        from .io.checkpoint import load_task

        load_task(self, path, task)
        return self

    def load_peft_adapter(self, path: str, task: str, **kwargs: Any) -> "Model":
        """Load a Hugging Face PEFT LoRA adapter folder as task ``task``."""
        from .io.peft import load_peft_adapter

        load_peft_adapter(self, path, task, **kwargs)
        return self

    def save_peft_adapter(self, path: str, task: str, **kwargs: Any) -> None:
        """Write task ``task`` as a PEFT LoRA adapter folder."""
        from .io.peft import save_peft_adapter

        save_peft_adapter(self, path, task, **kwargs)

    def merge(self, task: str) -> "Model":
        """Fold ``task`` into the base weights (zero-overhead single-task inference)."""
        from .io.merge import merge

        merge(self, task)
        return self

    def unmerge(self) -> "Model":
        """Restore the base weights saved by :meth:`merge`."""
        from .io.merge import unmerge

        unmerge(self)
        return self
