"""``torch.compile`` of an ``lk.Model``: one task, a weighted mix and a per-sample list give the eager outputs.

All three selections compile with ``fullgraph=True`` (no graph break): the route is built from the
``task=`` argument inside the traced ``forward`` and pushed on a plain list during tracing, so the
task names (and a per-sample list's pattern) are compile-time constants that dynamo guards on. A
new selection recompiles (dynamo's ``recompile_limit``, 8 by default, bounds that: past it,
``fullgraph=True`` raises and the default falls back to eager); mix *weights* become dynamic after
the first change, so varying weights costs one recompile, not one per weight.

Most tests use the ``aot_eager`` backend (dynamo + AOTAutograd: the graph capture and the joint
forward/backward graph are what can go wrong; inductor's codegen is torch's to test); one test runs
inductor end to end. Compile tests are slow on 2 cores: keep them few.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import lora_kernels as lk


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SELECTIONS = {
    "one task": dict(task="a"),
    "weighted mix": dict(task={"a": 1.0, "b": -0.5}),
    "per-sample list": dict(task=["a", None, "b", {"a": 0.5, "b": 1.0}, "a"]),
}


def _model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))
    m = lk.Model(net)
    m.add_task("a", rank=3, init="kaiming_both").add_task("b", rank=2, alpha=4, init="kaiming_both")
    return m


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_fullgraph_forward_and_backward_match_eager(name):
    """fullgraph=True: forward output and every gradient (input, base, both tasks) equal eager's."""
    kw = SELECTIONS[name]
    m = _model()
    x = torch.randn(5, 12)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, fullgraph=True, backend=counter)

    def run(fn):
        m.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = fn(xg, **kw)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), xg.grad, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    y_e, gx_e, g_e = run(m)
    y_c, gx_c, g_c = run(compiled)
    assert counter.frame_count == 1, "one graph, no break"
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-6, atol=1e-6)
    assert len(g_e) == 6 + (6 if name == "one task" else 12)  # base W, b of 3 layers; A, B per used task and layer
    for k in g_e.keys() | g_c.keys():  # a gradient one side leaves None must be zero on the other
        ref = g_e.get(k, torch.zeros_like(g_c.get(k, torch.zeros(0))))
        torch.testing.assert_close(g_c.get(k, torch.zeros_like(ref)), ref, rtol=1e-6, atol=1e-6, msg=k)


def test_switching_selections_recompiles_and_stays_correct():
    """One compiled model serving each selection, mix weights that change, a re-created task, in-place updates."""
    m = _model().eval()
    x = torch.randn(5, 12)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    calls = [dict(), *SELECTIONS.values(), dict(task="b"), dict(task="a"),
             dict(task={"a": 1.0, "b": 0.25}), dict(task={"a": 1.0, "b": 2.0}), dict(task={"a": 1.0, "b": 3.0})]
    with torch.no_grad():
        for kw in calls:
            torch.testing.assert_close(compiled(x, **kw), m(x, **kw), rtol=1e-6, atol=1e-6, msg=str(kw))
        frames = counter.frame_count
        assert frames <= 7, f"{frames} compiles for 6 distinct selections + 1 dynamic-weight recompile"
        # weights become dynamic after the first change: a new weight value does not recompile
        torch.testing.assert_close(compiled(x, task={"a": 1.0, "b": 0.125}), m(x, task={"a": 1.0, "b": 0.125}))
        assert counter.frame_count == frames
        # in-place training of a task's weights is seen by the compiled graph (parameters are graph inputs)
        m.model[0].adapters["a"].lora_B.weight.add_(0.5)
        torch.testing.assert_close(compiled(x, task="a"), m(x, task="a"))
        # removing a task and adding one of the same name with another rank: guards catch it
        m.remove_task("a").add_task("a", rank=5, init="kaiming_both")
        torch.testing.assert_close(compiled(x, task="a"), m(x, task="a"))
        # an unknown task is refused under compile too (it is not silently the base model)
        m.remove_task("b")
        with pytest.raises(Exception, match="unknown task|Observed exception"):
            compiled(x, task="b")


def test_compiled_training_step_matches_eager():
    """Two SGD steps on mixed-task batches through the compiled model end at eager's parameters."""
    results = []
    for use_compile in (False, True):
        torch._dynamo.reset()
        m = _model(seed=1)
        m.requires_grad_(False).requires_grad_(True, task="a").requires_grad_(True, task="b")
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        fn = torch.compile(m, fullgraph=True, backend="aot_eager") if use_compile else m
        g = torch.Generator().manual_seed(3)
        for _ in range(2):
            x, target = torch.randn(5, 12, generator=g), torch.randn(5, 5, generator=g)
            loss = nn.functional.mse_loss(fn(x, task=["a", "b", None, "a", "b"]), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append({k: v.detach().clone() for k, v in m.named_parameters()})
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("LORA_KERNELS_TEST_INDUCTOR")),
                    reason="inductor's C++ codegen takes 30-80 s on a 2-core CPU; set LORA_KERNELS_TEST_INDUCTOR=1 to run it")
def test_inductor_end_to_end():
    """The default backend (inductor) on a per-sample list, forward and backward: eager's numbers."""
    m = _model(seed=2)
    x = torch.randn(5, 12)
    kw = SELECTIONS["per-sample list"]
    compiled = torch.compile(m, fullgraph=True)
    xg = x.clone().requires_grad_()
    y_c = compiled(xg, **kw)
    y_c.sum().backward()
    gx_c = xg.grad
    xg2 = x.clone().requires_grad_()
    y_e = m(xg2, **kw)
    y_e.sum().backward()
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, xg2.grad, rtol=1e-5, atol=1e-5)
