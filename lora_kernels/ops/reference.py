"""The pure-torch LoRA ops: the correctness oracle for every kernel, and the CPU fast path.

Same signatures as the accelerated backends (``backend`` is accepted and ignored). Built on
``F.linear`` + ``addmm_`` so that the LoRA term is added into the base output in place (no extra
pass over ``y``), and on a :class:`~lora_kernels.ops.routing.Routing` computed once per batch
for mixed-task batches, so no layer builds indices per call.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_lora_linear, check_lora_linear_mixed, host_read_forbidden
from .routing import Routing

__all__ = ["lora_linear", "lora_linear_mixed", "rank_masked", "low_rank", "gather_pays", "gathered_delta", "segmented_delta"]


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float = 1.0,
                *, dropout_p: float = 0.0, backend: str | None = None) -> Tensor:
    """``y = x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T``.

    Shape: x [..., K], weight [N, K], bias [N] or None, lora_a [r, K], lora_b [N, r] -> y [..., N].
    Dropout (``dropout_p > 0``) applies to the LoRA input only, as ``F.dropout`` in training mode.
    """
    check_lora_linear(x, weight, bias, lora_a, lora_b, dropout_p)
    return _lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p)


def _lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0):
    y = F.linear(x, weight, bias)
    xd = F.dropout(x, dropout_p, training=True) if dropout_p else x
    n, r = lora_b.shape
    rows = y.shape[:-1].numel()
    if x.dtype == torch.float16:
        y.view(rows, n).add_(low_rank(xd, lora_a, lora_b, scale).reshape(rows, n))
        return y
    if y.dtype != lora_b.dtype:  # under torch.autocast F.linear casts, the in-place addmm_ would not
        return y + low_rank(xd, lora_a, lora_b, scale)
    h = F.linear(xd, lora_a)  # [..., r], small
    # addmm_ adds the expand GEMM into y in place: one write of y instead of two.
    y.view(rows, n).addmm_(h.reshape(rows, r), lora_b.t(), alpha=float(scale))
    return y


def low_rank(x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``scale * (x @ lora_a.T) @ lora_b.T`` in ``x``'s dtype.

    fp16 goes through fp32: ``x·Aᵀ`` sums K products and can pass fp16's 65504 where the output
    does not (DESIGN §5 keeps ``x·Aᵀ`` in fp32 for the same reason). bf16 has fp32's range.
    """
    if x.dtype == torch.float16:
        return F.linear(F.linear(x.float(), lora_a.float()) * scale, lora_b.float()).to(x.dtype)
    return F.linear(F.linear(x, lora_a) * scale, lora_b)


def lora_linear_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
                      task_ids: "Tensor | Routing", *, backend: str | None = None, ranks: Tensor | None = None) -> Tensor:
    """Per-row task: ``y[m] = x[m] @ weight.T + bias + scales[t] * (x[m] @ lora_a[t].T) @ lora_b[t].T``, ``t = task_ids[m]``.

    Shape: x [M, K] (or [B, ..., K] with one id per dim-0 sample, or [..., K] with ids over the
    flattened leading dims), lora_a [T, r, K], lora_b [T, N, r], scales [T], task_ids [M] int
    (``-1`` = no task) or a :class:`Routing`. Rows with task ``-1`` are exactly the base output.
    ``ranks [T]`` (optional, ints in [0, r]): task ``t`` uses only rows ``< ranks[t]`` of
    ``lora_a[t]`` and columns ``< ranks[t]`` of ``lora_b[t]``; the rest is absent (whatever it holds).
    """
    num_rows = task_ids.num_rows if isinstance(task_ids, Routing) else torch.as_tensor(task_ids).numel()
    check_lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, num_rows, ranks)  # shapes first: clearer errors
    lora_a, lora_b = rank_masked(lora_a, lora_b, ranks)
    routing = Routing.of(task_ids, lora_a.shape[0])
    scale_list = scales.tolist()  # T floats: one host copy per call
    y = F.linear(x, weight, bias)

    def delta(t: int, xt: Tensor) -> Tensor:
        return low_rank(xt, lora_a[t], lora_b[t], scale_list[t])

    rows_y, rows_x = y, x
    if not (x.dim() >= 2 and routing.num_rows == x.shape[0]):  # ids over the flattened leading dims
        rows_y, rows_x = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
    if gather_pays(routing, rows_x, lora_a.shape[1], lora_b.shape[1]):
        gathered_delta(rows_y, rows_x, routing, lora_a, lora_b, scales)
    else:
        segmented_delta(rows_y, rows_x, routing, delta)
    return y


def rank_masked(lora_a: Tensor, lora_b: Tensor, ranks: Tensor | None) -> tuple[Tensor, Tensor]:
    """The stacks with every row / column at or past a task's rank set to zero (absent).

    Shape: lora_a [T, r, ...], lora_b [T, N, r, ...], ranks [T] (validated) -> the same shapes.
    This is the ``ranks`` contract of every backend: the Triton kernels never read the padding;
    here (and before the CUDA kernels, which have no ``ranks``) it is zeroed by a select, so
    padding holding Inf or NaN is absent too (a multiply by 0 would give NaN). No copy when
    every rank is full.
    """
    if ranks is None:
        return lora_a, lora_b
    r = lora_a.shape[1]
    keep = torch.arange(r, device=lora_a.device) < ranks.to(lora_a.device).view(-1, 1)  # [T, r]
    if not host_read_forbidden(keep) and bool(keep.all()):  # under capture / tracing: always mask
        return lora_a, lora_b
    trail_a = (1,) * (lora_a.dim() - 2)
    trail_b = (1,) * (lora_b.dim() - 3)
    lora_a = torch.where(keep.view(*keep.shape, *trail_a), lora_a, 0)
    lora_b = torch.where(keep.view(keep.shape[0], 1, r, *trail_b), lora_b, 0)
    return lora_a, lora_b


# Gathering per-row stacks copies n·r·(K+N) elements: take that path only from this many tasks on
# (below, the per-task loop has few ops anyway) and while the copy stays small next to the
# activations or under 4M elements (16 MiB fp32), so a 8k-row batch never gathers gigabytes.
GATHER_MIN_TASKS = 3
GATHER_MAX_ELEMENTS = 1 << 22


def gather_pays(routing: Routing, x: Tensor, rank: int, n_out: int) -> bool:
    """Whether :func:`gathered_delta` beats :func:`segmented_delta` for this batch (see above)."""
    if len(routing.present) < GATHER_MIN_TASKS or x.shape[-1] == 0 or n_out == 0:
        return False
    n = routing.num_rows - routing.starts[0]
    copy = n * rank * (x.shape[-1] + n_out)
    return copy <= max(GATHER_MAX_ELEMENTS, 2 * x.numel() // max(x.shape[-1], 1) * (x.shape[-1] + n_out))


def gathered_delta(y: Tensor, x: Tensor, routing: Routing, lora_a: Tensor, lora_b: Tensor, scales: Tensor) -> Tensor:
    """Add every row's task term into ``y`` at once: gather per-row adapter stacks, then two ``bmm``.

    Shape: y [M, ..., N], x [M, ..., K] with the routing's rows as dim 0; lora_a [T, r, K],
    lora_b [T, N, r], scales [T]. The same result as :func:`segmented_delta` in six ops whatever the
    number of tasks (the segmented loop costs about five per task): the CPU path for batches that
    mix many tasks, where per-op overhead dominates the small low-rank GEMMs. Rows without a task
    are not touched.
    """
    if routing.starts[0] == routing.num_rows:
        return y
    all_rows = routing.starts[0] == 0
    rows = routing.active_rows
    ids = routing.task_ids if all_rows else routing.cached("active_ids", lambda: routing.task_ids.index_select(0, rows))
    n, k = ids.numel(), x.shape[-1]
    xs = (x if all_rows else x.index_select(0, rows)).reshape(n, -1, k)
    work = torch.float32 if x.dtype == torch.float16 else x.dtype  # fp16: x·Aᵀ may overflow (see low_rank)
    h = torch.bmm(xs.to(work), lora_a.index_select(0, ids).to(work).mT)
    h = h * scales.index_select(0, ids).to(work).view(n, 1, 1)
    d = torch.bmm(h, lora_b.index_select(0, ids).to(work).mT).to(y.dtype).reshape(n, *y.shape[1:])
    if all_rows:
        return y.add_(d)
    return y.index_add_(0, rows, d)


def segmented_delta(y: Tensor, x: Tensor, routing: Routing, delta: Callable[[int, Tensor], Tensor]) -> Tensor:
    """Add ``delta(t, x[rows of t])`` into the rows of ``y`` of each present task ``t``.

    ``y`` and ``x`` have the routing's rows as dim 0 (any trailing shape: a sample's block is
    gathered whole, so no per-row index is built); ``y`` is updated in place
    (one ``index_add_`` for the whole batch) and returned. Rows without a
    task are never written, so they stay bit-identical to the base output.
    """
    present = routing.present
    if not present:
        return y
    if len(present) == 1 and routing.starts[0] == 0:
        # Every row has the same task: no gather, no scatter.
        y.add_(delta(present[0], x))
        return y
    parts = [delta(t, x.index_select(0, routing.rows(t))) for t in present]
    y.index_add_(0, routing.active_rows, torch.cat(parts).to(y.dtype))
    return y
