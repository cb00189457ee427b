"""GPU check of the CUDA extension (csrc/): build it, run its GPU tests, time decode.

    python python/gpu_check_cuda.py            # build + tests + decode table (~3 min on an H200)
    python python/gpu_check_cuda.py --no-tests # build + table only
    python python/gpu_check_cuda.py --out benchmarks/results   # also write the table there

From python/gpu_check.py:  ``import gpu_check_cuda; report = gpu_check_cuda.run(out_dir=...)``
returns a dict (build seconds, test exit code, rows, table text) and prints the table last.

Timing. Each op is captured once in a CUDA graph and the graph is replayed with the L2 flushed
(a 256 MiB write) before every replay, timed by CUDA events: the GPU time of the op with cold
weights, free of Python launch overhead (median of the replays). The "call" columns time the
plain eager call in a loop (host + GPU, no graph): what a Python decode loop pays per call.

Peers: base = F.linear (cuBLAS, no LoRA); unfused = PEFT's formula F.linear(x, W, b) +
s * F.linear(F.linear(x, A), B); triton = lk.ops backend="triton"; cuda = this extension.
Mixed rows use M distinct tasks (T = M) against PEFT's mixed-batch loop (per task: gather rows,
LoRA delta, index_add) with the routing precomputed.
Targets (DESIGN §7, the README's): fused single-task forward <= 1.05 x base (TARGET_SINGLE) at every
M; mixed T distinct tasks <= 1.15 x (single-task fused time x the byte-floor ratio
1 + T·r·(K+N)/(N·K)) (TARGET_MIXED; 1.5 x at T = 64, r = 16, 4096²). The table marks rows that miss.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336)]  # K -> N
RANKS = [16, 64]
TOKENS = [1, 4, 16, 32, 64]  # 32, 64: wide_kernel where N allows


def build() -> float:
    """Load the extension (JIT-building it when setup.py did not); returns the seconds it took."""
    from lora_kernels.ops import cuda

    st = cuda.status()
    print(f"[cuda] status: {st.reason}", flush=True)
    if not st.available:
        raise SystemExit(f"[cuda] backend not available: {st.reason}")
    t0 = time.perf_counter()
    cuda.load()
    dt = time.perf_counter() - t0
    print(f"[cuda] extension ready in {dt:.1f} s ({cuda._loaded})", flush=True)
    return dt


def run_tests(timeout: int = 420) -> int:
    """The GPU tests of the extension (tests/test_cuda_ext.py -m gpu), in a subprocess."""
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda_ext.py", "-m", "gpu", "-q", "-x", "--no-header", "-p", "no:cacheprovider"]
    print(f"[cuda] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"[cuda] GPU tests timed out after {timeout} s", flush=True)
        return 124
    print(f"[cuda] GPU tests exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    return rc


class _Timer:
    def __init__(self, reps: int):
        self.reps = reps
        self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")

    def graph(self, fn) -> float | None:
        """Median GPU microseconds of ``fn`` replayed from a CUDA graph, L2 flushed before each replay.

        None (and a printed reason) when ``fn`` cannot be captured or fails.
        """
        try:
            return self._graph(fn)
        except Exception as e:  # noqa: BLE001 - one peer failing must not stop the table
            print(f"[cuda] timing failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            torch.cuda.synchronize()
            return None

    def _graph(self, fn) -> float:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return statistics.median(times)

    def eager(self, fn, n: int = 200) -> float | None:
        """Mean microseconds per eager call in a loop (host launch + GPU; weights stay in L2)."""
        try:
            return self._eager(fn, n)
        except Exception as e:  # noqa: BLE001
            print(f"[cuda] eager timing failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            return None

    def _eager(self, fn, n: int) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e6


def bench_decode(reps: int = 50, dtype=torch.bfloat16) -> list[dict]:
    import lora_kernels as lk
    from lora_kernels.ops import cuda
    from lora_kernels.ops.routing import Routing

    have_triton = lk.available_backends()["triton"].available
    timer = _Timer(reps)
    rows = []
    torch.manual_seed(0)
    for k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
        bias = torch.randn(n, device="cuda", dtype=dtype)
        for r in RANKS:
            a = torch.randn(r, k, device="cuda", dtype=dtype) / k ** 0.5
            b = torch.randn(n, r, device="cuda", dtype=dtype)
            for m in TOKENS:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                fns = {
                    "base": lambda: F.linear(x, w, bias),
                    "unfused": lambda: F.linear(x, w, bias) + 0.5 * F.linear(F.linear(x, a), b),
                    "cuda": lambda: cuda.lora_linear(x, w, bias, a, b, 0.5),
                }
                if have_triton:
                    fns["triton"] = lambda: lk.ops.lora_linear(x, w, bias, a, b, 0.5, backend="triton")
                row = {"kind": "single", "K": k, "N": n, "r": r, "M": m}
                with torch.no_grad():
                    for name, fn in fns.items():
                        row[name] = timer.graph(fn)
                    row["cuda_call"] = timer.eager(fns["cuda"])
                    if have_triton:
                        row["triton_call"] = timer.eager(fns["triton"])
                rows.append(row)

                # Mixed: M distinct tasks (T = M), one token each.
                t = m
                at = torch.randn(t, r, k, device="cuda", dtype=dtype) / k ** 0.5
                bt = torch.randn(t, n, r, device="cuda", dtype=dtype)
                scales = torch.full((t,), 0.5, device="cuda")
                ids = torch.arange(m, device="cuda")
                routing = Routing(ids, t)
                cuda.tiles_of(routing.to("cuda"), "cuda")  # per-batch metadata, built once
                idx = [routing.rows(i) for i in routing.present]
                sl = scales.tolist()

                def peft_loop():
                    y = F.linear(x, w, bias)
                    for i, rows_i in zip(routing.present, idx):
                        xs = x.index_select(0, rows_i)
                        y.index_add_(0, rows_i, F.linear(F.linear(xs, at[i]), bt[i]) * sl[i])
                    return y

                mfns = {
                    "cuda_mixed": lambda: cuda.lora_linear_mixed(x, w, bias, at, bt, scales, routing),
                    "peft_loop": peft_loop,
                }
                if have_triton:
                    mfns["triton_mixed"] = lambda: lk.ops.lora_linear_mixed(x, w, bias, at, bt, scales, routing, backend="triton")
                mrow = {"kind": "mixed", "K": k, "N": n, "r": r, "M": m, "T": t, "cuda": row["cuda"], "base": row["base"]}
                with torch.no_grad():
                    for name, fn in mfns.items():
                        mrow[name] = timer.graph(fn)
                rows.append(mrow)
                print(f"[cuda] {k}->{n} r={r} M={m}: base {row['base']} us, cuda {row['cuda']} us "
                      f"({_ratio(row['cuda'], row['base'])}x), mixed {mrow['cuda_mixed']} us", flush=True)
    return rows


TARGET_SINGLE = 1.05  # cuda / base, fused single-task forward
TARGET_MIXED = 1.15   # cuda mixed / (cuda single x byte-floor ratio)


def _byte_floor_ratio(r: dict) -> float:
    """Bytes of W + T adapters over bytes of W: what a mixed batch must read more than one task."""
    return 1 + r["T"] * r["r"] * (r["K"] + r["N"]) / (r["N"] * r["K"])


def _mark(a, b, target: float) -> str:
    """The ratio a / b, with ' MISS' when it is over target."""
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}" + (" MISS" if a / b > target else "")


def _ratio(a, b, digits: int = 2) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    out = ["| K->N | r | M | base us | unfused us | triton us | cuda us | cuda/base (<= 1.05) | cuda call us | triton call us |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "single":
            continue
        out.append(f"| {r['K']}->{r['N']} | {r['r']} | {r['M']} | {f(r['base'])} | {f(r['unfused'])} | {f(r.get('triton'))} | "
                   f"{f(r['cuda'])} | {_mark(r['cuda'], r['base'], TARGET_SINGLE)} | {f(r['cuda_call'])} | {f(r.get('triton_call'))} |")
    out += ["", "| K->N | r | M = T distinct | cuda mixed us | mixed / (cuda single x byte ratio) (<= 1.15) | triton mixed us | PEFT loop us | PEFT / cuda mixed |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "mixed":
            continue
        out.append(f"| {r['K']}->{r['N']} | {r['r']} | {r['M']} | {f(r['cuda_mixed'])} | "
                   f"{_mark(r['cuda_mixed'], None if r['cuda'] is None else r['cuda'] * _byte_floor_ratio(r), TARGET_MIXED)} | "
                   f"{f(r.get('triton_mixed'))} | {f(r['peft_loop'])} | {_ratio(r['peft_loop'], r['cuda_mixed'], 1)} |")
    return "\n".join(out)


def run(out_dir: str | os.PathLike | None = None, tests: bool = True, reps: int = 50) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("[cuda] no CUDA GPU visible to torch")
    report = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat()}
    report["build_s"] = build()
    report["tests_rc"] = run_tests() if tests else None
    rows = bench_decode(reps=reps)
    table = format_table(rows)
    header = (f"CUDA extension decode timings, {report['gpu']}, {report['date']}, bf16, torch {torch.__version__}; "
              f"GPU us from CUDA-graph replays with cold L2 (median of {reps}); build {report['build_s']:.0f} s; "
              f"GPU tests exit {report['tests_rc']}")
    report.update(rows=rows, table=f"{header}\n\n{table}\n")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() else "_" for c in report["gpu"]).strip("_")
        path = out / f"cuda_decode_{name}_{report['date']}.md"
        path.write_text(report["table"])
        report["path"] = str(path)
    print("\n" + report["table"], flush=True)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-tests", action="store_true", help="skip the GPU tests")
    ap.add_argument("--reps", type=int, default=50, help="graph replays per timing")
    ap.add_argument("--out", default=None, help="folder to write the table to (e.g. benchmarks/results)")
    args = ap.parse_args(argv)
    report = run(args.out, tests=not args.no_tests, reps=args.reps)
    return 0 if report["tests_rc"] in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
