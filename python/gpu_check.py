#!/usr/bin/env python
"""The one command for a GPU machine (no network; torch, triton, ninja, nvcc and peft present).

    python python/gpu_check.py                 # < 8 minutes on an H200
    python python/gpu_check.py --cpu-dry-run   # the same steps on CPU at toy sizes (checks the script)

Steps (each one that fails prints its error and the run goes on):

1. environment: versions, GPU, the backends that can run and why not the others;
2. the GPU tests: ``pytest tests -m gpu``, then the op test files (their ``device`` fixture is CUDA
   here, so the Triton kernels run compiled on CUDA tensors, not in the interpreter);
3. the CUDA extension check (``python/gpu_check_cuda.py`` when present, else the loader's status);
4. peak memory (``torch.cuda.max_memory_allocated``) of a mixed-task forward of a Llama-style model
   against the base model's forward;
5. large offsets: ``lora_linear`` and ``lora_linear_mixed`` with M·K > 2³¹ elements, rows at the
   end checked against the reference (skipped when memory is short);
6. the adapter pool: 1,000 adapters, zipf(1.1) requests, 8/32/128 slots vs all-resident, prefetch
   (outputs checked first);
7. the benchmark matrix's GPU subset (``python -m lora_kernels bench --size gpu``), within the time
   left, writing ``benchmarks/results/<gpu>-<date>.md`` and its plot;

and ends with the short table: the steps, the targets, and the 4096→4096 rank-16 rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))


class Run:
    def __init__(self, budget_s: float, dry: bool):
        self.t0 = time.monotonic()
        self.budget = budget_s
        self.dry = dry
        self.steps: list[tuple[str, str, float]] = []
        self.notes: list[str] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def step(self, name: str, fn, *args) -> None:
        print(f"\n=== {name} (t+{time.monotonic() - self.t0:.0f}s, {self.left():.0f}s left) ===", flush=True)
        t = time.monotonic()
        try:
            status = fn(*args) or "ok"
        except Exception as e:  # degrade gracefully: report and go on
            traceback.print_exc()
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        self.steps.append((name, status, time.monotonic() - t))
        print(f"--- {name}: {status}", flush=True)


def sh(cmd: list[str], timeout: float, env: dict | None = None) -> str:
    """Run a command from the repo root, streaming its output; a status string."""
    if timeout < 10:
        return "skipped: no time left"
    print("$ " + " ".join(cmd), flush=True)
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})}).returncode
    except subprocess.TimeoutExpired:
        return f"TIMED OUT after {timeout:.0f}s"
    return "ok" if rc == 0 else ("ok (nothing selected)" if rc == 5 else f"FAILED (exit code {rc})")


# --------------------------------------------------------------------------------------------------
def step_env(run: Run) -> str:
    import platform
    import shutil

    import torch

    import lora_kernels as lk

    print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | lora_kernels {lk.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"nvcc: {shutil.which('nvcc')} | ninja: {shutil.which('ninja')}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
    else:
        print("GPU: none visible to torch")
    for name, st in lk.available_backends().items():
        print(f"  {name:<7} {'yes' if st.available else 'no ':<4} {st.reason}")
    return "ok"


def step_tests(run: Run) -> str:
    py = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--benchmark-disable"]
    status = [sh(py + ["tests", "-m", "gpu"], min(150, run.left() - 240))]
    files = sorted(set(glob.glob(str(ROOT / "tests" / "test_lora_linear*.py")) + glob.glob(str(ROOT / "tests" / "test_triton*.py"))))
    if files:
        status.append(sh(py + [os.path.relpath(f, ROOT) for f in files] + ["-m", "not gpu"], min(150, run.left() - 200)))
    return "; ".join(status)


def step_cuda_ext(run: Run) -> str:
    script = ROOT / "python" / "gpu_check_cuda.py"
    if script.exists():
        status = sh([sys.executable, str(script)], min(150, run.left() - 180))
        return status + (" (expected in a CPU dry run)" if run.dry and status != "ok" else "")
    from lora_kernels.ops import cuda

    for fn in ("gpu_check", "check", "build"):
        if hasattr(cuda, fn):
            print(f"lora_kernels.ops.cuda.{fn}()")
            out = getattr(cuda, fn)()
            if out is not None:
                print(out)
            break
    st = cuda.status()
    return f"{'available' if st.available else 'not available'}: {st.reason}"


def step_memory(run: Run) -> str:
    """Peak memory of a mixed-task forward vs the base forward (Llama-style, 8 tasks, rank 16)."""
    import copy

    import torch

    import benchlib as bl
    import lora_kernels as lk

    dev = "cpu" if run.dry else "cuda"
    name = "tiny" if run.dry else "llama8b-2l"
    dtype = torch.float32 if run.dry else torch.bfloat16
    from transformers import LlamaConfig, LlamaModel

    cfg = dict(bl.MODEL_CONFIGS[name])
    batch = cfg.pop("batch")
    seq = 8 if run.dry else 512
    base = LlamaModel(LlamaConfig(**cfg)).to(dev, dtype).eval()
    paths = [p for p, _ in base.named_modules() if p.rsplit(".", 1)[-1] in bl.PROJECTIONS]
    lm = lk.Model(copy.deepcopy(base))
    for t in range(8):
        lm.add_task(f"t{t}", rank=16 if not run.dry else 4, alpha=32, modules=paths, init="kaiming_both")
    x = torch.randn(batch, seq, base.config.hidden_size, device=dev, dtype=dtype)
    tasks = [f"t{i % 8}" for i in range(batch)]

    def peak(fn) -> float | None:
        if dev != "cuda":
            fn()
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    with torch.no_grad():
        pb = peak(lambda: base(inputs_embeds=x))
        pm = peak(lambda: lm(inputs_embeds=x, task=tasks))  # first call: builds the stacks
        pm2 = peak(lambda: lm(inputs_embeds=x, task=tasks))
    if pb is None:
        return f"ran on CPU (dry run): no CUDA memory statistics; mixed forward of {name} B{batch} S{seq} OK"
    msg = (f"{name} bf16 B{batch}×S{seq}, 8 tasks r16 on all 7 projections: activation peak base {pb:.0f} MiB, "
           f"mixed first call {pm:.0f} MiB, mixed steady {pm2:.0f} MiB (+{pm2 - pb:.0f} MiB)")
    run.notes.append(msg)
    return msg


def step_offsets(run: Run) -> str:
    """M·K > 2^31: rows at the far end of x and y must be right (int64 offsets in the kernels)."""
    import torch
    import torch.nn.functional as F

    import benchlib as bl
    import lora_kernels as lk
    from lora_kernels.ops import reference

    dev = "cpu" if run.dry else "cuda"
    k, n, r = 4096, 4096, 16
    m = 2**31 // k + 256 if not run.dry else 512
    if run.dry:
        k = n = 64
    dtype = torch.float32 if run.dry else torch.bfloat16
    need = (m * k + m * n) * 2 * 2 + 2**30
    if dev == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if free < need:
            return f"skipped: {need / 2**30:.0f} GiB needed, {free / 2**30:.0f} GiB free"
    backends = [b for b in bl.lk_backends(dev) if dev == "cpu" or b != "torch"]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.empty(m, k, device=dev, dtype=dtype)
    x.normal_(generator=g)
    w = torch.randn(n, k, device=dev, dtype=dtype, generator=g) / k**0.5
    b = torch.randn(n, device=dev, dtype=dtype, generator=g)
    a = torch.randn(4, r, k, device=dev, dtype=dtype, generator=g) / k**0.5
    bb = torch.randn(4, n, r, device=dev, dtype=dtype, generator=g) / r**0.5
    scales = torch.tensor([1.0, 0.5, 2.0, 1.5], device=dev)
    ids = torch.randint(-1, 4, (m,), device=dev, generator=g)
    rows = torch.cat([torch.arange(0, 64, device=dev), torch.arange(m - 192, m, device=dev)])
    xs = x[rows].double()
    ref1 = reference.lora_linear(xs, w.double(), b.double(), a[0].double(), bb[0].double(), 2.0)
    ref2 = reference.lora_linear_mixed(xs, w.double(), b.double(), a.double(), bb.double(), scales.double(), ids[rows])
    tol = bl.REL_TOL[dtype] * 2
    out = []
    for be in backends:
        with torch.no_grad():
            y = lk.ops.lora_linear(x, w, b, a[0], bb[0], 2.0, backend=be)
            e1 = bl.rel_err(y[rows], ref1)
            del y
            y = lk.ops.lora_linear_mixed(x, w, b, a, bb, scales, ids, backend=be)
            e2 = bl.rel_err(y[rows], ref2)
            del y
        if dev == "cuda":
            torch.cuda.empty_cache()
        out.append(f"{be}: single {e1:.1e} {'ok' if e1 <= tol else 'WRONG'}, mixed {e2:.1e} {'ok' if e2 <= tol else 'WRONG'}")
    msg = f"M={m} K={k} (M·K = {m * k / 2**31:.3f}·2^31): " + ("; ".join(out) or "no backend to check")
    run.notes.append(msg)
    if any("WRONG" in o for o in out):
        raise AssertionError(msg)
    return msg


def step_adapter_pool(run: Run) -> str:
    """lk.AdapterPool: 1,000 rank-16 adapters (q/k/v/o of a 2-layer Llama-style model, bf16), zipf(1.1)
    requests of 32 sequences x 128 tokens. Outputs first (the pool's equal the all-resident model's;
    a run with prefetch equals one without), then tokens/s at 8/32/128 slots vs all-resident
    (DESIGN.md target: >= 0.8x at 32 slots), with and without prefetch of the next request's tasks,
    and device bytes within the slots' bound."""
    import tempfile

    import torch

    import bench_adapter_pool as bp

    if run.dry:
        st = bp.TINY
    else:
        st = bp.Setup(adapters=1000, batch=32, seq=128, hidden=1024, layers=2, vocab=1024, rank=16, device="cuda",
                      dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        paths = bp.write_adapters(st, folder)
        runs, resident = bp.peers(st, paths, slots=(8, 32, 128), with_peft=False)
        reqs = bp.requests(st, 8 + 20, seed=1)
        wrong = []
        with torch.no_grad():
            for x, t in reqs[:3]:
                ref = resident(x, task=t, use_cache=False).last_hidden_state
                for name, (fn, pool) in runs.items():
                    got = fn(x, t)
                    same = torch.equal(got, ref) if pool is None or pool._fits(sorted(set(t))) else \
                        bool(((got.float() - ref.float()).norm() <= 2e-2 * ref.float().norm()).item())
                    if not same:
                        wrong.append(name)
        res = {}
        for name, (fn, pool) in runs.items():
            if pool is not None:
                pool.reset_stats()
            res[name] = bp.measure(fn, reqs, 8)
            if pool is not None:
                res[name]["hit"] = pool.stats.hit_rate
                if pool.device_bytes() > pool.device_bytes_bound():
                    wrong.append(f"{name}: device bytes {pool.device_bytes()} > bound {pool.device_bytes_bound()}")
        # Prefetch: the next request's tasks are copied on a side stream while this one runs.
        fn32, pool32 = runs["pool 32 slots"]
        outs, times = [], []
        with torch.no_grad():
            for i, (x, t) in enumerate(reqs):
                torch.cuda.synchronize() if x.is_cuda else None
                start = time.perf_counter()
                y = fn32(x, t)
                if i + 1 < len(reqs):
                    pool32.prefetch(list(dict.fromkeys(reqs[i + 1][1]))[:16])
                torch.cuda.synchronize() if x.is_cuda else None
                times.append(time.perf_counter() - start)
                if i < 3:
                    outs.append(y)
            for (x, t), y in zip(reqs[:3], outs):
                if not torch.equal(y, fn32(x, t)):
                    wrong.append("pool 32 slots with prefetch")
        times = sorted(times[8:])
        pre = reqs[0][0].numel() / times[len(times) // 2]
    base = res["lk all resident"]["tokens_s"]
    parts = [f"{n.replace('pool ', '')}: {r['tokens_s']:,.0f} tok/s ({r['tokens_s'] / base:.2f}x"
             + (f", hit {100 * r['hit']:.0f}%" if "hit" in r else "") + ")" for n, r in res.items()]
    msg = "adapter pool (" + ("tiny, CPU" if run.dry else "1000 x r16, bf16, B32 x S128") + "): " + "; ".join(parts)
    msg += f"; 32 slots + prefetch: {pre:,.0f} tok/s ({pre / base:.2f}x)"
    run.notes.append(msg)
    if wrong:
        raise AssertionError(f"WRONG: {wrong}; {msg}")
    return msg


def step_bench(run: Run, stem: str, out_dir: Path) -> str:
    size = "tiny" if run.dry else "gpu"
    budget = run.left() - 25
    if budget < 30:
        return "skipped: no time left"
    deadline = time.time() + budget - 20  # remaining benchmarks are skipped past it, so the JSON is still written
    cmd = [sys.executable, "-m", "lora_kernels", "bench", "--size", size, "--name", stem, "--out", str(out_dir),
           f"--pytest-args=--bench-deadline={deadline:.0f}" + (" --bench-device=cpu" if run.dry else "")]
    return sh(cmd, budget)


def short_table(run: Run, stem: str, out_dir: Path) -> None:
    from lora_kernels import bench

    print("\n" + "=" * 100 + "\nSHORT TABLE\n")
    for name, status, secs in run.steps:
        print(f"  {name:<28} {secs:6.0f}s  {status}")
    size = "tiny" if run.dry else "gpu"
    path = out_dir / f".last-{size}.json"
    if not path.exists():
        print("\n(no benchmark results)")
        return
    records, machine = bench.load(path)
    key = min(((r.get("k"), r.get("n"), r.get("r")) for r in records if r["suite"] != "model"), default=None)
    main = [r for r in records if r["suite"] == "model" or (r.get("k"), r.get("n"), r.get("r")) == key]
    print(bench.tables(main, machine))
    print(bench.targets_table(bench.targets(records)))
    md = out_dir / f"{stem}.md"
    if md.exists():
        with open(md, "a") as f:
            f.write("\n## gpu_check steps\n\n| step | seconds | status |\n|---|---|---|\n")
            for name, status, secs in run.steps:
                f.write(f"| {name} | {secs:.0f} | {status} |\n")
            for note in run.notes:
                f.write(f"\n- {note}\n")
        print(f"\nresults: {md}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="run every step on CPU at toy sizes (checks the script)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results; dry run: /tmp)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: tests,cuda,memory,offsets,pool,bench")
    args = ap.parse_args(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; use --cpu-dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    run = Run(args.budget, args.cpu_dry_run)
    out_dir = Path(args.out) if args.out else (Path("/tmp/lora_kernels_gpu_check") if run.dry else ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = "cpu-dry-run" if run.dry else torch.cuda.get_device_name()
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in gpu.replace("NVIDIA ", "")).strip("-").lower()
    stem = f"{stem}-{dt.date.today().isoformat()}"
    skip = set(filter(None, args.skip.split(",")))

    run.step("environment", step_env, run)
    if "tests" not in skip:
        run.step("GPU tests", step_tests, run)
    if "cuda" not in skip:
        run.step("CUDA extension", step_cuda_ext, run)
    if "memory" not in skip:
        run.step("mixed-task peak memory", step_memory, run)
    if "offsets" not in skip:
        run.step("large offsets (M·K > 2^31)", step_offsets, run)
    if "pool" not in skip:
        run.step("adapter pool", step_adapter_pool, run)
    if "bench" not in skip:
        run.step("benchmarks", step_bench, run, stem, out_dir)
    try:
        short_table(run, stem, out_dir)
    except Exception:
        traceback.print_exc()
    failed = [s for s in run.steps if ("FAILED" in s[1] and "expected in a CPU dry run" not in s[1]) or "WRONG" in s[1] or "TIMED OUT" in s[1]]
    print(f"\ngpu_check finished in {time.monotonic() - run.t0:.0f}s; {len(failed)} step(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
