"""The Model/task API on the reference path: the seed's flow, DESIGN.md §3 semantics, errors."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.layers import LoRAConv, LoRAEmbedding, LoRALinear


def snapshot(model: lk.Model) -> dict:
    """Everything a failed call must leave unchanged: tasks, configs, every tensor and flag."""
    return {
        "tasks": list(model.tasks),
        "configs": {t: copy.deepcopy(model.task_config(t)) for t in model.tasks},
        "tensors": {k: v.detach().clone() for k, v in model.model.state_dict(keep_vars=True).items()},
        "grads": {k: p.requires_grad for k, p in model.named_parameters()},
        "layers": {p: list(layer.adapters) for p, layer in model.layers.items()},
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["tasks"] == b["tasks"] and a["configs"] == b["configs"] and a["layers"] == b["layers"]
    assert a["grads"] == b["grads"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k


class Net(nn.Module):
    """Every built-in layer type on one path: Embedding -> Linear -> Conv1d -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8, padding_idx=0)
        self.fc = nn.Linear(8, 12)
        self.conv = nn.Conv1d(12, 12, 3, padding=2, dilation=2, groups=2, padding_mode="reflect")
        self.head = nn.Linear(12, 5)

    def forward(self, ids):
        h = torch.relu(self.fc(self.emb(ids)))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


def trained_like(model: lk.Model, *names: str) -> lk.Model:
    """Give tasks non-zero B (as after training) so their deltas are visible."""
    for n in names:
        for p in model.task_parameters(n).values():
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture
def net_model():
    torch.manual_seed(0)
    return trained_like(lk.Model(Net()).add_task("a").add_task("b", rank=4, alpha=8), "a", "b")


# --- the seed README, verbatim -----------------------------------------------------------------

def test_seed_readme_flow():
    import lora_kernels as LoRA

    class Diffusion_Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

        def forward(self, x):
            return self.net(x)

    input = torch.randn(2, 3, 8, 8)
    model = Diffusion_Model()
    model = LoRA.Model(model=model)
    model.add_task("minimalist")
    model.add_task("anime")
    model.remove_task("anime")
    model.requires_grad_(requires_grad=False)
    model.requires_grad_(requires_grad=False, task="minimalist")
    model(input)
    model(input, task="minimalist")
    checkpoint = model.state_dict()
    checkpoint_task = model.state_dict(task="minimalist")
    model.load_state_dict(checkpoint)
    model.load_state_dict(checkpoint_task, task="minimalist")
    assert model.tasks == ["minimalist"]
    assert all(not p.requires_grad for p in model.parameters())


def test_seed_custom_wrapper_and_multi_tasks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            return x @ self.w

    class LoRABlock(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.delta = nn.Parameter(torch.randn(6, 6) * 0.1)

        def forward(self, x):
            return x @ (self.module.w + self.delta)

    lk.register_base_module_wrapper(Block, lambda module: LoRABlock(module=module))
    try:
        model = lk.Model(nn.Sequential(Block(), nn.Tanh()))
    finally:
        from lora_kernels.layers import _CUSTOM

        _CUSTOM.pop(Block)
    model.add_task("a").add_task("b")
    assert list(model.state_dict(task="a")) == ["0.delta"]  # the base's w is not the task's
    assert list(model.state_dict()) == ["0.w"]
    x = torch.randn(4, 6)
    base = model(x)
    ya, yb = model(x, task="a"), model(x, task="b")
    both = model(x, tasks=["a", "b"])  # the seed README's spelling: equal-weight sum
    inner = lambda t: x @ (model.model[0].base.w + sum(model.model[0].adapters[n].delta for n in t))
    torch.testing.assert_close(both, torch.tanh(inner(["a", "b"])))
    mixed = model(x, task=["a", None, "b", "a"])
    for i, y in enumerate([ya, base, yb, ya]):
        torch.testing.assert_close(mixed[i], y[i])
    assert torch.equal(mixed[1], base[1])


# --- semantics ---------------------------------------------------------------------------------

def test_new_task_equals_base():
    torch.manual_seed(0)
    model = lk.Model(Net()).add_task("a")
    ids = torch.randint(0, 13, (3, 7))
    assert torch.equal(model(ids), model(ids, task="a"))


def test_default_rank_rule_and_scale():
    model = lk.Model(nn.Sequential(nn.Linear(64, 10), nn.Linear(10, 100))).add_task("a").add_task("b", rank=4, alpha=8)
    assert model.task_config("a").ranks == {"0": 3, "1": 3}  # int(sqrt(min(in, out)))
    assert model.model[0].adapters["a"].scale == 1.0
    assert model.model[0].adapters["b"].scale == 2.0
    model.add_task("c", rank=4, alpha=8, rslora=True)
    assert model.model[0].adapters["c"].scale == 4.0  # alpha / sqrt(rank)


def test_base_keys_round_trip_both_ways():
    torch.manual_seed(0)
    plain = Net()
    keys = list(plain.state_dict())
    model = lk.Model(copy.deepcopy(plain)).add_task("a")
    assert list(model.state_dict()) == keys
    other = Net()  # different random weights
    model.load_state_dict(other.state_dict())  # the unwrapped model's checkpoint loads in ...
    back = Net()
    back.load_state_dict(model.state_dict())  # ... and the wrapped model's loads back out
    for k, v in other.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_task_state_dict_round_trips_into_fresh_model(net_model):
    sd = net_model.state_dict(task="b")
    assert set(sd) == {f"{p}.lora_{ab}.weight" for p in ("emb", "fc", "conv", "head") for ab in "AB"}
    fresh = lk.Model(Net()).add_task("b", rank=4, alpha=8)
    fresh.load_state_dict(net_model.state_dict())
    result = fresh.load_state_dict(sd, task="b")
    assert result.missing_keys == [] and result.unexpected_keys == []
    ids = torch.randint(0, 13, (2, 5))
    assert torch.equal(fresh(ids, task="b"), net_model(ids, task="b"))


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(7, 9), (5, 7)),
    (lambda: nn.Linear(7, 9), (5, 3, 7)),
    (lambda: nn.Embedding(11, 6, padding_idx=2), (5, 4)),
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (5, 4, 9)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, dilation=1, groups=2, padding_mode="circular"), (5, 4, 6, 6)),
    (lambda: nn.Conv3d(2, 3, 2), (5, 2, 4, 4, 4)),
])
def test_per_sample_rows_equal_single_task_runs(make, shape):
    torch.manual_seed(0)
    model = trained_like(lk.Model(nn.Sequential(make())).add_task("a").add_task("b", rank=2), "a", "b").eval()
    x = torch.randint(0, 11, shape) if len(shape) == 2 and isinstance(model.model[0].base, nn.Embedding) else torch.randn(shape)
    tasks = ["a", None, "b", {"a": 1.0, "b": -0.5}, "a"]
    mixed = model(x, task=tasks)
    base = model(x)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(mixed[i], model(x[i:i + 1], task=t)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(mixed[1], base[1])  # None rows: bit-identical to the base model
    assert not torch.allclose(mixed[0], base[0])  # and the task rows really changed


def test_embedding_many_tasks_take_the_gathered_path(monkeypatch):
    """Three or more tasks on an Embedding: one gather + bmm (padding rows still get no delta)."""
    original, calls = LoRAEmbedding._gathered, []

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(LoRAEmbedding, "_gathered", spy)
    torch.manual_seed(0)
    model = trained_like(lk.Model(nn.Embedding(11, 6, padding_idx=2)).add_task("a").add_task("b", rank=2).add_task("c", rank=1), "a", "b", "c")
    ids = torch.randint(0, 11, (5, 4))
    ids[0, 0] = 2
    tasks = ["a", None, "b", "c", {"a": 1.0, "c": 2.0}]
    mixed = model(ids, task=tasks)
    assert calls
    for i, t in enumerate(tasks):
        torch.testing.assert_close(mixed[i], model(ids[i:i + 1], task=t)[0])
    assert torch.equal(mixed[1], model(ids)[1])


def test_embedding_padding_idx_gets_no_delta():
    model = trained_like(lk.Model(nn.Embedding(10, 4, padding_idx=3)).add_task("a"), "a")
    ids = torch.tensor([[3, 1, 3]])
    y, y0 = model(ids, task="a"), model(ids)
    assert torch.equal(y[0, 0], y0[0, 0]) and torch.equal(y[0, 2], y0[0, 2])
    assert not torch.equal(y[0, 1], y0[0, 1])


def test_conv_delta_matches_merged_weight():
    """A conv with dilation, reflect padding and groups: the LoRA term equals conv with B·A merged."""
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode="reflect")
    model = trained_like(lk.Model(base).add_task("a", rank=4, alpha=2), "a")
    ad = model.model.adapters["a"]
    a, b = ad.lora_A.weight, ad.lora_B.weight  # [4, 2, 3, 3], [6, 2, 1, 1]
    g = 2
    delta = torch.cat([torch.einsum("or,rikl->oikl", b[j * 3:(j + 1) * 3, :, 0, 0], a[j * 2:(j + 1) * 2]) for j in range(g)])
    merged = copy.deepcopy(base)
    with torch.no_grad():
        merged.weight += ad.scale * delta
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(model(x, task="a"), merged(x), rtol=1e-5, atol=1e-5)


def test_weighted_mix_is_sum_of_deltas():
    torch.manual_seed(0)
    model = trained_like(lk.Model(nn.Linear(6, 5)).add_task("a").add_task("b", rank=3, alpha=6), "a", "b")
    x = torch.randn(4, 6)
    y0, ya, yb = model(x), model(x, task="a"), model(x, task="b")
    torch.testing.assert_close(model(x, task={"a": 0.7, "b": -1.5}), y0 + 0.7 * (ya - y0) - 1.5 * (yb - y0))
    torch.testing.assert_close(model(x, tasks=["a", "b"]), ya + yb - y0)


def test_tasks_of_different_ranks_in_one_batch():
    torch.manual_seed(0)
    model = trained_like(lk.Model(nn.Linear(16, 8)).add_task("r1", rank=1).add_task("r8", rank=8).add_task("r3", rank=3), "r1", "r8", "r3")
    x = torch.randn(6, 16)
    tasks = ["r8", "r1", "r3", None, "r1", "r8"]
    mixed = model(x, task=tasks)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(mixed[i], model(x[i:i + 1], task=t)[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tasks_on_some_layers_only_in_a_mixed_batch(backend):
    """A task that adapts only some layers (modules=), mixed with others: its rows skip the rest."""
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    model = lk.Model(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)))
    model.add_task("a").add_task("b", modules=["2"]).add_task("c").add_task("d", modules=["0"])
    model = trained_like(model, "a", "b", "c", "d").eval()
    x = torch.randn(5, 6)
    tasks = ["b", "a", "d", "c", None]
    with lk.use_backend(backend):
        mixed = model(x, task=tasks)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(mixed[i], model(x[i:i + 1], task=t)[0], rtol=1e-5, atol=1e-5)


def test_mixed_batch_gradients_are_sum_of_per_sample_gradients(net_model):
    torch.manual_seed(1)
    ids = torch.randint(0, 13, (4, 5))
    tasks = ["a", "b", None, {"a": 0.5, "b": 1.0}]
    params = dict(net_model.named_parameters())

    def grads(loss_fn):
        net_model.zero_grad()
        loss_fn().backward()
        return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}

    mixed = grads(lambda: net_model(ids, task=tasks).square().sum())
    per = [grads(lambda i=i: net_model(ids[i:i + 1], task=tasks[i]).square().sum()) for i in range(4)]
    for k in params:
        torch.testing.assert_close(mixed[k], sum(g[k] for g in per), rtol=1e-4, atol=1e-5)


def test_requires_grad_flags(net_model):
    net_model.requires_grad_(False)
    assert not any(p.requires_grad for p in net_model.base_parameters().values())
    assert all(p.requires_grad for p in net_model.task_parameters("a").values())
    net_model.requires_grad_(False, task="a")
    assert not any(p.requires_grad for p in net_model.task_parameters("a").values())
    assert all(p.requires_grad for p in net_model.task_parameters("b").values())
    ids = torch.randint(0, 13, (2, 3))
    net_model(ids, task="b").sum().backward()
    assert all(p.grad is None for p in net_model.base_parameters().values())
    assert all(p.grad is not None for p in net_model.task_parameters("b").values())


def test_dropout_applies_to_lora_input_only():
    torch.manual_seed(0)
    model = lk.Model(nn.Linear(32, 32)).add_task("d", dropout=0.5)  # B = 0: any base-path dropout would show
    x = torch.randn(4, 32)
    assert torch.equal(model.train()(x, task="d"), model(x))
    trained_like(model, "d")
    model.eval()
    assert torch.equal(model(x, task="d"), model(x, task="d"))  # eval: no dropout, deterministic
    model.train()
    assert not torch.equal(model(x, task="d"), model(x, task="d"))


def test_multihead_attention_left_unwrapped_with_warning():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)

    with pytest.warns(UserWarning, match="MultiheadAttention"):
        model = lk.Model(WithMHA())
    assert list(model.layers) == ["fc"]


def test_shared_module_gets_one_wrapper():
    shared = nn.Linear(4, 4)
    model = lk.Model(nn.Sequential(shared, nn.ReLU(), shared)).add_task("a")
    assert model.model[0] is model.model[2]
    assert list(model.layers) == ["0"]
    assert list(model.state_dict()) == list(nn.Sequential(shared, nn.ReLU(), shared).state_dict())


def test_layers_are_the_expected_types(net_model):
    kinds = {p: type(layer) for p, layer in net_model.layers.items()}
    assert kinds == {"emb": LoRAEmbedding, "fc": LoRALinear, "conv": LoRAConv, "head": LoRALinear}


# --- errors change nothing ---------------------------------------------------------------------

BAD_CALLS = [
    ("unknown task", lambda m, x: m(x, task="nope"), ValueError, "unknown task 'nope'"),
    ("unknown in list", lambda m, x: m(x, task=["a", "nope", None, "b"]), ValueError, "known tasks"),
    ("unknown in mix", lambda m, x: m(x, task={"a": 1, "zz": 1}), ValueError, "unknown task 'zz'"),
    ("list length", lambda m, x: m(x, task=["a", "b"]), ValueError, "4"),
    ("task and tasks", lambda m, x: m(x, task="a", tasks=["b"]), ValueError, "not both"),
    ("bad entry", lambda m, x: m(x, task=["a", 3, None, "b"]), TypeError, "per-sample"),
    ("bad weight", lambda m, x: m(x, task={"a": float("nan")}), ValueError, "finite"),
    ("duplicate", lambda m, x: m.add_task("a"), ValueError, "already exists"),
    ("invalid name", lambda m, x: m.add_task("x.y"), ValueError, "invalid task name"),
    ("empty name", lambda m, x: m.add_task(""), ValueError, "invalid task name"),
    ("non-str name", lambda m, x: m.add_task(3), ValueError, "invalid task name"),
    ("rank negative", lambda m, x: m.add_task("c", rank=-2), ValueError, "rank"),
    ("rank zero", lambda m, x: m.add_task("c", rank=0), ValueError, "rank"),
    ("rank vs groups", lambda m, x: m.add_task("c", rank=3), ValueError, "multiple of its groups"),
    ("bad dropout", lambda m, x: m.add_task("c", dropout=1.5), ValueError, "dropout"),
    ("bad init", lambda m, x: m.add_task("c", init="ones"), ValueError, "init"),
    ("bad alpha", lambda m, x: m.add_task("c", alpha=0), ValueError, "alpha"),
    ("bad module", lambda m, x: m.add_task("c", modules=["nope"]), ValueError, "unknown module"),
    ("remove unknown", lambda m, x: m.remove_task("zz"), ValueError, "unknown task"),
    ("grad unknown", lambda m, x: m.requires_grad_(False, task="zz"), ValueError, "unknown task"),
    ("sd unknown", lambda m, x: m.state_dict(task="zz"), ValueError, "unknown task"),
    ("load shape", lambda m, x: m.load_state_dict({**m.state_dict(task="a"), "fc.lora_A.weight": torch.zeros(1, 8)}, task="a"),
     RuntimeError, "shape"),
    ("load missing", lambda m, x: m.load_state_dict({"fc.lora_A.weight": torch.zeros_like(m.state_dict(task="a")["fc.lora_A.weight"])}, task="a"),
     RuntimeError, "missing keys"),
    ("load unexpected", lambda m, x: m.load_state_dict({**m.state_dict(task="a"), "zz.lora_A.weight": torch.zeros(1)}, task="a"),
     RuntimeError, "unexpected keys"),
    ("load dtype", lambda m, x: m.load_state_dict({k: torch.ones(v.shape, dtype=torch.int64) for k, v in m.state_dict(task="a").items()}, task="a"),
     RuntimeError, "dtype"),
    ("load base shape", lambda m, x: m.load_state_dict({**{k: v * 2 for k, v in m.state_dict().items()}, "fc.weight": torch.zeros(3, 3)}),
     RuntimeError, "shape"),
    ("load base unexpected", lambda m, x: m.load_state_dict({**{k: v * 2 for k, v in m.state_dict().items()}, "zz": torch.zeros(1)}),
     RuntimeError, "unexpected"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_errors_are_clear_and_change_nothing(net_model, name, call, exc, match):
    ids = torch.randint(0, 13, (4, 5))
    before = snapshot(net_model)
    y_before = net_model(ids, task=["a", "b", None, "a"])
    with pytest.raises(exc, match=match):
        call(net_model, ids)
    assert_same(before, snapshot(net_model))
    assert torch.equal(net_model(ids, task=["a", "b", None, "a"]), y_before)


def test_flattened_rows_are_routed_and_a_layer_whose_dim0_is_not_the_batch_is_named():
    class Flattens(nn.Module):
        def __init__(self, seq_major: bool):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.seq_major = seq_major

        def forward(self, x):  # [B, S, 4] -> [B*S, 4] (batch-major) or [S*B, 4] (sequence-major)
            return self.fc((x.transpose(0, 1) if self.seq_major else x).reshape(-1, 4))

    x = torch.randn(2, 3, 4)
    model = lk.Model(Flattens(seq_major=False)).add_task("a", init="gaussian")
    model.layers["fc"].adapters["a"].lora_B.weight.data.normal_()
    y = model(x, task=["a", None])  # batch-major [B*S, H]: the layout is learnt, rows follow their sample
    assert torch.allclose(y[:3], model(x[:1], task="a"), atol=1e-6) and torch.equal(y[3:], model(x[1:]))
    model = lk.Model(Flattens(seq_major=True)).add_task("a")
    with pytest.raises(ValueError, match=r"\['fc'\]"):  # interleaved rows: refused, never guessed
        model(x, task=["a", None])


# --- routing is per call -----------------------------------------------------------------------

def test_exception_mid_forward_leaves_no_routing(net_model):
    class Boom(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, fail=False):
            y = self.inner(ids)
            if fail:
                raise RuntimeError("boom")
            return y

    model = trained_like(lk.Model(Boom(Net())).add_task("a"), "a")
    ids = torch.randint(0, 13, (2, 3))
    base = model(ids)
    with pytest.raises(RuntimeError, match="boom"):
        model(ids, task="a", fail=True)
    from lora_kernels.layers.routing import current_route

    assert current_route() is None
    assert torch.equal(model.model.inner(ids), base)  # the inner model called directly: no task left on
    assert torch.equal(model(ids), base)


def test_threads_with_different_tasks(net_model):
    net_model.eval()
    ids = torch.randint(0, 13, (4, 6))
    selections = ["a", "b", None, {"a": 1.0, "b": 0.5}, ["a", None, "b", "a"], ["b", "b", None, None], "a", "b"]
    expected = [net_model(ids, task=s) for s in selections]
    results: dict[int, list] = {i: [] for i in range(len(selections))}
    barrier = threading.Barrier(len(selections))

    def serve(i):
        barrier.wait()
        for _ in range(20):
            results[i].append(net_model(ids, task=selections[i]))

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(selections))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        assert len(outs) == 20
        assert all(torch.equal(o, expected[i]) for o in outs), f"thread {i} ({selections[i]!r}) saw another thread's task"


def test_task_names_that_are_module_methods():
    model = trained_like(lk.Model(nn.Linear(4, 4)).add_task("double").add_task("train"), "double", "train")
    x = torch.randn(2, 4)
    assert not torch.equal(model(x, task="double"), model(x, task="train"))
    assert set(model.state_dict(task="train")) == {"lora_A.weight", "lora_B.weight"}
    model.remove_task("double")
    assert model.tasks == ["train"]


def test_add_remove_chainable_and_order():
    model = lk.Model(nn.Linear(4, 4))
    assert model.add_task("x").add_task("y").add_task("z").remove_task("y") is model
    assert model.tasks == ["x", "z"]
    assert "y" not in model.model.adapters


def test_state_dict_has_no_adapter_keys_and_model_attribute_passthrough():
    seq = nn.Sequential(nn.Linear(3, 3))
    seq.config = {"hidden": 3}  # e.g. a transformers model's config
    model = lk.Model(seq).add_task("a")
    assert list(model.state_dict()) == ["0.weight", "0.bias"]
    assert model.config == {"hidden": 3}


def test_remove_task_refused_while_a_call_uses_it():
    started, release = threading.Event(), threading.Event()

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            started.set()
            release.wait(10)
            return self.fc(x)

    model = lk.Model(Slow()).add_task("a").add_task("b")
    worker = threading.Thread(target=lambda: model(torch.randn(2, 4), task="a"))
    worker.start()
    started.wait(10)
    try:
        with pytest.raises(RuntimeError, match="in use"):
            model.remove_task("a")
        model.remove_task("b")  # a task no call is using goes at once
        model.add_task("c")  # adding is safe: running calls never see a task they did not name
    finally:
        release.set()
        worker.join()
    model.remove_task("a")
    assert model.tasks == ["c"]


# --- real-model habits: transparency, checkpointing, registration ---------------------------------
def test_wrapped_layers_read_through_to_the_base():
    inner = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(3, 3, 2, stride=2))
    model = lk.Model(inner)
    assert model.model[0].weight is model.model[0].base.weight and model.model[0].in_features == 4
    assert model.model[1].stride == (2, 2)
    with pytest.raises(AttributeError, match="nonexistent"):
        model.model[0].nonexistent


def test_position_ids_of_one_row_get_per_sample_deltas():
    class Pos(nn.Module):  # GPT-2's habit: position ids [1, S] broadcast over the batch
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(10, 6), nn.Embedding(8, 6), nn.Linear(6, 3)

        def forward(self, ids):
            return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0)))

    model = lk.Model(Pos()).add_task("a", init="kaiming_both").add_task("b", init="kaiming_both")
    ids = torch.randint(0, 10, (3, 5))
    y = model(ids, task=["a", None, "b"])
    for i, t in enumerate(["a", None, "b"]):
        assert torch.allclose(y[i:i + 1], model(ids[i:i + 1], task=t), atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_direct_checkpoint_recompute_without_route_is_refused_and_using_fixes_it(reentrant):
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return checkpoint(self.fc, x, use_reentrant=reentrant)

    model = lk.Model(Ckpt()).add_task("a", init="kaiming_both")
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="recomputed in backward"):  # before: silently the base's gradients
        model(x, task="a").sum().backward()
    model.zero_grad()
    with model.using(task="a"):
        model(x, task="a").sum().backward()
    got = {k: p.grad.clone() for k, p in model.task_parameters("a").items()}
    model.zero_grad()
    with model.using(task="a"):
        y = model.model.fc(x)  # no checkpoint: the reference
    y.sum().backward()
    for k, p in model.task_parameters("a").items():
        assert torch.allclose(got[k], p.grad)


def test_register_a_subclass_as_linear():
    class MyLinear(nn.Linear):  # a subclass whose math is nn.Linear's
        pass

    with pytest.warns(UserWarning, match="MyLinear"):  # not adapted by default, and said so
        lk.Model(nn.Sequential(MyLinear(4, 4)))
    lk.register_base_module_wrapper(MyLinear, lk.layers.LoRALinear)
    try:
        model = lk.Model(nn.Sequential(MyLinear(4, 4))).add_task("a", init="kaiming_both")
        assert isinstance(model.model[0], lk.layers.LoRALinear)
        x = torch.randn(2, 4)
        a = model.layers["0"].adapters["a"]
        assert torch.allclose(model(x, task="a"), model(x) + a.scale * x @ a.lora_A.weight.T @ a.lora_B.weight.T, atol=1e-6)
    finally:
        from lora_kernels.layers import _AS

        _AS.pop(MyLinear, None)


def test_tied_embedding_and_head_are_left_out_of_the_default_task_so_merge_works():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    model = lk.Model(Tied()).add_task("a", init="kaiming_both")
    assert list(model.task_config("a").ranks) == ["mid"]
    ids = torch.randint(0, 10, (2, 3))
    y = model(ids, task="a")
    model.merge("a")
    assert torch.allclose(model(ids), y, atol=1e-5)
    model.unmerge()
