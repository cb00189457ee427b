"""Shared machinery of the benchmark suites: the matrix, task distributions, peers, timing, checks.

Every benchmark builds its inputs once per case (shape, rank, tokens, distribution, mode), checks
the implementation under test against the float64 reference (``lora_kernels.ops.reference``)
and only then times it. All peers of a case see the same inputs and weights, in the same run.

Timing (:func:`run_timed`):

- CPU: ``benchmark.pedantic`` over a small pool of rotating inputs, after warm-up rounds.
- CUDA: the same, plus the L2 cache is flushed in the (untimed) setup of every round, and each
  round is also timed with CUDA events around the call; the event median (device time, no host
  sync in it) is stored in ``extra_info["median_device_s"]`` and is what the report shows.
  pytest-benchmark's own wall-clock stats include the ``synchronize`` at the end of the call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels.ops import reference
from lora_kernels.ops.routing import Routing

# --------------------------------------------------------------------------------------------------
# The matrix (DESIGN.md §7) and its subsets
# --------------------------------------------------------------------------------------------------
SHAPES_FULL = ((4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (4096, 1024))  # K -> N
RANKS_FULL = (8, 16, 64)
TOKENS_FULL = (1, 16, 64, 256, 2048, 8192)
DISTS = ("identical", "uniform", "zipf", "distinct")
MODES = ("fwd", "fwdbwd")
MAX_TASKS = 64  # task stacks hold at most this many tasks ("distinct" = min(M, 64) tasks, round robin)

SIZES = ("tiny", "quick", "gpu", "full")


@dataclass(frozen=True)
class Matrix:
    """Which cases one size runs. ``*_fwdbwd`` restrict the (costlier) forward+backward cases."""

    lin_shapes: tuple
    lin_ranks: tuple
    lin_tokens: tuple
    lin_fwdbwd_tokens: tuple
    lin_fwdbwd_shapes: tuple
    mix_shapes: tuple
    mix_ranks: tuple
    mix_tokens: tuple
    mix_dists: tuple
    mix_fwdbwd_tokens: tuple
    mix_fwdbwd_dists: tuple
    model: str  # key of MODEL_CONFIGS
    model_seqs: tuple  # sequence lengths (batch = MODEL_CONFIGS[model]["batch"])
    model_dists: tuple
    model_rank: int
    compile_shapes: tuple = ()  # torch.compile peer only on these (K, N) (compiling is slow)
    time_budget_s: float = 0.3  # per benchmark, for choosing the number of rounds
    min_rounds: int = 3
    max_rounds: int = 50


MATRICES = {
    # Smoke: every benchmark and peer at toy sizes (``pytest benchmarks --benchmark-disable``).
    "tiny": Matrix(lin_shapes=((64, 96),), lin_ranks=(4,), lin_tokens=(1, 16), lin_fwdbwd_tokens=(16,),
                   lin_fwdbwd_shapes=((64, 96),), mix_shapes=((64, 96),), mix_ranks=(4,), mix_tokens=(16,), mix_dists=DISTS,
                   mix_fwdbwd_tokens=(16,), mix_fwdbwd_dists=("uniform",), model="tiny", model_seqs=(4,),
                   model_dists=("distinct",), model_rank=4, compile_shapes=((64, 96),), time_budget_s=0.05, min_rounds=1, max_rounds=3),
    # CPU in under 3 minutes: the shapes the CPU targets are stated on.
    "quick": Matrix(lin_shapes=((4096, 4096),), lin_ranks=(16,), lin_tokens=(1, 16, 64, 256), lin_fwdbwd_tokens=(64,),
                    lin_fwdbwd_shapes=((4096, 4096),), mix_shapes=((4096, 4096),), mix_ranks=(16,), mix_tokens=(64,),
                    mix_dists=DISTS, mix_fwdbwd_tokens=(64,), mix_fwdbwd_dists=("uniform",), model="small",
                    model_seqs=(16,), model_dists=("uniform", "distinct"), model_rank=16, time_budget_s=0.6, min_rounds=5, max_rounds=60),
    # GPU subset for python/gpu_check.py (a few minutes on an H200).
    "gpu": Matrix(lin_shapes=((4096, 4096), (4096, 14336), (14336, 4096)), lin_ranks=(16,), lin_tokens=TOKENS_FULL,
                  lin_fwdbwd_tokens=(64, 2048, 8192), lin_fwdbwd_shapes=((4096, 4096),), mix_shapes=((4096, 4096),),
                  mix_ranks=(16,), mix_tokens=(16, 64, 256, 2048), mix_dists=DISTS, mix_fwdbwd_tokens=(64, 2048),
                  mix_fwdbwd_dists=("uniform", "distinct"), model="llama8b-2l", model_seqs=(256,), model_dists=("uniform", "distinct"),
                  model_rank=16, compile_shapes=((4096, 4096),), time_budget_s=0.05, min_rounds=10, max_rounds=200),
    # The whole matrix of DESIGN.md §7.
    "full": Matrix(lin_shapes=SHAPES_FULL, lin_ranks=RANKS_FULL, lin_tokens=TOKENS_FULL, lin_fwdbwd_tokens=TOKENS_FULL,
                   lin_fwdbwd_shapes=SHAPES_FULL, mix_shapes=SHAPES_FULL, mix_ranks=RANKS_FULL, mix_tokens=TOKENS_FULL,
                   mix_dists=DISTS, mix_fwdbwd_tokens=TOKENS_FULL, mix_fwdbwd_dists=DISTS, model="llama8b-2l",
                   model_seqs=(1, 256, 1024), model_dists=DISTS, model_rank=16, compile_shapes=SHAPES_FULL,
                   time_budget_s=0.1, min_rounds=10, max_rounds=200),
}

# Llama-style configs (transformers.LlamaConfig kwargs) + the batch the model benchmarks use.
MODEL_CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=128, batch=4),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=1024, batch=8),
    "llama8b-2l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=1024, batch=8),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Relative error ||out - ref|| / ||ref|| allowed per dtype (same budget as tests/utils.py).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# --------------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------------
OP_PEERS = ("base", "merged", "unfused", "compile", "seed", "loralib", "peft")  # + "lk[<backend>]"
MIXED_PEERS = ("base", "loop", "seed", "peft")
MODEL_PEERS = ("base", "merged", "peft")

PEER_DOC = {
    "base": "the base layer/model alone, no LoRA (F.linear / the HF model)",
    "merged": "W + s·B·A merged once beforehand (one task only)",
    "unfused": "PEFT's formula in torch: F.linear(x, W, b) + s·B(A(x))",
    "compile": "torch.compile (default options) of the unfused formula",
    "seed": "the seed's approach: F.linear(x, W + s·B·A) materialising the weight every call (per task in mixed batches)",
    "loralib": "loralib.Linear (merge_weights=False), one task",
    "peft": "PEFT LoRA, default options (mixed batches: adapter_names=..., inference only)",
    "loop": "per-task loop in torch: gather rows, s·B(A(x)), index_add (row indices precomputed)",
}


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def lk_backends(device: str) -> list[str]:
    """Our backends that can really run on ``device`` (the Triton interpreter is not a benchmark)."""
    from lora_kernels.ops.dispatch import triton_interpreter

    out = []
    for name, status in lk.available_backends().items():
        if not status.available:
            continue
        if name != "torch" and device != "cuda":
            continue
        if name == "triton" and triton_interpreter():
            continue
        out.append(name)
    return out


def lk_name(backend: str) -> str:
    return f"lk[{backend}]"


def is_ours(peer: str) -> bool:
    return peer.startswith("lk[")


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def num_tasks(dist: str, m: int) -> int:
    return {"identical": 1, "uniform": max(1, math.ceil(math.sqrt(m))), "zipf": min(m, MAX_TASKS),
            "distinct": min(m, MAX_TASKS)}[dist]


def task_ids(dist: str, m: int, seed: int = 0) -> tuple[list[int], int]:
    """(ids of the ``m`` rows, number of tasks T) for a distribution of DESIGN.md §7.

    identical: every row task 0. uniform: each row uniform over ceil(sqrt(m)) tasks. zipf(1.5):
    P(task k) ∝ k^-1.5 over min(m, 64) tasks. distinct: every row its own task (round robin over
    min(m, 64) tasks, shuffled).
    """
    g = torch.Generator().manual_seed(seed)
    t = num_tasks(dist, m)
    if dist == "identical":
        ids = [0] * m
    elif dist == "uniform":
        ids = torch.randint(0, t, (m,), generator=g).tolist()
    elif dist == "zipf":
        p = torch.arange(1, t + 1, dtype=torch.float64).pow(-1.5)
        ids = torch.multinomial(p / p.sum(), m, replacement=True, generator=g).tolist()
    elif dist == "distinct":
        ids = [i % t for i in torch.randperm(m, generator=g).tolist()]
    else:
        raise ValueError(f"unknown distribution {dist!r}; choose one of {DISTS}")
    return ids, t


def randn(*shape, gen, device, dtype, std=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * std).to(device=device, dtype=dtype)


def pool_size(device: str) -> int:
    return 2  # inputs rotate through this many tensors (CUDA also flushes L2 every round)


# --------------------------------------------------------------------------------------------------
# Floors (FLOPs and bytes) for the report's fraction of max(F/P, bytes/BW)
# --------------------------------------------------------------------------------------------------
def linear_cost(m: int, k: int, n: int, r: int, elem: int, mode: str, lora: bool = True, weights_read: int = 1) -> tuple[float, float]:
    """(FLOPs, bytes) a LoRA linear must at least do: x, W (``weights_read`` times), y once each.

    fwd+bwd (base frozen): dx = dy·Wᵀ + s·(dy·B)·A, dA, dB: one more pass over W, dy, x, dx.
    """
    f = 2.0 * m * k * n + (2.0 * m * r * (k + n) if lora else 0.0)
    b = (m * k + weights_read * k * n + m * n + ((k + n) * r if lora else 0)) * elem
    if mode == "fwdbwd":
        f += 2.0 * m * k * n + (3 * 2.0 * m * r * (k + n) if lora else 0.0)
        b += (m * n + k * n + 2 * m * k + (2 * (k + n) * r if lora else 0)) * elem
    return f, b


# --------------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double(), ref.detach().double().to(out.device)
    denom = ref64.norm().item()
    err = (out64 - ref64).norm().item()
    return err / denom if denom > 0 else err


def check(what: str, got: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor], dtype: torch.dtype, k: int = 1) -> dict:
    """Assert every tensor in ``got`` matches ``ref`` (float64) within ``dtype``'s tolerance.

    The tolerance grows with sqrt(K / 4096) for the reduction length (bf16 rounding of long sums).
    """
    tol = REL_TOL[dtype] * max(1.0, math.sqrt(k / 4096))
    errs = {}
    for name, ref_t in ref.items():
        out = got.get(name)
        if out is None:
            continue
        assert out.shape == ref_t.shape, f"{what}: {name} shape {tuple(out.shape)} != reference {tuple(ref_t.shape)}"
        e = rel_err(out, ref_t)
        assert math.isfinite(e) and e <= tol, f"{what}: {name} relative error {e:.3e} > {tol:.1e} ({dtype})"
        errs[name] = e
    return errs


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
_L2_FLUSH: dict[str, torch.Tensor] = {}


def flush_l2(device: str) -> None:
    """Overwrite a buffer larger than any L2 (H200: 50 MiB) so the cache holds none of the inputs."""
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    buf.zero_()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_timed(benchmark, fn: Callable[[Any], Any], inputs: list, device: str, matrix: Matrix, extra: dict) -> Any:
    """Time ``fn(inputs[i])`` with pytest-benchmark, rotating inputs; see the module docstring.

    Returns the last result. With ``--benchmark-disable`` it runs ``fn`` once (the smoke run).
    """
    benchmark.extra_info.update(extra)
    it = [0]
    cuda = device == "cuda"
    events: list = []

    def setup():
        x = inputs[it[0] % len(inputs)]
        it[0] += 1
        if cuda:
            flush_l2(device)
            torch.cuda.synchronize()
        return (x,), {}

    def target(x):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(x)
            end.record()
            torch.cuda.synchronize()
            events.append((start, end))
            return out
        return fn(x)

    if getattr(benchmark, "disabled", False):
        return benchmark.pedantic(target, setup=setup, rounds=1, iterations=1)

    # Warm up (autotuning, compile, allocator; the correctness call before this was the first) and
    # estimate one call's time to size the rounds.
    args, _ = setup()
    target(*args)
    t0 = time.perf_counter()
    args, _ = setup()
    target(*args)
    est = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(matrix.max_rounds, max(matrix.min_rounds, matrix.time_budget_s / est)))
    events.clear()
    out = benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1 if cuda else 0)
    if cuda and events:
        times = sorted(s.elapsed_time(e) / 1e3 for s, e in events[-rounds:])
        benchmark.extra_info["median_device_s"] = times[len(times) // 2]
    return out


# --------------------------------------------------------------------------------------------------
# Case cache: tests are parametrized with the peer varying fastest, so one setup serves all peers
# --------------------------------------------------------------------------------------------------
def cached_setup(build: Callable[..., Any]) -> Callable[..., Any]:
    """Keep only the most recent setup (big weights: never hold two cases at once)."""
    slot: dict = {}

    @functools.wraps(build)
    def get(*key):
        if key not in slot:
            slot.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            slot[key] = build(*key)
        return slot[key]

    get.clear = slot.clear  # type: ignore[attr-defined]
    return get


@contextlib.contextmanager
def no_grad_if(flag: bool):
    with (torch.no_grad() if flag else contextlib.nullcontext()):
        yield


def zero_grads(*tensors) -> None:
    for t in tensors:
        if t is not None:
            t.grad = None


def make_step(fn, mode: str, dy, lora: dict):
    """The timed call: inference under no_grad, or forward + backward (``dy``) with fresh grads."""
    if mode == "fwd":
        def step(x):
            with torch.no_grad():
                return fn(x)
    else:
        def step(x):
            zero_grads(x, *lora.values())
            y = fn(x)
            y.backward(dy)
            return y
    return step


def skip_reason(peer: str, *, op: str, mode: str, device: str, shape=None, matrix: Matrix | None = None,
                compile_ok: bool = False) -> str | None:
    """Why a peer does not run in a case (None: it runs)."""
    if peer == "peft" and not (have("peft") and have("transformers")):
        return "peft (and transformers) not installed"
    if peer == "loralib" and not have("loralib"):
        return "loralib not installed"
    if peer == "peft" and op in ("lora_linear_mixed", "model_mixed") and mode == "fwdbwd":
        return "PEFT's adapter_names mixed batches are inference only (it raises in training mode)"
    if peer == "merged" and mode == "fwdbwd":
        return "merged weights do not train the adapter"
    if peer == "compile":
        if device != "cuda" and not compile_ok:
            return "torch.compile peer runs on CUDA (or on CPU with --bench-compile)"
        if matrix is not None and shape is not None and tuple(shape) not in matrix.compile_shapes and device == "cuda":
            return "torch.compile peer only on the matrix's compile_shapes (compiling every shape is slow)"
    return None


# --------------------------------------------------------------------------------------------------
# Settings from the pytest command line (options defined in benchmarks/conftest.py)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    size: str
    matrix: Matrix
    device: str
    dtype: torch.dtype
    dtype_name: str
    compile_ok: bool
    disabled: bool


def _opt(config, name, default=None):
    try:
        return config.getoption(name, default=default)
    except ValueError:
        return default


def settings(config) -> Settings:
    device = _opt(config, "bench_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    disabled = bool(_opt(config, "benchmark_disable", False))
    size = _opt(config, "bench_size") or "tiny"  # timing runs name their size (the report passes --quick / --bench-size gpu)
    dtype_name = _opt(config, "bench_dtype") or ("bfloat16" if device == "cuda" else "float32")
    return Settings(size=size, matrix=MATRICES[size], device=device, dtype=dtype_of(dtype_name), dtype_name=dtype_name,
                    compile_ok=bool(_opt(config, "bench_compile", False)), disabled=disabled)


def case_id(**kw) -> str:
    return "-".join(f"{v}" if k in ("peer", "mode", "dist") else f"{k}{v}" for k, v in kw.items())
