"""Serving many adapters: a request stream over N adapters (zipf(1.1) popularity), each request a
batch of sequences with one adapter per sequence, on a small Llama-style model (``LlamaConfig``
built here, random weights, no downloads).

Peers: ``lk.AdapterPool`` with 8, 32 and 128 resident slots (adapters read from ``save_task`` files
on demand), ``lk.Model`` with every adapter resident, PEFT with every adapter loaded
(``adapter_names=[...]``), and a per-adapter loop (PEFT ``set_adapter`` + one call per distinct
adapter of the batch). Reported: tokens/s and p50/p99 latency per request, the pool's hit rate.

    pytest benchmarks/bench_adapter_pool.py --benchmark-disable      # smoke (tiny sizes, checks outputs)
    python benchmarks/bench_adapter_pool.py --out benchmarks/results/adapter_pool_cpu   # table + plot

Every peer's first request is checked against the all-resident model (bit-identical for the pool
when the batch fits in the slots, float32 tolerance when it was split, PEFT within tolerance).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest
import torch

import lora_kernels as lk

pytest.importorskip("transformers")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK, ALPHA = 8, 16.0


@dataclass
class Setup:
    adapters: int = 1000
    batch: int = 32
    seq: int = 32
    hidden: int = 256
    layers: int = 2
    vocab: int = 1000
    rank: int = RANK
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


TINY = Setup(adapters=24, batch=8, seq=8, hidden=32, layers=1, vocab=64)


def base_model(st: Setup):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=st.vocab, hidden_size=st.hidden, intermediate_size=2 * st.hidden, num_hidden_layers=st.layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    return LlamaModel(cfg).to(st.device, st.dtype).eval().requires_grad_(False)


def write_adapters(st: Setup, folder: str) -> dict[str, str]:
    """``st.adapters`` task files (``save_task`` format) with random weights on the attention projections."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = lk.Model(base_model(st))
    modules = [p for p in model.layers if p.rsplit(".", 1)[-1] in TARGETS]
    model.add_task("t", rank=st.rank, alpha=ALPHA, modules=modules)
    template = os.path.join(folder, "template.safetensors")
    model.save_task(template, "t")  # the library writes the metadata once; the files below reuse it
    with safe_open(template, framework="pt") as f:
        metadata = dict(f.metadata())
    os.unlink(template)
    g = torch.Generator().manual_seed(1)
    paths = {}
    for i in range(st.adapters):
        weights = {}
        for p in modules:
            n_in, n_out = model.layers[p].dims()
            weights[f"{p}.lora_A.weight"] = torch.randn(st.rank, n_in, generator=g) / n_in ** 0.5
            weights[f"{p}.lora_B.weight"] = torch.randn(n_out, st.rank, generator=g) * 0.05
        paths[f"u{i}"] = os.path.join(folder, f"u{i}.safetensors")
        save_file(weights, paths[f"u{i}"], metadata=metadata)
    return paths


def requests(st: Setup, n: int, seed: int = 0) -> list[tuple[torch.Tensor, list[str]]]:
    """``n`` requests: token ids ``[batch, seq]`` and one adapter per sequence, zipf(1.1) over the adapters."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, st.adapters + 1, dtype=torch.float64) ** -1.1
    out = []
    for _ in range(n):
        picks = torch.multinomial(weights, st.batch, replacement=True, generator=g).tolist()
        ids = torch.randint(0, st.vocab, (st.batch, st.seq), generator=g)
        out.append((ids.to(st.device), [f"u{p}" for p in picks]))
    return out


def all_resident(st: Setup, paths: dict[str, str]) -> lk.Model:
    model = lk.Model(base_model(st))
    for name, path in paths.items():
        model.load_task(path, name)
    return model


def peft_all(st: Setup, resident: lk.Model):
    """PEFT with every adapter loaded (weights copied from the all-resident model's tasks)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(r=st.rank, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0)
    model = None
    for name in resident.tasks:
        if model is None:
            model = get_peft_model(base_model(st), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        sd = {f"base_model.model.{k}": v for k, v in resident.state_dict(task=name).items()}
        set_peft_model_state_dict(model, sd, adapter_name=name)
    return model.eval()


def peers(st: Setup, paths: dict[str, str], slots=(8, 32, 128), with_peft: bool = True) -> dict:
    """name -> (run(ids, task_list) -> last hidden state, pool or None)."""
    resident = all_resident(st, paths)
    out = {}
    for n in slots:
        pool = lk.AdapterPool(lk.Model(base_model(st)), slots=n, host_slots=max(256, n)).add_many(paths)
        out[f"pool {n} slots"] = ((lambda p: lambda x, t: p(x, task=t, use_cache=False).last_hidden_state)(pool), pool)
    out["lk all resident"] = (lambda x, t: resident(x, task=t, use_cache=False).last_hidden_state, None)
    if with_peft:
        try:
            peft_model = peft_all(st, resident)
        except ImportError:
            peft_model = None
        if peft_model is not None:
            out["PEFT all loaded (adapter_names)"] = (lambda x, t: peft_model(input_ids=x, adapter_names=t, use_cache=False).last_hidden_state, None)

            def loop(x, t):
                y = None
                for name in dict.fromkeys(t):
                    rows = torch.tensor([i for i, n in enumerate(t) if n == name], device=x.device)
                    peft_model.set_adapter(name)
                    part = peft_model(input_ids=x[rows], use_cache=False).last_hidden_state
                    y = part.new_empty((x.shape[0], *part.shape[1:])) if y is None else y
                    y[rows] = part
                return y

            out["PEFT per-adapter loop"] = (loop, None)
    return out, resident


def measure(run, reqs, warmup: int) -> dict:
    """Latency of each request after ``warmup`` ones: tokens/s (median) and p50/p99."""
    return measure_all({"run": (run, None)}, reqs, warmup)["run"]


def measure_all(runs: dict, reqs, warmup: int) -> dict:
    """Every peer on every request, peers interleaved request by request (a shared, noisy machine
    then slows them alike); each pool sees the same request sequence. Stats counted after warm-up."""
    sync = torch.cuda.synchronize if reqs[0][0].is_cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for i, (x, t) in enumerate(reqs):
            if i == warmup:
                for _, pool in runs.values():
                    if pool is not None:
                        pool.reset_stats()
            for name, (run, _) in runs.items():
                sync()
                start = time.perf_counter()
                run(x, t)
                sync()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    tokens = reqs[0][0].numel()
    out = {}
    for name, ts in times.items():
        ts.sort()
        p = lambda q: ts[min(len(ts) - 1, int(q * len(ts)))]
        out[name] = {"tokens_s": tokens / statistics.median(ts), "p50_ms": 1e3 * p(0.5), "p99_ms": 1e3 * p(0.99), "n": len(ts)}
    return out


# --- pytest-benchmark: smoke in CI (tiny sizes), timings with --bench-size quick ----------------------
PEERS = ("pool 8 slots", "pool 32 slots", "pool 128 slots", "lk all resident", "PEFT all loaded (adapter_names)",
         "PEFT per-adapter loop")


@pytest.fixture(scope="module")
def stream(tmp_path_factory, request):
    size = request.config.getoption("bench_size", default=None) or "tiny"
    st = TINY if size == "tiny" else Setup(adapters=200, batch=32, seq=16, hidden=128)
    threads = torch.get_num_threads()
    if st is TINY:  # tiny ops: OpenMP threads only spin on a loaded machine
        torch.set_num_threads(1)
    paths = write_adapters(st, str(tmp_path_factory.mktemp("pool_adapters")))
    runs, resident = peers(st, paths, slots=(2, 8, 32) if st is TINY else (8, 32, 128))
    yield st, runs, resident
    torch.set_num_threads(threads)


@pytest.mark.bench
@pytest.mark.parametrize("peer", range(len(PEERS)), ids=[p.split(" (")[0].replace(" ", "_") for p in PEERS])
def test_adapter_pool(benchmark, stream, peer):
    st, runs, resident = stream
    name = list(runs)[peer] if peer < len(runs) else None
    if name is None:
        pytest.skip("peft is not installed")
    run, pool = runs[name]
    reqs = requests(st, 4)
    x, t = reqs[0]
    with torch.no_grad():
        got, ref = run(x, t), resident(x, task=t, use_cache=False).last_hidden_state
    if pool is not None and pool._fits(sorted(set(t))):
        assert torch.equal(got, ref), name
    else:
        import benchlib

        benchlib.check(name, {"out": got}, {"out": ref.double()}, torch.float32)
    it = iter(reqs * 100)

    def step():
        x, t = next(it)
        with torch.no_grad():
            run(x, t)

    benchmark(step)
    if pool is not None:
        benchmark.extra_info["hit_rate"] = pool.stats.hit_rate


# --- script mode: the README's table and the plot ----------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/adapter_pool_cpu", help="output path prefix (.md and .png)")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--requests", type=int, default=40, help="measured requests per peer (after --warmup)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--slots", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    st = Setup(adapters=args.adapters, batch=args.batch, seq=args.seq)
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        paths = write_adapters(st, folder)
        print(f"wrote {len(paths)} adapters in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        runs, resident = peers(st, paths, slots=tuple(args.slots), with_peft=not args.no_peft)
        print(f"peers ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        reqs = requests(st, args.warmup + args.requests, seed=1)
        rows = []
        measured = measure_all(runs, reqs, args.warmup)
        for name, (run, pool) in runs.items():
            res = measured[name]
            if pool is not None:
                s = pool.stats
                res.update(hit_rate=s.hit_rate, slots=int(name.split()[1]), evictions=s.evictions,
                           device_mb=pool.device_bytes() / 2**20)
            rows.append((name, res))
            print(f"{name}: {res}", file=sys.stderr)
        dev_all = sum(p.nbytes for n in resident.tasks for p in resident.task_parameters(n).values()) / 2**20
    base = next(r for n, r in rows if n == "lk all resident")["tokens_s"]
    lines = [f"{st.adapters} adapters (rank {st.rank}, {', '.join(TARGETS)}), zipf(1.1) requests of {st.batch} sequences x "
             f"{st.seq} tokens, Llama-style {st.layers} layers x {st.hidden} hidden; {args.requests} timed requests after "
             f"{args.warmup} warm-up, peers interleaved request by request; torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}.", "",
             "| peer | tokens/s (median) | × all resident | p50 ms | p99 ms | hit rate | evictions | adapter memory MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        mem = f"{r['device_mb']:.1f}" if "device_mb" in r else (f"{dev_all:.1f}" if name == "lk all resident" else "")
        hit = f"{100 * r['hit_rate']:.0f}%" if "hit_rate" in r else ""
        lines.append(f"| {name} | {r['tokens_s']:,.0f} | {r['tokens_s'] / base:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{hit} | {r.get('evictions', '')} | {mem} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    pools = [(r["slots"], r) for n, r in rows if "slots" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot([s for s, _ in pools], [r["tokens_s"] for _, r in pools], "o-", label="lk.AdapterPool")
    for name, r in rows:
        if "slots" not in r:
            ax.axhline(r["tokens_s"], linestyle="--", linewidth=1, label=name, color=None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("resident slots")
    ax.set_ylabel("tokens/s (median)")
    ax2 = ax.twinx()
    ax2.plot([s for s, _ in pools], [100 * r["hit_rate"] for _, r in pools], "s:", color="gray", label="hit rate")
    ax2.set_ylabel("hit rate %")
    ax2.set_ylim(0, 100)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    ax.set_title(f"{st.adapters} adapters, zipf(1.1), batches of {st.batch}")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(f"wrote {args.out}.md and {args.out}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
