"""transformers' ``Conv1D`` (GPT-2 and relatives): a linear layer that stores its weight transposed.

``Conv1D`` computes ``y = x·W + b`` with ``W [in, out]`` (``nn.Linear`` keeps ``[out, in]``). The
adapter is the same as a linear layer's (``A [r, in]``, ``B [out, r]``, PEFT's layout for these
layers too: PEFT's ``fan_in_fan_out=True`` only transposes when merging). The type is matched by its
qualified name (see :mod:`lora_kernels.layers`), so transformers is never imported for it.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Adapter, LoRALayer


class LoRAHFConv1D(LoRALayer):
    """Shape: x [B, ..., in] -> [B, ..., out]. Base ``weight [in, out]``; ``A [r, in]``, ``B [out, r]``."""

    def dims(self) -> tuple[int, int]:
        n_in, n_out = self.base.weight.shape
        return n_in, n_out

    def make_adapter(self, rank: int, alpha: float, rslora: bool, dropout: float) -> Adapter:
        w = self.base.weight
        n_in, n_out = w.shape
        kw = dict(bias=False, device=w.device, dtype=w.dtype)
        return Adapter(nn.Linear(n_in, rank, **kw), nn.Linear(rank, n_out, **kw), rank, alpha, rslora, dropout)

    def delta(self, x: Tensor, a: Tensor, b: Tensor, scale: float, dropout_p: float) -> Tensor:
        if dropout_p:
            x = nn.functional.dropout(x, dropout_p, training=True)
        return nn.functional.linear(nn.functional.linear(x, a) * scale, b)
