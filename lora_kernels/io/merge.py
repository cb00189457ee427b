"""Fold one task into the base weights (zero-overhead single-task inference), and undo it exactly.

``merge(model, "a")`` computes each adapted layer's ``ΔW`` in fp32 from ``A``, ``B`` and the scale
(``W + s·B·A`` for linears; the transpose for embeddings and GPT-2's ``Conv1D``; the grouped
``B·A`` with the base kernel for convs), checks that every delta and every merged weight is finite,
and only then writes the merged weights **in place** (same parameters: optimizers, compiled graphs
and tied references keep pointing at them). A copy of each original weight is kept, so
``unmerge()`` restores the base **bit for bit** (no ``W + ΔW − ΔW`` rounding); the price is one
extra copy of the adapted layers' weights while merged.

While task ``a`` is merged (one at a time):

- ``model(x, task="a")`` and ``model(x)`` both run the merged base only: task ``a``'s output with
  no LoRA overhead (so ``generate()`` and other direct calls of the inner model use it too);
- any other selection (another task, a mix, a per-sample list) raises a clear error instead of
  applying ``a`` twice or silently dropping it; ``unmerge()`` first;
- loading new weights into ``a`` with :func:`lora_kernels.io.load_task` is refused (the merged base
  would go stale); ``save_checkpoint`` saves the unmerged base.

Tasks with layers of registered custom types cannot be merged (their math is unknown here), nor
layers whose weight is tied to another parameter (merging would change that one too).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..layers import CustomLayer, LoRAConv, LoRAEmbedding, LoRAHFConv1D, LoRALayer, LoRALinear
from ..layers.base import Adapter
from ..model import Model

__all__ = ["merge", "unmerge", "merged_task", "delta_weight"]

_STATE = "_lora_kernels_merged"


@dataclass
class MergedState:
    task: str
    originals: dict[str, Tensor] = field(default_factory=dict)  # layer path -> copy of its original weight
    stamps: dict[str, tuple] = field(default_factory=dict)  # layer path -> fingerprint of the merged weight


def _stamp(w: Tensor) -> tuple:
    """Fingerprint of a weight: its version counter (in-place writes, optimizer steps), its storage
    (``p.data = ...``) and two sums (writes through ``.data`` that bump no counter)."""
    d = w.detach().double()
    return w._version, w.data_ptr(), float(d.sum()), float(d.abs().sum())


def merged_state(model: Model) -> MergedState | None:
    return model.__dict__.get(_STATE)


def merged_task(model: Model) -> str | None:
    """The task merged into ``model``'s base weights, or None."""
    state = merged_state(model)
    return None if state is None else state.task


def delta_weight(layer: LoRALayer, adapter: Adapter) -> Tensor:
    """The adapter's ``ΔW`` in fp32, shaped like ``layer.base.weight``."""
    a = adapter.lora_A.weight.detach().float()
    b = adapter.lora_B.weight.detach().float()
    s = adapter.scale
    if isinstance(layer, LoRALinear):
        return (b @ a) * s  # [out, in]
    if isinstance(layer, LoRAHFConv1D):
        return (b @ a).t() * s  # Conv1D stores [in, out]
    if isinstance(layer, LoRAEmbedding):
        d = (b @ a).t() * s  # [num_embeddings, dim]
        if layer.base.padding_idx is not None:
            d[layer.base.padding_idx] = 0  # the layer gives padding rows no delta
        return d
    if isinstance(layer, LoRAConv):
        g = layer.groups
        w = layer.base.weight
        out_ch, r = b.shape[0], a.shape[0]
        # Group j: B_j [out/g, r/g] · A_j [r/g, in/g * k] -> that group's block of W.
        d = torch.bmm(b.reshape(g, out_ch // g, r // g), a.reshape(g, r // g, -1))
        return d.reshape(w.shape) * s
    raise TypeError(f"layer '{layer.path}' ({type(layer).__name__}) cannot be merged")


def _tied(model: Model) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def merge(model: Model, task: str) -> None:
    """Fold ``task`` into the base weights; see the module docstring. Nothing changes if it fails."""
    model.task_config(task)  # (checks the name)
    current = merged_task(model)
    if current is not None:
        raise RuntimeError(f"task {current!r} is already merged; unmerge() first (one merged task at a time)")
    layers = [(p, layer) for p, layer in model.layers.items() if task in layer.adapters]
    custom = [p for p, layer in layers if isinstance(layer, CustomLayer)]
    if custom:
        raise ValueError(f"task {task!r} cannot be merged: layer(s) {custom} are registered custom types whose math is unknown here")
    tied = _tied(model)
    shared = {p: tied[id(layer.base.weight)] for p, layer in layers if len(tied.get(id(layer.base.weight), ())) > 1}
    if shared:
        raise ValueError(f"task {task!r} cannot be merged: the weights of {sorted(shared)} are tied to other parameters "
                         f"({shared}); merging would change those too")
    merged, bad = {}, []
    for p, layer in layers:  # compute and check everything before writing anything
        w = layer.base.weight
        d = delta_weight(layer, layer.adapters[task])
        new = (w.detach().float() + d.to(w.device)).to(w.dtype)
        if not bool(torch.isfinite(d).all()):
            bad.append(f"{p}: ΔW holds NaN or Inf")
        elif not bool(torch.isfinite(new).all()) and bool(torch.isfinite(w).all()):
            bad.append(f"{p}: W + ΔW overflows {w.dtype}")
        merged[p] = new
    if bad:
        raise ValueError(f"refusing to merge task {task!r} (the base weights were not touched):\n  " + "\n  ".join(bad))
    state = MergedState(task)
    originals = {p: layer.base.weight.detach().clone() for p, layer in layers}
    # Every call uses the base weights: refused while any runs, and none starts until the merged
    # weights and the merged state are both in place (else a call could add the task twice).
    with model.changing(f"merge task {task!r}"), torch.no_grad():
        if merged_task(model) is not None:
            raise RuntimeError(f"task {merged_task(model)!r} is already merged; unmerge() first (one merged task at a time)")
        for p, layer in layers:
            state.originals[p] = originals[p]
            layer.base.weight.copy_(merged[p])
        for p, layer in layers:
            state.stamps[p] = _stamp(layer.base.weight)
        for layer in model.layers.values():
            layer.merged_task = task
        model.__dict__[_STATE] = state


def unmerge(model: Model) -> None:
    """Restore the base weights saved by :func:`merge` exactly. A no-op when nothing is merged.

    A weight that changed while merged (training the base, a load) keeps its change: ``W − ΔW``
    instead of the saved original (with a warning), never a silent loss of that training.
    """
    state = merged_state(model)
    if state is None:
        return
    changed = []
    with model.changing("unmerge"), torch.no_grad():
        if merged_state(model) is not state:
            return  # another thread unmerged first
        for p, original in state.originals.items():
            layer = model.layers[p]
            w = layer.base.weight
            if _stamp(w) == state.stamps.get(p):
                w.copy_(original)  # unchanged since merge: the original, bit for bit
            else:  # trained (or written) while merged: keep that change, take the task's ΔW back out
                w.copy_((w.detach().float() - delta_weight(layer, layer.adapters[state.task]).to(w.device)).to(w.dtype))
                changed.append(p)
        for layer in model.layers.values():
            layer.merged_task = None
        del model.__dict__[_STATE]
    if changed:
        warnings.warn(f"base weights of {changed} changed while task {state.task!r} was merged; unmerge() kept those changes "
                      "and subtracted the task's ΔW (not the bit-exact original)", stacklevel=3)

