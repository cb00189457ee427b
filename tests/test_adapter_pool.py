"""lk.AdapterPool: residency, eviction, host tier, prefetch, split scheduling, bounded memory, threads.

Every output through the pool is compared with the same model holding every task at once
(all-resident): bit-identical where the same kernels run (the same batch), within the float32
tolerance of the float64 oracle where a call was split into sub-batches.
"""

from __future__ import annotations

import copy
import json
import os
import threading

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lora_kernels as lk
from lora_kernels.io.checkpoint import META_KEY
from lora_kernels.validation import CheckpointError

from utils import assert_close

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

V, S = 40, 5
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny ops: OpenMP threads only spin here


class Tiny(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear; ids [B, S] -> [B, S, 8]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 12)
        self.l1 = nn.Linear(12, 20)
        self.l2 = nn.Linear(20, 8)

    def forward(self, ids):
        return self.l2(torch.relu(self.l1(self.emb(ids))))


def _base() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


def write_adapters(folder, n: int, ranks=(1, 2, 3, 4), seed: int = 1) -> dict[str, str]:
    """``n`` task files (``save_task`` format) with random A and B, ranks cycling through ``ranks``."""
    model = lk.Model(_base())
    meta = {}
    for r in ranks:  # the metadata of a rank-r task, written by the library
        model.add_task("t", rank=r, alpha=2.0 * r)
        path = os.path.join(folder, f"template{r}.safetensors")
        model.save_task(path, "t")
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta[r] = (dict(f.metadata()), {k: f.get_slice(k).get_shape() for k in f.keys()})
        model.remove_task("t")
        os.unlink(path)
    g = torch.Generator().manual_seed(seed)
    paths = {}
    for i in range(n):
        r = ranks[i % len(ranks)]
        metadata, shapes = meta[r]
        tensors = {k: torch.randn(*s, generator=g) * 0.5 for k, s in shapes.items()}
        paths[f"a{i}"] = os.path.join(folder, f"a{i}.safetensors")
        save_file(tensors, paths[f"a{i}"], metadata=metadata)
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_adapters(str(tmp_path_factory.mktemp("adapters")), 8)


@pytest.fixture(scope="module")
def resident(files):
    """The all-resident model: every adapter loaded as a task."""
    model = lk.Model(_base())
    for name, path in files.items():
        model.load_task(path, name)
    return model


def make_pool(files, **kw) -> lk.AdapterPool:
    return lk.AdapterPool(lk.Model(_base()), **kw).add_many(files)


def ids(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, S), generator=torch.Generator().manual_seed(seed))


def state(pool: lk.AdapterPool) -> tuple:
    return (pool.model.tasks, pool.resident, pool.host_resident, pool.stats, pool.device_bytes(), pool.host_bytes())


# --- equality with the all-resident model ------------------------------------------------------
NAMES = [f"a{i}" for i in range(8)]
request = st.one_of(
    st.sampled_from(NAMES),  # one task, whole batch
    st.lists(st.one_of(st.none(), st.sampled_from(NAMES)), min_size=1, max_size=5),  # per sample
    st.dictionaries(st.sampled_from(NAMES), st.sampled_from([1.0, 0.5, -2.0]), min_size=1, max_size=2),  # a mix
)


@settings(max_examples=25)
@given(requests=st.lists(request, min_size=1, max_size=6), slots=st.sampled_from([2, 3, {1: 2, 2: 1, 3: 2, 4: 2}]),
       host=st.sampled_from([0, 2, 8]))
def test_outputs_equal_all_resident_for_any_eviction_order(files, resident, requests, slots, host):
    pool = make_pool(files, slots=slots, host_slots=host)
    bound = None
    with torch.no_grad():
        for i, task in enumerate(requests):
            x = ids(len(task) if isinstance(task, list) else 3, seed=i)
            out = pool(x, task=task)
            ref = resident(x, task=task)
            names = {n for e in (task if isinstance(task, list) else [task]) if e is not None
                     for n in ([e] if isinstance(e, str) else e)}
            split = isinstance(task, list) and not pool._fits(sorted(names))
            if split:  # sub-batches: other batch shapes, same math
                assert_close(out, ref.double(), torch.float32, f"split request {task}")
            else:
                assert torch.equal(out, ref), f"request {i} {task} (resident before: {pool.resident})"
            bound = pool.device_bytes_bound()
            assert pool.device_bytes() <= bound
            assert len(pool.host_resident) <= host


def test_reload_after_eviction_is_bit_identical(files):
    x = ids(4)
    for host in (0, 4):  # reloaded from disk, and from host memory
        pool = make_pool(files, slots=1, host_slots=host)
        with torch.no_grad():
            first = pool(x, task="a0")
            pool(x, task="a4")  # same rank (1): evicts a0
            assert "a0" not in pool.model.tasks
            again = pool(x, task="a0")
        assert torch.equal(first, again)
        s = pool.stats
        assert (s.evictions, s.misses_disk, s.misses_host) == ((2, 3, 0) if host == 0 else (2, 2, 1)), s
    # Evicted while the host tier no longer holds it: its weights are written back to the host as they are.
    pool = make_pool(files, slots=1, host_slots=2)
    with torch.no_grad():
        first = pool(x, task="a0")
        pool(x, task="a1")
        pool(x, task="a5")  # rank 2 (a1, a5): the host tier drops a0, which stays resident
        assert pool.host_resident == ["a1", "a5"] and "a0" in pool.resident
        pool(x, task="a4")  # rank 1: evicts a0, written back to the host
        again = pool(x, task="a0")
    assert torch.equal(first, again)
    assert pool.stats.misses_host == 1


def test_least_recently_used_is_evicted(files):
    pool = make_pool(files, slots=2, host_slots=0).add("b0", files["a0"])  # a0, a4, b0: rank 1
    with torch.no_grad():
        for name in ("a0", "a4", "a0", "b0"):
            pool(ids(1), task=name)
    assert pool.resident == ["a0", "b0"] and pool.stats.evictions == 1


# --- bounded memory ------------------------------------------------------------------------------
def test_thousand_adapters_bounded_memory_and_equal_outputs(tmp_path):
    """A zipf(1.1) stream over 1,000 rank 1-4 adapters: the slot storage never exceeds the slots'
    size, the host tier never holds more than host_slots adapters, outputs equal all-resident."""
    files = write_adapters(str(tmp_path), 1000)
    slots, host_slots = 3, 16
    pool = make_pool(files, slots=slots, host_slots=host_slots)
    # Slot bytes per adapter of rank r over the three layers: emb A [r, 40] B [12, r], l1 [r, 12] [20, r], l2 [r, 20] [8, r].
    per_rank = {r: r * (40 + 12 + 12 + 20 + 20 + 8) * 4 for r in (1, 2, 3, 4)}
    largest_adapter = per_rank[4]
    check = {f"a{i}" for i in range(0, 1000, 37)}  # outputs compared for these (loading all 1,000 costs seconds)
    reference = lk.Model(_base())
    for name in sorted(check):
        reference.load_task(files[name], name)
    rng = torch.Generator().manual_seed(3)
    weights = torch.arange(1, 1001, dtype=torch.float64) ** -1.1
    with torch.no_grad():
        for step in range(150):
            picks = torch.multinomial(weights, 4, replacement=True, generator=rng).tolist()
            task = [f"a{p}" for p in picks]
            x = ids(4, seed=step)
            out = pool(x, task=task)
            # (ranks are reserved as they appear: the bound grows to the slots' size of every rank seen)
            assert pool.device_bytes() <= pool.device_bytes_bound() <= sum(slots * b for b in per_rank.values())
            assert len(pool.host_resident) <= host_slots and pool.host_bytes() <= host_slots * largest_adapter
            assert len(pool.model.tasks) <= 4 * slots
            mine = [i for i, t in enumerate(task) if t in check]
            if mine:
                sub = [task[i] if i in mine else None for i in range(4)]
                ref = reference(x, task=sub)
                rows = torch.tensor(mine)
                # the same model call as the pool's when it was not split, else within tolerance
                assert_close(out[rows], ref[rows].double(), torch.float32, f"step {step}")
    assert pool.device_bytes_bound() == sum(slots * b for b in per_rank.values())
    s = pool.stats
    assert s.misses_disk > 100 and s.hits > 0 and s.evictions > 0, s


# --- rank paging, prefetch, sources ---------------------------------------------------------------
def test_ranks_are_paged_by_size(files):
    pool = make_pool(files, slots={1: 1, 4: 2}, host_slots=0)
    with torch.no_grad():
        pool(ids(3), task=["a0", "a3", "a7"])  # ranks 1, 4, 4
    caps = {k[0]: s.capacity for k, s in pool.model.layers["l1"]._pools.items()}
    assert caps == {1: 1, 4: 2}
    with pytest.raises(ValueError, match="no slots for rank 2"):
        pool(ids(1), task="a1")
    pool.add("b4", files["a3"]).add("c4", files["a7"])
    with pytest.raises(ValueError, match="3 tasks of rank 4"):  # one sample's mix needs more rank-4 slots than exist
        pool(ids(2), task=[{"a3": 1.0, "b4": 1.0, "c4": 1.0}, None])


def test_prefetch_makes_resident_and_next_call_hits(files, resident):
    pool = make_pool(files, slots=2, host_slots=0)
    pool.prefetch(["a0", "a4", "a1"])  # a0, a4: rank 1 (2 slots); a1: rank 2
    assert set(pool.resident) == {"a0", "a4", "a1"}
    x = ids(3)
    with torch.no_grad():
        out = pool(x, task=["a0", "a4", "a1"])
        assert torch.equal(out, resident(x, task=["a0", "a4", "a1"]))
    s = pool.stats
    assert (s.hits, s.misses) == (3, 0), s
    pool.prefetch(["a0", "a4", "a0"])  # already resident: nothing moves
    assert pool.stats.evictions == 0


def test_peft_folder_source(files, resident, tmp_path):
    folder = str(tmp_path / "peft_a2")
    resident.save_peft_adapter(folder, "a2")
    pool = lk.AdapterPool(lk.Model(_base()), slots=2).add("p", folder)
    x = ids(2)
    with torch.no_grad():
        assert torch.equal(pool(x, task="p"), resident(x, task="a2"))


# --- scheduling of per-sample lists --------------------------------------------------------------
def test_split_forward_into_sub_batches(files, resident):
    pool = make_pool(files, slots=1, host_slots=8)
    task = ["a0", "a1", None, "a4", "a0", "a2", "a5"]  # ranks 1, 2, -, 1, 1, 3, 2: 3 sub-batches at 1 slot per rank
    x = ids(len(task))
    with torch.no_grad():
        out = pool(x, task=task)
        ref = resident(x, task=task)
    assert_close(out, ref.double(), torch.float32, "split forward")
    assert pool.stats.misses_disk == 5


def test_split_refuses_what_cannot_fit_and_changes_nothing(files):
    pool = make_pool(files, slots=1)
    before = state(pool)
    with pytest.raises(ValueError, match="sample 1's tasks"):
        pool(ids(2), task=["a0", {"a0": 1.0, "a4": 0.5}])  # two rank-1 tasks in one sample, 1 rank-1 slot
    with pytest.raises(ValueError, match="1 rank-1 slots"):
        pool(ids(2), task={"a0": 1.0, "a4": 1.0})  # a mix cannot be split
    assert state(pool) == before


def test_split_generate_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    model = lk.Model(copy.deepcopy(base))
    paths = {}
    for i in range(4):
        model.add_task(f"g{i}", rank=2, init="kaiming_both")
        paths[f"g{i}"] = str(tmp_path / f"g{i}.safetensors")
        model.save_task(paths[f"g{i}"], f"g{i}")
    pool = lk.AdapterPool(lk.Model(copy.deepcopy(base)), slots=2).add_many(paths)
    prompt = torch.randint(3, 64, (5, 4), generator=torch.Generator().manual_seed(1))
    task = ["g0", "g1", "g2", None, "g3"]
    with torch.no_grad():
        out = pool.generate(prompt, task=task, max_new_tokens=6, do_sample=False)
        ref = model.generate(prompt, task=task, max_new_tokens=6, do_sample=False)
    assert out.shape == ref.shape and torch.equal(out, ref)
    assert pool.stats.evictions == 2


# --- bad sources -----------------------------------------------------------------------------------
def test_bad_source_raises_and_changes_nothing(files, tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickle.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(files["a0"], "rb").read()[:-10])
    nan = tmp_path / "nan.safetensors"
    from safetensors import safe_open

    with safe_open(files["a1"], framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    tensors["l1.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, str(nan), metadata=metadata)
    wrong = tmp_path / "wrong.safetensors"
    cfg = json.loads(metadata[META_KEY])
    cfg["ranks"]["l1"] = 5
    save_file(tensors, str(wrong), metadata={**metadata, META_KEY: json.dumps(cfg)})
    pool = make_pool(files, slots=1, host_slots=2)
    pool.add_many({"pickle": tmp_path / "pickle.safetensors", "truncated": truncated, "nan": nan, "wrong": wrong})
    with torch.no_grad():
        pool(ids(2), task=["a0", "a1"])  # resident and host tier not empty
        before = state(pool)
        for bad, message in (("pickle", "pickle"), ("truncated", "truncated"), ("nan", "NaN"), ("wrong", "shape")):
            with pytest.raises(CheckpointError, match=message):
                pool(ids(2), task=[bad, "a2"])
            assert state(pool) == before, bad
    with pytest.raises(FileNotFoundError):
        pool.add("missing", tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="already registered"):
        pool.add_many({"new": files["a0"], "a0": files["a0"]})
    assert "new" not in pool.adapters
    with pytest.raises(ValueError, match="unknown adapter"):
        pool(ids(1), task="zzz")
    with pytest.raises(ValueError, match="without tasks"):
        lk.AdapterPool(lk.Model(_base()).add_task("x"))


# --- threads ---------------------------------------------------------------------------------------
def test_concurrent_calls_from_threads(files, resident):
    pool = make_pool(files, slots=2, host_slots=3)
    g = torch.Generator().manual_seed(5)
    jobs = []
    for j in range(24):
        task = [NAMES[int(i)] for i in torch.randint(0, 8, (2,), generator=g)]
        x = ids(2, seed=100 + j)
        with torch.no_grad():
            jobs.append((x, task, resident(x, task=task)))
    errors = []

    def worker(k: int):
        try:
            with torch.no_grad():
                for x, task, ref in jobs[k::4]:
                    out = pool(x, task=task)
                    if not torch.equal(out, ref):
                        errors.append(f"{task}: max diff {(out - ref).abs().max().item():g}")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert pool.device_bytes() <= pool.device_bytes_bound()


def test_all_slots_pinned_waits_then_raises(files):
    pool = make_pool(files, slots=1, host_slots=0, wait_timeout=0.3)
    inside, release = threading.Event(), threading.Event()

    def hold(module, args):
        inside.set()
        release.wait(10)

    handle = pool.model.model.l2.register_forward_pre_hook(hold)
    holder = threading.Thread(target=lambda: pool(ids(1), task="a0"))
    holder.start()
    assert inside.wait(10)
    handle.remove()
    try:
        with pytest.raises(RuntimeError, match="pinned by running calls"):
            pool(ids(1), task="a4")  # rank 1: its only slot is a0's, pinned by the holder
        assert pool.resident == ["a0"]
        x = ids(1)  # another rank is free: runs now
        pool(x, task="a1")
    finally:
        release.set()
        holder.join()
    # A call that finds every slot pinned waits, and runs once the holder is done.
    pool.wait_timeout = 30.0
    inside.clear()
    release.clear()
    handle = pool.model.model.l2.register_forward_pre_hook(hold)
    holder = threading.Thread(target=lambda: pool(ids(1), task="a0"))
    holder.start()
    assert inside.wait(10)
    handle.remove()
    waiter_errors = []
    waiter = threading.Thread(target=lambda: waiter_errors.append(pool(ids(1), task="a4") is None))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and pool.resident[-1] == "a0"  # waiting for a0's slot
    release.set()
    holder.join()
    waiter.join(10)
    assert waiter_errors == [False] and "a4" in pool.resident and "a0" not in pool.resident
