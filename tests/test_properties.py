"""Property tests for ``lk.ops.lora_linear`` and ``lk.ops.lora_linear_mixed`` on every backend that runs here.

Hypothesis draws M, K, N, rank, T, the task distribution (including ``-1`` rows and unsorted ids),
the dtype, bias or none, and strided (non-contiguous) operands; every backend is compared against
an *independent* float64 oracle (a per-row loop written here, not the reference's segmentation),
forward and backward. The ``ci`` profile (tests/conftest.py) is derandomized and bounded; the
Triton interpreter examples are few and tiny because each launch runs in Python.

Also: ``torch.autograd.gradcheck`` in float64 (reference; Triton's ops take fp32/fp16/bf16 only,
its float64 single-task call *is* the reference, so its backward is checked against the float64
oracle instead), and ``torch.library.opcheck`` for every op registered under ``torch.ops.lora_kernels``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_kernels as lk
from tests.utils import assert_close


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _triton_module(name: str):
    """The Triton op module if it imports and exposes its entry point, else None (kernels still landing)."""
    try:
        mod = importlib.import_module(f"lora_kernels.ops.triton.{name}")
    except Exception:  # noqa: BLE001 - any import failure means "not ready here"
        return None
    return mod if callable(getattr(mod, name, None)) else None


def _triton_ready(name: str) -> bool:
    return lk.available_backends()["triton"].available and _triton_module(name) is not None


BACKENDS = ["torch", "triton"]


def _skip_unless(backend: str, op: str) -> None:
    if backend == "triton" and not _triton_ready(op):
        pytest.skip(f"Triton {op} not importable/complete here")


# ---------------------------------------------------------------------------------------------
# Independent float64 oracle (row loop: shares no code with lk.ops.reference)
# ---------------------------------------------------------------------------------------------


def oracle_single(x, w, b, a, bb, s):
    x, w, a, bb = (t.double() for t in (x, w, a, bb))
    y = x @ w.T + s * ((x @ a.T) @ bb.T)
    return y + b.double() if b is not None else y


def oracle_mixed(x, w, b, a, bb, scales, ids):
    """ids over dim 0 of x (per sample) or over the flattened leading dims."""
    x, w, a, bb, scales = (t.double() for t in (x, w, a, bb, scales))
    lead = x.shape[:-1]
    per_sample = x.dim() >= 2 and ids.numel() == x.shape[0]
    rows = x.reshape(x.shape[0], -1, x.shape[-1]) if per_sample else x.reshape(-1, 1, x.shape[-1])
    outs = []
    for i in range(rows.shape[0]):
        xi = rows[i]
        yi = xi @ w.T
        t = int(ids[i])
        if t >= 0:
            yi = yi + scales[t] * ((xi @ a[t].T) @ bb[t].T)
        outs.append(yi)
    y = torch.stack(outs).reshape(*lead, w.shape[0])
    return y + b.double() if b is not None else y


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def _make(shape, dtype, layout, gen):
    """A randn tensor of ``shape`` in one of three layouts: contiguous, transposed storage, sliced."""
    if layout == "transposed" and len(shape) >= 2:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64).to(dtype).transpose(-1, -2)
    if layout == "sliced":
        return torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen, dtype=torch.float64).to(dtype)[..., 1::2]
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])


@st.composite
def single_case(draw, dtypes=DTYPES, max_dim=40, max_rank=9):
    lead = draw(st.sampled_from([(), (1,), (5,), (3, 4), (2, 1, 3), (9,)]))
    k = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, max_rank))
    dtype = draw(st.sampled_from(dtypes))
    has_bias = draw(st.booleans())
    layouts = [draw(LAYOUTS) for _ in range(4)]
    scale = draw(st.sampled_from([1.0, 0.5, 2.0, -0.75]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(lead=lead, k=k, n=n, r=r, dtype=dtype, bias=has_bias, layouts=layouts, scale=scale, seed=seed)


@st.composite
def mixed_case(draw, dtypes=DTYPES, max_dim=40, max_rows=12):
    t = draw(st.integers(1, 5))
    dist = draw(st.sampled_from(["identical", "distinct", "random", "none", "zipf-ish"]))
    m = draw(st.integers(1, max_rows))
    if dist == "identical":
        ids = [draw(st.integers(0, t - 1))] * m
    elif dist == "distinct":
        ids = list(range(-1, t))[:m] if m <= t + 1 else [i % (t + 1) - 1 for i in range(m)]
        ids = draw(st.permutations(ids))
    elif dist == "none":
        ids = [-1] * m
    elif dist == "zipf-ish":
        ids = [draw(st.sampled_from([0, 0, 0, 0, min(1, t - 1), t - 1, -1])) for _ in range(m)]
    else:
        ids = draw(st.lists(st.integers(-1, t - 1), min_size=m, max_size=m))
    inner = draw(st.sampled_from([(), (), (3,), (2, 2)]))  # x [M, *inner, K] with ids per sample
    per_row = bool(inner) and draw(st.booleans())  # or ids over every flattened row
    k = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(dtypes))
    return dict(ids=ids, t=t, inner=inner, per_row=per_row, k=k, n=n, r=r, dtype=dtype, bias=draw(st.booleans()),
                layouts=[draw(LAYOUTS) for _ in range(4)], seed=draw(st.integers(0, 2**31 - 1)), zero_scale=draw(st.booleans()))


def _single_tensors(c, requires_grad=False):
    g = torch.Generator().manual_seed(c["seed"])
    dt, k, n, r = c["dtype"], c["k"], c["n"], c["r"]
    x = _make((*c["lead"], k), dt, c["layouts"][0], g)
    w = _make((n, k), dt, c["layouts"][1], g) / k**0.5
    a = _make((r, k), dt, c["layouts"][2], g) / k**0.5
    bb = _make((n, r), dt, c["layouts"][3], g)
    b = _make((n,), dt, "contiguous", g) if c["bias"] else None
    ts = [x, w, b, a, bb]
    if requires_grad:
        ts = [t.detach().requires_grad_() if t is not None else None for t in ts]
    return ts


def _mixed_tensors(c, requires_grad=False):
    g = torch.Generator().manual_seed(c["seed"])
    dt, k, n, r, t = c["dtype"], c["k"], c["n"], c["r"], c["t"]
    m = len(c["ids"])
    ids = torch.tensor(c["ids"], dtype=torch.int64)
    x = _make((m, *c["inner"], k), dt, c["layouts"][0], g)
    if c["per_row"]:  # one id per flattened row: repeat the per-sample ids over the inner dims
        ids = ids.repeat_interleave(max(1, torch.Size(c["inner"]).numel()))
    w = _make((n, k), dt, c["layouts"][1], g) / k**0.5
    a = _make((t, r, k), dt, c["layouts"][2], g) / k**0.5
    bb = _make((t, n, r), dt, c["layouts"][3], g)
    b = _make((n,), dt, "contiguous", g) if c["bias"] else None
    scales = torch.randn(t, generator=g, dtype=torch.float64).float()
    if c["zero_scale"]:
        scales[0] = 0.0
    ts = [x, w, b, a, bb]
    if requires_grad:
        ts = [v.detach().requires_grad_() if v is not None else None for v in ts]
    return ts, scales, ids


def _grads(out, inputs, seed):
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (out * dy.to(out.dtype)).sum().backward() if out.dtype != torch.float64 else (out * dy).sum().backward()
    return dy, [None if t is None else t.grad for t in inputs]


def _check_fwd_bwd(fn, oracle, tensors, extra, dtype, seed, names=("x", "weight", "bias", "lora_a", "lora_b")):
    out = fn(*tensors, *extra)
    assert out.dtype == dtype
    ref_in = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    ref = oracle(*ref_in, *extra)
    assert_close(out, ref, dtype, "forward")
    dy, grads = _grads(out, tensors, seed)
    (ref * dy).sum().backward()
    for name, g, r in zip(names, grads, ref_in):
        if r is None:
            continue
        rg = r.grad if r.grad is not None else torch.zeros_like(r)
        if g is None:  # torch's convention for an input the output does not depend on (no row uses LoRA)
            assert not rg.any(), f"no gradient for {name} but the oracle's is non-zero"
            continue
        assert g.dtype == dtype and g.shape == r.shape, f"grad {name}: {g.dtype} {tuple(g.shape)}"
        # Gradients reduce over M (dW, dA, dB) or over N (dx) in the input dtype: the product of two
        # rounded operands per term, so the forward's tolerance one dtype step looser for 16-bit.
        assert_close(g, rg, dtype, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# lora_linear
# ---------------------------------------------------------------------------------------------


@given(c=single_case())
def test_lora_linear_torch_matches_oracle(c):
    tensors = _single_tensors(c, requires_grad=True)
    _check_fwd_bwd(lambda *a: lk.ops.lora_linear(*a[:5], a[5], backend="torch"), oracle_single, tensors, (c["scale"],),
                   c["dtype"], c["seed"])


@settings(max_examples=5)
@given(c=single_case(dtypes=[torch.float32, torch.float16, torch.bfloat16], max_dim=24, max_rank=5))
def test_lora_linear_triton_matches_oracle(c):
    _skip_unless("triton", "lora_linear")
    tensors = _single_tensors(c, requires_grad=True)
    _check_fwd_bwd(lambda *a: lk.ops.lora_linear(*a[:5], a[5], backend="triton"), oracle_single, tensors, (c["scale"],),
                   c["dtype"], c["seed"])


# ---------------------------------------------------------------------------------------------
# lora_linear_mixed
# ---------------------------------------------------------------------------------------------


@given(c=mixed_case())
def test_lora_linear_mixed_torch_matches_oracle(c):
    tensors, scales, ids = _mixed_tensors(c, requires_grad=True)
    _check_fwd_bwd(lambda *a: lk.ops.lora_linear_mixed(*a[:5], a[5], a[6], backend="torch"), oracle_mixed, tensors,
                   (scales, ids), c["dtype"], c["seed"])


# Triton 3.9's interpreter multiplies the raw uint16 bits of bf16 dot operands (triton-lang/triton#11584,
# "not supported yet"); the kernels widen bf16 to fp32 under the interpreter only, so bf16 runs here too.
_MIXED_TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=5)
@given(c=mixed_case(dtypes=_MIXED_TRITON_DTYPES, max_dim=24, max_rows=8))
def test_lora_linear_mixed_triton_matches_oracle(c):
    _skip_unless("triton", "lora_linear_mixed")
    tensors, scales, ids = _mixed_tensors(c, requires_grad=True)
    _check_fwd_bwd(lambda *a: lk.ops.lora_linear_mixed(*a[:5], a[5], a[6], backend="triton"), oracle_mixed, tensors,
                   (scales, ids), c["dtype"], c["seed"])


def test_lora_linear_mixed_triton_bf16():
    """bf16 on a fixed case (the interpreter's bf16 dot needs the kernels' widening: triton-lang/triton#11584)."""
    _skip_unless("triton", "lora_linear_mixed")
    c = dict(ids=[0, -1, 1, 0], t=2, inner=(), per_row=False, k=16, n=16, r=4, dtype=torch.bfloat16, bias=True,
             layouts=["contiguous"] * 4, seed=5, zero_scale=False)
    tensors, scales, ids = _mixed_tensors(c, requires_grad=True)
    _check_fwd_bwd(lambda *a: lk.ops.lora_linear_mixed(*a[:5], a[5], a[6], backend="triton"), oracle_mixed, tensors,
                   (scales, ids), c["dtype"], c["seed"])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6)
@given(c=mixed_case(dtypes=[torch.float32, torch.bfloat16], max_dim=16, max_rows=8))
def test_untasked_rows_are_bit_identical_to_base(backend, c):
    """vLLM's bar: rows with task -1 equal the base op of the same backend bit for bit."""
    _skip_unless(backend, "lora_linear_mixed")
    (x, w, b, a, bb), scales, ids = _mixed_tensors(c)
    if c["per_row"]:
        return  # the row-level variant is covered by the oracle test; here rows are samples
    y = lk.ops.lora_linear_mixed(x, w, b, a, bb, scales, ids, backend=backend)
    base = torch.nn.functional.linear(x, w, b)
    none = ids == -1
    if backend == "torch":
        assert torch.equal(y[none], base[none])
    else:  # a kernel's base GEMM is its own (tile order differs from cuBLAS/MKL): compare to all -1
        y_none = lk.ops.lora_linear_mixed(x, w, b, a, bb, scales, torch.full_like(ids, -1), backend=backend)
        assert torch.equal(y[none], y_none[none])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=5)
@given(c=mixed_case(dtypes=[torch.float32], max_dim=16, max_rows=8))
def test_mixed_is_deterministic_and_permutation_equivariant(backend, c):
    """Same call twice: bit-identical. Permuting rows (and their ids) permutes the output rows."""
    _skip_unless(backend, "lora_linear_mixed")
    (x, w, b, a, bb), scales, ids = _mixed_tensors(c)
    if c["per_row"]:
        return
    y1 = lk.ops.lora_linear_mixed(x, w, b, a, bb, scales, ids, backend=backend)
    y2 = lk.ops.lora_linear_mixed(x, w, b, a, bb, scales, ids, backend=backend)
    assert torch.equal(y1, y2)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(c["seed"]))
    yp = lk.ops.lora_linear_mixed(x[perm], w, b, a, bb, scales, ids[perm], backend=backend)
    assert_close(yp, y1[perm].double(), torch.float32, "permuted")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=5)
@given(c=single_case(dtypes=[torch.float32], max_dim=16, max_rank=4))
def test_mixed_with_one_task_equals_single(backend, c):
    """lora_linear_mixed with every row on task 0 equals lora_linear on that task."""
    _skip_unless(backend, "lora_linear_mixed")
    _skip_unless(backend, "lora_linear")
    x, w, b, a, bb = _single_tensors(c)
    x2 = x.reshape(-1, x.shape[-1])
    ids = torch.zeros(x2.shape[0], dtype=torch.int64)
    y_mixed = lk.ops.lora_linear_mixed(x2, w, b, a[None], bb[None], torch.tensor([c["scale"]]), ids, backend=backend)
    y_single = lk.ops.lora_linear(x2, w, b, a, bb, c["scale"], backend=backend)
    assert_close(y_mixed, y_single.double(), torch.float32, "mixed vs single")


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_reference_lora_linear(bias):
    g = torch.Generator().manual_seed(0)
    x, w, a, bb = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 5), (4, 5), (2, 5), (4, 2)))
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    fn = lambda x, w, b, a, bb: lk.ops.reference.lora_linear(x, w, b, a, bb, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, a, bb))


@pytest.mark.parametrize("ids", [[1, -1, 0, 1, 2], [-1, -1, -1, -1, -1], [2, 2, 2, 2, 2]])
def test_gradcheck_reference_lora_linear_mixed(ids):
    g = torch.Generator().manual_seed(1)
    x, w, b, a, bb = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                      for s in ((5, 6), (3, 6), (3,), (3, 2, 6), (3, 3, 2)))
    scales = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    ids = torch.tensor(ids)
    fn = lambda x, w, b, a, bb: lk.ops.reference.lora_linear_mixed(x, w, b, a, bb, scales, ids)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))


def test_gradcheck_reference_dropout_is_a_fixed_mask():
    """With dropout the op is random; under a fixed RNG state per evaluation it is linear in x and gradcheck holds."""
    g = torch.Generator().manual_seed(2)
    x, w, a, bb = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((3, 5), (4, 5), (2, 5), (4, 2)))

    def fn(x, w, a, bb):
        with torch.random.fork_rng():
            torch.manual_seed(123)
            return lk.ops.reference.lora_linear(x, w, None, a, bb, 1.3, dropout_p=0.4)

    assert torch.autograd.gradcheck(fn, (x, w, a, bb))


# ---------------------------------------------------------------------------------------------
# opcheck: every op registered under torch.ops.lora_kernels
# ---------------------------------------------------------------------------------------------


def _op_samples():
    """Sample arguments per registered op (schema, fake, autograd registration, AOT dispatch)."""
    g = torch.Generator().manual_seed(3)

    def r(*s, dtype=torch.float32, grad=False):
        return torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)

    m, k, n, rank, t = 5, 12, 7, 3, 3
    samples = {
        "lora_linear": [
            (r(m, k, grad=True), r(n, k, grad=True), r(n, grad=True), r(rank, k, grad=True), r(n, rank, grad=True), 0.5, 0.0, None,
             True),
            (r(2, 3, k), r(n, k), None, r(rank, k, grad=True), r(n, rank, grad=True), 1.5, 0.25, torch.tensor([7]), False),
        ],
        "lora_shrink": [(r(m, k), r(rank, k), 0.0, None), (r(m, k), r(rank, k), 0.3, torch.tensor([5]))],
        "lora_linear_dx": [(r(m, n), r(n, k), r(rank, k), r(n, rank), 0.5, 0.0, None)],
        "lora_linear_backward": [(r(m, n), r(m, k), r(n, k), r(rank, k), r(n, rank), r(m, rank), 0.5, 0.0, None),
                                 (r(m, n), r(m, k), r(n, k), r(rank, k), r(n, rank), r(m, rank), 0.5, 0.3, torch.tensor([4]))],
        "lora_dropout": [(r(m, k), 0.3, torch.tensor([9]))],
    }
    ids = torch.tensor([2, -1, 0, 2, 1])
    sorted_ids, order = torch.sort(ids, stable=True)
    seg_off = torch.searchsorted(sorted_ids, torch.arange(t + 1)).to(torch.int32)
    meta = (order, sorted_ids.to(torch.int32), seg_off)
    scales = torch.tensor([0.5, 1.0, -2.0])
    samples["lora_linear_mixed"] = [
        (r(m, k, grad=True), r(n, k), r(n), r(t, rank, k, grad=True), r(t, n, rank, grad=True), scales, None, *meta, bgmv)
        for bgmv in (True, False)
    ]
    h = r(m, rank)
    samples["lora_linear_mixed_backward"] = [
        (r(m, n), r(m, k), r(n, k), r(t, rank, k), r(t, n, rank), scales, None, h, *meta, True, True, True),
    ]
    return samples


def _registered_ops() -> list[str]:
    for name in ("lora_linear", "lora_linear_mixed"):
        _triton_module(name)  # importing registers the custom ops
    ns = getattr(torch.ops, "lora_kernels", None)
    names = [] if ns is None else sorted(n for n in dir(ns) if not n.startswith("_") and n != "name"
                                          and isinstance(getattr(ns, n, None), torch._ops.OpOverloadPacket))
    return names


def test_opcheck_every_registered_op():
    if not lk.available_backends()["triton"].available:
        pytest.skip("the registered ops run Triton kernels; no GPU and no interpreter here")
    names = _registered_ops()
    if not names:
        pytest.skip("no op registered under torch.ops.lora_kernels yet")
    samples = _op_samples()
    missing = [n for n in names if n not in samples]
    failures = []
    for name in names:
        if name not in samples:
            continue
        op = getattr(torch.ops.lora_kernels, name).default
        for args in samples[name]:
            res = torch.library.opcheck(op, args, raise_exception=False)
            bad = {k: v for k, v in res.items() if v != "SUCCESS"}
            if bad:
                failures.append(f"{name}: {bad}")
    assert not failures, "opcheck failures:\n" + "\n".join(failures)
    if missing:
        pytest.skip(f"registered op(s) without an opcheck sample in tests/test_properties.py: {missing}")
