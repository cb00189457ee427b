"""The Model on the Triton backend (interpreter on CPU): same outputs and gradients as torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_kernels as lk

pytest.importorskip("triton")


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
    model = lk.Model(net).add_task("a", rank=2).add_task("b", rank=4, alpha=2).add_task("c", rank=3)
    for t in model.tasks:
        for p in model.task_parameters(t).values():
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("task", ["a", {"a": 1.0, "b": -0.5}, ["a", None, "b", "c", "a"], ["c", "b", "a", "b", None]])
def test_model_on_triton_matches_torch(task):
    """One task, a mix, and per-sample lists (3 tasks: the kernels' stacked path) — forward and gradients."""
    model = _model()
    x = torch.randn(5, 3, 12)

    def run(backend):
        model.zero_grad()
        with lk.use_backend(backend):
            y = model(x, task=task)
        y.square().sum().backward()
        return y.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    y_t, g_t = run("torch")
    y_k, g_k = run("triton")
    torch.testing.assert_close(y_k, y_t, rtol=1e-4, atol=1e-5)
    assert g_k.keys() == g_t.keys()
    for k in g_t:
        torch.testing.assert_close(g_k[k], g_t[k], rtol=1e-4, atol=1e-4)


def test_mixed_training_steps_equal_per_task_loops():
    """SGD on a mixed batch (Triton kernels) ends where per-task loops (torch) end."""
    mixed, loops = _model(), _model()
    x, target = torch.randn(6, 12), torch.randn(6, 6)
    tasks = ["a", "b", "c", "a", None, "b"]
    opt_m = torch.optim.SGD(mixed.parameters(), lr=0.1)
    opt_l = torch.optim.SGD(loops.parameters(), lr=0.1)
    for _ in range(3):
        opt_m.zero_grad()
        with lk.use_backend("triton"):
            (mixed(x, task=tasks) - target).square().sum().backward()
        opt_m.step()
        opt_l.zero_grad()
        for t in set(tasks):
            rows = [i for i, s in enumerate(tasks) if s == t]
            (loops(x[rows], task=t) - target[rows]).square().sum().backward()
        opt_l.step()
    for (k, p), q in zip(mixed.named_parameters(), loops.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=k)


def test_inference_reads_the_adapter_pool_without_copies(monkeypatch):
    """Steady-state mixed inference hands the kernel the layer's pool itself (the tasks' live
    storage): nothing is copied per forward, and an in-place write is seen by the next call."""
    torch.manual_seed(0)
    model = lk.Model(nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))).eval()
    for t in "abc":
        model.add_task(t, rank=3, init="kaiming_both")
    x = torch.randn(5, 12)
    tasks = ["a", "b", "c", None, "a"]
    layer = model.layers["0"]
    seen = []
    real = lk.ops.lora_linear_mixed

    def spy(x, w, bias, a, b, *args, **kwargs):
        seen.append((a, b))
        return real(x, w, bias, a, b, *args, **kwargs)

    monkeypatch.setattr(lk.ops, "lora_linear_mixed", spy)
    with torch.no_grad(), lk.use_backend("triton"):
        y1 = model(x, task=tasks)
        model(x, task=tasks)
        model.task_parameters("b")["0.lora_B.weight"].mul_(2)
        y2 = model(x, task=tasks)
    assert seen and all(a is layer.pool_of("a").a for a, _ in seen[::2])  # layer "0": the pool, not a copy
    assert torch.equal(y2[0], y1[0]) and not torch.allclose(y2[1], y1[1])
