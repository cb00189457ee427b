"""A quick verdict on one copy of csrc/: ``python -m tests.cuda_emu.check [--sanitize] [CSRC_DIR]``.

``--sanitize`` builds the emulator with ASan + UBSan (run it with ``emulator.sanitizer_env()``).

Builds the emulator from CSRC_DIR (default: the repo's csrc/) and runs a small set of cases that
together reach every code path of lora_linear.cu (tensor-core paths with 16-, 4- and 2-byte loads,
the scalar path, tails in M, N and K,
K splits, ranks over the 64-wide expand chunk, odd ranks whose B rows are not 16-byte aligned,
mixed tasks with -1 rows, the expand-only mode, PDL on an sm_90 and an sm_80 binary, the host's
fused-rows rule) against the
float64 reference with the elementwise tolerance helper. Exit 0: all pass; 1: a case failed (the
first failure is printed). Run in a subprocess by tests/test_cuda_mutants.py, so a mutant that
crashes the process is a caught mutant too, and pytest survives it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from lora_kernels.ops import reference
from lora_kernels.ops.routing import Routing
from tests.cuda_emu import emulator as emu
from tests.utils import assert_close


def cases(lib):
    """(name, thunk) pairs; each thunk raises AssertionError on a wrong result."""
    def single(m, k, n, r, dtype, num_sms=132, binary_version=90, bias=True, x_off=0, w_pad=0, lora_only=None,
               eager=False):
        """x_off / w_pad: x starts x_off elements into its buffer, W's rows are w_pad elements apart
        beyond K (NaN in between). lora_only: run as bindings.cpp decides, and require the base GEMM +
        LoRA-term kernels (True) or the fused kernel (False). eager: cp.async copies land at issue."""
        x, w, b0, a, b = emu.inputs(m, k, n, r, dtype, seed=m + k + n + r)
        b0 = b0 if bias else None
        xp, wp = emu.placed(x, x_off), emu.placed(w, 0, w_pad)
        y, info = emu.run(lib, xp, wp, b0, a, b, scale=0.75, num_sms=num_sms, binary_version=binary_version,
                          accumulate=False if lora_only is None else "auto", cp_async_eager=eager)
        if lora_only is not None:
            assert info % 10 == int(lora_only), f"{m} rows of {dtype}: expected lora_only={lora_only}, harness says {info}"
        d = lambda t: None if t is None else t.double()  # noqa: E731
        assert_close(y, reference.lora_linear(d(x), d(w), d(b0), d(a), d(b), 0.75), dtype, f"single {m}x{k}->{n} r={r}")

    def mixed(m, k, n, r, t, dtype, accumulate=False, x_off=0, num_sms=132):
        x, w, b0, a, b = emu.inputs(m, k, n, r, dtype, t=t, seed=m * t)
        scales = torch.rand(t, generator=torch.Generator().manual_seed(1)) + 0.5
        ids = torch.randint(-1, t, (m,), generator=torch.Generator().manual_seed(m)).long()
        y0 = torch.nn.functional.linear(x, w, b0).clone() if accumulate is True else None
        y, _ = emu.run(lib, emu.placed(x, x_off), w, b0, a, b, scales=scales, routing=Routing(ids, t),
                       accumulate=accumulate, y=y0, num_sms=num_sms)
        ref = reference.lora_linear_mixed(x.double(), w.double(), b0.double(), a.double(), b.double(), scales.double(), ids)
        assert_close(y, ref, dtype, f"mixed {m}x{k}->{n} r={r} T={t}")

    bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    return [
        ("bf16 M=1 tails", lambda: single(1, 264, 40, 5, bf)),
        ("bf16 M=1 pipelined K", lambda: single(1, 4104, 24, 4, bf)),
        ("fp16 M=16 pipelined K", lambda: single(16, 2056, 20, 8, f16)),
        ("bf16 M=13 r=70", lambda: single(13, 520, 33, 70, bf)),
        ("fp16 M=40 K splits", lambda: single(40, 1040, 24, 16, f16, num_sms=8)),
        ("bf16 M=64", lambda: single(64, 256, 17, 3, bf)),
        ("bf16 wide N=4096", lambda: single(8, 64, 4096, 4, bf)),
        ("fp32 scalar path", lambda: single(5, 72, 19, 4, f32, bias=False)),
        ("bf16 K % 8 != 0", lambda: single(3, 37, 18, 2, bf)),
        ("bf16 sm_80 binary", lambda: single(8, 264, 24, 8, bf, binary_version=80)),
        ("bf16 mixed", lambda: mixed(20, 72, 33, 5, 4, bf)),
        ("fp32 mixed", lambda: mixed(9, 40, 17, 3, 3, f32)),
        ("bf16 expand only", lambda: mixed(70, 48, 20, 6, 3, bf, accumulate=True)),
        # The vector path (rows not 16-byte aligned): 4-byte loads with a K % 8 = 2 tail after whole
        # stages, 2-byte loads for odd K, x at a 2-byte offset, W rows an odd number of elements apart.
        ("bf16 vector 4-byte K tail", lambda: single(3, 1026, 24, 4, bf)),
        ("fp16 vector 2-byte odd K", lambda: single(5, 1001, 20, 3, f16)),
        ("bf16 vector x offset", lambda: single(4, 264, 18, 5, bf, x_off=1)),
        ("fp16 vector W odd stride", lambda: single(2, 520, 40, 4, f16, w_pad=1)),
        ("bf16 vector mixed above 8 rows", lambda: mixed(12, 1001, 20, 3, 4, bf, accumulate="auto", x_off=2)),
        # Which kernels run (bindings.cpp's rule): the 8-token paths fused only up to 8 rows.
        ("fp32 9 rows: base + LoRA term", lambda: single(9, 72, 24, 4, f32, lora_only=True)),
        ("bf16 odd K 9 rows: base + LoRA term", lambda: single(9, 37, 24, 4, bf, lora_only=True)),
        ("bf16 aligned 9 rows: fused", lambda: single(9, 64, 24, 4, bf, lora_only=False)),
        # wide_kernel (few SMs, so that its grid needs <= 4 K parts): a whole chunk + a partial one, N past
        # a 64-column block, M past a 32-token tile, K parts whose last chunk is partial, mixed tasks
        # with -1 rows, both cp.async schedules, >= 3 chunks per part (a buffer is refilled) where eager.
        ("bf16 wide tails", lambda: single(40, 200, 70, 5, bf, num_sms=1)),
        ("bf16 wide tails, eager cp.async", lambda: single(40, 392, 70, 5, bf, num_sms=1, eager=True)),
        ("fp16 wide K parts", lambda: single(33, 1000, 70, 4, f16, num_sms=4)),
        ("fp16 wide K parts, eager cp.async", lambda: single(64, 1000, 70, 4, f16, num_sms=2, eager=True)),
        ("bf16 wide mixed", lambda: mixed(20, 264, 72, 5, 4, bf, num_sms=1)),
        ("bf16 wide expand only", lambda: mixed(130, 48, 200, 6, 3, bf, accumulate=True, num_sms=2)),
    ]


def main(argv: list[str]) -> int:
    sanitize = "--sanitize" in argv
    args = [a for a in argv if a != "--sanitize"]
    csrc = Path(args[0]) if args else emu.ROOT / "csrc"
    with tempfile.TemporaryDirectory() as tmp:
        # -O0: the cases take ~1 s, the build ~8 s; the sanitized build keeps -O1 (as it always had).
        lib = emu.build(Path(tmp) / "emu.so", csrc, sanitize=sanitize, opt="-O1" if sanitize else "-O0")
        for name, case in cases(lib):
            try:
                case()
            except AssertionError as e:
                print(f"FAILED {name}: {e}")
                return 1
    print("all cases pass")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
