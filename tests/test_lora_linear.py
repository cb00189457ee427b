"""The fused Triton LoRA linear (``lora_kernels.ops.triton.lora_linear``) against the float64 oracle.

On a CPU machine the kernels run through the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest), so shapes are small and odd; the interpreter does not check ``tl.dot`` minimum shapes
or shared memory, which ``tests/test_triton_aot.py`` covers by compiling for sm_90 / sm_80.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lora_kernels.ops.dispatch import triton_interpreter
from tests.utils import assert_close, poisoned

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and not triton_interpreter():
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from lora_kernels.ops.triton import lora_linear as tl_mod  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(m, k, n, r, dtype, device, *, bias=True, lead=None, seed=0):
    """Fresh randn inputs, scaled so that y's entries are O(1) whatever K and r."""
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, k) if lead else (m, k)
    x = torch.randn(shape, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    a = torch.randn(r, k, generator=g) / k**0.5
    bb = torch.randn(n, r, generator=g) / r**0.5
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(a), cast(bb)


def ref64(x, w, b, a, bb, scale, mask=None, p=0.0):
    """float64 oracle; with ``mask`` the LoRA input is x * mask / (1 - p) (the kernels' dropout)."""
    d = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    x64 = d(x)
    xd = x64 * d(mask) / (1 - p) if mask is not None else x64
    y = torch.nn.functional.linear(x64, d(w), d(b))
    return y + scale * (xd @ d(a).t()) @ d(bb).t()


def ref64_grads(x, w, b, a, bb, scale, dy, mask=None, p=0.0):
    leaves = [None if t is None else t.detach().double().cpu().requires_grad_(True) for t in (x, w, b, a, bb)]
    x64, w64, b64, a64, bb64 = leaves
    xd = x64 * mask.double().cpu() / (1 - p) if mask is not None else x64
    y = torch.nn.functional.linear(x64, w64, b64) + scale * (xd @ a64.t()) @ bb64.t()
    y.backward(dy.detach().double().cpu())
    return [None if t is None else t.grad for t in leaves]


# ------------------------------------------------------------------------------------------ forward

# (M, K, N, r): odd sizes, K or N = 1, rank 1 and 256, one K = 2049 (the interpreter is slow).
FWD_SHAPES = [(1, 17, 17, 1), (17, 33, 1, 3), (17, 1, 19, 16), (5, 2049, 17, 8), (17, 40, 24, 256), (33, 20, 65, 5)]


# The three forward paths, forced on small shapes: one fused kernel with the shrink in every output
# tile, the shrink kernel first then the fused kernel, and the LoRA-term kernel + cuBLAS base (M > 128).
PATHS = {"shrink_in_tile": dict(shrink_in_tile=True, cublas_base=False),
         "shrink_kernel": dict(shrink_in_tile=False, cublas_base=False),
         "cublas_base": dict(cublas_base=True)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FWD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", list(PATHS))
def test_forward_matches_reference(shape, dtype, path, device):
    m, k, n, r = shape
    bias = (m + r) % 2 == 0  # half the shapes without bias
    x, w, b, a, bb = make(m, k, n, r, dtype, device, bias=bias)
    scale = -0.75 if path == "shrink_in_tile" else 1.5
    y, hs = tl_mod.lora_linear_forward(x, w, b, a, bb, scale, save_h=True, **PATHS[path])
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, ref64(x, w, b, a, bb, scale), dtype, f"y {shape}")
    # hs = scale * x @ A.T (what backward's dB reads instead of recomputing the shrink)
    assert hs.dtype == dtype and hs.shape == (m, r)
    assert_close(hs, scale * x.double() @ a.double().t(), dtype, f"hs {shape}")


@pytest.mark.parametrize("regime", ["decode_s", "decode_l", "middle", "prefill"])
def test_every_regime_config(regime, device):
    """Each row of the config table (forced on a small odd shape: the interpreter ignores tiles)."""
    dtype = torch.bfloat16
    x, w, b, a, bb = make(19, 70, 37, 12, dtype, device)
    for in_tile in ([False] if regime in ("middle", "prefill") else [True, False]):
        out = poisoned((19, 37), dtype, device)
        y, _ = tl_mod.lora_linear_forward(x, w, b, a, bb, 0.5, out=out, shrink_in_tile=in_tile, regime=regime)
        assert y.data_ptr() == out.data_ptr()
        assert_close(y, ref64(x, w, b, a, bb, 0.5), dtype, f"{regime} in_tile={in_tile}")


@pytest.mark.parametrize("path", list(PATHS))
def test_poisoned_output_buffer(path, device):
    """The launcher writes every element of a NaN-filled out (edge tiles included); on the cuBLAS
    path the LoRA-term kernel must write all of it before cuBLAS reads it back (beta = 1)."""
    dtype = torch.float16
    x, w, b, a, bb = make(23, 45, 67, 7, dtype, device)
    out = poisoned((23, 67), dtype, device)
    tl_mod.lora_linear_forward(x, w, b, a, bb, 2.0, out=out, **PATHS[path])
    assert_close(out, ref64(x, w, b, a, bb, 2.0), dtype, "out")


@pytest.mark.parametrize("path", ["in_tile", "shrink_kernel", "cublas_base"])
@pytest.mark.parametrize("p", [0.0, 0.4], ids=["nodrop", "drop"])
def test_poisoned_dx_buffer(path, p, device):
    """dx = dy W + mask * s/(1-p) * (dy B) A and gs = s * dy B on every path, into a NaN-filled dx."""
    dtype = torch.float32
    x, w, _, a, bb = make(21, 35, 18, 5, dtype, device, bias=False)
    dy = torch.randn(21, 18, dtype=dtype, device=device)
    g = dy.double() @ bb.double()
    mask = tl_mod.dropout_mask(x, p, 11).double() if p else torch.ones(21, 35, dtype=torch.float64)
    out = poisoned((21, 35), dtype, device)
    dx, gs = tl_mod.lora_linear_dx(dy, w, a, bb, 0.7, p, 11, out=out, shrink_in_tile=path == "in_tile",
                                   cublas_base=path == "cublas_base")
    assert dx.data_ptr() == out.data_ptr() and gs.dtype == dtype
    assert_close(out, dy.double() @ w.double() + 0.7 / (1 - p) * mask * (g @ a.double()), dtype, f"dx {path}")
    assert_close(gs, 0.7 * g, dtype, f"gs {path}")


@pytest.mark.parametrize("scale", [0.0, -2.0])
def test_scale_zero_and_negative(scale, device):
    x, w, b, a, bb = make(9, 24, 13, 4, torch.float32, device)
    y = tl_mod.lora_linear(x, w, b, a, bb, scale)
    assert_close(y, ref64(x, w, b, a, bb, scale), torch.float32, f"scale={scale}")
    if scale == 0.0:
        assert torch.equal(y, tl_mod.lora_linear(x, w, b, a, torch.zeros_like(bb), 1.0))


def test_leading_dims_and_empty(device):
    x, w, b, a, bb = make(0, 24, 13, 4, torch.float32, device, lead=(2, 3, 5))
    y = tl_mod.lora_linear(x, w, b, a, bb, 0.5)
    assert y.shape == (2, 3, 5, 13)
    assert_close(y, ref64(x, w, b, a, bb, 0.5), torch.float32, "3 leading dims")
    empty = tl_mod.lora_linear(x[:0], w, b, a, bb, 0.5)
    assert empty.shape == (0, 3, 5, 13)


def test_noncontiguous_inputs(device):
    """Strided x (every other column), x needing a copy to flatten, transposed W, strided A/B."""
    dtype = torch.float32
    k, n, r = 21, 30, 6
    xs = torch.randn(17, 2 * k, dtype=dtype, device=device)[:, ::2]  # stride (2k, 2): a view
    x3 = torch.randn(k, 4, 5, dtype=dtype, device=device).permute(1, 2, 0)  # flattening copies
    w = torch.randn(k, n, dtype=dtype, device=device).t() / k**0.5  # [n, k], stride (1, n)
    a = torch.randn(k, r, dtype=dtype, device=device).t()  # [r, k], stride (1, r)
    bb = torch.randn(n, 2 * r, dtype=dtype, device=device)[:, 1::2]  # stride (2r, 2)
    b = torch.randn(2 * n, dtype=dtype, device=device)[::2]  # strided bias
    for x in (xs, x3):
        assert not x.is_contiguous()
        for path, kw in PATHS.items():
            y, _ = tl_mod.lora_linear_forward(x, w, b, a, bb, 0.9, **kw)
            assert_close(y, ref64(x, w, b, a, bb, 0.9), dtype, f"x stride {x.stride()} {path}")


def test_dispatch_routes_backend_triton_here(device):
    import lora_kernels as lk

    x, w, b, a, bb = make(6, 16, 9, 3, torch.bfloat16, device)
    assert torch.equal(lk.ops.lora_linear(x, w, b, a, bb, 0.5, backend="triton"), tl_mod.lora_linear(x, w, b, a, bb, 0.5))


def test_float64_runs_the_reference(device):
    x, w, b, a, bb = make(5, 8, 6, 2, torch.float64, device)
    assert_close(tl_mod.lora_linear(x, w, b, a, bb, 0.3), ref64(x, w, b, a, bb, 0.3), torch.float64)


def test_bad_arguments_raise(device):
    x, w, b, a, bb = make(5, 8, 6, 2, torch.float32, device)
    with pytest.raises(ValueError, match="lora_a must be"):
        tl_mod.lora_linear(x, w, b, a[:, :7], bb)
    with pytest.raises(TypeError, match="dtype"):
        tl_mod.lora_linear(x, w, b, a.half(), bb)
    with pytest.raises(ValueError, match="dropout_p"):
        tl_mod.lora_linear(x, w, b, a, bb, dropout_p=1.0)


# ----------------------------------------------------------------------------------------- backward

GRAD_CASES = [
    # (M, K, N, r, dtype, bias)
    (1, 17, 19, 1, torch.float32, True),
    (17, 33, 1, 3, torch.float16, False),
    (17, 24, 40, 256, torch.bfloat16, True),
    (33, 2049, 17, 8, torch.float32, False),
    (130, 20, 18, 16, torch.bfloat16, True),  # M > 128: LoRA-term kernel + cuBLAS base, forward and dx
    (5, 33, 70, 100, torch.float16, True),  # r > 64: shrink kernels first (h, g), fused kernels store hs / gs
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}r{c[3]}-{str(c[4])[6:]}-{'b' if c[5] else 'nob'}")
def test_gradients_match_reference(case, device):
    m, k, n, r, dtype, bias = case
    x, w, b, a, bb = make(m, k, n, r, dtype, device, bias=bias, lead=(1, m))
    leaves = [t.requires_grad_(True) for t in (x, w, b, a, bb) if t is not None]
    y = tl_mod.lora_linear(x, w, b, a, bb, -1.25)
    assert_close(y, ref64(x, w, b, a, bb, -1.25), dtype, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = ref64_grads(x, w, b, a, bb, -1.25, dy)
    for name, t, ref in zip(("dx", "dW", "db", "dA", "dB"), (x, w, b, a, bb), refs):
        if t is not None:
            assert t.grad is not None, name
            assert_close(t.grad, ref, dtype, name)
    assert len(leaves) == 4 + bias


@pytest.mark.parametrize("m", [9, 131], ids=["fused", "cublas_base"])
def test_backward_reuses_forward_h(m, monkeypatch, device):
    """Backward launches no shrink over x (hs is saved by the forward) and no separate dy @ B
    (g comes out of the dx pass): one Triton launch, which for a decode batch also writes dA and
    dB (else two GEMMs follow). The previous backward ran the shrink twice (g = dy B, h = x A^T
    recomputed) around the dx kernel."""
    x, w, b, a, bb = make(m, 40, 23, 6, torch.bfloat16, device)
    for t in (x, a, bb):
        t.requires_grad_(True)
    y = tl_mod.lora_linear(x, w, b, a, bb, 0.5)
    launches = []
    for name in ("_launch_shrink", "_launch_fused", "_launch_term", "_launch_dropout"):
        fn = getattr(tl_mod, name, None)
        if fn is not None:
            monkeypatch.setattr(tl_mod, name, lambda *args, _fn=fn, _name=name, **kw:
                                launches.append(_name + ("+grads" if kw.get("grads") is not None else "")) or _fn(*args, **kw))
    dy = torch.randn_like(y)
    y.backward(dy)
    # decode: dx, dA and dB from the one dx launch; prefill: the LoRA-term kernel (+ cuBLAS GEMMs)
    assert launches == ["_launch_fused+grads" if m <= tl_mod.DECODE_M else "_launch_term"], launches
    refs = ref64_grads(x, w, b, a, bb, 0.5, dy)
    for name, t, ref in (("dx", x, refs[0]), ("dA", a, refs[3]), ("dB", bb, refs[4])):
        assert_close(t.grad, ref, torch.bfloat16, name)


@pytest.mark.parametrize("case", [(5, 70, 300, 7, torch.bfloat16, 0.0), (5, 70, 300, 7, torch.bfloat16, 0.3),
                                  (1, 33, 17, 1, torch.float32, 0.0), (40, 45, 150, 16, torch.float16, 0.25),
                                  (16, 2049, 33, 64, torch.float32, 0.0)],
                         ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}r{c[3]}-{str(c[4])[6:]}-p{c[5]}")
def test_backward_one_launch_for_decode(case, device):
    """A decode batch (one row tile, g in-tile) gets dx, dA and dB from the dx kernel alone
    (LORA_GRADS): dB's rows are split over the programs by K step (N = 300: 3 steps of 128 over
    3 column tiles at M = 5), dA per column tile, dropout's mask on x in dA. Against float64."""
    m, k, n, r, dtype, p = case
    x, w, b, a, bb = make(m, k, n, r, dtype, device)
    seed = 77
    hs_ref = 0.9 / (1 - p) * (x.double() * (tl_mod.dropout_mask(x, p, seed).double() if p else 1.0)) @ a.double().t()
    dy = torch.randn(m, n, dtype=dtype, device=device)
    dx, da, db = tl_mod.lora_linear_backward(dy, x, w, a, bb, hs_ref.to(dtype), 0.9, p, seed)
    mask = tl_mod.dropout_mask(x, p, seed) if p else None
    refs = ref64_grads(x, w, b, a, bb, 0.9, dy, mask, p)
    for name, got, ref in (("dx", dx, refs[0]), ("dA", da, refs[3]), ("dB", db, refs[4])):
        assert_close(got, ref, dtype, f"{name} {case}")


def test_only_requested_gradients(device):
    """A frozen base gets no dW / db; a frozen adapter no dA / dB; x alone still gets dx."""
    x, w, b, a, bb = make(9, 16, 12, 4, torch.float32, device)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    y = tl_mod.lora_linear(x, w, b, a, bb, 2.0)
    y.sum().backward()
    assert w.grad is None and b.grad is None and x.grad is None
    refs = ref64_grads(x, w, b, a, bb, 2.0, torch.ones_like(y))
    assert_close(a.grad, refs[3], torch.float32, "dA")
    assert_close(bb.grad, refs[4], torch.float32, "dB")
    x2 = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(tl_mod.lora_linear(x2, w, b, a.detach(), bb.detach(), 2.0).sum(), x2)
    assert_close(dx, refs[0], torch.float32, "dx")


def test_scale_zero_gradients(device):
    x, w, b, a, bb = make(7, 16, 12, 4, torch.float32, device)
    for t in (x, a, bb):
        t.requires_grad_(True)
    tl_mod.lora_linear(x, w, b, a, bb, 0.0).sum().backward()
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(bb.grad) == 0
    assert_close(x.grad, torch.ones(7, 12, dtype=torch.float64) @ w.double(), torch.float32, "dx")


# ------------------------------------------------------------------------------------------ dropout


def test_dropout_mask_is_philox_and_fair(device):
    x = torch.randn(64, 257, device=device)
    m1 = tl_mod.dropout_mask(x, 0.25, 123)
    assert m1.dtype == torch.bool and m1.shape == x.shape
    assert torch.equal(m1, tl_mod.dropout_mask(x, 0.25, 123))  # regenerated, not stored
    assert not torch.equal(m1, tl_mod.dropout_mask(x, 0.25, 124))
    kept = m1.float().mean().item()
    assert abs(kept - 0.75) < 0.02, kept  # 16448 draws: 4 sigma ~ 0.013
    # Leading dims index the flattened rows: the mask of x[None] is the mask of x.
    assert torch.equal(tl_mod.dropout_mask(x.view(2, 32, 257), 0.25, 123).view(64, 257), m1)


@pytest.mark.parametrize("m", [29, 131], ids=["fused", "cublas_base"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_forward_backward_same_mask(dtype, m, device):
    """The op with a given seed == the reference on x * mask / (1 - p), forward and every grad."""
    p, seed = 0.3, torch.tensor([987654], dtype=torch.int64)
    x, w, b, a, bb = make(m, 40, 23, 6, dtype, device)
    for t in (x, w, b, a, bb):
        t.requires_grad_(True)
    mask = tl_mod.dropout_mask(x.detach(), p, int(seed))
    y = torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 1.3, p, seed, True)[0]
    assert_close(y, ref64(x, w, b, a, bb, 1.3, mask, p), dtype, "y (dropout)")
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = ref64_grads(x, w, b, a, bb, 1.3, dy, mask, p)
    for name, t, ref in zip(("dx", "dW", "db", "dA", "dB"), (x, w, b, a, bb), refs):
        assert_close(t.grad, ref, dtype, f"{name} (dropout)")


def test_dropout_in_tile_and_split_k_paths(device):
    """Dropout inside the output tile (launcher override) and in the split-K shrink agree with the mask."""
    p, seed = 0.5, 42
    x, w, b, a, bb = make(3, 300, 20, 5, torch.float32, device)  # M = 3: the shrink splits K
    mask = tl_mod.dropout_mask(x, p, seed)
    ref = ref64(x, w, b, a, bb, 0.8, mask, p)
    for in_tile in (True, False):
        y, _ = tl_mod.lora_linear_forward(x, w, b, a, bb, 0.8, p, seed, shrink_in_tile=in_tile)
        assert_close(y, ref, torch.float32, f"dropout in_tile={in_tile}")


def test_dropout_public_call_draws_fresh_masks(device):
    x, w, _, a, bb = make(16, 32, 8, 4, torch.float32, device, bias=False)
    y1 = tl_mod.lora_linear(x, w, None, a, bb, 1.0, dropout_p=0.5)
    y2 = tl_mod.lora_linear(x, w, None, a, bb, 1.0, dropout_p=0.5)
    assert not torch.equal(y1, y2)


# ------------------------------------------------------------------------------ torch.library / compile


def test_opcheck(device):
    x, w, b, a, bb = make(6, 16, 9, 3, torch.float32, device)
    for t in (x, w, b, a, bb):
        t.requires_grad_(True)
    seed = torch.tensor([7], dtype=torch.int64)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear.default, (x, w, b, a, bb, 0.5, 0.0, None, True))
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear.default, (x, w, None, a, bb, -1.0, 0.25, seed, True))
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear.default, (x, w, None, a, bb, -1.0, 0.25, seed, False))
    dy = torch.randn(6, 9, device=device)
    torch.library.opcheck(torch.ops.lora_kernels.lora_shrink.default, (x.detach(), a.detach(), 0.25, seed))
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_dx.default,
                          (dy, w.detach(), a.detach(), bb.detach(), 0.5, 0.25, seed))
    torch.library.opcheck(torch.ops.lora_kernels.lora_dropout.default, (x.detach(), 0.25, seed))
    hs = torch.randn(6, 3, device=device)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_backward.default,
                          (dy, x.detach(), w.detach(), a.detach(), bb.detach(), hs, 0.5, 0.25, seed))


def test_torch_compile_fullgraph(device):
    import torch._dynamo

    torch._dynamo.reset()
    x, w, b, a, bb = make(8, 16, 12, 4, torch.float32, device, lead=(2, 4))
    a.requires_grad_(True)
    bb.requires_grad_(True)

    def step(x, w, b, a, bb):
        return tl_mod.lora_linear(x, w, b, a, bb, 0.5).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, b, a, bb)
    loss.backward()
    ref = ref64(x, w, b, a, bb, 0.5).square().sum()
    assert_close(loss, ref, torch.float32, "compiled loss")
    ga, gbb = a.grad.clone(), bb.grad.clone()
    a.grad = bb.grad = None
    step(x, w, b, a, bb).backward()
    assert_close(ga, a.grad.double(), torch.float32, "compiled dA")
    assert_close(gbb, bb.grad.double(), torch.float32, "compiled dB")


def test_torch_compile_fullgraph_with_dropout(device):
    """The per-call seed (torch.randint on the CPU generator) traces into the graph: no break."""
    import torch._dynamo

    torch._dynamo.reset()
    x, w, b, a, bb = make(8, 16, 12, 4, torch.float32, device)
    bb.requires_grad_(True)
    compiled = torch.compile(lambda x, bb: tl_mod.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5), fullgraph=True,
                             backend="aot_eager")
    y1, y2 = compiled(x, bb), compiled(x, bb)
    assert not torch.equal(y1, y2)  # a fresh mask per call, also when compiled
    y1.sum().backward()
    assert torch.isfinite(bb.grad).all()
