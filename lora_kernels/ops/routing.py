"""Routing: which rows of a batch belong to which task, computed once per batch.

A mixed-task batch carries one task id per row (``-1`` = no task). Every LoRA layer of a model
needs the same grouping (rows sorted by task, rows per task, segment offsets), so it is computed
once per model call and the same :class:`Routing` object is handed to every layer; nothing is
rebuilt per layer.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Routing"]


class Routing:
    """Rows of a batch grouped by task.

    Shape: ``task_ids [M]`` int64 with values in ``[-1, T)``.

    Attributes:
        task_ids: ``[M]`` int64, the ids as given (unsorted is fine).
        num_tasks: ``T``, the number of task slots the stacks hold.
        order: ``[M]`` int64, a stable argsort of ``task_ids``: the ``-1`` rows first, then the
            rows of task 0, task 1, ... each in their original order.
        counts: ``tuple[int]`` of length ``T``, rows per task (on the host).
        starts: ``tuple[int]`` of length ``T + 1``: task ``t``'s rows are
            ``order[starts[t]:starts[t + 1]]``; ``starts[0]`` is the number of ``-1`` rows.
        present: the tasks with at least one row, ascending.

    The host copies cost one device sync per batch, not per layer. Kernels keep what else they
    derive from a routing (tile maps, device offsets) in :meth:`cached`, so that it too is built
    once per batch.
    """

    __slots__ = ("task_ids", "num_tasks", "order", "counts", "starts", "present", "_cache")

    def __init__(self, task_ids: Tensor, num_tasks: int):
        if not isinstance(task_ids, Tensor):
            task_ids = torch.as_tensor(task_ids)
        if task_ids.dim() != 1:
            raise ValueError(f"task_ids must be 1-D (one id per row), got shape {tuple(task_ids.shape)}")
        if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
            raise TypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
        if not isinstance(num_tasks, int) or num_tasks < 0:
            raise ValueError(f"num_tasks must be a non-negative int, got {num_tasks!r}")
        task_ids = task_ids.to(torch.int64)
        # One host round trip for the whole batch: bincount over ids shifted by one (-1 -> 0).
        if task_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(task_ids))
            if lo < -1 or hi >= num_tasks:
                bad = lo if lo < -1 else hi
                raise ValueError(f"task id {bad} out of range: ids must lie in [-1, {num_tasks}) for {num_tasks} task(s)")
        counts_all = torch.bincount(task_ids + 1, minlength=num_tasks + 1).tolist()
        self.task_ids = task_ids
        self.order = torch.sort(task_ids, stable=True).indices
        self._set_counts(num_tasks, counts_all)

    @classmethod
    def of(cls, task_ids: "Tensor | Routing", num_tasks: int) -> "Routing":
        """``task_ids`` as a Routing (returned as is when it already is one, after a check)."""
        if isinstance(task_ids, Routing):
            if task_ids.num_tasks != num_tasks:
                raise ValueError(f"routing was built for {task_ids.num_tasks} task(s) but the stacks hold {num_tasks}")
            return task_ids
        return cls(task_ids, num_tasks)

    @classmethod
    def from_list(cls, ids: Sequence[int], num_tasks: int, device=None) -> "Routing":
        """A routing from a Python list of ids, computed on the host.

        No device sync, and traceable by ``torch.compile`` (the list is a compile-time constant),
        which is how :class:`lora_kernels.Model` builds the routing of a per-sample task list.
        """
        ids = [int(i) for i in ids]
        for i in ids:
            if not -1 <= i < num_tasks:
                raise ValueError(f"task id {i} out of range: ids must lie in [-1, {num_tasks}) for {num_tasks} task(s)")
        order = sorted(range(len(ids)), key=lambda m: ids[m])  # Python's sort is stable
        counts = [0] * (num_tasks + 1)
        for i in ids:
            counts[i + 1] += 1
        new = cls.__new__(cls)
        new.task_ids = torch.tensor(ids, dtype=torch.int64, device=device)
        new.order = torch.tensor(order, dtype=torch.int64, device=device)
        new._set_counts(num_tasks, counts)
        return new

    def _set_counts(self, num_tasks: int, counts_all: list[int]) -> None:
        self.num_tasks = num_tasks
        self.counts = tuple(counts_all[1:])
        starts = [counts_all[0]]
        for c in self.counts:
            starts.append(starts[-1] + c)
        self.starts = tuple(starts)
        self.present = tuple(t for t, c in enumerate(self.counts) if c)
        self._cache = {}

    @property
    def num_rows(self) -> int:
        return self.task_ids.numel()

    def rows(self, t: int) -> Tensor:
        """Row indices of task ``t`` (a view into :attr:`order`), ascending."""
        return self.order[self.starts[t] : self.starts[t + 1]]

    @property
    def active_rows(self) -> Tensor:
        """Rows that have a task, grouped by task: ``order[starts[0]:]``."""
        return self.order[self.starts[0] :]

    def cached(self, key, build):
        """``build()`` once per routing (i.e. once per batch), then the same value for every layer."""
        try:
            return self._cache[key]
        except KeyError:
            value = self._cache[key] = build()
            return value

    def expand(self, rows_per_id: int) -> "Routing":
        """The routing of a batch in which each id covers ``rows_per_id`` consecutive rows.

        A layer whose input is ``[B, S, K]`` with one task per sample sees ``B * S`` rows;
        this builds (once per batch and ``S``) the row-level routing for it.
        """
        if rows_per_id == 1:
            return self
        return self.cached(("expand", rows_per_id), lambda: Routing(self.task_ids.repeat_interleave(rows_per_id), self.num_tasks))

    def to(self, device) -> "Routing":
        """This routing with its tensors on ``device`` (cached)."""
        device = torch.device(device)
        if self.task_ids.device == device:
            return self
        return self.cached(("to", str(device)), lambda: _moved(self, device))

    def __repr__(self) -> str:
        return f"Routing(rows={self.num_rows}, tasks={self.num_tasks}, counts={self.counts}, untasked={self.starts[0]})"


def _moved(r: Routing, device: torch.device) -> Routing:
    new = Routing.__new__(Routing)
    new.task_ids = r.task_ids.to(device)
    new.order = r.order.to(device)
    new._set_counts(r.num_tasks, [r.starts[0], *r.counts])
    return new
