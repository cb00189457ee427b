"""Shared validation: the one error type of every refused load, and the checks loads share.

``Model.load_state_dict``, task files, full checkpoints and PEFT folders all refuse bad input the
same way: they check everything first, raise :class:`CheckpointError` naming every problem, and
change nothing. Values are staged (converted to each target's dtype and device) before the first
write, so a conversion that fails (a meta tensor, an unsupported dtype) is a refusal, not a load
that stops half-way.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["CheckpointError", "refuse", "is_int", "is_num", "state_errors", "check_value", "stage"]


class CheckpointError(ValueError, RuntimeError):
    """A file or state dict was refused; the model was not changed.

    A ``ValueError`` (bad input) and a ``RuntimeError`` (what ``torch.nn.Module.load_state_dict``
    raises), so callers written for either keep working.
    """


def refuse(source: str, problems: list[str] | str) -> CheckpointError:
    """The error for refusing ``source``: every problem on its own line."""
    if isinstance(problems, str):
        problems = [problems]
    return CheckpointError(f"refusing to load {source} (nothing was changed):\n  " + "\n  ".join(problems))


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite real number that is not a bool (huge ints too: no OverflowError)."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # a 400-digit int
        return False


def _dtype_ok(v: Tensor, target: torch.dtype) -> bool:
    if v.dtype == target:
        return True
    if not (v.dtype.is_floating_point and target.is_floating_point):
        return False
    try:  # float8 and other exotic dtypes may not convert on this device
        torch.zeros(1, dtype=v.dtype, device=v.device).to(target)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def check_value(k: str, v: Any, shape, dtype: torch.dtype, finite: bool = False) -> list[str]:
    """Problems of loading ``v`` where a ``shape``/``dtype`` tensor lives (empty list: fine)."""
    if not isinstance(v, Tensor):
        return [f"{k}: expected a tensor, got {type(v).__name__}"]
    if v.is_meta:
        return [f"{k}: a meta tensor holds no values"]
    if tuple(v.shape) != tuple(shape):
        return [f"{k}: shape {tuple(v.shape)} does not match the model's {tuple(shape)}"]
    if not _dtype_ok(v, dtype):
        return [f"{k}: dtype {v.dtype} cannot be loaded into {dtype}"]
    if v.dtype.is_floating_point:
        wide = v if v.dtype.itemsize > 1 else v.float()  # float8 has no isfinite kernel
        ok = torch.isfinite(wide)
        if finite and not bool(ok.all()):
            return [f"{k}: holds NaN or Inf values"]
        if v.dtype != dtype and dtype.is_floating_point and not bool((torch.isfinite(v.to(dtype).float()) | ~ok).all()):
            return [f"{k}: values overflow the model's dtype {dtype} (cast from {v.dtype})"]
    return []


def state_errors(given: Mapping[str, Any], targets: Mapping[str, Tensor], strict: bool = True,
                 finite: bool = False) -> tuple[list, list, list[str]]:
    """``(missing, unexpected, errors)`` of loading ``given`` into ``targets``: key set (when
    ``strict``), tensor type, shape, dtype policy (floating to floating is cast) and, with
    ``finite``, NaN/Inf and overflow of the cast."""
    missing = [k for k in targets if k not in given]
    unexpected = [k for k in given if k not in targets]
    errors = []
    if strict and missing:
        errors.append(f"missing keys: {missing}")
    if strict and unexpected:
        errors.append(f"unexpected keys: {unexpected}")
    for k, v in given.items():
        if k in targets:
            errors += check_value(k, v, targets[k].shape, targets[k].dtype, finite)
    return missing, unexpected, errors


def stage(given: Mapping[str, Tensor], targets: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """``given``'s entries for ``targets`` converted to each target's dtype and device (copies).

    Run after :func:`state_errors` and before the first write: whatever conversion fails here
    (out of memory, a device it cannot reach) fails before anything was changed.
    """
    try:
        return {k: given[k].detach().to(device=t.device, dtype=t.dtype, copy=True) for k, t in targets.items() if k in given}
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise refuse(source, f"a value could not be converted: {type(e).__name__}: {e}") from None
