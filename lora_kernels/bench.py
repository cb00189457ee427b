"""``python -m lora_kernels bench``: run the benchmark suite (or read its JSON) and report.

    python -m lora_kernels bench --quick                 # CPU subset (< 3 min), table + plot
    python -m lora_kernels bench --size gpu              # the GPU subset (python/gpu_check.py runs it)
    python -m lora_kernels bench --json run.json         # report an existing pytest-benchmark JSON

The table gives per case and implementation the median time, the ratio to the base (no LoRA),
the speedup of our fastest backend over each peer, and on a GPU the fraction of the physical floor
``max(F/P, bytes/BW)`` reached, with P (dense matmul FLOP/s) and BW (copy bandwidth) measured in the
same run. Then the targets (issue 6 / DESIGN.md §7), met or missed and by how much. The PNG plot
shows the overhead over the base against the tokens, one line per implementation.

The suite lives in the source tree (``benchmarks/``); pytest-benchmark, matplotlib and tqdm are
imported only here, on use, never at package import.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"

# Columns in this order; anything else after them.
PEER_ORDER = ("base", "merged", "unfused", "compile", "loralib", "peft", "loop", "seed")


# --------------------------------------------------------------------------------------------------
# Device peaks (P, BW), measured in the same run as the benchmarks
# --------------------------------------------------------------------------------------------------
def measure_peaks(device: str = "cuda", dtype=None, reps: int = 10) -> dict[str, float]:
    """Best-of-``reps`` dense matmul FLOP/s (8192³ in ``dtype``) and device-memory copy bandwidth."""
    import torch

    dtype = dtype or torch.bfloat16

    def best(fn) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return min(times)

    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    p = 2.0 * n**3 / best(lambda: torch.matmul(a, b, out=c))
    del a, b, c
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bw = 2.0 * src.numel() / best(lambda: dst.copy_(src))
    return {"peak_flops": p, "peak_bw": bw, "peak_dtype": str(dtype).replace("torch.", "")}


# --------------------------------------------------------------------------------------------------
# Running the suite
# --------------------------------------------------------------------------------------------------
class _Progress:
    """pytest plugin: a tqdm bar over the collected benchmarks; failures are kept for the report."""

    def __init__(self) -> None:
        self.bar = None
        self.failures: list[str] = []

    def pytest_collection_finish(self, session) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=len(session.items), desc="benchmarks", unit="case", file=sys.stderr, dynamic_ncols=True)

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.failures.append(f"{report.nodeid}: {str(report.longrepr).strip().splitlines()[-1] if report.longrepr else ''}")
        if self.bar is not None and (report.when == "call" or (report.when == "setup" and not report.passed)):
            self.bar.update(1)
            self.bar.set_postfix_str(report.nodeid.split("[", 1)[-1].rstrip("]")[:48], refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_suite(json_path: Path, size: str, extra: Iterable[str] = (), quiet: bool = True) -> tuple[int, list[str]]:
    """Run ``benchmarks/`` with pytest-benchmark into ``json_path``; (pytest exit code, failures)."""
    if not BENCH_DIR.is_dir():
        raise SystemExit(f"the benchmark suite is not here ({BENCH_DIR}): run from a source checkout, or pass --json")
    import pytest

    args = [str(BENCH_DIR), f"--bench-size={size}", f"--benchmark-json={json_path}", "--benchmark-quiet",
            "-p", "no:cacheprovider", "-q", "-rN", *extra]
    progress = _Progress()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
            code = pytest.main(args, plugins=[progress])
    finally:
        progress.close()
    if code not in (0, 5) and quiet:
        sys.stderr.write(out.getvalue()[-6000:])
    return int(code), progress.failures


# --------------------------------------------------------------------------------------------------
# Reading and summarising
# --------------------------------------------------------------------------------------------------
def load(json_path: str | os.PathLike) -> tuple[list[dict], dict]:
    """Records (one per benchmark: its extra_info plus ``median``) and the machine info."""
    with open(json_path) as f:
        data = json.load(f)
    records = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        if "suite" not in info or not b.get("stats"):
            continue
        info["median"] = info.get("median_device_s") or b["stats"]["median"]
        info["wall_median"] = b["stats"]["median"]
        info["rounds"] = b["stats"].get("rounds")
        records.append(info)
    machine = data.get("machine_info", {})
    machine["datetime"] = data.get("datetime")
    return records, machine


def _case_key(r: dict) -> tuple:
    if r["suite"] == "model":
        return (r["suite"], r["mode"], r["model"], r["dist"], r["s"])
    return (r["suite"], r["mode"], r["k"], r["n"], r["r"], r["dist"], r["m"])


def _case_label(key: tuple, recs: list[dict]) -> str:
    r = recs[0]
    if r["suite"] == "model":
        return f"{r['model']} B{r['batch']}×S{r['s']} r{r['r']} {r['dist']}" + (f" T{r['tasks']}" if r["dist"] != "single" else "")
    label = f"{r['k']}→{r['n']} r{r['r']} M{r['m']}"
    return label + (f" {r['dist']} T{r['tasks']}" if r["suite"] == "lora_linear_mixed" else "")


def _peer_sort(p: str) -> tuple:
    if p.startswith("lk["):
        return (0, p)
    return (1, PEER_ORDER.index(p) if p in PEER_ORDER else 99, p)


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def _cases(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        cases[_case_key(r)][r["peer"]] = r
    return cases


def best_ours(peers: dict[str, dict]) -> tuple[str, dict] | None:
    ours = [(p, r) for p, r in peers.items() if p.startswith("lk[")]
    return min(ours, key=lambda pr: pr[1]["median"]) if ours else None


def floor_time(r: dict, machine: dict) -> float | None:
    lk = machine.get("lora_kernels", {})
    p, bw = lk.get("peak_flops"), lk.get("peak_bw")
    if not p or not bw or r.get("device") != "cuda":
        return None
    f, b = (r["base_flops"], r["base_bytes"]) if r["peer"] == "base" else (r["flops"], r["bytes"])
    return max(f / p, b / bw)


SUITE_TITLES = {"lora_linear": "Single-task LoRA linear", "lora_linear_mixed": "Mixed-task LoRA linear (a task per row)",
                "model": "Llama-style model, all 7 projections adapted"}


def tables(records: list[dict], machine: dict) -> str:
    """Markdown: per suite and mode, rows = cases, a column per implementation."""
    cases = _cases(records)
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for key in cases:
        groups[(key[0], key[1])].append(key)
    has_floor = any(floor_time(r, machine) for r in records)
    out = []
    for suite in ("lora_linear", "lora_linear_mixed", "model"):
        for mode in ("fwd", "fwdbwd"):
            keys = groups.get((suite, mode))
            if not keys:
                continue
            peers = sorted({p for k in keys for p in cases[k]}, key=_peer_sort)
            out.append(f"\n### {SUITE_TITLES[suite]} — {'forward' if mode == 'fwd' else 'forward + backward'}\n")
            out.append("Cell: median time (× base). Last columns: our fastest backend's speedup over each peer"
                       + (", and its fraction of the floor max(F/P, bytes/BW)." if has_floor else "."))
            others = [p for p in peers if not p.startswith("lk[") and p != "base"]
            head = ["case", *peers, *[f"ours vs {p}" for p in others]] + (["floor %"] if has_floor else [])
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            for key in sorted(keys, key=lambda k: tuple(str(x).zfill(8) if isinstance(x, int) else str(x) for x in k)):
                row = cases[key]
                base = row.get("base")
                cells = [_case_label(key, list(row.values()))]
                for p in peers:
                    r = row.get(p)
                    if r is None:
                        cells.append("—")
                    elif base and p != "base":
                        cells.append(f"{fmt_time(r['median'])} ({r['median'] / base['median']:.2f}×)")
                    else:
                        cells.append(fmt_time(r["median"]))
                ours = best_ours(row)
                for p in others:
                    r = row.get(p)
                    cells.append(f"{r['median'] / ours[1]['median']:.2f}×" if (r and ours) else "—")
                if has_floor:
                    ft = floor_time(ours[1], machine) if ours else None
                    cells.append(f"{100 * ft / ours[1]['median']:.0f}%" if ft else "—")
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _verdict(value: float, bound: float, better: str) -> str:
    """'met' or 'missed by N%' for ``value`` against ``bound`` (better='low' or 'high')."""
    ok = value <= bound if better == "low" else value >= bound
    if ok:
        return "met"
    miss = (value / bound - 1) if better == "low" else (bound / value - 1)
    return f"MISSED by {100 * miss:.0f}%"


def targets(records: list[dict]) -> list[dict]:
    """The issue-6 CPU targets and the DESIGN.md §7 GPU targets, evaluated on what was measured."""
    cases = _cases(records)
    rows: list[dict] = []

    def add(target, case, value, bound, better, what):
        rows.append(dict(target=target, case=case, value=value, bound=bound, verdict=_verdict(value, bound, better), what=what))

    for key, peers in cases.items():
        suite, mode = key[0], key[1]
        ours = best_ours(peers)
        if ours is None:
            continue
        o = ours[1]
        base, label = peers.get("base"), _case_label(key, list(peers.values()))
        dev = o.get("device")
        if suite == "model" and dev == "cpu":
            if o["dist"] == "single" and "peft" in peers:
                add("CPU: one task no slower than PEFT", f"{label} {mode}", o["median"] / peers["peft"]["median"], 1.0, "low",
                    f"{ours[0]} ÷ peft time")
            if o["dist"] != "single" and "peft" in peers and base:
                ov_o, ov_p = o["median"] - base["median"], peers["peft"]["median"] - base["median"]
                if ov_p > 0:
                    add("CPU: mixed overhead ≤ ½ PEFT's", f"{label} {mode}", ov_o / ov_p, 0.5, "low",
                        f"({ours[0]} − base) ÷ (peft − base)")
        if suite == "lora_linear" and dev == "cpu" and (o["k"], o["n"]) == (4096, 4096) and o["m"] <= 64 and "seed" in peers:
            add("CPU: ≥ 2× the seed at ≤ 64 tokens", f"{label} {mode}", peers["seed"]["median"] / o["median"], 2.0, "high",
                f"seed ÷ {ours[0]} time")
        if dev != "cuda":
            continue
        if suite == "lora_linear" and mode == "fwd" and base:
            add("GPU: fused fwd ≤ 1.05× base", label, o["median"] / base["median"], 1.05, "low", f"{ours[0]} ÷ base")
        if suite == "lora_linear" and mode == "fwdbwd" and "unfused" in peers:
            add("GPU: fwd+bwd ≥ 1.4× unfused", label, peers["unfused"]["median"] / o["median"], 1.4, "high", f"unfused ÷ {ours[0]}")
        if suite == "lora_linear_mixed" and mode == "fwd" and o["dist"] == "distinct" and o["m"] == 64:
            single = cases.get(("lora_linear", "fwd", o["k"], o["n"], o["r"], "single", o["m"]))
            so = best_ours(single) if single else None
            if so:
                add("GPU: mixed 64 distinct ≤ 1.5× single fused", label, o["median"] / so[1]["median"], 1.5, "low", "mixed ÷ single")
            if "peft" in peers:
                add("GPU: mixed 64 distinct ≥ 10× PEFT", label, peers["peft"]["median"] / o["median"], 10.0, "high", f"peft ÷ {ours[0]}")
        if suite in ("lora_linear_mixed", "model") and mode == "fwdbwd" and o.get("tasks_present", o.get("tasks")) == 8 and "loop" in peers:
            add("GPU: mixed training step (8 tasks) ≥ 5× per-task loop", label, peers["loop"]["median"] / o["median"], 5.0, "high",
                f"loop ÷ {ours[0]}")
    return rows


def targets_table(rows: list[dict]) -> str:
    if not rows:
        return "\n(no target applies to the cases measured in this run)"
    out = ["\n### Targets\n", "| target | case | measured | bound | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['target']} | {r['case']} | {r['value']:.2f} ({r['what']}) | {r['bound']:g} | {r['verdict']} |")
    return "\n".join(out)


def header(machine: dict, command: str) -> str:
    lk = machine.get("lora_kernels", {})
    dev = lk.get("gpu") or f"CPU: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}"
    lines = [f"- hardware: {dev}" + (f", {os.cpu_count()} logical cores visible" if lk.get("device") == "cpu" else ""),
             f"- date: {machine.get('datetime', '?')}; size: {lk.get('size', '?')}; dtype: {lk.get('dtype', '?')}; "
             f"our backends: {', '.join(lk.get('backends', [])) or '?'}",
             f"- python {machine.get('python_version', '?')}; command: `{command}`"]
    if lk.get("peak_flops"):
        lines.append(f"- measured in this run: P = {lk['peak_flops'] / 1e12:.0f} TFLOP/s ({lk.get('peak_dtype')} 8192³ matmul), "
                     f"BW = {lk['peak_bw'] / 1e9:.0f} GB/s (1 GiB copy)")
    lines.append("- times are medians; on CUDA from CUDA events around each call with L2 flushed before it; on CPU wall clock")
    return "\n".join(lines)


def report(records: list[dict], machine: dict, command: str = "python -m lora_kernels bench") -> str:
    from importlib import import_module

    try:
        peer_doc = import_module("benchlib").PEER_DOC
    except ImportError:
        peer_doc = {}
    peers = sorted({r["peer"] for r in records}, key=_peer_sort)
    legend = "\n".join(f"- `{p}`: {peer_doc.get(p, 'lora_kernels, backend ' + p[3:-1] if p.startswith('lk[') else '')}" for p in peers)
    return "\n".join([header(machine, command), "\nImplementations:\n", legend, tables(records, machine), targets_table(targets(records))])


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------
def plot(records: list[dict], path: str | os.PathLike, title: str = "") -> Path | None:
    """PNG: overhead over the base (%) against tokens, a line per implementation, one panel per
    (suite, mode, distribution) for the first shape/rank of each. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    panels: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    first_shape: dict[tuple, tuple] = {}
    cases = _cases(records)
    for key, peers in cases.items():
        base = peers.get("base")
        if not base:
            continue
        r0 = base
        shape = (r0.get("model"),) if r0["suite"] == "model" else (r0["k"], r0["n"], r0["r"])
        pk = (r0["suite"], r0["mode"], r0["dist"])
        if first_shape.setdefault(pk, shape) != shape:
            continue
        for p, r in peers.items():
            if p != "base":
                panels[pk][p].append((r["m"], 100 * (r["median"] / base["median"] - 1)))
    if not panels:
        return None
    keys = sorted(panels, key=lambda k: (["lora_linear", "lora_linear_mixed", "model"].index(k[0]), k[1], k[2]))
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, pk in zip(axes.flat, keys):
        shape = first_shape[pk]
        for p in sorted(panels[pk], key=_peer_sort):
            pts = sorted(panels[pk][p])
            xs, ys = [x for x, _ in pts], [y for _, y in pts]
            ax.plot(xs, ys, marker="o", linewidth=2.2 if p.startswith("lk[") else 1.2, label=p)
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=10)
        what = shape[0] if pk[0] == "model" else f"{shape[0]}→{shape[1]} r{shape[2]}"
        ax.set_title(f"{pk[0]} {pk[1]} {pk[2]}\n{what}", fontsize=9)
        ax.set_xlabel("tokens (rows)")
        ax.set_ylabel("overhead over base, %")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def default_name(machine: dict) -> str:
    lk = machine.get("lora_kernels", {})
    name = lk.get("gpu") or "cpu"
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in name.replace("NVIDIA ", "")).strip("-").lower()
    return f"{name}-{_dt.date.today().isoformat()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lora-kernels bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="report this pytest-benchmark JSON instead of running the suite")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--size", choices=("tiny", "quick", "gpu", "full"), default=None,
                      help="matrix size (default: gpu on CUDA, quick on CPU)")
    size.add_argument("--quick", dest="size", action="store_const", const="quick")
    size.add_argument("--full", dest="size", action="store_const", const="full")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression to select benchmarks")
    ap.add_argument("--out", default=None, help="directory for the markdown report and plot (default benchmarks/results)")
    ap.add_argument("--name", default=None, help="file stem of the outputs (default <gpu-or-cpu>-<date>)")
    ap.add_argument("--no-save", action="store_true", help="print only; write no markdown/plot")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, space separated")
    ap.add_argument("--verbose", action="store_true", help="show pytest's output")
    args = ap.parse_args(argv)

    command = "python -m lora_kernels bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        json_path = Path(args.json)
        code, failures = 0, []
    else:
        import torch

        size_name = args.size or ("gpu" if torch.cuda.is_available() else "quick")
        out_dir = Path(args.out) if args.out else BENCH_DIR / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / f".last-{size_name}.json"
        extra = args.pytest_args.split() + (["-k", args.keyword] if args.keyword else [])
        code, failures = run_suite(json_path, size_name, extra, quiet=not args.verbose)
        if not json_path.exists():
            print(f"the benchmark run produced no results (pytest exit code {code})", file=sys.stderr)
            return 1
    records, machine = load(json_path)
    if not records:
        print(f"no lora_kernels benchmark results in {json_path}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(BENCH_DIR))
    text = report(records, machine, command)
    if failures:
        text += "\n\n### Failures\n\n" + "\n".join(f"- {f}" for f in failures)
    print(text)
    if not args.no_save:
        out_dir = Path(args.out) if args.out else BENCH_DIR / "results"
        stem = args.name or default_name(machine)
        png = plot(records, out_dir / f"{stem}.png", title=stem)
        md = out_dir / f"{stem}.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        body = f"# lora_kernels benchmarks: {stem}\n\n{text}\n"
        if png:
            body += f"\n![overhead over the base vs tokens]({png.name})\n"
        md.write_text(body)
        print(f"\nwrote {md}" + (f" and {png}" if png else ""))
    return 0 if code in (0, 5) and not failures else 1
