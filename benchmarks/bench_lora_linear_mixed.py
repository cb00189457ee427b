"""Mixed-task LoRA linear: a task per row (segmented gather), our backends against every peer.

Shape: x [M, K], W [N, K], A [T, r, K], B [T, N, r], scales [T], one task id per row drawn from a
distribution of DESIGN.md §7 (identical, uniform over √M tasks, zipf(1.5), distinct; at most 64
tasks). Our ops get a ``Routing`` built once per batch (as a model does for all its layers); the
loop peer gets its row indices precomputed likewise. Modes: ``fwd`` (no grad) and ``fwdbwd``
(base frozen; grads of x and of the stacked A, B). Checked against the float64 reference first.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import benchlib as bl
import lora_kernels as lk
from lora_kernels.ops import reference
from lora_kernels.ops.routing import Routing


def pytest_generate_tests(metafunc):
    if "mix_case" not in metafunc.fixturenames:
        return
    s = bl.settings(metafunc.config)
    m = s.matrix
    peers = list(bl.MIXED_PEERS) + [bl.lk_name(b) for b in bl.lk_backends(s.device)]
    params = []
    for k, n in m.mix_shapes:
        for r in m.mix_ranks:
            for mode in bl.MODES:
                tokens, dists = (m.mix_tokens, m.mix_dists) if mode == "fwd" else (m.mix_fwdbwd_tokens, m.mix_fwdbwd_dists)
                for tok in tokens:
                    for dist in dists:
                        for peer in peers:
                            case = dict(k=k, n=n, r=r, m=tok, dist=dist, mode=mode, peer=peer)
                            why = bl.skip_reason(peer, op="lora_linear_mixed", mode=mode, device=s.device)
                            marks = [pytest.mark.skip(reason=why)] if why else []
                            params.append(pytest.param(case, id=bl.case_id(**case), marks=marks))
    metafunc.parametrize("mix_case", params)


class Setup:
    def __init__(self, k, n, r, m, dist, mode, device, dtype):
        g = torch.Generator().manual_seed(4321)
        kw = dict(gen=g, device=device, dtype=dtype)
        self.k, self.n, self.r, self.m, self.mode, self.device, self.dtype = k, n, r, m, mode, device, dtype
        self.ids, self.t = bl.task_ids(dist, m)
        self.w = bl.randn(n, k, std=k**-0.5, **kw)
        self.b = bl.randn(n, std=0.1, **kw)
        self.a = bl.randn(self.t, r, k, std=k**-0.5, **kw)
        self.bb = bl.randn(self.t, n, r, std=r**-0.5, **kw)
        self.scales_list = [1.0 + t / max(self.t, 1) for t in range(self.t)]
        self.scales = torch.tensor(self.scales_list, dtype=torch.float32, device=device)
        self.ids_t = torch.tensor(self.ids, dtype=torch.int64, device=device)
        self.routing = Routing.from_list(self.ids, self.t, device)
        self.rows = [(t, self.routing.rows(t)) for t in self.routing.present]
        self.xs = [bl.randn(m, k, **kw).requires_grad_(mode == "fwdbwd") for _ in range(bl.pool_size(device))]
        self.dy = bl.randn(m, n, **kw)
        x64 = self.xs[0].detach().double().requires_grad_(mode == "fwdbwd")
        w64, b64 = self.w.double(), self.b.double()
        a64, bb64 = self.a.double().requires_grad_(mode == "fwdbwd"), self.bb.double().requires_grad_(mode == "fwdbwd")
        with bl.no_grad_if(mode == "fwd"):
            y = reference.lora_linear_mixed(x64, w64, b64, a64, bb64, self.scales.double(), self.ids_t)
            self.ref = {"y": y.detach()}
            self.ref_base = {"y": F.linear(x64, w64, b64).detach()}
            if mode == "fwdbwd":
                y.backward(self.dy.double())
                self.ref.update(dx=x64.grad, dA=a64.grad, dB=bb64.grad)
                self.ref_base["dx"] = self.dy.double() @ w64

    def leaf(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(self.mode == "fwdbwd")


get_setup = bl.cached_setup(Setup)


class _One(nn.Module):
    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x, **kwargs):
        return self.lin(x, **kwargs)


def build(peer: str, st: Setup):
    w, b = st.w, st.b
    if peer == "base":
        return (lambda x: F.linear(x, w, b)), {}
    a, bb = st.leaf(st.a), st.leaf(st.bb)
    lora = {"dA": a, "dB": bb}
    sl = st.scales_list
    if peer == "loop":
        def loop(x):
            y = F.linear(x, w, b)
            for t, rows in st.rows:
                y.index_add_(0, rows, F.linear(F.linear(x.index_select(0, rows), a[t]), bb[t]) * sl[t])
            return y
        return loop, lora
    if peer == "seed":
        def seed(x):
            y = x.new_empty(st.m, st.n)
            if st.routing.starts[0]:  # rows without a task: the base output
                y.index_copy_(0, st.routing.order[: st.routing.starts[0]], F.linear(x, w, b)[st.routing.order[: st.routing.starts[0]]])
            for t, rows in st.rows:
                y.index_copy_(0, rows, F.linear(x.index_select(0, rows), w + (bb[t] @ a[t]) * sl[t], b))
            return y
        return seed, lora
    if peer == "peft":
        from peft import LoraConfig, get_peft_model

        lin = nn.Linear(st.k, st.n, device=st.device, dtype=st.dtype)
        with torch.no_grad():
            lin.weight.copy_(w), lin.bias.copy_(b)
        cfg = lambda t: LoraConfig(r=st.r, lora_alpha=sl[t] * st.r, target_modules=["lin"], lora_dropout=0.0)  # noqa: E731
        pm = get_peft_model(_One(lin), cfg(0), adapter_name="t0")
        for t in range(1, st.t):
            pm.add_adapter(f"t{t}", cfg(t))
        layer = pm.base_model.model.lin
        with torch.no_grad():
            for t in range(st.t):
                layer.lora_A[f"t{t}"].weight.copy_(a[t]), layer.lora_B[f"t{t}"].weight.copy_(bb[t])
        pm.eval()
        names = [f"t{i}" if i >= 0 else "__base__" for i in st.ids]
        return (lambda x: pm(x, adapter_names=names)), {}
    if bl.is_ours(peer):
        backend, scales, routing = peer[3:-1], st.scales, st.routing
        return (lambda x: lk.ops.lora_linear_mixed(x, w, b, a, bb, scales, routing, backend=backend)), lora
    raise ValueError(f"unknown peer {peer!r}")


@pytest.mark.bench
def test_lora_linear_mixed(benchmark, mix_case, pytestconfig):
    s = bl.settings(pytestconfig)
    c = mix_case
    st = get_setup(c["k"], c["n"], c["r"], c["m"], c["dist"], c["mode"], s.device, s.dtype)
    fn, lora = build(c["peer"], st)
    step = bl.make_step(fn, st.mode, st.dy, lora)

    y = step(st.xs[0])
    got = {"y": y}
    if st.mode == "fwdbwd":
        got["dx"] = st.xs[0].grad
        got.update({k: v.grad for k, v in lora.items()})
    ref = st.ref_base if c["peer"] == "base" else st.ref
    errs = bl.check(f"{c['peer']} {bl.case_id(**c)}", got, ref, s.dtype, k=max(c["k"], c["n"]))

    elem = torch.finfo(s.dtype).bits // 8
    n_present = len(st.routing.present)
    flops, nbytes = bl.linear_cost(c["m"], c["k"], c["n"], c["r"], elem, c["mode"])
    nbytes += (n_present - 1) * (c["k"] + c["n"]) * c["r"] * elem * (2 if c["mode"] == "fwdbwd" else 1)  # every present task's A, B
    bflops, bbytes = bl.linear_cost(c["m"], c["k"], c["n"], c["r"], elem, c["mode"], lora=False)
    extra = dict(suite="lora_linear_mixed", **c, tasks=st.t, tasks_present=n_present, dtype=s.dtype_name, device=s.device,
                 size=s.size, flops=flops, bytes=nbytes, base_flops=bflops, base_bytes=bbytes, rel_err=errs)
    benchmark.group = f"lora_linear_mixed {c['k']}x{c['n']} r{c['r']} M{c['m']} {c['dist']} {c['mode']}"
    bl.run_timed(benchmark, step, st.xs, s.device, s.matrix, extra)
