"""Training an ``lk.Model`` with torch's own distributed engines, over 2 real processes (gloo, CPU).

- DDP: 2 ranks, each on half of every mixed-task global batch, end with exactly (float64: up to
  rounding of the gradient all-reduce) the parameters of one process trained on the whole batch.
- FSDP2 (``torch.distributed.fsdp.fully_shard``): 2 ranks shard the base model and the tasks, train on
  mixed-task batches, and the gathered task state dict saves and loads into a fresh model.

Each test spawns its processes with ``torch.multiprocessing`` on a free port of 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lora_kernels as lk

WORLD = 2
STEPS = 3
BATCH = 8  # global batch; each rank gets BATCH / WORLD rows
TASK_LISTS = [["a", "b", None, "a", "b", "b", None, "a"],
              ["b", "b", "a", None, "a", {"a": 0.5, "b": 0.5}, "a", None],
              [None, "a", "a", "b", "b", "a", "b", None]]

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="torch.distributed with gloo needed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    m = lk.Model(net)
    m.add_task("a", rank=2, init="kaiming_both").add_task("b", rank=3, alpha=6, init="kaiming_both")
    m.requires_grad_(False).requires_grad_(True, task="a").requires_grad_(True, task="b")
    return m


def _batches(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 10, generator=g, dtype=dtype), torch.randn(BATCH, 3, generator=g, dtype=dtype), tl)
            for tl in TASK_LISTS[:STEPS]]


def _train(model, batches, rows=slice(None), loss_scale=1.0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    for x, target, tasks in batches:
        y = model(x[rows], task=tasks[rows])
        # mean over the *global* batch: each rank's share of the sum, DDP averages over ranks
        loss = nn.functional.mse_loss(y, target[rows], reduction="sum") / (BATCH * 3) * loss_scale
        opt.zero_grad()
        loss.backward()
        opt.step()


def _single_process_result() -> dict[str, torch.Tensor]:
    m = _build()
    _train(m, _batches())
    return {**{f"base.{k}": v for k, v in m.state_dict().items()}, **{f"a.{k}": v for k, v in m.state_dict(task="a").items()},
            **{f"b.{k}": v for k, v in m.state_dict(task="b").items()}}


def _init(rank, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _ddp_worker(rank, port, out_dir):
    _init(rank, port)
    try:
        m = _build()
        ddp = nn.parallel.DistributedDataParallel(m)
        per = BATCH // WORLD
        rows = slice(rank * per, (rank + 1) * per)
        # DDP averages gradients over ranks: scale each rank's share of the global mean by WORLD
        _train(ddp, _batches(), rows=rows, loss_scale=WORLD)
        if rank == 0:
            state = {**{f"base.{k}": v for k, v in m.state_dict().items()}, **{f"a.{k}": v for k, v in m.state_dict(task="a").items()},
                     **{f"b.{k}": v for k, v in m.state_dict(task="b").items()}}
            torch.save(state, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_single_process():
    expected = _single_process_result()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(_free_port(), d), nprocs=WORLD, join=True)
        got = torch.load(os.path.join(d, "ddp.pt"))
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        # float64 and 2 ranks: the only difference is the rounding of (g0 + g1) / 2 against the single sum
        torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-13, msg=k)
    base0 = _build().state_dict()
    assert all(torch.equal(got[f"base.{k}"], v) for k, v in base0.items()), "frozen base parameters moved"
    a0 = _build().state_dict(task="a")
    assert any(not torch.equal(got[f"a.{k}"], v) for k, v in a0.items()), "task a did not train"


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------


def _fsdp_worker(rank, port, out_dir):
    from torch.distributed.fsdp import fully_shard

    _init(rank, port)
    try:
        m = _build()
        for layer in m.model:  # shard each wrapped layer (base + its tasks), then the root
            if isinstance(layer, lk.layers.LoRALayer):
                fully_shard(layer)
        fully_shard(m)
        per = BATCH // WORLD
        rows = slice(rank * per, (rank + 1) * per)
        _train(m, _batches(), rows=rows, loss_scale=WORLD)  # FSDP averages gradients like DDP
        # gather the full task state (DTensor -> full tensor) and save it from rank 0
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in m.state_dict(task="a").items()}
        full_b = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                  for k, v in m.state_dict(task="b").items()}
        if rank == 0:
            torch.save({"a": full, "b": full_b}, os.path.join(out_dir, "fsdp.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_processes_train_save_load():
    expected = _single_process_result()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_fsdp_worker, args=(_free_port(), d), nprocs=WORLD, join=True)
        got = torch.load(os.path.join(d, "fsdp.pt"))
    for task in ("a", "b"):
        for k, v in got[task].items():
            torch.testing.assert_close(v, expected[f"{task}.{k}"], rtol=1e-12, atol=1e-13, msg=f"{task}.{k}")
    # the gathered task state loads into a fresh single-process model and reproduces its outputs
    fresh = _build()
    fresh.load_state_dict(got["a"], task="a")
    fresh.load_state_dict(got["b"], task="b")
    ref = _build()
    _train(ref, _batches())
    x = torch.randn(4, 10, dtype=torch.float64)
    sel = ["a", "b", None, {"a": 1.0, "b": 1.0}]
    torch.testing.assert_close(fresh(x, task=sel), ref(x, task=sel), rtol=1e-12, atol=1e-12)
