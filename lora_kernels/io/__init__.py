"""Checkpoints, PEFT interop and merging: everything that reads or writes a model's weights.

- :mod:`.checkpoint`: ``save_task`` / ``load_task`` (one task, safetensors with its config),
  ``save_checkpoint`` / ``load_checkpoint`` and ``full_state_dict`` / ``load_full_state_dict``
  (base + every task, also for ``torch.distributed.checkpoint``).
- :mod:`.peft`: ``load_peft_adapter`` / ``save_peft_adapter`` (Hugging Face PEFT LoRA folders).
- :mod:`.merge`: ``merge`` / ``unmerge`` (fold one task into the base weights, exactly reversible).

Nothing here imports peft or transformers: the formats are read and written directly.
"""

from .checkpoint import (CheckpointError, add_tasks, full_state_dict, load_checkpoint, load_full_state_dict, load_task,
                         save_checkpoint, save_task, task_configs)
from .merge import merge, merged_task, unmerge
from .peft import load_peft_adapter, save_peft_adapter

__all__ = ["CheckpointError", "save_task", "load_task", "save_checkpoint", "load_checkpoint", "full_state_dict",
           "load_full_state_dict", "task_configs", "add_tasks", "load_peft_adapter", "save_peft_adapter", "merge",
           "unmerge", "merged_task"]
