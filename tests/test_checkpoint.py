"""Task checkpoints, full checkpoints and hot-swap: round trips, and every refusal leaves the model as it was."""

from __future__ import annotations

import copy
import json
import os
import pickle
import warnings

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.io import CheckpointError, add_tasks, full_state_dict, load_checkpoint, save_checkpoint, task_configs

safetensors_torch = pytest.importorskip("safetensors.torch")


class Net(nn.Module):
    """Embedding -> Linear -> grouped Conv1d -> Linear: every built-in layer kind."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 12)
        self.conv = nn.Conv1d(12, 6, 3, padding=1, groups=2)
        self.head = nn.Linear(6, 5)

    def forward(self, ids):
        h = torch.relu(self.fc(self.emb(ids)))  # [B, T, 12]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)  # [B, T, 6]
        return self.head(h)


def make(seed: int = 0) -> lk.Model:
    torch.manual_seed(seed)
    model = lk.Model(Net()).eval()
    model.add_task("a", rank={"emb": 3, "fc": 4, "conv": 2, "head": 2}, alpha={"fc": 8.0, "conv": 3.0}, init="kaiming_both")
    model.add_task("b", rank=2, alpha=4.0, rslora=True, dropout=0.1, modules=["fc", "head"], init="kaiming_both")
    return model


IDS = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))


def snapshot(model: lk.Model) -> dict:
    return {"base": {k: v.clone() for k, v in model.state_dict().items()}, "tasks": model.tasks,
            "configs": {t: copy.deepcopy(model.task_config(t)) for t in model.tasks},
            "weights": {(t, k): v.clone() for t in model.tasks for k, v in model.state_dict(task=t).items()},
            "ptrs": {(t, k): v.data_ptr() for t in model.tasks for k, v in model.task_parameters(t).items()}}


def assert_unchanged(model: lk.Model, snap: dict) -> None:
    now = snapshot(model)
    assert now["tasks"] == snap["tasks"], "task set changed"
    assert now["configs"] == snap["configs"], "task configs changed"
    assert now["ptrs"] == snap["ptrs"], "task tensors were reallocated"
    for part in ("base", "weights"):
        assert now[part].keys() == snap[part].keys()
        assert all(torch.equal(now[part][k], snap[part][k]) for k in now[part]), f"{part} changed"


# --- round trips ----------------------------------------------------------------------------------
def test_save_load_creates_task_with_config(tmp_path):
    src = make(0)
    path = tmp_path / "a.safetensors"
    src.save_task(path, task="a")
    meta = json.loads(safetensors_torch.safe_open(str(path), "pt").metadata()["lora_kernels"])
    assert meta["version"] == lk.__version__ and meta["ranks"]["emb"] == 3 and meta["alphas"]["fc"] == 8.0
    dst = make(1)
    dst.remove_task("a").load_task(path, task="new")
    assert dst.task_config("new") == src.task_config("a")
    dst.load_state_dict(src.state_dict())
    torch.testing.assert_close(dst(IDS, task="new"), src(IDS, task="a"), rtol=0, atol=0)
    # rsLoRA and dropout travel too.
    src.save_task(tmp_path / "b.safetensors", task="b")
    dst.load_task(tmp_path / "b.safetensors", task="b2")
    assert dst.task_config("b2").rslora and dst.task_config("b2").dropout == 0.1


def test_hot_swap_in_place(tmp_path):
    """Loading into an existing compatible task writes into the same tensors."""
    src, dst = make(0), make(1)
    src.save_task(tmp_path / "a.safetensors", task="a")
    ptrs = {k: v.data_ptr() for k, v in dst.task_parameters("a").items()}
    dst.load_task(tmp_path / "a.safetensors", task="a")
    assert {k: v.data_ptr() for k, v in dst.task_parameters("a").items()} == ptrs
    for k, v in src.state_dict(task="a").items():
        assert torch.equal(dst.state_dict(task="a")[k], v)


def test_float64_file_is_cast_to_model_dtype(tmp_path):
    src = make(0)
    sd = {k: v.double() for k, v in src.state_dict(task="a").items()}
    path = tmp_path / "a64.safetensors"
    src.save_task(path, task="a")
    meta = safetensors_torch.safe_open(str(path), "pt").metadata()
    safetensors_torch.save_file(sd, str(path), metadata=meta)
    dst = make(1)
    dst.load_task(path, task="a")
    assert all(v.dtype == torch.float32 for v in dst.state_dict(task="a").values())


def test_hot_swap_under_torch_compile(tmp_path):
    """New weights into an existing task: a compiled model sees them without recompiling."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, other = make(0), make(1)
    other.save_task(tmp_path / "a.safetensors", task="a")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    before = compiled(IDS, task="a")
    frames = counter.frame_count
    assert frames >= 1
    model.load_task(tmp_path / "a.safetensors", task="a")
    after = compiled(IDS, task="a")
    assert counter.frame_count == frames, "hot-swap recompiled"
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(after, other(IDS, task="a"))
    assert not torch.allclose(after, before)
    torch._dynamo.reset()


def test_full_checkpoint_round_trip(tmp_path):
    src = make(0)
    save_checkpoint(src, tmp_path / "full.safetensors")
    dst = lk.Model(Net()).eval()
    load_checkpoint(dst, tmp_path / "full.safetensors")
    assert dst.tasks == src.tasks
    for t in (None, "a", "b", ["a", None, "b"]):
        torch.testing.assert_close(dst(IDS, task=t), src(IDS, task=t), rtol=0, atol=0)


def test_full_checkpoint_with_torch_distributed_checkpoint(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    src = make(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(full_state_dict(src), checkpoint_id=str(tmp_path / "dcp"))
        (tmp_path / "tasks.json").write_text(json.dumps(task_configs(src)))
        dst = lk.Model(Net()).eval()
        add_tasks(dst, json.loads((tmp_path / "tasks.json").read_text()))
        dcp.load(full_state_dict(dst), checkpoint_id=str(tmp_path / "dcp"))  # in place
    for t in (None, "a", "b"):
        torch.testing.assert_close(dst(IDS, task=t), src(IDS, task=t), rtol=0, atol=0)


def test_atomic_write_keeps_old_file_on_crash(tmp_path, monkeypatch):
    model = make(0)
    path = tmp_path / "a.safetensors"
    model.save_task(path, task="a")
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors_torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_task(path, task="b")
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["a.safetensors"], "temporary file left behind"


# --- refusals -------------------------------------------------------------------------------------
def write_variant(tmp_path, edit_tensors=None, edit_meta=None, name="bad.safetensors"):
    """A task file of make(0)'s task 'a', with its tensors or config edited."""
    src = make(0)
    path = tmp_path / name
    src.save_task(path, task="a")
    with safetensors_torch.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = safetensors_torch.load_file(str(path))
    if edit_tensors:
        edit_tensors(sd)
    if edit_meta:
        cfg = json.loads(meta["lora_kernels"])
        edit_meta(cfg)
        meta["lora_kernels"] = json.dumps(cfg)
    safetensors_torch.save_file(sd, str(path), metadata=meta)
    return path


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


TENSOR_CASES = {
    "wrong shape": (_set("fc.lora_A.weight", torch.randn(4, 9)), "shape"),
    "rank mismatch between A and B": (_set("fc.lora_B.weight", torch.randn(12, 3)), "shape"),
    "NaN": (lambda d: d["fc.lora_B.weight"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
    "Inf": (lambda d: d["conv.lora_A.weight"].view(-1).__setitem__(0, float("inf")), "NaN or Inf"),
    "fp32 value overflowing nothing but int dtype": (_set("head.lora_A.weight", torch.ones(2, 6, dtype=torch.int32)), "floating point"),
    "extra key": (_set("fc.lora_C.weight", torch.randn(2, 2)), "unexpected keys: \\['fc.lora_C.weight'\\]"),
    "missing key": (lambda d: d.pop("head.lora_B.weight"), "missing keys: \\['head.lora_B.weight'\\]"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
@pytest.mark.parametrize("into", ["new task", "existing task"])
def test_bad_tensors_refused(tmp_path, case, into):
    edit, message = TENSOR_CASES[case]
    path = write_variant(tmp_path, edit_tensors=edit)
    model = make(1)
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        model.load_task(path, task="new" if into == "new task" else "a")
    assert_unchanged(model, snap)


CONFIG_CASES = {
    "rank as string": (lambda c: c["ranks"].__setitem__("fc", "4"), "'ranks' must map"),
    "rank zero": (lambda c: c["ranks"].__setitem__("fc", 0), "'ranks' must map"),
    "rank bool": (lambda c: c["ranks"].__setitem__("fc", True), "'ranks' must map"),
    "rank disagrees with tensors": (lambda c: c["ranks"].__setitem__("fc", 5), "shape"),
    "alpha NaN": (lambda c: c["alphas"].__setitem__("fc", float("nan")), "non-finite number NaN"),
    "dropout out of range": (lambda c: c.__setitem__("dropout", 2), "'dropout' must be"),
    "rslora not bool": (lambda c: c.__setitem__("rslora", "yes"), "'rslora' must be"),
    "unknown init": (lambda c: c.__setitem__("init", "magic"), "'init' must be"),
    "unknown field": (lambda c: c.__setitem__("use_dora", True), "unknown field"),
    "unknown module": (lambda c: [c["ranks"].__setitem__("nope", 2), c["alphas"].__setitem__("nope", 2.0)], "not adapted layers"),
    "ranks and alphas disagree": (lambda c: c["alphas"].pop("fc"), "name different modules"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_refused(tmp_path, case):
    edit, message = CONFIG_CASES[case]
    path = write_variant(tmp_path, edit_meta=edit)
    model = make(1)
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        model.load_task(path, task="new")
    assert_unchanged(model, snap)


def test_incompatible_existing_task_refused(tmp_path):
    src = make(0)
    src.save_task(tmp_path / "b.safetensors", task="b")
    model = make(1)
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="does not fit the existing task 'a'"):
        model.load_task(tmp_path / "b.safetensors", task="a")
    assert_unchanged(model, snap)


def test_truncated_and_garbage_files_refused(tmp_path):
    good = write_variant(tmp_path).read_bytes()
    model = make(1)
    snap = snapshot(model)
    cases = {"truncated": good[: len(good) - 40], "header only": good[:60], "empty": b"", "garbage": os.urandom(300),
             "header length lies": (10 ** 6).to_bytes(8, "little") + good[8:]}
    for name, data in cases.items():
        (tmp_path / "x.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError, match="truncated|corrupt|too short|not a safetensors"):
            model.load_task(tmp_path / "x.safetensors", task="new")
        assert_unchanged(model, snap)
    with pytest.raises(FileNotFoundError):
        model.load_task(tmp_path / "missing.safetensors", task="new")


class WritesAFile:
    """A pickle payload: unpickling it would create a file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("name, writer", [("task.pt", "torch"), ("task.bin", "pickle"), ("task.safetensors", "pickle"),
                                          ("task.safetensors", "torch"), ("task.pkl", "pickle0")])
def test_pickle_files_refused_never_unpickled(tmp_path, name, writer):
    marker = tmp_path / "pwned"
    payload = {"fc.lora_A.weight": WritesAFile(str(marker))}
    path = tmp_path / name
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=0 if writer == "pickle0" else pickle.DEFAULT_PROTOCOL)
    model = make(1)
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="pickle.*never unpickles.*safetensors"):
        model.load_task(path, task="new")
    assert not marker.exists(), "the pickle payload ran"
    assert_unchanged(model, snap)


def test_safetensors_named_bin_is_read(tmp_path):
    """Files are sniffed, not judged by their name: a safetensors file called .bin loads."""
    make(0).save_task(tmp_path / "a.bin", task="a")
    model = make(1)
    model.load_task(tmp_path / "a.bin", task="new")
    assert "new" in model.tasks


class Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return x * self.w


class GainTask(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base, self.scale = base, nn.Parameter(torch.full((5,), 1.5))

    def forward(self, x):
        return self.base(x) * self.scale


def test_custom_layer_task_round_trip(tmp_path):
    lk.register_base_module_wrapper(Gain, GainTask)
    torch.manual_seed(0)
    src = lk.Model(nn.Sequential(nn.Linear(4, 5), Gain())).add_task("a", rank=2, init="kaiming_both")
    with torch.no_grad():
        src.task_parameters("a")["1.scale"].copy_(torch.randn(5))
    src.save_task(tmp_path / "a.safetensors", task="a")
    dst = lk.Model(nn.Sequential(nn.Linear(4, 5), Gain()))
    dst.load_state_dict(src.state_dict())
    dst.load_task(tmp_path / "a.safetensors", task="a")
    x = torch.randn(3, 4)
    torch.testing.assert_close(dst(x, task="a"), src(x, task="a"), rtol=0, atol=0)


def test_failure_after_creation_removes_the_task(tmp_path, monkeypatch):
    """If publishing the new task fails half-way through the layers, nothing is left of it."""
    from lora_kernels.io import checkpoint

    make(0).save_task(tmp_path / "a.safetensors", task="a")
    model = make(1)
    snap = snapshot(model)

    from lora_kernels.layers import LoRALayer

    calls = []
    real = LoRALayer.prepare

    def boom(self, name, adapter):  # the second layer fails to allocate: the first one's plan is dropped
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(self, name, adapter)

    monkeypatch.setattr(LoRALayer, "prepare", boom)
    with pytest.raises(CheckpointError, match="device lost"):
        model.load_task(tmp_path / "a.safetensors", task="new")
    assert_unchanged(model, snap)


def test_file_without_config_only_into_existing_task(tmp_path):
    src = make(0)
    safetensors_torch.save_file(dict(src.state_dict(task="a")), str(tmp_path / "plain.safetensors"))
    model = make(1)
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="no lora_kernels task config"):
        model.load_task(tmp_path / "plain.safetensors", task="new")
    assert_unchanged(model, snap)
    model.load_task(tmp_path / "plain.safetensors", task="a")
    assert all(torch.equal(model.state_dict(task="a")[k], v) for k, v in src.state_dict(task="a").items())


def test_full_checkpoint_refusals(tmp_path):
    src = make(0)
    path = tmp_path / "full.safetensors"
    save_checkpoint(src, path)
    sd = safetensors_torch.load_file(str(path))
    meta = safetensors_torch.safe_open(str(path), "pt").metadata()
    model = make(1)
    model.add_task("extra", rank=1, modules=["fc"])
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="task\\(s\\) \\['extra'\\] that the checkpoint lacks"):
        load_checkpoint(model, path)
    assert_unchanged(model, snap)
    model.remove_task("extra")
    model.remove_task("b")
    snap = snapshot(model)
    sd["@tasks.b.fc.lora_B.weight"] = torch.full_like(sd["@tasks.b.fc.lora_B.weight"], float("nan"))
    sd["fc.weight"] = torch.zeros(3, 3)
    safetensors_torch.save_file(sd, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="fc.weight: shape") as info:
        load_checkpoint(model, path)
    assert "NaN" in str(info.value)
    assert_unchanged(model, snap)
