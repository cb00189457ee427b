"""merge / unmerge: merged outputs equal the unmerged task's, unmerge restores the base bit for bit,
nothing is applied twice while merged, and bad deltas never touch the base."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.io import merged_task

from tests.utils import assert_close


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0, dtype=dtype)
        self.fc = nn.Linear(8, 12, dtype=dtype)
        self.conv = nn.Conv1d(12, 6, 3, padding=1, groups=2, dtype=dtype)
        self.conv2 = nn.Conv2d(6, 4, (3, 1), stride=(2, 1), dilation=(2, 1), padding=(2, 0), dtype=dtype)
        self.head = nn.Linear(4, 5, dtype=dtype)

    def forward(self, ids):
        h = torch.relu(self.fc(self.emb(ids)))  # [B, T, 12]
        h = self.conv(h.transpose(1, 2))  # [B, 6, T]
        h = self.conv2(h.unsqueeze(-1)).squeeze(-1)  # [B, 4, T']
        return self.head(h.transpose(1, 2))


IDS = torch.randint(0, 20, (3, 9), generator=torch.Generator().manual_seed(0))
IDS[0, 0] = 0  # a padding token


def make(dtype=torch.float32) -> lk.Model:
    torch.manual_seed(0)
    model = lk.Model(Net(dtype)).eval()
    model.add_task("a", rank={"emb": 3, "fc": 4, "conv": 2, "conv2": 2, "head": 2}, alpha=3.0, init="kaiming_both")
    model.add_task("b", rank=2, rslora=True, modules=["fc", "head"], init="kaiming_both")
    return model


@torch.no_grad()
def test_merge_round_trip():
    model = make()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.base_parameters().items()}
    base_out, a_out = model(IDS), model(IDS, task="a")
    model.merge("a")
    assert merged_task(model) == "a"
    assert {k: v.data_ptr() for k, v in model.base_parameters().items()} == ptrs, "merge must write in place"
    assert_close(model(IDS, task="a"), a_out.double(), torch.float32, "merged task")
    assert torch.equal(model(IDS), model(IDS, task="a")), "without a task the merged base runs"
    model.unmerge()
    assert merged_task(model) is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), f"{k} not restored exactly"
    assert torch.equal(model(IDS), base_out)
    assert torch.equal(model(IDS, task="a"), a_out)
    model.unmerge()  # a no-op when nothing is merged


@torch.no_grad()
def test_merge_bf16_restores_bits():
    model = make(torch.bfloat16)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = make(torch.float32)
    ref.load_state_dict({k: v.float() for k, v in base_state.items()})
    for t in ("a",):
        ref.load_state_dict({k: v.float() for k, v in model.state_dict(task=t).items()}, task=t)
    model.merge("a")
    assert_close(model(IDS, task="a"), ref(IDS, task="a").double(), torch.bfloat16, "bf16 merged")
    model.unmerge()
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_while_merged_other_selections_refused():
    model = make()
    model.merge("a")
    for task in ("b", {"a": 1.0, "b": 1.0}, {"a": 0.5}, ["a", None, "b"], ["a", None, "a"]):
        with pytest.raises(RuntimeError, match="merged into the base weights.*unmerge"):
            model(IDS, task=task)
    with pytest.raises(RuntimeError, match="already merged"):
        model.merge("b")
    assert torch.equal(model(IDS, task=["a", "a", "a"]), model(IDS, task="a"))
    model.unmerge()
    model(IDS, task=["a", None, "b"])  # fine again


@torch.no_grad()
def test_merge_refuses_nan_without_touching_base():
    model = make()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.task_parameters("a")["conv2.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="conv2: ΔW holds NaN or Inf"):
        model.merge("a")
    assert merged_task(model) is None
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    model(IDS, task="b")  # not left in a merged state


@torch.no_grad()
def test_merge_refuses_overflow():
    model = make(torch.float16)
    model.task_parameters("a")["fc.lora_A.weight"].fill_(1.0)
    model.task_parameters("a")["fc.lora_B.weight"].fill_(6e4)  # ΔW = 0.75 * 8 * 6e4: finite in fp32, not in fp16
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="overflows torch.float16"):
        model.merge("a")
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())


def test_merge_refuses_custom_and_tied():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w

    class ScaledTask(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.s = base, nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.base(x) * self.s

    lk.register_base_module_wrapper(Scaled, ScaledTask)
    model = lk.Model(nn.Sequential(nn.Linear(4, 4), Scaled()))
    model.add_task("a", rank=2)
    with pytest.raises(ValueError, match="custom types"):
        model.merge("a")
    # Tied weights: an embedding that is also the output layer.
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    tied = lk.Model(nn.Sequential(emb, head))
    tied.add_task("t", rank=2, modules=["0"])
    with pytest.raises(ValueError, match="tied"):
        tied.merge("t")


def test_merge_llama_and_gpt2():
    """Real transformer blocks: Llama (Linear + Embedding) and GPT-2 (transposed Conv1D)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64)).eval()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16,
                                                                bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    for base, modules in ((llama, None), (gpt2, ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"])):
        model = lk.Model(copy.deepcopy(base)).eval()
        if modules is None:
            modules = [p for p in model.layers if p != "lm_head"]
        model.add_task("a", rank=4, alpha=8, modules=modules, init="kaiming_both")
        with torch.no_grad():
            before = model(input_ids=ids, task="a").logits
            base_out = model(input_ids=ids).logits
            model.merge("a")
            assert_close(model(input_ids=ids, task="a").logits, before.double(), torch.float32, type(base).__name__)
            model.unmerge()
            assert torch.equal(model(input_ids=ids).logits, base_out)


def test_changing_the_merged_task_or_base_is_refused_while_merged():
    torch.manual_seed(0)
    model = lk.Model(torch.nn.Linear(6, 6)).add_task("a").add_task("b")
    model.merge("a")
    sd_a, sd_base = model.state_dict(task="a"), model.state_dict()
    for call in (lambda: model.remove_task("a"), lambda: model.load_state_dict(sd_a, task="a"), lambda: model.load_state_dict(sd_base)):
        with pytest.raises(RuntimeError, match="unmerge"):
            call()
    model.load_state_dict(model.state_dict(task="b"), task="b")  # other tasks are fine
    model.unmerge()
    model.remove_task("a")
