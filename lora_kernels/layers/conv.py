"""``nn.Conv1d/2d/3d``: ``A`` is a conv with the base's geometry, ``B`` a 1×1 conv, both grouped.

``A`` copies the base's kernel size, stride, padding, dilation, groups and padding_mode (PEFT
drops the last two: its delta is wrong for dilated or reflect-padded convs); ``B`` is a 1×1 conv
with the base's groups, so the delta ``B·A`` has the base weight's block structure and could be
merged into it. The rank must be a multiple of the groups.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Adapter, LoRALayer


class LoRAConv(LoRALayer):
    """Shape: x [B, C_in, *spatial] -> [B, C_out, *spatial']. ``A [r, C_in/g, *k]``, ``B [C_out, r/g, 1...]``."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.groups = base.groups

    def dims(self) -> tuple[int, int]:
        return self.base.in_channels, self.base.out_channels

    def make_adapter(self, rank: int, alpha: float, rslora: bool, dropout: float) -> Adapter:
        base, w = self.base, self.base.weight
        conv = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[w.dim() - 2]
        kw = dict(bias=False, device=w.device, dtype=w.dtype)
        lora_a = conv(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                      dilation=base.dilation, groups=base.groups, padding_mode=base.padding_mode, **kw)
        lora_b = conv(rank, base.out_channels, 1, groups=base.groups, **kw)
        return Adapter(lora_a, lora_b, rank, alpha, rslora, dropout)

    def delta(self, x: Tensor, a: Tensor, b: Tensor, scale: float, dropout_p: float) -> Tensor:
        if dropout_p:
            x = nn.functional.dropout(x, dropout_p, training=True)
        # Any adapter's lora_A carries the base geometry; its _conv_forward honours padding_mode.
        geometry = next(iter(self.adapters.values())).lora_A
        h = geometry._conv_forward(x, a, None) * scale  # scale the r channels, not the output
        expand = {3: nn.functional.conv1d, 4: nn.functional.conv2d, 5: nn.functional.conv3d}[b.dim()]
        return expand(h, b, groups=self.groups)
