"""Serving many adapters: :class:`AdapterPool`, a bounded set of device-resident tasks over many sources.

A :class:`lora_kernels.Model` keeps every task on the device. Serving one adapter per customer
means hundreds or thousands of them, so the pool keeps three tiers:

- **device**: at most ``slots`` tasks per rank are tasks of the model (resident). Each adapted
  layer's storage for a rank is reserved at exactly that many slots
  (:meth:`LoRALayer.reserve_slots`), so device memory for adapters is bounded by the slots,
  whatever the number of sources, and a rank-8 adapter never occupies a rank-64 slot;
- **host**: at most ``host_slots`` adapters' weights in host memory (pinned when CUDA is
  available), least recently used dropped first;
- **source**: the files registered with :meth:`AdapterPool.add` (task checkpoints from
  ``save_task``, or PEFT adapter folders), read on first use and validated exactly as
  ``Model.load_task`` / ``Model.load_peft_adapter`` validate.

A call names tasks; the pool makes them resident (evicting least recently used tasks that no
running call uses), pins them for the call, and runs the model. A per-sample task list with more
distinct tasks than slots is split into sub-batches that fit, run one after the other, and joined
back in the original row order.

Concurrency: every residency change happens under one lock; a call pins its tasks for its
duration and pinned tasks are never evicted. A call that needs slots while all candidates are
pinned by other calls waits for them (up to ``wait_timeout`` seconds, then ``RuntimeError``).
A call pins all of its tasks at once, so calls never hold some slots while waiting for others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from .model import _MAX_SCALE, Model, TaskConfig
from .validation import CheckpointError, refuse

__all__ = ["AdapterPool", "PoolStats"]


@dataclass
class PoolStats:
    """Counters of an :class:`AdapterPool` since creation or :meth:`AdapterPool.reset_stats`.

    A task needed by a call counts once per (sub-)batch: a ``hit`` when already resident, else a
    miss served from host memory (``misses_host``) or from its source file (``misses_disk``).
    """

    hits: int = 0
    misses_host: int = 0
    misses_disk: int = 0
    evictions: int = 0  # resident tasks removed from the device to make room
    bytes_h2d: int = 0  # adapter bytes copied host -> device (into the layers' slots)
    bytes_disk: int = 0  # adapter bytes read from source files
    resident: int = 0  # tasks resident now

    @property
    def misses(self) -> int:
        return self.misses_host + self.misses_disk

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class _Entry:
    """One adapter's weights in host memory: config, tensors under the task's state-dict keys
    (in the model's dtypes), per-layer ranks."""

    config: TaskConfig
    tensors: dict[str, Tensor]
    ranks: tuple[int, ...]  # distinct ranks over its layers (each needs a slot of that rank)
    nbytes: int
    disk_bytes: int = 0


class AdapterPool:
    """A bounded set of resident tasks of ``model`` over many registered adapter sources.

    ``slots``: resident adapters per rank (an int: every rank gets that many; ``{rank: count}``:
    only those ranks, each with its own count). ``host_slots``: adapters kept in host memory.
    ``wait_timeout``: seconds a call waits when every slot it could use is pinned by other calls.

    The pool owns the model's tasks: create it on a model without tasks, register adapters with
    :meth:`add`, and call through the pool (``pool(x, task=...)``, :meth:`generate`). Resident
    tasks are served read-only: their weights go back to host memory on eviction as they are.
    """

    def __init__(self, model: Model, slots: int | Mapping[int, int] = 32, host_slots: int = 256,
                 wait_timeout: float = 60.0):
        if not isinstance(model, Model):
            raise TypeError(f"AdapterPool serves an lk.Model, got {type(model).__name__}")
        if model.tasks:
            raise ValueError(f"AdapterPool manages every task of the model, but it already has {model.tasks}; create the "
                             "pool on a model without tasks and register adapters with pool.add(name, path)")
        if isinstance(slots, Mapping):
            bad = {r: c for r, c in slots.items() if not _pos_int(r) or not _pos_int(c)}
            if bad or not slots:
                raise ValueError(f"slots must map ranks (positive ints) to slot counts (positive ints), got {dict(slots)!r}")
            self._slots: dict[int, int] | None = dict(slots)
            self._default: int | None = None
        elif _pos_int(slots):
            self._slots, self._default = None, int(slots)
        else:
            raise ValueError(f"slots must be a positive int or a {{rank: count}} dict, got {slots!r}")
        if not isinstance(host_slots, int) or isinstance(host_slots, bool) or host_slots < 0:
            raise ValueError(f"host_slots must be an int >= 0, got {host_slots!r}")
        if not isinstance(wait_timeout, (int, float)) or not wait_timeout > 0:
            raise ValueError(f"wait_timeout must be a positive number of seconds, got {wait_timeout!r}")
        self.model = model
        self.host_slots = host_slots
        self.wait_timeout = float(wait_timeout)
        self._sources: dict[str, tuple[str, str]] = {}  # name -> ("task" | "peft", path)
        self._ranks: dict[str, tuple[int, ...]] = {}  # known ranks per source (from file headers)
        self._host: OrderedDict[str, _Entry] = OrderedDict()  # LRU: oldest first
        self._resident: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # LRU: oldest first
        self._pins: Counter = Counter()
        self._reserved: set[int] = set()
        self._lock = threading.Condition(threading.RLock())
        self._stats = PoolStats()
        self._stream = None  # CUDA side stream of prefetch (created on first use)
        self._pending: list = []  # CUDA events of prefetch copies the next call waits on
        self._last_use: dict[str, Any] = {}  # CUDA: task -> event after the last call that used it
        for r in self._slots or ():
            self._reserve(r)

    # --- registration --------------------------------------------------------------------------
    def add(self, name: str, path: str | os.PathLike) -> "AdapterPool":
        """Register ``path`` (a ``save_task`` file or a PEFT adapter folder) as adapter ``name``.
        Nothing is read until a call needs it. Returns self."""
        return self.add_many({name: path})

    def add_many(self, sources: Mapping[str, str | os.PathLike]) -> "AdapterPool":
        """Register several adapters (``{name: path}``); all are checked before any is added. Returns self."""
        if not isinstance(sources, Mapping):
            raise TypeError(f"add_many takes a {{name: path}} mapping, got {type(sources).__name__}")
        new = {}
        for name, path in sources.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"invalid adapter name {name!r}: a non-empty str without '.'")
            if name in self._sources or name in new:
                raise ValueError(f"adapter {name!r} is already registered")
            path = os.fspath(path)
            if os.path.isdir(path):
                new[name] = ("peft", path)
            elif os.path.isfile(path):
                new[name] = ("task", path)
            else:
                raise FileNotFoundError(f"adapter {name!r}: no such file or folder: '{path}'")
        with self._lock:
            clash = [n for n in new if n in self._sources]
            if clash:
                raise ValueError(f"adapter(s) {clash} are already registered")
            self._sources.update(new)
        return self

    @property
    def adapters(self) -> list[str]:
        """Registered adapter names, in registration order."""
        return list(self._sources)

    @property
    def resident(self) -> list[str]:
        """Resident tasks, least recently used first."""
        with self._lock:
            return list(self._resident)

    @property
    def stats(self) -> PoolStats:
        """A snapshot of the counters (see :class:`PoolStats`)."""
        with self._lock:
            return dataclasses.replace(self._stats, resident=len(self._resident))

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = PoolStats()

    # --- calls ---------------------------------------------------------------------------------
    def __call__(self, *inputs: Any, task: Any = None, tasks: Any = None, **kwargs: Any) -> Any:
        """``model(*inputs, task=..., **kwargs)`` with the named tasks made resident for the call."""
        return self._run(self.model, inputs, kwargs, task, tasks, generate=False)

    def generate(self, *inputs: Any, task: Any = None, tasks: Any = None, **kwargs: Any) -> Any:
        """``model.generate(*inputs, task=..., **kwargs)`` with the named tasks made resident.

        A per-sample list with more distinct tasks than fit in the slots is split into sub-batches
        that fit; their outputs (token ids ``[b, L]``) are padded on the right to the longest with
        the pad token and put back in the prompts' order."""
        return self._run(self.model.generate, inputs, kwargs, task, tasks, generate=True)

    def prefetch(self, tasks) -> None:
        """Start making ``tasks`` (names, in priority order) resident for a coming call.

        On CUDA the host->device copies run on a side stream and the next call through the pool
        waits on their event; on CPU the same code runs synchronously. A hint: it never evicts
        pinned tasks or tasks named earlier in the list, and stops when no slot is left.
        """
        names = list(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
        self._check_names(names)
        with self._lock:
            done: set[str] = set()
            for n in names:
                if n in self._resident:
                    self._resident.move_to_end(n)
                    done.add(n)
                    continue
                fresh = {} if n in self._host else {n: self._read(n)}
                entry = self._host.get(n) or fresh[n]
                try:
                    victims = self._victims(done | {n}, {n: entry})
                except ValueError:
                    break
                if victims is None:
                    break
                with self._side_stream() as stream:
                    self._commit(victims, [n], {n: entry}, fresh, stream, count=False)
                done.add(n)

    # --- residency -----------------------------------------------------------------------------
    def _run(self, fn, inputs: tuple, kwargs: dict, task: Any, tasks: Any, generate: bool) -> Any:
        if tasks is not None:
            if task is not None:
                raise ValueError("pass task= or tasks=, not both")
            names = [tasks] if isinstance(tasks, str) else list(tasks)
            self._check_names(names)
            with self._using(names):
                return fn(*inputs, tasks=tasks, **kwargs)
        if task is None:
            return fn(*inputs, **kwargs)
        if isinstance(task, (list, tuple)):
            needs = [self._entry_names(e) for e in task]
            names = list(dict.fromkeys(n for need in needs for n in need))
            self._check_names(names)
            if not self._fits(names):
                return self._split(fn, inputs, kwargs, list(task), needs, generate)
        else:
            names = self._entry_names(task)
            self._check_names(names)
            self._check_fits(names, "the task selection")
        with self._using(names):
            return fn(*inputs, task=task, **kwargs)

    @contextlib.contextmanager
    def _using(self, names: list[str]) -> Iterator[None]:
        """Make ``names`` resident and pinned for the body of the ``with``."""
        self._acquire(names)
        try:
            yield
        finally:
            event = None
            if names and _device_of(self.model).type == "cuda":  # when the GPU is done with this call's slots
                event = torch.cuda.Event()
                event.record()
            with self._lock:
                for n in names:
                    self._pins[n] -= 1
                    if not self._pins[n]:
                        del self._pins[n]
                    if event is not None:
                        self._last_use[n] = event
                self._lock.notify_all()

    def _acquire(self, names: list[str]) -> None:
        deadline = time.monotonic() + self.wait_timeout
        fresh: dict[str, _Entry] = {}  # read from their sources by this call, not yet committed
        with self._lock:
            while True:
                missing = [n for n in names if n not in self._resident]
                for n in missing:
                    if n not in self._host and n not in fresh:
                        fresh[n] = self._read(n)  # may raise: nothing has changed yet
                entries = {n: self._host.get(n) or fresh[n] for n in missing}
                victims = self._victims(set(names), entries)
                if victims is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"AdapterPool: no free slot for {missing} within {self.wait_timeout:g} s: every slot "
                                       f"is pinned by running calls ({dict(self._pins)}). Use fewer concurrent calls, more "
                                       "slots, or a longer wait_timeout")
                self._lock.wait(left)
            self._wait_pending()  # prefetch copies (side stream) land before this call evicts, writes or reads
            self._commit(victims, names, entries, fresh, None, count=True)
            for n in names:
                self._pins[n] += 1

    def _commit(self, victims: list[str], names: list[str], entries: dict[str, _Entry], fresh: dict[str, _Entry],
                stream, count: bool) -> None:
        """Evict ``victims``, make ``entries`` resident, touch ``names`` (under the lock)."""
        st = self._stats
        for v in victims:
            last = self._last_use.pop(v, None)
            if stream is not None and last is not None:
                stream.wait_event(last)  # kernels queued by an earlier call may still read the victim's slot
            self._evict(v)
        for n in names:
            if n in self._resident:
                self._resident.move_to_end(n)
                st.hits += count
                continue
            entry = entries[n]  # (held here: the host tier may drop it while this commit fills it)
            if fresh.get(n) is entry:
                st.misses_disk += count
                st.bytes_disk += entry.disk_bytes
            else:
                st.misses_host += count
            self._host_put(n, entry)  # most recently used
            self._upload(n, entry, stream)

    def _victims(self, keep: set[str], entries: dict[str, _Entry]) -> list[str] | None:
        """Least recently used unpinned resident tasks (not in ``keep``) to evict so that
        ``entries`` fit; None when they fit only once running calls unpin some. Raises when they
        can never fit."""
        need = Counter(r for e in entries.values() for r in e.ranks)
        want = Counter(need)
        for n in keep:
            if n in self._resident:
                want.update(self._resident[n])
        for r, c in want.items():
            cap = self._cap(r)
            if cap is None or c > cap:
                raise ValueError(self._too_big(r, c, cap))
        used = Counter(r for ranks in self._resident.values() for r in ranks)
        deficit = {r: used[r] + c - self._cap(r) for r, c in need.items()}
        victims = []
        for n, ranks in self._resident.items():  # oldest first
            if not any(deficit.get(r, 0) > 0 for r in ranks):
                continue
            if n in keep or self._pins.get(n):
                continue
            victims.append(n)
            for r in ranks:
                if r in deficit:
                    deficit[r] -= 1
        return victims if all(d <= 0 for d in deficit.values()) else None

    def _evict(self, name: str) -> None:
        if name not in self._host and self.host_slots:  # keep its weights on the host (recently used)
            tensors = {k: _to_host(v) for k, v in self.model.state_dict(task=name).items()}
            self._host_put(name, _Entry(self.model.task_config(name), tensors, self._resident[name],
                                        sum(v.nbytes for v in tensors.values())))
        self.model.remove_task(name)
        del self._resident[name]
        self._stats.evictions += 1

    def _upload(self, name: str, entry: _Entry, stream) -> None:
        """Make ``name`` a task of the model from its host weights (into a free reserved slot)."""
        for r in entry.ranks:
            self._reserve(r)
        cfg = entry.config
        device = _device_of(self.model)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # add_task initialises before the weights are written
            weights = {k: v.to(device, non_blocking=True) for k, v in entry.tensors.items()}
            self.model.add_task(name, rank=dict(cfg.ranks), alpha=dict(cfg.alphas), dropout=cfg.dropout, init=cfg.init,
                                rslora=cfg.rslora, modules=[p for p in self.model.layers if p in cfg.ranks], weights=weights)
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
            self._pending.append(event)
        self._resident[name] = entry.ranks
        self._stats.bytes_h2d += entry.nbytes

    def _host_put(self, name: str, entry: _Entry) -> None:
        if not self.host_slots:
            return
        self._host[name] = entry
        self._host.move_to_end(name)
        while len(self._host) > self.host_slots:
            self._host.popitem(last=False)

    @contextlib.contextmanager
    def _side_stream(self):
        if _device_of(self.model).type != "cuda":
            yield None
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=_device_of(self.model))
        # Copies overlap the work already queued; a victim's slot is rewritten only after the
        # last call that read it (its event, in _commit).
        with torch.cuda.stream(self._stream):
            yield self._stream

    def _wait_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for event in pending:
            torch.cuda.current_stream().wait_event(event)

    # --- sources -------------------------------------------------------------------------------
    def _read(self, name: str) -> _Entry:
        """Read and validate adapter ``name`` from its source into host memory (changes nothing)."""
        from .io.checkpoint import _prevalidate, read_task_file
        from .io.peft import read_peft_adapter

        kind, path = self._sources[name]
        if kind == "peft":
            config, tensors, source = read_peft_adapter(self.model, path)
            custom: list[str] = []
        else:
            source = f"'{path}'"
            try:
                tensors, config, custom = read_task_file(path)
            except CheckpointError as e:
                raise e if str(e).startswith("refusing") else refuse(source, str(e)) from None
            if config is None:
                raise refuse(source, "it has no lora_kernels task config (write it with Model.save_task)")
            if custom:
                raise refuse(source, f"it adapts custom module(s) {custom}; the adapter pool serves built-in layers only")
            errors = _prevalidate(self.model, config, custom, tensors)
            if errors:
                raise refuse(source, errors)
        errors = []
        for p, r in config.ranks.items():  # what add_task would refuse, checked before anything is evicted
            scale = config.alphas[p] / (math.sqrt(r) if config.rslora else r)
            if not abs(scale) <= _MAX_SCALE:
                errors.append(f"alpha {config.alphas[p]!r} for layer '{p}' gives scale {scale:g}; at most {_MAX_SCALE:g}")
            groups = self.model.layers[p].groups
            if r % groups:
                errors.append(f"rank {r} for layer '{p}' must be a multiple of its groups ({groups})")
        if errors:
            raise refuse(source, errors)
        disk = sum(v.nbytes for v in tensors.values())
        staged = {k: _to_host(v.to(self._dtype_of(k))) for k, v in tensors.items()}
        ranks = tuple(sorted(set(config.ranks.values())))
        self._ranks[name] = ranks
        return _Entry(config, staged, ranks, sum(v.nbytes for v in staged.values()), disk)

    def _dtype_of(self, key: str) -> torch.dtype:
        return self.model.layers[key.rsplit(".", 2)[0] if key.count(".") >= 2 else ""].base.weight.dtype

    def _ranks_of(self, name: str) -> tuple[int, ...]:
        """The adapter's ranks: known, or from its file's header (shapes of its ``lora_A`` tensors,
        no data read), or (when the header cannot be read that way) from a full, validated read."""
        known = self._ranks.get(name)
        if known is not None:
            return known
        kind, path = self._sources[name]
        file = os.path.join(path, "adapter_model.safetensors") if kind == "peft" else path
        ranks: set[int] = set()
        try:
            from safetensors import safe_open

            with safe_open(file, framework="pt", device="cpu") as f:
                for k in f.keys():
                    if "lora_A" in k or "lora_embedding_A" in k:
                        shape = f.get_slice(k).get_shape()
                        ranks.add(int(shape[0]) if shape else 0)
        except Exception:
            ranks = set()
        if not ranks or 0 in ranks:
            return self._read(name).ranks  # the library's reader names what is wrong
        self._ranks[name] = tuple(sorted(ranks))
        return self._ranks[name]

    # --- slots ---------------------------------------------------------------------------------
    def _cap(self, rank: int) -> int | None:
        return self._default if self._slots is None else self._slots.get(rank)

    def _reserve(self, rank: int) -> None:
        if rank in self._reserved or self._cap(rank) is None:
            return
        for layer in self.model.layers.values():
            layer.reserve_slots(rank, self._cap(rank))
        self._reserved.add(rank)

    def _too_big(self, rank: int, count: int, cap: int | None) -> str:
        if cap is None:
            return (f"AdapterPool has no slots for rank {rank} (slots={self._slots}); add the rank to slots= "
                    "(or pass an int to give every rank the same number)")
        return (f"AdapterPool: {count} tasks of rank {rank} are needed at once but the pool has {cap} rank-{rank} slots; "
                "raise slots= or name fewer tasks in one selection")

    def _fits(self, names: list[str]) -> bool:
        want = Counter(r for n in names for r in self._ranks_of(n))
        return all(self._cap(r) is not None and c <= self._cap(r) for r, c in want.items())

    def _check_fits(self, names: list[str], what: str) -> None:
        want = Counter(r for n in names for r in self._ranks_of(n))
        for r, c in want.items():
            if self._cap(r) is None or c > self._cap(r):
                raise ValueError(f"{what} {names if len(names) <= 8 else names[:8] + ['...']}: " + self._too_big(r, c, self._cap(r)))

    def _check_names(self, names: list[str]) -> None:
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"a task name is a str, got {type(n).__name__}: {n!r}")
        unknown = [n for n in names if n not in self._sources]
        if unknown:
            some = self.adapters[:10]
            raise ValueError(f"unknown adapter(s) {unknown}: register them with pool.add(name, path); "
                             f"{len(self._sources)} registered{', e.g. ' + str(some) if some else ''}")

    @staticmethod
    def _entry_names(entry: Any) -> list[str]:
        if entry is None:
            return []
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, Mapping):
            return [n for n, w in entry.items() if not (isinstance(w, (int, float)) and w == 0)]
        raise TypeError(f"task entries are None, a task name or a {{name: weight}} dict; got {entry!r}")

    # --- split calls ---------------------------------------------------------------------------
    def _split(self, fn, inputs: tuple, kwargs: dict, entries: list, needs: list[list[str]], generate: bool) -> Any:
        """Run a per-sample call whose tasks exceed the slots as sub-batches that fit, joined back."""
        batch = len(entries)
        first = next((v for v in (*inputs, *kwargs.values()) if isinstance(v, Tensor) and v.dim()), None)
        if first is None or first.shape[0] != batch:
            raise ValueError(f"per-sample task list has {len(entries)} entries but the batch (dim 0 of the input) has "
                             f"{None if first is None else first.shape[0]}")
        groups: OrderedDict[frozenset, list[int]] = OrderedDict()
        for i, need in enumerate(needs):
            groups.setdefault(frozenset(need), []).append(i)
        plan: list[tuple[set[str], list[int]]] = []
        for need, rows in groups.items():
            if not self._fits(sorted(need)):
                self._check_fits(sorted(need), f"sample {rows[0]}'s tasks")
            for names, members in plan:
                if self._fits(sorted(names | need)):
                    names |= need
                    members += rows
                    break
            else:
                plan.append((set(need), list(rows)))
        parts, order = [], []
        for names, rows in plan:
            rows.sort()
            sub_in = tuple(_rows(v, rows, batch) for v in inputs)
            sub_kw = {k: _rows(v, rows, batch) for k, v in kwargs.items()}
            with self._using([n for n in dict.fromkeys(n for i in rows for n in needs[i])]):
                parts.append(fn(*sub_in, task=[entries[i] for i in rows], **sub_kw))
            order += rows
        pad = self._pad_id(kwargs) if generate else None
        return _join(parts, [len(r) for _, r in plan], order, pad, generate)

    def _pad_id(self, kwargs: dict) -> int | None:
        pad = kwargs.get("pad_token_id")
        gen = kwargs.get("generation_config") or getattr(self.model.model, "generation_config", None)
        for v in (pad, getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None)):
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if isinstance(v, Tensor):
                v = int(v.flatten()[0])
            if v is not None:
                return int(v)
        return None

    # --- memory --------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        """Bytes the model holds for adapters now: every layer's slot storage (reserved, resident
        or free) plus the adapters of layer types without slot storage."""
        seen, total = set(), 0
        for layer in self.model.layers.values():
            if layer.pooled:
                for s in layer._pools.values():
                    for t in (s.a, s.b):
                        if t.data_ptr() not in seen:
                            seen.add(t.data_ptr())
                            total += t.nbytes
            else:
                total += sum(p.nbytes for ad in layer.adapters.values() for p in ad.parameters())
        return total

    def device_bytes_bound(self) -> int:
        """The most :meth:`device_bytes` can be: per layer, each reserved rank's slots."""
        from .io.checkpoint import expected_shapes

        total = 0
        for layer in self.model.layers.values():
            item = layer.base.weight.element_size()
            for r in self._reserved:
                shapes = expected_shapes(layer, r)
                if shapes is not None:
                    total += self._cap(r) * (math.prod(shapes[0]) + math.prod(shapes[1])) * item
        return total

    def host_bytes(self) -> int:
        """Bytes of adapter weights held in host memory (at most ``host_slots`` adapters)."""
        with self._lock:
            return sum(e.nbytes for e in self._host.values())

    @property
    def host_resident(self) -> list[str]:
        """Adapters held in host memory, least recently used first."""
        with self._lock:
            return list(self._host)

    def __repr__(self) -> str:
        slots = self._slots if self._slots is not None else self._default
        return (f"AdapterPool(slots={slots}, host_slots={self.host_slots}, adapters={len(self._sources)}, "
                f"resident={len(self._resident)}, host={len(self._host)})")


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _device_of(model: Model) -> torch.device:
    return next((p.device for p in model.model.parameters()), torch.device("cpu"))


def _to_host(t: Tensor) -> Tensor:
    """A host copy (pinned when CUDA is available: copies from it to the device can be asynchronous)."""
    t = t.detach().to("cpu", copy=True).contiguous()
    return t.pin_memory() if torch.cuda.is_available() else t


def _rows(v: Any, rows: list[int], batch: int) -> Any:
    if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch:
        return v.index_select(0, torch.tensor(rows, device=v.device))
    return v


def _join(parts: list, sizes: list[int], order: list[int], pad: int | None, generate: bool) -> Any:
    """Outputs of sub-batches (rows ``order``, in sub-batch order) joined into the full batch's order."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        if any(not isinstance(p, Tensor) or p.dim() == 0 or p.shape[0] != s for p, s in zip(parts, sizes)):
            raise ValueError("a per-sample call split into sub-batches (more tasks than slots) returned a tensor whose dim 0 "
                             "is not the batch (a loss?); call with at most the pool's slots in distinct tasks, or without it")
        if generate and len({p.shape[1:] for p in parts}) > 1:
            longest = max(p.shape[1] for p in parts)
            if pad is None:
                raise ValueError("sub-batches generated sequences of different lengths and there is no pad token to align them; "
                                 "pass pad_token_id=")
            parts = [torch.nn.functional.pad(p, (0, longest - p.shape[1]), value=pad) for p in parts]
        joined = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return joined.index_select(0, inverse.to(joined.device))
    if isinstance(first, Mapping):
        values = {k: _join([p[k] for p in parts], sizes, order, pad, generate) for k in first}
        try:
            return type(first)(**values)
        except TypeError:
            return values
    if isinstance(first, (list, tuple)) and not hasattr(first, "_fields"):
        return type(first)(_join([p[i] for p in parts], sizes, order, pad, generate) for i in range(len(first)))
    raise ValueError(f"a per-sample call split into sub-batches (more tasks than slots) returned a {type(first).__name__}, "
                     "which cannot be joined (pass use_cache=False for a forward, or name at most the pool's slots in distinct tasks)")
