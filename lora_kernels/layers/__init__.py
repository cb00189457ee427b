"""Wrapped module types and the registry that maps a base type to its wrapper."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .base import Adapter, CustomLayer, LoRALayer
from .conv import LoRAConv
from .embedding import LoRAEmbedding
from .hf_conv1d import LoRAHFConv1D
from .linear import LoRALinear

__all__ = ["Adapter", "LoRALayer", "CustomLayer", "LoRALinear", "LoRAEmbedding", "LoRAConv", "LoRAHFConv1D",
           "register_base_module_wrapper", "wrapper_for"]

_BUILTIN: dict[type, Callable[[nn.Module], LoRALayer]] = {
    nn.Linear: LoRALinear,
    nn.Embedding: LoRAEmbedding,
    nn.Conv1d: LoRAConv,
    nn.Conv2d: LoRAConv,
    nn.Conv3d: LoRAConv,
}
# Types of optional libraries, matched by qualified name so that the library is never imported here.
_BY_NAME: dict[str, Callable[[nn.Module], LoRALayer]] = {
    "transformers.pytorch_utils.Conv1D": LoRAHFConv1D,  # GPT-2's transposed linear
    # Subclasses whose forward is their parent's math (checked against transformers 5.x):
    "transformers.models.falcon.modeling_falcon.FalconLinear": LoRALinear,  # x @ W.T (+ b)
}
_CUSTOM: dict[type, Callable[[nn.Module], nn.Module]] = {}
_AS: dict[type, type[LoRALayer]] = {}  # "treat this type as Linear/Embedding/...": a built-in wrapper class


def register_base_module_wrapper(base_type: type, constructor: Callable[[nn.Module], nn.Module]) -> None:
    """Wrap every ``base_type`` module that :class:`lora_kernels.Model` meets with ``constructor``.

    ``constructor(module)`` builds one task's module from the base module; that module computes the
    layer's whole output for its task. Registering a built-in type replaces the built-in wrapper.
    Models wrapped before the call are not affected.

    ``constructor`` may also be one of the library's wrapper classes (``LoRALinear``,
    ``LoRAEmbedding``, ``LoRAConv``, ``LoRAHFConv1D``): "treat this type as Linear / Embedding / ...",
    for subclasses whose forward computes their parent's math. They then get the fast paths, PEFT
    import/export and merging; the type's own forward still computes the base output.
    """
    if not isinstance(base_type, type) or not issubclass(base_type, nn.Module):
        raise TypeError(f"base_type must be a torch.nn.Module subclass, got {base_type!r}")
    if not callable(constructor):
        raise TypeError(f"constructor must be callable (module -> task module), got {constructor!r}")
    if isinstance(constructor, type) and issubclass(constructor, LoRALayer):
        if constructor is CustomLayer or constructor is LoRALayer:
            raise TypeError("register a concrete wrapper class (LoRALinear, LoRAEmbedding, LoRAConv, LoRAHFConv1D) or a task-module constructor")
        _CUSTOM.pop(base_type, None)
        _AS[base_type] = constructor
        return
    _AS.pop(base_type, None)
    _CUSTOM[base_type] = constructor


def wrapper_for(module: nn.Module) -> Callable[[nn.Module], LoRALayer] | None:
    """The wrapper factory for ``module``'s exact type, or None to look inside it.

    Exact types only: a subclass may override ``forward`` (quantized or fused linears), and wrapping
    it as its parent would compute the wrong base output. Register such types explicitly.
    """
    t = type(module)
    if t in _CUSTOM:
        constructor = _CUSTOM[t]
        return lambda m: CustomLayer(m, constructor)
    if t in _AS:
        return _AS[t]
    return _BUILTIN.get(t) or _BY_NAME.get(f"{t.__module__}.{t.__qualname__}")
