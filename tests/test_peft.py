"""PEFT interop against the real thing: adapters made and run by PEFT, loaded and run by lora_kernels.

Models are built from configs in code (random weights, no downloads). Adapters are created with
``init_lora_weights=False`` so every ``B`` is non-zero and a wrong scale, rank or layout shows.
"""

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
from lora_kernels.io import CheckpointError

from tests.utils import assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
ADAPTERS = {
    "default": dict(r=4, lora_alpha=8),
    "rs": dict(r=8, lora_alpha=4, use_rslora=True),
    "pat": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 8},
                alpha_pattern={"v_proj": 3, "embed_tokens": 5}),
}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The base model, a PEFT model with three adapters, their saved folders, and lk with them loaded."""
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "save_embedding_layers set to True" etc.
        pm = None
        for name, kw in ADAPTERS.items():
            cfg = LoraConfig(target_modules=LLAMA_TARGETS, init_lora_weights=False, **kw)
            if pm is None:
                pm = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
            else:
                pm.add_adapter(name, cfg)
        pm.eval()
        root = tmp_path_factory.mktemp("peft_llama")
        pm.save_pretrained(root)
    dirs = {n: str(root if n == "default" else root / n) for n in ADAPTERS}
    model = lk.Model(copy.deepcopy(base)).eval()
    for name, d in dirs.items():
        model.load_peft_adapter(d, task=name)
    ids = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(1))
    return dict(base=base, pm=pm, dirs=dirs, model=model, ids=ids)


def test_files_are_what_peft_writes(llama):
    """The fixture's folders hold embedding LoRA keys and the base embedding (save_embedding_layers)."""
    from safetensors import safe_open

    with safe_open(os.path.join(llama["dirs"]["pat"], "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight" in keys


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_each_adapter_matches_peft(llama, name):
    pm, model, ids = llama["pm"], llama["model"], llama["ids"]
    pm.set_adapter(name)
    ref = logits(pm, ids)
    out = logits(model, ids, task=name)
    assert_close(out, ref, torch.float32, f"adapter {name}")
    assert (out - logits(model, ids)).abs().max() > 1e-3, "the adapter must change the outputs"


def test_per_module_ranks_and_alphas(llama):
    cfg = llama["model"].task_config("pat")
    assert cfg.ranks["model.layers.0.self_attn.q_proj"] == 2
    assert cfg.ranks["model.layers.1.mlp.down_proj"] == 8
    assert cfg.ranks["model.layers.0.mlp.down_proj"] == 4
    assert cfg.alphas["model.layers.1.self_attn.v_proj"] == 3
    assert cfg.alphas["model.embed_tokens"] == 5
    assert llama["model"].task_config("rs").rslora


def test_mixed_batch_matches_peft(llama):
    pm, model, ids = llama["pm"], llama["model"], llama["ids"]
    ref = logits(pm, ids, adapter_names=["default", "__base__", "rs", "pat"])
    out = logits(model, ids, task=["default", None, "rs", "pat"])
    assert_close(out, ref, torch.float32, "mixed batch")


def test_export_loads_in_peft(llama, tmp_path):
    model, ids = llama["model"], llama["ids"]
    for name in ("pat", "rs"):
        model.save_peft_adapter(tmp_path / name, task=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel.from_pretrained(copy.deepcopy(llama["base"]), tmp_path / name).eval()
        assert_close(logits(pm, ids), logits(model, ids, task=name), torch.float32, f"exported {name} in PEFT")
    # ... and back into lora_kernels, hot-swapped into the existing task.
    before = {k: v.data_ptr() for k, v in model.task_parameters("pat").items()}
    model.load_peft_adapter(tmp_path / "pat", task="pat")
    assert {k: v.data_ptr() for k, v in model.task_parameters("pat").items()} == before


def gpt2_pair():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: fan_in_fan_out for Conv1D
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                                             fan_in_fan_out=True, init_lora_weights=False))
        pm.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    return base, pm.eval()


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    base, pm = gpt2_pair()
    pm.save_pretrained(tmp_path)
    model = lk.Model(copy.deepcopy(base)).eval()
    assert type(model.layers["transformer.h.0.attn.c_attn"]).__name__ == "LoRAHFConv1D"
    model.load_peft_adapter(tmp_path, task="a").load_peft_adapter(tmp_path / "other", task="b")
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    pm.set_adapter("default")
    assert_close(logits(model, ids, task="a"), logits(pm, ids), torch.float32, "GPT-2 adapter")
    mixed = logits(pm, ids, adapter_names=["other", "default", "__base__"])
    assert_close(logits(model, ids, task=["b", "a", None]), mixed, torch.float32, "GPT-2 mixed batch")
    model.save_peft_adapter(tmp_path / "export", task="a")
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    assert_close(logits(back, ids), logits(model, ids, task="a"), torch.float32, "GPT-2 export in PEFT")


# --- refusals -----------------------------------------------------------------------------------
def snapshot(model: lk.Model) -> dict:
    """Everything a refused load must leave alone: base state, task names, configs and weights."""
    return {"base": {k: v.clone() for k, v in model.state_dict().items()}, "tasks": model.tasks,
            "configs": {t: copy.deepcopy(model.task_config(t)) for t in model.tasks},
            "weights": {t: {k: v.clone() for k, v in model.state_dict(task=t).items()} for t in model.tasks}}


def assert_unchanged(model: lk.Model, snap: dict) -> None:
    now = snapshot(model)
    assert now["tasks"] == snap["tasks"] and now["configs"] == snap["configs"]
    for part in ("base", "weights"):
        a, b = now[part], snap[part]
        flat_a = a if part == "base" else {(t, k): v for t, sd in a.items() for k, v in sd.items()}
        flat_b = b if part == "base" else {(t, k): v for t, sd in b.items() for k, v in sd.items()}
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), f"{part} changed"


@pytest.fixture
def adapter_copy(llama, tmp_path):
    """A writable copy of the 'pat' folder, and a fresh lk model holding one task."""
    src = llama["dirs"]["pat"]
    dst = tmp_path / "adapter"
    dst.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (dst / f).write_bytes(open(os.path.join(src, f), "rb").read())
    model = lk.Model(copy.deepcopy(llama["base"])).eval()
    model.add_task("keep", rank=2)
    return dst, model


def edit_config(folder, **changes):
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def edit_weights(folder, fn):
    from safetensors.torch import load_file, save_file

    p = str(folder / "adapter_model.safetensors")
    sd = load_file(p)
    fn(sd)
    save_file(sd, p)


@pytest.mark.parametrize("change, message", [
    (dict(use_dora=True), "DoRA"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(peft_type="LOHA"), "peft_type"),
    (dict(init_lora_weights="pissa"), "PiSSA"),
    (dict(r="4"), "r must be"),
    (dict(lora_alpha=float("nan")), "non-finite number NaN"),
    (dict(lora_alpha=0), "lora_alpha must be"),
    (dict(target_modules=["q_proj"]), "target_modules does not select"),
    (dict(some_future_option=True), "unknown config field"),
    (dict(r=3), "rank 4"),
])
def test_bad_config_refused(adapter_copy, change, message):
    folder, model = adapter_copy
    edit_config(folder, **change)
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        model.load_peft_adapter(folder, task="new")
    assert_unchanged(model, snap)


def test_bad_weights_refused(adapter_copy):
    folder, model = adapter_copy
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    cases = [
        (lambda sd: sd.__setitem__(key, torch.full_like(sd[key], float("nan"))), "NaN"),
        (lambda sd: sd.__setitem__(key, torch.zeros(3, 3)), "shape"),
        (lambda sd: sd.pop(key), "lora_B is missing"),
        (lambda sd: sd.__setitem__("base_model.model.model.embed_tokens.base_layer.weight", torch.zeros(64, 32)), "differs"),
        (lambda sd: sd.__setitem__(key.replace("lora_B.weight", "lora_magnitude_vector"), torch.ones(16)), "DoRA"),
        (lambda sd: sd.__setitem__("base_model.model.model.norm.extra", torch.ones(2)), "unexpected key"),
        (lambda sd: [sd.pop(k) for k in list(sd) if "layers.1.self_attn.o_proj" in k], "selected by target_modules"),
    ]
    original = (folder / "adapter_model.safetensors").read_bytes()
    for fn, message in cases:
        (folder / "adapter_model.safetensors").write_bytes(original)
        edit_weights(folder, fn)
        snap = snapshot(model)
        with pytest.raises(CheckpointError, match=message):
            model.load_peft_adapter(folder, task="new")
        assert_unchanged(model, snap)


class WritesAFile:
    """A pickle payload: unpickling it would create a file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_adapter_refused_and_never_unpickled(adapter_copy, tmp_path):
    folder, model = adapter_copy
    os.remove(folder / "adapter_model.safetensors")
    marker = tmp_path / "pwned"
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": WritesAFile(str(marker))}, f)
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        model.load_peft_adapter(folder, task="new")
    # Even with the opt-in, torch.load(weights_only=True) refuses the payload.
    with pytest.raises(CheckpointError, match="weights_only"):
        model.load_peft_adapter(folder, task="new", allow_pickle=True)
    assert not marker.exists(), "the pickle payload ran"
    assert_unchanged(model, snap)


def test_bin_adapter_with_opt_in(llama, tmp_path):
    from safetensors.torch import load_file

    src = llama["dirs"]["default"]
    torch.save(load_file(os.path.join(src, "adapter_model.safetensors")), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(open(os.path.join(src, "adapter_config.json")).read())
    model = lk.Model(copy.deepcopy(llama["base"])).eval()
    model.load_peft_adapter(tmp_path, task="a", allow_pickle=True)
    assert_close(logits(model, llama["ids"], task="a"), logits(llama["model"], llama["ids"], task="default"), torch.float32)


def test_adapter_name_in_keys_accepted(adapter_copy, llama):
    """Some writers keep the adapter name in the keys (lora_A.default.weight)."""
    folder, model = adapter_copy

    def rename(sd):
        for k in list(sd):
            if ".lora_A.weight" in k or ".lora_B.weight" in k:
                sd[k.replace(".weight", ".default.weight")] = sd.pop(k)
            elif k.endswith(("lora_embedding_A", "lora_embedding_B")):
                sd[k + ".default"] = sd.pop(k)

    edit_weights(folder, rename)
    model.load_peft_adapter(folder, task="pat")
    ids = llama["ids"]
    assert_close(logits(model, ids, task="pat"), logits(llama["model"], ids, task="pat"), torch.float32)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.inner = nn.Sequential()
        self.inner.fc = nn.Linear(6, 6)  # "inner.fc" ends with ".fc": PEFT's suffix match would pick it too

    def forward(self, x):
        return self.inner.fc(torch.relu(self.fc(x)))


def test_export_with_ambiguous_names(tmp_path):
    torch.manual_seed(0)
    base = Block()
    model = lk.Model(copy.deepcopy(base))
    model.add_task("a", rank={"fc": 2}, alpha=5.0, modules=["fc"], init="kaiming_both")
    model.save_peft_adapter(tmp_path, task="a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert_close(pm(x), model(x, task="a").double(), torch.float32, "ambiguous export")
    assert not hasattr(pm.base_model.model.inner.fc, "lora_A"), "PEFT adapted a module the task does not"
    back = lk.Model(copy.deepcopy(base)).load_peft_adapter(tmp_path, task="a")
    got, want = back.task_config("a"), model.task_config("a")
    assert (got.ranks, got.alphas, got.rslora) == (want.ranks, want.alphas, want.rslora)
