"""Mixed-task LoRA linear on Triton (``lora_kernels/ops/triton/lora_linear_mixed.py``).

On CPU the kernels run through the Triton interpreter (see conftest.py) against the float64
reference; shapes are small because the interpreter runs every program in Python. The AOT tests
compile every shipped config for sm_90 and sm_80 (tests/triton_aot.py).
"""

from __future__ import annotations

import os

import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import reference
from lora_kernels.ops.routing import Routing

from tests.utils import assert_close, poisoned

mixed = pytest.importorskip("lora_kernels.ops.triton.lora_linear_mixed")
pytestmark = pytest.mark.skipif(not lk.ops.available_backends()["triton"].available, reason="Triton cannot run here")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an element a kernel forgets is caught."""
    monkeypatch.setattr(mixed, "_empty", lambda shape, *, dtype, device: poisoned(shape, dtype, device))


def task_ids(dist: str, m: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """Task ids of ``m`` rows over ``t`` tasks, unsorted, for a named distribution."""
    if dist == "identical":
        return torch.full((m,), int(torch.randint(t, (1,), generator=gen)), dtype=torch.int64)
    if dist == "uniform":
        return torch.randint(t, (m,), generator=gen)
    if dist == "zipf":  # P(task i) ~ 1 / (i + 1)^1.5
        w = torch.tensor([1.0 / (i + 1) ** 1.5 for i in range(t)], dtype=torch.float64)
        return torch.multinomial(w, m, replacement=True, generator=gen)
    if dist == "distinct":  # every row its own task while tasks last
        return torch.randperm(m, generator=gen) % t
    if dist == "none":
        return torch.full((m,), -1, dtype=torch.int64)
    if dist == "random-1":
        return torch.randint(-1, t, (m,), generator=gen)
    raise ValueError(dist)


def make_case(m, k, n, ranks, dtype, *, bias=True, seed=0, device="cpu"):
    """Random inputs; the stacks are zero-padded to max(ranks), scales alpha / r per task."""
    gen = torch.Generator().manual_seed(seed)
    t, r = len(ranks), max(ranks)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = randn(m, k)
    w = randn(n, k, scale=k ** -0.5)
    b = randn(n) if bias else None
    a = torch.zeros(t, r, k, dtype=dtype)
    bb = torch.zeros(t, n, r, dtype=dtype)
    for i, ri in enumerate(ranks):
        a[i, :ri] = randn(ri, k, scale=k ** -0.5)
        bb[i, :, :ri] = randn(n, ri, scale=ri ** -0.5)
    scales = torch.tensor([16.0 / ri for ri in ranks], dtype=torch.float32)
    return [v.to(device) if v is not None else None for v in (x, w, b, a, bb, scales)], gen


def run_and_grads(fn, x, w, b, a, bb, scales, ids, dy, **kw):
    leaves = [v.detach().clone().requires_grad_() if v is not None else None for v in (x, w, b, a, bb)]
    y = fn(*leaves, scales, ids, **kw)
    y.backward(dy)
    return y.detach(), [v.grad if v is not None else None for v in leaves]


def check_against_reference(args, ids, dtype, *, what="", **kw):
    x, w, b, a, bb, scales = args
    m = x.shape[0] if x.dim() == 2 else x.shape[:-1].numel()
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(*x.shape[:-1], w.shape[0], generator=gen, dtype=torch.float64).to(dtype).to(x.device)
    y, grads = run_and_grads(mixed.lora_linear_mixed, x, w, b, a, bb, scales, ids, dy, **kw)
    to64 = [v.double() if v is not None else None for v in (x, w, b, a, bb)]
    ref_ids = ids.task_ids if isinstance(ids, Routing) else ids
    y_ref, grads_ref = run_and_grads(reference.lora_linear_mixed, *to64, scales.double(), ref_ids, dy.double())
    assert y.dtype == dtype and m == y.shape[:-1].numel()
    assert_close(y, y_ref, dtype, f"{what} y")
    for name, g, g_ref in zip(("dx", "dW", "db", "dA", "dB"), grads, grads_ref):
        if g_ref is not None:
            assert g is not None, f"{what} {name} missing"
            assert_close(g, g_ref, dtype, f"{what} {name}")
    return y, grads


# ------------------------------------------------------------------------------------------------
# Oracle: forward and backward vs float64, every distribution and dtype, both regimes
# ------------------------------------------------------------------------------------------------

# (distribution, M, T): M <= 64 takes the BGMV shrink, M = 150 with long segments the SGMV one.
CASES = [("identical", 24, 3), ("uniform", 40, 4), ("zipf", 33, 8), ("distinct", 24, 64), ("none", 20, 3),
         ("random-1", 37, 5), ("identical", 150, 1), ("uniform", 150, 3), ("random-1", 150, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist,m,t", CASES, ids=[f"{d}-M{m}-T{t}" for d, m, t in CASES])
def test_matches_reference(dist, m, t, dtype):
    gen = torch.Generator().manual_seed(m * 100 + t)
    ranks = [int(torch.randint(1, 9, (1,), generator=gen)) for _ in range(t)]  # differing ranks, padded
    args, gen = make_case(m, 40, 24, ranks, dtype, seed=m + t)
    ids = task_ids(dist, m, t, gen)
    check_against_reference(args, ids, dtype, what=f"{dist}/{dtype}")


@pytest.mark.parametrize("k,n,r", [(1, 17, 1), (17, 1, 3), (2049, 17, 5), (33, 20, 256)], ids=str)
def test_odd_shapes_and_ranks(k, n, r):
    dtype = torch.bfloat16
    m = 6 if k > 1000 or r > 64 else 19
    args, gen = make_case(m, k, n, [r, max(1, r // 2)], dtype, seed=k + n)
    ids = task_ids("random-1", m, 2, gen)
    check_against_reference(args, ids, dtype, what=f"K{k} N{n} r{r}")


def test_no_bias_and_frozen_base():
    """dW / db are not computed when the base does not require grad; bias=None works."""
    dtype = torch.float32
    (x, w, _, a, bb, scales), gen = make_case(20, 24, 16, [4, 2], dtype, bias=False)
    ids = task_ids("random-1", 20, 2, gen)
    check_against_reference((x, w, None, a, bb, scales), ids, dtype, what="no bias")
    x = x.clone().requires_grad_()
    a, bb = a.clone().requires_grad_(), bb.clone().requires_grad_()
    y = mixed.lora_linear_mixed(x, w, None, a, bb, scales, ids)
    y.sum().backward()
    assert w.grad is None and a.grad is not None and x.grad is not None


@pytest.mark.parametrize("m,k,r,dtype", [(5, 101, 3, torch.float32), (16, 33, 16, torch.bfloat16), (2, 17, 64, torch.bfloat16)],
                         ids=["M5-K101-r3", "M16-r16", "M2-r64"])
def test_bgmv_rank_split(monkeypatch, m, k, r, dtype):
    """The per-row shrink split over the rank as on a GPU (the interpreter keeps one program per
    row, see ``_bgmv_programs``; here the split aims at 64 programs instead of BGMV_PROGRAMS and
    the tile is 64 elements instead of BGMV_TILE: the same rules at interpreter cost): r-blocks of
    1-4 rank rows, several K steps with a ragged last one, -1 rows and per-task ranks; forward
    and backward."""
    monkeypatch.setattr(mixed, "_bgmv_programs", lambda: 64)
    monkeypatch.setattr(mixed, "BGMV_TILE", 64)
    br, bk = mixed._bgmv_tile(m, r, False, torch.empty((), dtype=dtype).element_size(), True, k, 64)
    assert br < mixed._block_r(r, torch.empty((), dtype=dtype).element_size()) or r < 16  # the rank is split
    ranks = [r, max(1, r // 2), 1]
    args, gen = make_case(m, k, 17, ranks, dtype, seed=m + k)
    ids = task_ids("random-1", m, 3, gen)
    check_against_reference(args, ids, dtype, what=f"bgmv split br{br} bk{bk}")
    check_against_reference(args, ids, dtype, what=f"bgmv split br{br}, ranks", ranks=torch.tensor(ranks))


@pytest.mark.parametrize("m,t", [(24, 64), (40, 5)], ids=["distinct", "uniform"])
def test_gathered_and_segmented_expand_agree(monkeypatch, m, t):
    """Small M runs the gathered per-row expand, long segments one MMA per segment: both match the
    reference on the same batch, and the gathered one (fp32 FMAs on h) is at least as close."""
    dtype = torch.bfloat16
    args, gen = make_case(m, 40, 24, [int(i % 8) + 1 for i in range(t)], dtype, seed=m + t)
    ids = task_ids("distinct" if t >= m else "random-1", m, t, gen)
    y_gather, _ = check_against_reference(args, ids, dtype, what="gathered")
    monkeypatch.setattr(mixed, "GATHER_MAX_M", 0)
    y_seg, _ = check_against_reference(args, ids, dtype, what="segmented")
    x, w, b, a, bb, scales = args
    y_ref = reference.lora_linear_mixed(*(v.double() for v in (x, w, b, a, bb)), scales.double(), ids)
    err = [float((y.double() - y_ref).norm() / y_ref.norm()) for y in (y_gather, y_seg)]
    assert err[0] <= err[1] * 1.01 + 1e-6, err


def test_short_segments_above_gather_max_m(monkeypatch):
    """150 rows over 40 tasks (mean segment < BGMV_MAX_MEAN_SEGMENT): the gathered expand on the
    128-row prefill tile (K, N, r multiples of 16: the aligned bf16 config, 2 rank columns per step),
    forward and backward vs float64; an Inf in one task's B stays in that task's rows."""
    dtype = torch.bfloat16
    m, t = 150, 40
    used = []
    gather_r = mixed._gather_r
    monkeypatch.setattr(mixed, "_gather_r", lambda cfg, aligned=True: used.append((cfg.block_m, aligned)) or gather_r(cfg, aligned))
    args, gen = make_case(m, 48, 32, [16] + [int(i % 5) + 1 for i in range(t - 1)], dtype, seed=9)
    ids = task_ids("random-1", m, t, gen)
    routing = Routing(ids, t)
    check_against_reference(args, routing, dtype, what="short segments, M 150")
    assert (128, True) in used, used  # forward and dx took the gathered expand on the 128-row tile
    x, w, b, a, bb, scales = args
    bb = bb.clone()
    bb[3, 7, 0] = float("inf")
    y = mixed.lora_linear_mixed(x, w, b, a, bb, scales, routing)
    y_ref = reference.lora_linear_mixed(*(v.double() for v in (x, w, b, a, bb)), scales.double(), ids)
    rows = ids != 3
    assert (ids == 3).any()
    assert_close(y[rows], y_ref[rows], dtype, "rows of finite tasks (B of task 3 holds Inf)")


def test_split_segment_reduction_is_deterministic(monkeypatch):
    """M > SEGSUM_SPLIT_ROWS splits each task's rows into fixed chunks: still exact and bitwise repeatable."""
    monkeypatch.setattr(mixed, "SEGSUM_SPLIT_ROWS", 48)  # the interpreter is slow: split small batches
    dtype = torch.float32
    m = 200
    args, gen = make_case(m, 8, 8, [3, 2], dtype, seed=3)
    ids = task_ids("random-1", m, 2, gen)
    y1, g1 = check_against_reference(args, ids, dtype, what="split")
    dy = torch.randn(m, 8, generator=gen).to(dtype)
    _, g2 = run_and_grads(mixed.lora_linear_mixed, *args, ids, dy)
    _, g3 = run_and_grads(mixed.lora_linear_mixed, *args, ids, dy)
    for u, v in zip(g2, g3):
        assert torch.equal(u, v)


def test_training_steps_match_per_task_loops():
    """Three SGD steps on one mixed batch (per-task A/B, shared base) = the same steps computed as
    a per-task loop of single-task torch ops: mixed gradients are the sum of per-task ones."""
    dtype = torch.float32
    (x, w, b, a, bb, scales), gen = make_case(30, 24, 16, [4, 4, 4], dtype, seed=11)
    ids = task_ids("random-1", 30, 3, gen)
    target = torch.randn(30, 16, generator=gen)
    mixed_params = [v.clone().requires_grad_() for v in (w, b, a, bb)]
    loop_params = [v.clone().requires_grad_() for v in (w, b, a, bb)]
    routing = Routing(ids, 3)
    for _ in range(3):
        y = mixed.lora_linear_mixed(x, *mixed_params, scales, routing)
        ((y - target) ** 2).mean().backward()
        lw, lb, la, lbb = loop_params
        rows = ids < 0
        loss = ((torch.nn.functional.linear(x[rows], lw, lb) - target[rows]) ** 2).sum()
        for t in range(3):
            rows = ids == t
            yt = reference.lora_linear(x[rows], lw, lb, la[t], lbb[t], float(scales[t]))
            loss = loss + ((yt - target[rows]) ** 2).sum()
        (loss / target.numel()).backward()
        with torch.no_grad():
            for p in mixed_params + loop_params:
                p -= 0.5 * p.grad
                p.grad = None
    for u, v in zip(mixed_params, loop_params):
        assert_close(u, v.double(), dtype, "parameters after 3 steps")


# ------------------------------------------------------------------------------------------------
# Semantics: -1 rows, routing objects, per-sample ids, layouts, per-task ranks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [30, 150], ids=["bgmv", "sgmv"])
def test_untasked_rows_are_exactly_the_base(m):
    """Rows with id -1 equal, bit for bit, what the same op computes with no task in the batch."""
    dtype = torch.bfloat16
    (x, w, b, a, bb, scales), gen = make_case(m, 40, 24, [4, 8, 2], dtype, seed=m)
    ids = task_ids("random-1", m, 3, gen)
    y = mixed.lora_linear_mixed(x, w, b, a, bb, scales, ids)
    y_base = mixed.lora_linear_mixed(x, w, b, a, bb, scales, torch.full_like(ids, -1))
    rows = ids < 0
    assert rows.any() and torch.equal(y[rows], y_base[rows])
    assert not torch.equal(y[~rows], y_base[~rows])


@pytest.mark.parametrize("m", [30, 150], ids=["bgmv", "sgmv"])
@pytest.mark.parametrize("where", ["A", "B"])
def test_non_finite_adapter_stays_in_its_rows(m, where):
    """One task's adapter holds Inf: only that task's rows may be non-finite. Rows of the other
    tasks and -1 rows share row tiles with it (grouped shrink at M = 150, fused expand always)
    and must still equal the reference (0 * Inf = NaN must not cross segments)."""
    dtype = torch.float32
    (x, w, b, a, bb, scales), gen = make_case(m, 40, 24, [4, 8, 2], dtype, seed=m)
    ids = task_ids("random-1", m, 3, gen)
    if where == "A":
        a[1, 0, 3] = float("inf")
    else:
        bb[1, 5, 0] = float("inf")
    y = mixed.lora_linear_mixed(x, w, b, a, bb, scales, ids)
    y_ref = reference.lora_linear_mixed(*(v.double() for v in (x, w, b, a, bb)), scales.double(), ids)
    rows = ids != 1
    assert (ids == 1).any() and rows.any()
    assert_close(y[rows], y_ref[rows], dtype, f"rows of finite tasks ({where} of task 1 holds Inf)")


def test_no_task_slots():
    """T = 0 stacks (no adapter on this layer): the base output, no kernel reads the empty
    ``scales`` / ``ranks`` (element 0 of an empty tensor would fault on a GPU)."""
    dtype = torch.float32
    (x, w, b, _, _, _), _ = make_case(9, 16, 8, [2], dtype)
    a, bb, scales = torch.zeros(0, 2, 16), torch.zeros(0, 8, 2), torch.zeros(0)
    ids = torch.full((9,), -1)

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for T = 0")

    with pytest.MonkeyPatch.context() as mp:
        for kernel in ("_shrink_bgmv_kernel", "_shrink_sgmv_kernel", "_fused_kernel"):
            mp.setattr(mixed, kernel, type("NoLaunch", (), {"__getitem__": lambda self, grid: no_launch})())
        y = mixed.lora_linear_mixed(x, w, b, a, bb, scales, ids)
    assert torch.equal(y, torch.nn.functional.linear(x, w, b))


def test_routing_and_ids_agree_and_metadata_is_cached():
    dtype = torch.float32
    (x, w, b, a, bb, scales), gen = make_case(40, 24, 16, [4, 4, 4, 4], dtype)
    ids = task_ids("random-1", 40, 4, gen)
    routing = Routing(ids, 4)
    y_ids = mixed.lora_linear_mixed(x, w, b, a, bb, scales, ids)
    y_routing = mixed.lora_linear_mixed(x, w, b, a, bb, scales, routing)
    assert torch.equal(y_ids, y_routing)
    meta = mixed.batch_metadata(routing, x.device)
    assert meta is mixed.batch_metadata(routing, x.device)  # built once per batch
    # The traceable builder (used under torch.compile) gives the same metadata.
    traced = mixed._metadata_from_ids(ids, 4)
    for u, v in zip(meta, traced):
        assert torch.equal(u, v)
    # Also through the dispatcher.
    with lk.ops.use_backend("triton"):
        assert torch.equal(lk.ops.lora_linear_mixed(x, w, b, a, bb, scales, routing), y_routing)


def test_per_sample_ids_on_3d_input():
    """x [B, S, K] with one id per sample (Routing or tensor) = the flattened rows with expanded ids."""
    dtype = torch.float16
    bsz, s = 5, 7
    (x, w, b, a, bb, scales), gen = make_case(bsz * s, 24, 16, [3, 5], dtype, seed=7)
    x3 = x.view(bsz, s, 24)
    ids = torch.tensor([1, -1, 0, 1, 1])
    y_flat = mixed.lora_linear_mixed(x, w, b, a, bb, scales, ids.repeat_interleave(s))
    for given in (ids, Routing(ids, 2)):
        y3 = mixed.lora_linear_mixed(x3, w, b, a, bb, scales, given)
        assert y3.shape == (bsz, s, 16) and torch.equal(y3.reshape(-1, 16), y_flat)
    check_against_reference((x3, w, b, a, bb, scales), Routing(ids, 2), dtype, what="[B,S,K]")


def test_non_contiguous_inputs():
    """Transposed / strided views go through the strides (no silent copies needed) and match."""
    dtype = torch.float32
    (x, w, b, a, bb, scales), gen = make_case(21, 24, 18, [4, 6], dtype, seed=5)
    xt = x.t().contiguous().t()            # [M, K] with stride (1, M)
    wt = w.t().contiguous().t()            # [N, K] column-major
    at = a.transpose(1, 2).contiguous().transpose(1, 2)
    bt = bb.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    assert not (xt.is_contiguous() or wt.is_contiguous() or at.is_contiguous() or bt.is_contiguous())
    ids = task_ids("random-1", 21, 2, gen)
    check_against_reference((xt, wt, b, at, bt, scales), ids, dtype, what="strided")


def test_per_task_ranks_skip_padding():
    """``ranks`` bounds every r loop by the task's rank: same result as the zero-padded stacks."""
    dtype = torch.float32
    ranks = [2, 70, 1]  # 70 > BLOCK_R: several rank blocks for one task, one for the others
    for m in (30, 150):
        args, gen = make_case(m, 24, 16, ranks, dtype, seed=m)
        ids = task_ids("random-1", m, 3, gen)
        check_against_reference(args, ids, dtype, what=f"ranks M{m}", ranks=torch.tensor(ranks))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ranks_one_contract_for_every_backend(backend):
    """``ranks`` means the same on every backend: rows / columns at or past a task's rank are absent
    (here they hold garbage, Inf included), and ranks outside [0, r] raise before anything runs."""
    dtype = torch.float32
    ranks = [2, 5, 0]
    (x, w, b, a, bb, scales), gen = make_case(30, 24, 16, [5, 5, 5], dtype, seed=4)
    ids = task_ids("random-1", 30, 3, gen)
    exact = [v.clone() for v in (a, bb)]
    for t, rt in enumerate(ranks):  # the exact stacks: zero past each rank
        exact[0][t, rt:] = 0
        exact[1][t, :, rt:] = 0
    a[0, 3, 1] = float("inf")  # padding of task 0 (rank 2) holds Inf
    bb[2, 4, 1] = float("nan")  # task 2 has rank 0: all of it is padding
    y_ref = reference.lora_linear_mixed(*(v.double() for v in (x, w, b, *exact)), scales.double(), ids)
    rk = torch.tensor(ranks, dtype=torch.int32)
    with lk.ops.use_backend(backend):
        y = lk.ops.lora_linear_mixed(x, w, b, a, bb, scales, ids, ranks=rk)
        assert_close(y, y_ref, dtype, f"{backend}: ranks with garbage padding")
        for bad, match in ((torch.tensor([2, 6, 0]), "rank 6 out of range"), (torch.tensor([2, -1, 0]), "rank -1 out of range"),
                           (torch.tensor([2, 5]), r"ranks must be a tensor \[T=3\]"), (torch.tensor([2.0, 5.0, 0.0]), "integer")):
            with pytest.raises((ValueError, TypeError), match=match):
                lk.ops.lora_linear_mixed(x, w, b, a, bb, scales, ids, ranks=bad)


def test_errors_and_float64():
    (x, w, b, a, bb, scales), gen = make_case(8, 16, 8, [2, 2], torch.float32)
    ids = torch.tensor([0, 1, -1, 0, 1, 1, -1, 0])
    f64 = [v.double() for v in (x, w, b, a, bb)]  # float64 runs the reference (no fp64 kernels)
    assert torch.equal(mixed.lora_linear_mixed(*f64, scales, ids), reference.lora_linear_mixed(*f64, scales, ids))
    with pytest.raises(ValueError, match="out of range"):
        mixed.lora_linear_mixed(x, w, b, a, bb, scales, torch.full((8,), 2))
    with pytest.raises(ValueError, match="ranks"):
        mixed.lora_linear_mixed(x, w, b, a, bb, scales, torch.zeros(8, dtype=torch.long), ranks=torch.tensor([1]))


# ------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------


def test_opcheck():
    dtype = torch.float32
    (x, w, b, a, bb, scales), gen = make_case(12, 16, 8, [3, 2], dtype)
    ids = task_ids("random-1", 12, 2, gen)
    meta = mixed._metadata_from_ids(ids, 2)
    leaves = [v.clone().requires_grad_() for v in (x, w, b, a, bb)]
    args = (*leaves, scales, None, meta.order, meta.sorted_ids, meta.seg_off, True)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_mixed.default, args)
    bwd = (torch.randn(12, 8), x, w, a, bb, scales, torch.tensor([3, 2], dtype=torch.int32),
           torch.zeros(12, 3), meta.order, meta.sorted_ids, meta.seg_off, False, True, True)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_mixed_backward.default, bwd)


@pytest.mark.parametrize("given", ["ids", "routing-3d"])
def test_torch_compile_fullgraph(given):
    """The op traces without graph breaks -- raw ids (sorted and searched on the device, no host
    sync) or a host-built Routing with per-sample ids on [B, S, K] -- and its backward compiles."""
    dtype = torch.float32
    (x, w, b, a, bb, scales), gen = make_case(20, 16, 8, [3, 2, 4], dtype)
    if given == "ids":
        ids = task_ids("random-1", 20, 3, gen)
    else:
        x = x.view(4, 5, 16)
        ids = Routing.from_list([2, -1, 0, 2], 3)

    def f(x, w, b, a, bb, scales, ids):
        return mixed.lora_linear_mixed(x, w, b, a, bb, scales, ids).square().sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    eager_leaves = [v.clone().requires_grad_() for v in (x, w, b, a, bb)]
    comp_leaves = [v.clone().requires_grad_() for v in (x, w, b, a, bb)]
    loss = f(*eager_leaves, scales, ids)
    loss.backward()
    loss_c = compiled(*comp_leaves, scales, ids)
    loss_c.backward()
    assert_close(loss_c, loss.double(), dtype, "compiled loss")
    for u, v in zip(comp_leaves, eager_leaves):
        assert_close(u.grad, v.grad.double(), dtype, "compiled grad")


# ------------------------------------------------------------------------------------------------
# AOT: every shipped config compiles for Hopper and Ampere, fits shared memory, does not spill
# ------------------------------------------------------------------------------------------------

def _in_ci(cfg) -> bool:
    """The CI subset (~100 compiles, ~2-3 min): bf16 and fp32, every tile config and use, the
    register-heaviest rank block (64; 32 for fp32), every bf16 shrink tile (BGMV r-splits
    included), odd strides for the fused kernel. Left to the full sweep
    (LORA_KERNELS_AOT=full): fp16 (the bf16 tiles with another MMA type), rank block 16 (fewer
    registers than 64), HAS_RANKS (a scalar load and a loop bound)."""
    name, kernel, sig, consts, *_ = cfg
    odd = "i32:16" not in sig.values()
    if "/fp16/" in name or consts["HAS_RANKS"]:
        return False
    if kernel is mixed._fused_kernel:
        return not odd or "/bf16/" in name
    if kernel is not mixed._segsum_kernel and "/bf16/" in name and not odd:
        return True  # the shrinks' bf16 tiles by rank block: the BGMV r-splits, the SGMV r <= 16 tile
    return consts["BLOCK_R"] == mixed._block_r(256, 4 if "/fp32/" in name else 2) and not odd


CONFIGS = [c for c in mixed.shipped_configs() if os.environ.get("LORA_KERNELS_AOT") == "full" or _in_ci(c)]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_aot_compile(cfg, arch):
    aot = pytest.importorskip("tests.triton_aot")
    name, kernel, sig, consts, num_warps, num_stages, is_mma = cfg
    res = aot.aot_compile(kernel, sig, consts, arch=arch, num_warps=num_warps, num_stages=num_stages)
    assert res.shared_bytes <= aot.SMEM_LIMIT[arch], f"{name}: {res.shared_bytes} B of shared memory > sm_{arch}'s limit"
    assert res.spills == 0, f"{name}: {res.spills} B of register spills on sm_{arch} ({res.registers} registers)"
    if arch == 90 and is_mma:
        assert res.has_wgmma, f"{name}: no wgmma on sm_90"
