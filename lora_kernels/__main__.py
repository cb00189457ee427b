"""Command line: ``python -m lora_kernels {demo,info,bench,plan}`` (also installed as ``lora-kernels``)."""

from __future__ import annotations

import argparse
import sys


def info() -> int:
    import platform

    import torch

    import lora_kernels as lk

    print(f"lora_kernels {lk.__version__} | torch {torch.__version__} | Python {platform.python_version()} | {platform.machine()}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch"
    print(f"GPU: {gpu}")
    print(f"default backend: {lk.ops.dispatch.current_backend()} (set with lk.set_backend or LORA_KERNELS_BACKEND)")
    for name, status in lk.available_backends().items():
        print(f"  {name:<7} {'yes' if status.available else 'no ':<4} {status.reason}")
    from .ops import cuda

    print(f"CUDA extension: {cuda.build_path()}")
    return 0


def plan_report(gpus: list[str] | None, detail: bool) -> int:
    """Print the launch plans: Triton's, and the CUDA extension's when its plan module exists."""
    import importlib
    import importlib.util

    from .plan.gpus import GPUS

    names = gpus or list(GPUS)
    unknown = [g for g in names if g not in GPUS]
    if unknown:
        print(f"unknown GPU {unknown}; choose from {', '.join(GPUS)}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("triton") is None:
        print("triton plan: the triton package is not installed")
    else:
        from .plan import triton as triton_plan

        print(triton_plan.report(tuple(names), detail))
    if importlib.util.find_spec("lora_kernels.plan.cuda") is not None:
        cuda_plan = importlib.import_module("lora_kernels.plan.cuda")
        for name in names:
            print(f"== cuda extension, {name} (PREDICTED)")
            for row in cuda_plan.plan_rows(GPUS[name]):
                print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train three tasks on a small transformer and serve a mixed-task batch")
    demo.add_argument("--steps", type=int, default=100, help="steps per training phase (default 100)")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="backends available here, and why not the others")
    sub.add_parser("bench", help="the benchmark report (table and plot); see 'lora-kernels bench --help'", add_help=False)
    plan = sub.add_parser("plan", help="predicted launch plan of the GPU kernels per benchmark case (no GPU needed)")
    plan.add_argument("--gpu", action="append", help="H200-SXM, H100-SXM or A100-SXM-80GB (default: all)")
    plan.add_argument("--detail", action="store_true", help="one line per kernel launch")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return 0 if demo_main(steps=args.steps, seed=args.seed)["ok"] else 1
    if args.command == "info":
        return info()
    if args.command == "plan":
        return plan_report(args.gpu, args.detail)
    from .bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
