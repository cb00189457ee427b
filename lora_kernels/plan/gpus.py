"""GPU constants for launch plans (vendor datasheet numbers; SXM parts, dense, no sparsity).

``bw`` is peak HBM bandwidth in bytes/s and ``tc_bf16`` peak dense bf16/fp16 tensor-core FLOP/s.
The ``*_eff`` fractions are the attainable share assumed by the roofline model (labelled
predictions until a GPU run measures them: ``python/gpu_check.py`` reports P and BW in the same run).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    cc: int                 # compute capability, e.g. 90
    sms: int                # streaming multiprocessors
    bw: float               # HBM bytes/s, peak
    tc_bf16: float          # dense bf16 tensor-core FLOP/s, peak
    fp32: float             # plain fp32 FLOP/s, peak (FMA = 2)
    l2_bytes: int
    smem_per_sm: int        # shared memory per SM, bytes
    smem_per_block: int     # largest opt-in shared memory per block, bytes
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    bw_eff: float = 0.90    # attainable fraction of peak bandwidth (streaming reads)
    tc_eff: float = 0.75    # attainable fraction of peak tensor-core rate (large GEMMs)
    launch_s: float = 3e-6  # one kernel launch plus tail, seconds


H100 = GPU("H100-SXM", 90, 132, 3.35e12, 989e12, 67e12, 50 * 2**20, 228 * 1024, 227 * 1024)
H200 = GPU("H200-SXM", 90, 132, 4.8e12, 989e12, 67e12, 50 * 2**20, 228 * 1024, 227 * 1024)
A100 = GPU("A100-SXM-80GB", 80, 108, 2.039e12, 312e12, 19.5e12, 40 * 2**20, 164 * 1024, 163 * 1024)

GPUS = {g.name: g for g in (H100, H200, A100)}
