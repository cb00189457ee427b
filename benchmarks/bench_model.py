"""Model level: a Llama-style model (``transformers.LlamaConfig`` built here, random weights) with all
seven projections (q, k, v, o, gate, up, down) adapted, through ``lk.Model`` and through PEFT.

Input: ``inputs_embeds [B, S, H]`` (so forward+backward has a gradient path through the frozen base,
as in LoRA training). ``dist="single"``: one task for the whole batch; the other distributions give
each of the B samples its task (``task=[...]`` / PEFT ``adapter_names=[...]``). Peers: the base
model, merged weights (single), PEFT, a per-task loop of PEFT calls over the batch's samples
("loop": what training mixed batches with PEFT takes), and our backends. Checked first against a
float64 oracle: per task, a float64 copy of the base with ``W + s·B·A`` merged.
Skips cleanly when transformers (or, for its peers, peft) is not installed.
"""

from __future__ import annotations

import copy

import pytest
import torch

import benchlib as bl
import lora_kernels as lk

pytest.importorskip("transformers")

ALPHA_OVER_R = 2.0  # scale = alpha / r


def pytest_generate_tests(metafunc):
    if "model_case" not in metafunc.fixturenames:
        return
    s = bl.settings(metafunc.config)
    m = s.matrix
    ours = [bl.lk_name(b) for b in bl.lk_backends(s.device)]
    params = []
    for mode in bl.MODES:
        for seq in m.model_seqs:
            for dist in ("single", *m.model_dists):
                peers = (["base", "merged", "peft"] if dist == "single" else ["base", "peft", "loop"]) + ours
                for peer in peers:
                    case = dict(model=m.model, s=seq, dist=dist, mode=mode, peer=peer)
                    op = "model_single" if dist == "single" else "model_mixed"
                    why = bl.skip_reason("peft" if peer == "loop" else peer, op=op if peer != "loop" else "model_single",
                                         mode=mode, device=s.device)
                    marks = [pytest.mark.skip(reason=why)] if why else []
                    params.append(pytest.param(case, id=bl.case_id(**case), marks=marks))
    metafunc.parametrize("model_case", params)


def _base_model(name: str, device, dtype):
    from transformers import LlamaConfig, LlamaModel

    cfg = dict(bl.MODEL_CONFIGS[name])
    cfg.pop("batch")
    torch.manual_seed(0)
    config = LlamaConfig(**cfg, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    model = LlamaModel(config).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


class Setup:
    def __init__(self, name, seq, dist, mode, rank, device, dtype):
        self.name, self.seq, self.dist, self.mode, self.rank, self.device, self.dtype = name, seq, dist, mode, rank, device, dtype
        self.batch = bl.MODEL_CONFIGS[name]["batch"]
        if dist == "single":
            self.ids, self.t = [0] * self.batch, 1
        else:
            self.ids, self.t = bl.task_ids(dist, self.batch)
        self.base = _base_model(name, device, dtype)
        self.paths = [p for p, mod in self.base.named_modules() if p.rsplit(".", 1)[-1] in bl.PROJECTIONS]
        g = torch.Generator().manual_seed(99)
        self.lora = []  # per task: {path: (A [r, in], B [out, r])}
        for _ in range(self.t):
            w = {}
            for p in self.paths:
                lin = self.base.get_submodule(p)
                w[p] = (bl.randn(rank, lin.in_features, std=lin.in_features**-0.5, gen=g, device=device, dtype=dtype),
                        bl.randn(lin.out_features, rank, std=0.5 * rank**-0.5, gen=g, device=device, dtype=dtype))
            self.lora.append(w)
        h = self.base.config.hidden_size
        self.xs = [bl.randn(self.batch, seq, h, gen=g, device=device, dtype=dtype).requires_grad_(mode == "fwdbwd")
                   for _ in range(bl.pool_size(device))]
        self.dy = bl.randn(self.batch, seq, h, gen=g, device=device, dtype=dtype)
        self.names = [f"t{i}" for i in self.ids]
        self._reference()

    def merged_copy(self, t: int, dtype) -> torch.nn.Module:
        m = copy.deepcopy(self.base).to(dtype)
        with torch.no_grad():
            for p, (a, b) in self.lora[t].items():
                lin = m.get_submodule(p)
                lin.weight += ALPHA_OVER_R * (b.to(dtype) @ a.to(dtype))
        return m

    def _run(self, model, x):
        with bl.no_grad_if(self.mode == "fwd"):
            y = model(inputs_embeds=x).last_hidden_state
            if self.mode == "fwdbwd":
                y.backward(self.dy.to(y.dtype))
        return y.detach()

    def _reference(self):
        x64 = self.xs[0].detach().double()
        self.ref, self.ref_base = {}, {}
        xb = x64.clone().requires_grad_(self.mode == "fwdbwd")
        self.ref_base["y"] = self._run(copy.deepcopy(self.base).double(), xb)
        if self.mode == "fwdbwd":
            self.ref_base["dx"] = xb.grad
        y = torch.empty_like(self.ref_base["y"])
        dx = torch.empty_like(x64)
        for t in sorted(set(self.ids)):
            rows = torch.tensor([i for i, v in enumerate(self.ids) if v == t], device=self.device)
            xt = x64.index_select(0, rows).requires_grad_(self.mode == "fwdbwd")
            m = self.merged_copy(t, torch.float64)
            dy, self.dy = self.dy, self.dy.index_select(0, rows)
            try:
                y[rows] = self._run(m, xt)
            finally:
                self.dy = dy
            if self.mode == "fwdbwd":
                dx[rows] = xt.grad
            del m
        self.ref["y"] = y
        if self.mode == "fwdbwd":
            self.ref["dx"] = dx

    def lk_model(self):
        lm = lk.Model(copy.deepcopy(self.base))
        for t in range(self.t):
            lm.add_task(f"t{t}", rank=self.rank, alpha=ALPHA_OVER_R * self.rank, modules=self.paths)
            params = lm.task_parameters(f"t{t}")
            with torch.no_grad():
                for p, (a, b) in self.lora[t].items():
                    params[f"{p}.lora_A.weight"].copy_(a)
                    params[f"{p}.lora_B.weight"].copy_(b)
            lm.requires_grad_(self.mode == "fwdbwd", task=f"t{t}")
        lm.requires_grad_(False)
        return lm.eval()

    def peft_model(self):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=self.rank, lora_alpha=ALPHA_OVER_R * self.rank, target_modules=list(bl.PROJECTIONS), lora_dropout=0.0)
        pm = get_peft_model(copy.deepcopy(self.base), cfg, adapter_name="t0")
        for t in range(1, self.t):
            pm.add_adapter(f"t{t}", cfg)
        with torch.no_grad():
            for t in range(self.t):
                for p, (a, b) in self.lora[t].items():
                    layer = pm.base_model.model.get_submodule(p)
                    layer.lora_A[f"t{t}"].weight.copy_(a)
                    layer.lora_B[f"t{t}"].weight.copy_(b)
        for n, prm in pm.named_parameters():
            prm.requires_grad_(self.mode == "fwdbwd" and "lora_" in n)
        return pm.eval()


def get_setup(*key):
    return _get(*key)


_get = bl.cached_setup(Setup)


def build(peer: str, st: Setup):
    """fn(x) -> last hidden state, and the model (kept alive) for one peer."""
    if peer == "base":
        m = st.base
        return (lambda x: m(inputs_embeds=x).last_hidden_state), m
    if peer == "merged":
        m = st.merged_copy(0, st.dtype)
        return (lambda x: m(inputs_embeds=x).last_hidden_state), m
    if peer == "peft":
        pm = st.peft_model()
        if st.dist == "single":
            pm.set_adapter("t0")
            if st.mode == "fwdbwd":  # set_adapter marks only the active adapter trainable
                pass
            return (lambda x: pm(inputs_embeds=x).last_hidden_state), pm
        names = st.names
        return (lambda x: pm(inputs_embeds=x, adapter_names=names).last_hidden_state), pm
    if peer == "loop":
        pm = st.peft_model()
        groups = [(f"t{t}", torch.tensor([i for i, v in enumerate(st.ids) if v == t], device=st.device))
                  for t in sorted(set(st.ids))]

        def loop(x):
            y = None
            for name, rows in groups:
                pm.base_model.set_adapter(name)
                yt = pm(inputs_embeds=x.index_select(0, rows)).last_hidden_state
                y = yt.new_empty((x.shape[0], *yt.shape[1:])) if y is None else y
                y = y.index_copy(0, rows, yt)
            return y
        return loop, pm
    if bl.is_ours(peer):
        backend = peer[3:-1]
        lm = st.lk_model()
        task = "t0" if st.dist == "single" else st.names

        def ours(x):
            with lk.use_backend(backend):
                return lm(inputs_embeds=x, task=task).last_hidden_state
        return ours, lm
    raise ValueError(f"unknown peer {peer!r}")


def model_cost(st: Setup, elem: int) -> tuple[float, float, float, float]:
    """(FLOPs, bytes, base FLOPs, base bytes) of the model's linear layers (attention excluded)."""
    f = b = bf = bb = 0.0
    m = st.batch * st.seq
    n_present = len(set(st.ids))
    for p in st.paths:
        lin = st.base.get_submodule(p)
        k, n = lin.in_features, lin.out_features
        lf, lb = bl.linear_cost(m, k, n, st.rank, elem, st.mode)
        lb += (n_present - 1) * (k + n) * st.rank * elem
        xf, xb = bl.linear_cost(m, k, n, st.rank, elem, st.mode, lora=False)
        f, b, bf, bb = f + lf, b + lb, bf + xf, bb + xb
    return f, b, bf, bb


@pytest.mark.bench
def test_model(benchmark, model_case, pytestconfig):
    s = bl.settings(pytestconfig)
    c = model_case
    st = get_setup(c["model"], c["s"], c["dist"], c["mode"], s.matrix.model_rank, s.device, s.dtype)
    fn, keep = build(c["peer"], st)

    if st.mode == "fwd":
        def step(x):
            with torch.no_grad():
                return fn(x)
    else:
        lora = [p for p in keep.parameters() if p.requires_grad]

        def step(x):
            bl.zero_grads(x, *lora)
            y = fn(x)
            y.backward(st.dy)
            return y

    y = step(st.xs[0])
    got = {"y": y, "dx": st.xs[0].grad if st.mode == "fwdbwd" else None}
    ref = st.ref_base if c["peer"] == "base" else st.ref
    errs = bl.check(f"{c['peer']} {bl.case_id(**c)}", got, ref, s.dtype, k=3 * 4096)  # 2 layers deep: 3x the budget

    elem = torch.finfo(s.dtype).bits // 8
    flops, nbytes, bflops, bbytes = model_cost(st, elem)
    extra = dict(suite="model", **c, m=st.batch * st.seq, batch=st.batch, r=st.rank, tasks=st.t, dtype=s.dtype_name,
                 device=s.device, size=s.size, flops=flops, bytes=nbytes, base_flops=bflops, base_bytes=bbytes, rel_err=errs)
    benchmark.group = f"model {c['model']} B{st.batch} S{c['s']} {c['dist']} {c['mode']}"
    bl.run_timed(benchmark, step, st.xs, s.device, s.matrix, extra)
