"""lora_kernels: LoRA for any PyTorch model, with many tasks, mixed-task batches and fused kernels.

    import lora_kernels as lk
    model = lk.Model(model)
    model.add_task("a")
    y = model(x, task="a")                  # one task
    y = model(x, task=["a", None, "b"])     # one task per sample
    pool = lk.AdapterPool(lk.Model(inner), slots=32)   # serving thousands of adapters from files
"""

__version__ = "0.1.0"

from . import io, ops
from .layers import register_base_module_wrapper
from .model import Model, TaskConfig
from .ops import available_backends, set_backend, use_backend
from .serving import AdapterPool, PoolStats

__all__ = ["Model", "AdapterPool", "PoolStats", "TaskConfig", "register_base_module_wrapper", "io", "ops", "set_backend", "use_backend", "available_backends", "__version__"]
