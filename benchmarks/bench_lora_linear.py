"""Single-task LoRA linear ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``: our backends against every peer.

Shape: x [M, K], W [N, K], A [r, K], B [N, r]. Modes: ``fwd`` (inference, no grad) and ``fwdbwd``
(training: base frozen, grads of x, A and B). Every peer is checked against the float64
reference before it is timed. Peers: see ``benchlib.PEER_DOC``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import benchlib as bl
import lora_kernels as lk
from lora_kernels.ops import reference

SCALE = 2.0


def pytest_generate_tests(metafunc):
    if "lin_case" not in metafunc.fixturenames:
        return
    s = bl.settings(metafunc.config)
    m = s.matrix
    peers = list(bl.OP_PEERS) + [bl.lk_name(b) for b in bl.lk_backends(s.device)]
    params = []
    for k, n in m.lin_shapes:
        for r in m.lin_ranks:
            for mode in bl.MODES:
                tokens = m.lin_tokens if mode == "fwd" else (m.lin_fwdbwd_tokens if (k, n) in m.lin_fwdbwd_shapes else ())
                for tok in tokens:
                    for peer in peers:
                        case = dict(k=k, n=n, r=r, m=tok, mode=mode, peer=peer)
                        why = bl.skip_reason(peer, op="lora_linear", mode=mode, device=s.device, shape=(k, n), matrix=m,
                                             compile_ok=s.compile_ok)
                        marks = [pytest.mark.skip(reason=why)] if why else []
                        params.append(pytest.param(case, id=bl.case_id(**case), marks=marks))
    metafunc.parametrize("lin_case", params)


class Setup:
    """Inputs, weights and the float64 reference of one case (shared by all its peers)."""

    def __init__(self, k, n, r, m, mode, device, dtype):
        g = torch.Generator().manual_seed(1234)
        kw = dict(gen=g, device=device, dtype=dtype)
        self.k, self.n, self.r, self.m, self.mode, self.device, self.dtype = k, n, r, m, mode, device, dtype
        self.w = bl.randn(n, k, std=k**-0.5, **kw)
        self.b = bl.randn(n, std=0.1, **kw)
        self.a = bl.randn(r, k, std=k**-0.5, **kw)
        self.bb = bl.randn(n, r, std=r**-0.5, **kw)
        self.xs = [bl.randn(m, k, **kw).requires_grad_(mode == "fwdbwd") for _ in range(bl.pool_size(device))]
        self.dy = bl.randn(m, n, **kw)
        # float64 oracle on xs[0]
        x64 = self.xs[0].detach().double().requires_grad_(mode == "fwdbwd")
        w64, b64 = self.w.double(), self.b.double()
        a64, bb64 = self.a.double().requires_grad_(mode == "fwdbwd"), self.bb.double().requires_grad_(mode == "fwdbwd")
        with bl.no_grad_if(mode == "fwd"):
            y = reference.lora_linear(x64, w64, b64, a64, bb64, SCALE)
            self.ref = {"y": y.detach()}
            self.ref_base = {"y": F.linear(x64, w64, b64).detach()}
            if mode == "fwdbwd":
                y.backward(self.dy.double())
                self.ref.update(dx=x64.grad, dA=a64.grad, dB=bb64.grad)
                self.ref_base["dx"] = self.dy.double() @ w64
        self.merged = (w64 + SCALE * bb64.detach() @ a64.detach()).to(dtype)

    def leaf(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(self.mode == "fwdbwd")


get_setup = bl.cached_setup(Setup)


class _One(nn.Module):
    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _unfused(x, w, b, a, bb, s: float):
    return F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * s


_COMPILED = []


def _compiled_unfused():
    """One compiled function for the whole run: it recompiles per dtype/mode, and after the first
    new shape dynamo's automatic dynamic shapes make the token dimension symbolic (few compiles)."""
    if not _COMPILED:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        _COMPILED.append(torch.compile(_unfused))
    return _COMPILED[0]


def build(peer: str, st: Setup):
    """(fn(x) -> y, {"dA": tensor whose .grad is dA, "dB": ...}) for one peer."""
    w, b, s = st.w, st.b, SCALE
    if peer == "base":
        return (lambda x: F.linear(x, w, b)), {}
    if peer == "merged":
        wm = st.merged
        return (lambda x: F.linear(x, wm, b)), {}
    a, bb = st.leaf(st.a), st.leaf(st.bb)
    lora = {"dA": a, "dB": bb}
    if peer == "unfused":
        return (lambda x: F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * s), lora
    if peer == "compile":
        f = _compiled_unfused()
        return (lambda x: f(x, w, b, a, bb, s)), lora
    if peer == "seed":
        return (lambda x: F.linear(x, w + (bb @ a) * s, b)), lora
    if peer == "loralib":
        import loralib

        layer = loralib.Linear(st.k, st.n, r=st.r, lora_alpha=s * st.r, merge_weights=False).to(st.device, st.dtype)
        with torch.no_grad():
            layer.weight.copy_(w), layer.bias.copy_(b), layer.lora_A.copy_(a), layer.lora_B.copy_(bb)
        layer.weight.requires_grad_(False), layer.bias.requires_grad_(False)
        layer.lora_A.requires_grad_(st.mode == "fwdbwd"), layer.lora_B.requires_grad_(st.mode == "fwdbwd")
        layer.train(st.mode == "fwdbwd")
        return layer, {"dA": layer.lora_A, "dB": layer.lora_B}
    if peer == "peft":
        from peft import LoraConfig, get_peft_model

        lin = nn.Linear(st.k, st.n, device=st.device, dtype=st.dtype)
        with torch.no_grad():
            lin.weight.copy_(w), lin.bias.copy_(b)
        pm = get_peft_model(_One(lin), LoraConfig(r=st.r, lora_alpha=s * st.r, target_modules=["lin"], lora_dropout=0.0))
        layer = pm.base_model.model.lin
        la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            la.copy_(a), lb.copy_(bb)
        la.requires_grad_(st.mode == "fwdbwd"), lb.requires_grad_(st.mode == "fwdbwd")
        pm.train(st.mode == "fwdbwd")
        return pm, {"dA": la, "dB": lb}
    if bl.is_ours(peer):
        backend = peer[3:-1]
        return (lambda x: lk.ops.lora_linear(x, w, b, a, bb, s, backend=backend)), lora
    raise ValueError(f"unknown peer {peer!r}")


@pytest.mark.bench
def test_lora_linear(benchmark, lin_case, pytestconfig):
    s = bl.settings(pytestconfig)
    c = lin_case
    st = get_setup(c["k"], c["n"], c["r"], c["m"], c["mode"], s.device, s.dtype)
    fn, lora = build(c["peer"], st)
    step = bl.make_step(fn, st.mode, st.dy, lora)

    # correctness first (also what the smoke run checks)
    y = step(st.xs[0])
    got = {"y": y}
    if st.mode == "fwdbwd":
        got["dx"] = st.xs[0].grad
        got.update({k: v.grad for k, v in lora.items()})
    ref = st.ref_base if c["peer"] == "base" else st.ref
    errs = bl.check(f"{c['peer']} {bl.case_id(**c)}", got, ref, s.dtype, k=max(c["k"], c["n"]))

    elem = torch.finfo(s.dtype).bits // 8
    flops, nbytes = bl.linear_cost(c["m"], c["k"], c["n"], c["r"], elem, c["mode"])
    bflops, bbytes = bl.linear_cost(c["m"], c["k"], c["n"], c["r"], elem, c["mode"], lora=False)
    extra = dict(suite="lora_linear", **c, dist="single", dtype=s.dtype_name, device=s.device, size=s.size,
                 flops=flops, bytes=nbytes, base_flops=bflops, base_bytes=bbytes, rel_err=errs)
    benchmark.group = f"lora_linear {c['k']}x{c['n']} r{c['r']} M{c['m']} {c['mode']}"
    bl.run_timed(benchmark, step, st.xs, s.device, s.matrix, extra)
