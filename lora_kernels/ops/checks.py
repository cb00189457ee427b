"""Argument checks shared by every backend, so that all of them refuse the same bad calls."""

from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _same_device(name: str, t: Tensor, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}: all tensors must be on one device")


def _check_base(op: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[int, int]:
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{op}: x and weight must be tensors")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: x has dtype {x.dtype}; allowed: float32, float16, bfloat16, float64")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dim [..., K], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has {x.shape[-1]} features in its last dim but weight is [N={n}, K={k}]")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} != x dtype {x.dtype}")
    _same_device("weight", weight, x)
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"{op}: bias must be [N={n}], got shape {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} != x dtype {x.dtype}")
        _same_device("bias", bias, x)
    return n, k


def check_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, dropout_p: float) -> int:
    """Validate the arguments of ``lora_linear``; returns the rank ``r``."""
    op = "lora_linear"
    n, k = _check_base(op, x, weight, bias)
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"{op}: lora_a must be [r, K] and lora_b [N, r], got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"{op}: rank must be >= 1, got lora_a of shape {tuple(lora_a.shape)}")
    if lora_a.shape[1] != k or lora_b.shape != (n, r):
        raise ValueError(f"{op}: with weight [N={n}, K={k}] and rank {r}, lora_a must be [{r}, {k}] and lora_b [{n}, {r}]; "
                         f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} != x dtype {x.dtype}")
        _same_device(name, t, x)
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{op}: dropout_p must lie in [0, 1), got {dropout_p}")
    return r


def check_lora_linear_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
                            num_rows: int, ranks: Tensor | None = None) -> int:
    """Validate the arguments of ``lora_linear_mixed``; returns the (padded) rank ``r``.

    ``ranks [T]`` (optional, integer): each task's true rank, ``0 <= ranks[t] <= r``. Checked on the
    host (one read of T ints) because a rank past ``r`` would read outside the stacks and a negative
    one drop the term; skipped while ``torch.compile`` traces or a CUDA graph captures (no host
    reads there), where every backend clamps it to [0, r] instead.
    """
    op = "lora_linear_mixed"
    n, k = _check_base(op, x, weight, bias)
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"{op}: lora_a must be [T, r, K] and lora_b [T, N, r], got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    t, r, _ = lora_a.shape
    if r < 1:
        raise ValueError(f"{op}: rank must be >= 1, got lora_a of shape {tuple(lora_a.shape)}")
    if lora_a.shape[2] != k or lora_b.shape != (t, n, r):
        raise ValueError(f"{op}: with weight [N={n}, K={k}], T={t} and rank {r}, lora_a must be [{t}, {r}, {k}] and lora_b "
                         f"[{t}, {n}, {r}]; got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    for name, tt in (("lora_a", lora_a), ("lora_b", lora_b)):
        if tt.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {tt.dtype} != x dtype {x.dtype}")
        _same_device(name, tt, x)
    if not isinstance(scales, Tensor) or scales.shape != (t,):
        raise ValueError(f"{op}: scales must be a tensor [T={t}], got {getattr(scales, 'shape', type(scales))}")
    lead = x.shape[:-1].numel()
    if num_rows != lead and (x.dim() < 2 or num_rows != x.shape[0]):
        raise ValueError(f"{op}: {num_rows} task id(s) fit neither x's dim 0 ({x.shape[0] if x.dim() > 1 else 'none'}) "
                         f"nor its {lead} flattened rows (x shape {tuple(x.shape)})")
    if ranks is not None:
        check_ranks(ranks, t, r)
    return r


def check_ranks(ranks: Tensor, num_tasks: int, r: int) -> None:
    """``ranks`` is an integer tensor [T] with every value in [0, r] (see check_lora_linear_mixed)."""
    op = "lora_linear_mixed"
    if not isinstance(ranks, Tensor) or ranks.shape != (num_tasks,):
        raise ValueError(f"{op}: ranks must be a tensor [T={num_tasks}], got {getattr(ranks, 'shape', type(ranks))}")
    if ranks.dtype.is_floating_point or ranks.dtype.is_complex or ranks.dtype == torch.bool:
        raise TypeError(f"{op}: ranks must be an integer tensor, got {ranks.dtype}")
    if num_tasks and not host_read_forbidden(ranks):
        lo, hi = (int(v) for v in torch.aminmax(ranks))
        if lo < 0 or hi > r:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{op}: rank {bad} out of range: ranks must lie in [0, r={r}] (the stacks' padded rank); "
                             f"pass ranks=None if the stacks hold no padding")


def host_read_forbidden(t: Tensor) -> bool:
    """Whether reading ``t`` on the host is impossible now: under ``torch.compile`` tracing, or a
    CUDA tensor while the current stream captures a CUDA graph (a sync would break the capture)."""
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
