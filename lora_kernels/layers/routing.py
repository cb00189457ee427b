"""Per-call task routing from :class:`lora_kernels.Model` to its layers.

``Model.forward`` turns its ``task=`` argument into one :class:`Route` and makes it current for the
duration of the call; every wrapped layer reads it. Nothing is stored on the model:

- in eager mode the route lives in a :class:`contextvars.ContextVar`, so threads (and async tasks)
  each see their own, and the ``finally`` that resets it runs even when the model raises;
- under ``torch.compile`` context variables cannot be traced, so the route is pushed on a plain
  list for the duration of the traced call (the route is then a compile-time constant: the task
  names are guarded on, and a new task selection recompiles).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..ops.routing import Routing

# A mix: ((task name, weight), ...) in a fixed order. One task is ((name, 1.0),).
Mix = tuple[tuple[str, float], ...]

#: How an adapted layer's input dim 0 relates to the batch, learnt by the Model's probe:
#: ``batch``: dim 0 is the batch, or the batch times a block, batch-major (``[B*S, H]`` flattening);
#: ``broadcast``: dim 0 is 1 whatever the batch (position ids): the input is expanded to the batch;
#: ``unbatched``: 1-D ids equal for every batch (Whisper's encoder positions): given a batch dim;
#: ``fixed``: dim 0 does not depend on the batch (T5's relative-attention bias sees ``[q, k]``);
#: ``varies``: inconsistent between calls or samples (e.g. MoE experts that see a router's picks).
LAYOUTS = ("batch", "broadcast", "unbatched", "fixed", "varies")


@dataclass(frozen=True, eq=False)
class Route:
    """The task selection of one model call.

    ``mix`` is set for a whole-batch selection (one task or a weighted sum). For a per-sample list,
    ``slots`` holds the distinct mixes and ``routing`` maps each sample (dim 0) to its slot
    (``-1`` = base model only).
    """

    mix: Mix | None = None
    slots: tuple[Mix, ...] = ()
    routing: Routing | None = None
    #: per-sample routes: the layouts (a frozenset of :data:`LAYOUTS`) each adapted layer's dim 0
    #: showed, by layer path; the Model's dict, filled by its probe. Layers absent cannot be routed.
    layout: dict | None = None
    _blocks: dict = field(default_factory=dict)  # block size -> the routing with each id repeated

    def rows_routing(self, block: int) -> Routing:
        """The routing of a flattened ``[batch * block, ...]`` input (batch-major: sample i owns
        rows ``i*block ... (i+1)*block - 1``)."""
        if block == 1:
            return self.routing
        hit = self._blocks.get(block)
        if hit is None:
            ids = self.routing.task_ids.repeat_interleave(block)
            hit = self._blocks[block] = Routing(ids, self.routing.num_tasks)
        return hit

    def task_names(self) -> tuple[str, ...]:
        """Every task this call uses."""
        mixes = (self.mix,) if self.mix is not None else self.slots
        return tuple(sorted({n for mix in mixes for n, _ in mix}))

    @property
    def batch(self) -> int | None:
        return None if self.routing is None else self.routing.num_rows


_NO_CALL = object()  # the default: no model call in flight (distinct from a base-only call, route None)
_current: contextvars.ContextVar = contextvars.ContextVar("lora_kernels_route", default=_NO_CALL)
_compile_stack: list[Route] = []


def current_route() -> Route | None:
    """The route of the model call in progress on this thread, or None outside one."""
    if torch.compiler.is_compiling():
        return _compile_stack[-1] if _compile_stack else None
    route = _current.get()
    return None if route is _NO_CALL else route


def call_in_flight() -> bool:
    """Whether a model call (or a ``using`` block) is in progress in this context, even a base-only one."""
    if torch.compiler.is_compiling():
        return True
    return _current.get() is not _NO_CALL


@contextlib.contextmanager
def routed(route: Route | None) -> Iterator[None]:
    """Make ``route`` current for the body of the ``with`` (and nothing after it)."""
    if torch.compiler.is_compiling():
        _compile_stack.append(route)
        try:
            yield
        finally:
            _compile_stack.pop()
        return
    token = _current.set(route)
    try:
        yield
    finally:
        _current.reset(token)
