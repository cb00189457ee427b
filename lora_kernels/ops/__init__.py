"""Functional LoRA ops, dispatched to a backend (see :mod:`lora_kernels.ops.dispatch`).

``lora_linear``        y = x @ W.T + b + scale * (dropout(x) @ A.T) @ B.T
``lora_linear_mixed``  the same with a task per row, ``-1`` rows = base only
``reference``          the same functions in plain torch: the oracle
"""

from __future__ import annotations

from torch import Tensor

import torch

from . import reference
from .checks import check_lora_linear_mixed
from .dispatch import available_backends, resolve, set_backend, use_backend
from .routing import Routing

__all__ = ["lora_linear", "lora_linear_mixed", "reference", "Routing", "available_backends", "set_backend", "use_backend"]


def _needs_grad(*tensors) -> bool:
    import torch

    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _nothing_to_fuse(x: Tensor, weight: Tensor, lora_a: Tensor, mixed: bool) -> bool:
    """Empty batches, K = 0, N = 0, no task slots, malformed arguments: no work for a kernel.

    These go to the reference, which returns the right (empty, or base-only) result or the shared
    clear error, so every backend answers degenerate calls the same way.
    """
    if not all(isinstance(t, Tensor) for t in (x, weight, lora_a)):
        return True
    if mixed and (lora_a.dim() != 3 or lora_a.shape[0] == 0):
        return True
    return x.dim() < 1 or x.numel() == 0 or weight.dim() != 2 or 0 in weight.shape


def _autocast(*tensors):
    """Under ``torch.autocast`` cast as ``F.linear`` does (fp32 tensors to the autocast dtype; fp64,
    None and non-floating stay), so mixed-precision code runs every backend on one dtype."""
    import torch

    x = tensors[0]
    if not isinstance(x, Tensor) or not torch.is_autocast_enabled(x.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float = 1.0,
                *, dropout_p: float = 0.0, backend: str | None = None) -> Tensor:
    """``y = x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T``.

    Shape: x [..., K], weight [N, K], bias [N] or None, lora_a [r, K], lora_b [N, r] -> [..., N].
    Differentiable in x, weight, bias, lora_a and lora_b.
    """
    if not isinstance(x, Tensor):
        return reference.lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=dropout_p)  # its TypeError
    x, weight, bias, lora_a, lora_b = _autocast(x, weight, bias, lora_a, lora_b)
    name = resolve(backend, x, _needs_grad(x, weight, bias, lora_a, lora_b))  # an impossible backend raises first
    if _nothing_to_fuse(x, weight, lora_a, mixed=False):
        name = "torch"
    if name == "triton":
        from .triton import lora_linear as impl
    elif name == "cuda":
        from . import cuda as impl
    else:
        impl = reference
    return impl.lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=dropout_p)


def lora_linear_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
                      task_ids: "Tensor | Routing", *, backend: str | None = None, ranks: Tensor | None = None) -> Tensor:
    """Per-row task LoRA linear; see :func:`lora_kernels.ops.reference.lora_linear_mixed`.

    Shape: x [M, K] (or [B, ..., K] with ids per sample, or [..., K] with ids per flattened row),
    lora_a [T, r, K], lora_b [T, N, r], scales [T], task_ids [M] int (-1 = no task) or a Routing.
    ``ranks [T]`` (optional, ints in [0, r]): each task's true rank in the padded stacks. Every
    backend treats rows / columns at or past a task's rank as absent, whatever they hold (the
    Triton kernels skip them, the others zero them); out-of-range ranks raise.
    """
    if not isinstance(x, Tensor):
        return reference.lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, task_ids)  # its TypeError
    x, weight, bias, lora_a, lora_b = _autocast(x, weight, bias, lora_a, lora_b)
    name = resolve(backend, x, _needs_grad(x, weight, bias, lora_a, lora_b))  # an impossible backend raises first
    if _nothing_to_fuse(x, weight, lora_a, mixed=True):
        name = "torch"
    if name == "triton":
        from .triton import lora_linear_mixed as impl

        return impl.lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, task_ids, ranks=ranks)
    if name == "cuda":
        from . import cuda as impl

        if ranks is not None:  # the CUDA kernels have no ranks: validate, then zero the padding
            num_rows = task_ids.num_rows if isinstance(task_ids, Routing) else torch.as_tensor(task_ids).numel()
            check_lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, num_rows, ranks)
            lora_a, lora_b = reference.rank_masked(lora_a, lora_b, ranks)
        return impl.lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, task_ids)
    return reference.lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, task_ids, ranks=ranks)
