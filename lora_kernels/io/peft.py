"""Hugging Face PEFT LoRA adapters: load a PEFT folder as a task, and write a task as one.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (older ones
``adapter_model.bin``, a pickle: read only with ``allow_pickle=True``, through
``torch.load(weights_only=True)``). Keys are ``base_model.model.<path>.lora_A.weight`` /
``.lora_B.weight`` (linears, convs, GPT-2's ``Conv1D``) and ``.lora_embedding_A`` /
``.lora_embedding_B`` (embeddings; same layout as ours: ``A [r, num_embeddings]``, ``B [dim, r]``).
Some writers keep the adapter name in the key (``lora_A.default.weight``); that is accepted.

Config fields read: ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``
(resolved per module exactly as PEFT does), ``lora_dropout``, ``target_modules``,
``exclude_modules``, ``layers_to_transform`` / ``layers_pattern`` (the modules they select must all
be in the file, and nothing else), ``fan_in_fan_out`` (it only changes how PEFT merges; the stored
``A``/``B`` of a ``Conv1D`` are the same as a linear's). The scale is PEFT's: ``alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). Features that change the math and are not implemented here are
refused by name (DoRA, ``lora_bias``, ``modules_to_save``, trainable tokens, PiSSA/OLoRA/CorDA/LoftQ
adapters saved against a modified base, ...), never ignored. A file that also carries base weights
(PEFT's ``save_embedding_layers``) is accepted when they equal the model's, refused otherwise.

Known difference: an ``nn.Embedding`` with ``padding_idx`` gets no LoRA delta on padding tokens here;
PEFT adds one (a warning says so when such a layer is loaded or saved).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from typing import Any, Mapping

import regex
import torch
from torch import Tensor

from ..layers import CustomLayer, LoRAConv, LoRAEmbedding, LoRAHFConv1D, LoRALayer
from ..model import Model, TaskConfig
from ..validation import CheckpointError
from ..validation import is_int as _is_int
from ..validation import is_num as _is_num
from ..validation import refuse as _refuse
from .checkpoint import atomic_save_folder, atomic_save_safetensors, atomic_write_text, load_into_task, parse_json, read_safetensors

__all__ = ["load_peft_adapter", "read_peft_adapter", "save_peft_adapter"]

# User patterns (target_modules, exclude_modules, rank/alpha_pattern, layers_pattern) come from the
# file: matched with the `regex` engine under a time limit, because Python's `re` backtracks
# without bound (`(.*.*)*X` runs for minutes). Limits are far above any real config's needs.
MAX_PATTERN = 1000
MATCH_SECONDS = 1.0


def _bounded(fn, pattern: str, path: str):
    try:
        return fn(pattern, path, timeout=MATCH_SECONDS)
    except TimeoutError:
        raise CheckpointError(f"refusing to load the PEFT config (nothing was changed): pattern {pattern!r} takes over "
                              f"{MATCH_SECONDS:g} s to match '{path}' (catastrophic backtracking); simplify it") from None
    except (regex.error, re.error) as e:
        raise CheckpointError(f"refusing to load the PEFT config (nothing was changed): pattern {pattern!r}: {e}") from None


def _module_key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# Fields that change the adapter's math and are not implemented: refused unless neutral (None/False/empty).
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}
# Fields read here.
_HANDLED = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
            "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "bias", "init_lora_weights"}
# Fields that do not change a trained adapter's outputs.
_HARMLESS = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
             "megatron_core", "qalora_group_size", "runtime_config", "loftq_config", "eva_config", "corda_config",
             "lora_ga_config", "ensure_weight_tying"}
# init_lora_weights values whose adapters are relative to a modified base model (unless converted on save).
_INIT_OK = {"gaussian", "eva", "orthogonal"}


def _neutral(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, (list, dict, str, tuple)) and len(v) == 0)


# --- config --------------------------------------------------------------------------------------
class _PeftLora:
    """A checked PEFT LoRA config."""

    def __init__(self, cfg: Any, source: str):
        if not isinstance(cfg, dict):
            raise _refuse(source, f"{CONFIG_NAME} must hold a JSON object, got {type(cfg).__name__}")
        errors = []
        if cfg.get("peft_type") != "LORA":
            errors.append(f"peft_type is {cfg.get('peft_type')!r}: only LoRA adapters (peft_type 'LORA') are supported")
        for name, what in _UNSUPPORTED.items():
            if not _neutral(cfg.get(name)):
                errors.append(f"{what} is not supported: {name}={cfg[name]!r}")
        unknown = sorted(k for k in cfg if k not in _HANDLED | _HARMLESS | set(_UNSUPPORTED) and not _neutral(cfg[k]))
        if unknown:
            errors.append(f"unknown config field(s) {unknown} with non-default values: they may change the adapter's math, "
                          "which this version of lora_kernels cannot reproduce")
        bias = cfg.get("bias", "none")
        if bias != "none":
            errors.append(f"bias={bias!r} is not supported (base biases trained with the adapter); only 'none'")
        init = cfg.get("init_lora_weights", True)
        if not isinstance(init, bool) and not (isinstance(init, str) and init in _INIT_OK):
            errors.append(f"init_lora_weights={init!r}: such adapters (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA ...) are relative "
                          "to a modified base model; save them from PEFT with path_initial_model_for_weight_conversion")
        self.r, self.alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        if not _is_int(self.r) or self.r <= 0:
            errors.append(f"r must be a positive int, got {self.r!r}")
        if not _is_num(self.alpha) or self.alpha == 0:
            errors.append(f"lora_alpha must be a finite non-zero number, got {self.alpha!r}")
        self.dropout = cfg.get("lora_dropout", 0.0)
        if not _is_num(self.dropout) or not 0.0 <= self.dropout < 1.0:
            errors.append(f"lora_dropout must be a number in [0, 1), got {self.dropout!r}")
        self.rslora = cfg.get("use_rslora", False)
        if not isinstance(self.rslora, bool):
            errors.append(f"use_rslora must be true or false, got {self.rslora!r}")
        if not isinstance(cfg.get("fan_in_fan_out", False), bool):
            errors.append(f"fan_in_fan_out must be true or false, got {cfg.get('fan_in_fan_out')!r}")
        self.rank_pattern = cfg.get("rank_pattern") or {}
        self.alpha_pattern = cfg.get("alpha_pattern") or {}
        if not isinstance(self.rank_pattern, dict) or not all(isinstance(k, str) and _is_int(v) and v > 0 for k, v in self.rank_pattern.items()):
            errors.append(f"rank_pattern must map patterns to positive ints, got {self.rank_pattern!r}")
        if not isinstance(self.alpha_pattern, dict) or not all(isinstance(k, str) and _is_num(v) and v != 0 for k, v in self.alpha_pattern.items()):
            errors.append(f"alpha_pattern must map patterns to finite non-zero numbers, got {self.alpha_pattern!r}")
        self.targets = cfg.get("target_modules")
        self.exclude = cfg.get("exclude_modules")
        for name, v in (("target_modules", self.targets), ("exclude_modules", self.exclude)):
            if not (v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v))):
                errors.append(f"{name} must be null, a regex string or a list of names, got {v!r}")
        self.layers = cfg.get("layers_to_transform")
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if not (self.layers is None or (isinstance(self.layers, list) and all(_is_int(i) for i in self.layers))):
            errors.append(f"layers_to_transform must be null, an int or a list of ints, got {cfg.get('layers_to_transform')!r}")
        self.layers_pattern = cfg.get("layers_pattern")
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]
        if not (self.layers_pattern is None or (isinstance(self.layers_pattern, list) and all(isinstance(p, str) for p in self.layers_pattern))):
            errors.append(f"layers_pattern must be null, a string or a list of strings, got {cfg.get('layers_pattern')!r}")
        for pattern in [*(self.rank_pattern if isinstance(self.rank_pattern, dict) else ()),
                        *(self.alpha_pattern if isinstance(self.alpha_pattern, dict) else ()),
                        *([self.targets] if isinstance(self.targets, str) else []),
                        *([self.exclude] if isinstance(self.exclude, str) else []),
                        *(self.layers_pattern if isinstance(self.layers_pattern, list) else [])]:
            if not isinstance(pattern, str):
                continue  # reported above
            if len(pattern) > MAX_PATTERN:
                errors.append(f"pattern of {len(pattern)} characters refused (at most {MAX_PATTERN})")
                continue
            try:
                regex.compile(pattern)
            except (regex.error, re.error, RecursionError, OverflowError) as e:
                errors.append(f"pattern {pattern!r} is not a valid regular expression: {e}")
        if errors:
            raise _refuse(source, [f"unsupported or invalid {CONFIG_NAME}:"] + errors)

    @staticmethod
    def _pattern(patterns: Mapping[str, Any], path: str) -> str | None:
        """PEFT's ``get_pattern_key``: the first pattern matching a suffix of ``path``."""
        for key in patterns:
            if _bounded(regex.match, rf"(.*\.)?({key})$", path):
                return key
        return None

    def rank(self, path: str) -> int:
        key = self._pattern(self.rank_pattern, path)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, path: str) -> float:
        key = self._pattern(self.alpha_pattern, path)
        return float(self.alpha if key is None else self.alpha_pattern[key])

    def selects(self, path: str) -> bool | None:
        """Whether PEFT targets the module at ``path`` (None: cannot tell, e.g. ``all-linear``)."""
        if self.targets is None or self.targets == "all-linear":
            return None
        if isinstance(self.exclude, str) and _bounded(regex.fullmatch, self.exclude, path):
            return False
        if isinstance(self.exclude, list) and (path in self.exclude or any(path.endswith("." + e) for e in self.exclude)):
            return False
        if isinstance(self.targets, str):
            return _bounded(regex.fullmatch, self.targets, path) is not None
        if path in self.targets:
            return True
        if not any(path.endswith("." + t) for t in self.targets):
            return False
        if self.layers:  # PEFT: the first numbered segment (after layers_pattern, if given) is the layer index
            m = None
            if not self.layers_pattern:
                m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
            else:
                for pattern in self.layers_pattern:
                    m = _bounded(regex.match, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
                    if m:
                        break
            return m is not None and int(m.group("idx")) in self.layers
        return True


# --- loading -------------------------------------------------------------------------------------
_LORA_KEY = re.compile(r"^(?:(?P<path>.*)\.)?(?P<kind>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")
_EMB_KEY = re.compile(r"^(?:(?P<path>.*)\.)?(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<name>[^.]+))?$")
_UNSUPPORTED_KEYS = (("lora_magnitude_vector", "DoRA magnitudes"), ("lora_B.bias", "LoRA bias terms (lora_bias)"),
                     ("modules_to_save", "modules_to_save weights"), ("trainable_tokens", "trainable tokens"))


def _read_weights(folder: str, allow_pickle: bool, source: str) -> dict[str, Tensor]:
    st = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(st):
        return read_safetensors(st)[0]
    pk = os.path.join(folder, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pk):
        if not allow_pickle:
            raise _refuse(source, f"it holds {PICKLE_WEIGHTS_NAME}, a pickle file, and no {WEIGHTS_NAME}. Pickle files can run code "
                                  "when loaded; if you trust it, pass allow_pickle=True (read with torch.load(weights_only=True)) "
                                  "or convert it once: `safetensors.torch.save_file(torch.load(p, weights_only=True), "
                                  f"'{WEIGHTS_NAME}')`")
        try:
            sd = torch.load(pk, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise _refuse(source, f"{PICKLE_WEIGHTS_NAME} could not be read with weights_only=True: {type(e).__name__}: {e}") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
            raise _refuse(source, f"{PICKLE_WEIGHTS_NAME} is not a flat dict of str to tensors")
        return sd
    raise _refuse(source, f"it has neither {WEIGHTS_NAME} nor {PICKLE_WEIGHTS_NAME}")


def _padding_warning(model: Model, paths, verb: str) -> None:
    pad = [p for p in paths if isinstance(model.layers[p], LoRAEmbedding) and model.layers[p].base.padding_idx is not None]
    if pad:
        warnings.warn(f"{verb} embedding layer(s) {pad} with padding_idx: lora_kernels gives padding tokens no LoRA delta, "
                      "PEFT adds one, so outputs at padding positions differ", stacklevel=3)


def _conv_problem(layer: LoRALayer) -> str | None:
    if isinstance(layer, LoRAConv):
        b = layer.base
        if b.groups != 1 or any(d != 1 for d in b.dilation) or b.padding_mode != "zeros":
            return (f"layer '{layer.path}' is a conv with groups={b.groups}, dilation={b.dilation}, padding_mode={b.padding_mode!r}: "
                    "PEFT's conv LoRA ignores those in lora_A, so its outputs differ from this library's for such layers")
    return None


def load_peft_adapter(model: Model, path: str | os.PathLike, task: str, *, allow_pickle: bool = False) -> None:
    """Load the PEFT LoRA adapter folder ``path`` as ``task`` (see the module docstring).

    Absent task: created with PEFT's per-module ranks and alphas. Existing task: loaded in place
    (hot-swap) when it adapts the same modules with the same ranks, alphas, rsLoRA and dropout.
    Refuses (:class:`CheckpointError`) without changing the model.
    """
    config, tensors, source = read_peft_adapter(model, path, allow_pickle=allow_pickle)
    load_into_task(model, task, config, [], tensors, source)


def read_peft_adapter(model: Model, path: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[TaskConfig, dict[str, Tensor], str]:
    """Read and check the PEFT folder ``path`` against ``model`` without changing it:
    ``(config, tensors under the task's state-dict keys (CPU), source)`` for :func:`load_into_task`."""
    folder = os.fspath(path)
    source = f"PEFT adapter '{folder}'"
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such folder: '{folder}' (a PEFT adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise _refuse(source, f"it has no {CONFIG_NAME}")
    with open(cfg_path, "rb") as f:
        raw = f.read(1 << 20)
    try:
        text = raw.decode("utf-8")
        cfg = parse_json(text, f"{source}: {CONFIG_NAME}")
    except (UnicodeDecodeError, CheckpointError) as e:
        raise _refuse(source, str(e)) from None
    lora = _PeftLora(cfg, source)
    weights = _read_weights(folder, allow_pickle, source)

    errors: list[str] = []
    pairs: dict[str, dict[str, Tensor]] = {}  # module path -> {"A": ..., "B": ...}
    kinds: dict[str, str] = {}
    base_given: dict[str, Tensor] = {}
    prefixed = any(k.startswith(PREFIX) for k in weights)
    for key, v in weights.items():
        k = key[len(PREFIX):] if prefixed and key.startswith(PREFIX) else key
        m = _LORA_KEY.match(k) or _EMB_KEY.match(k)
        if m and (m.group("name") is None or m.group("name") != "weight"):
            p = m.group("path") or ""
            kind = m.group("kind")
            side = kind[-1]
            if side in pairs.setdefault(p, {}):
                errors.append(f"{key}: a second {kind} for module '{p}' (several adapters in one file?)")
            pairs[p][side] = v
            kinds[p] = "embedding" if "embedding" in kind else "linear"
            continue
        bad = next((what for marker, what in _UNSUPPORTED_KEYS if marker in k), None)
        if bad:
            errors.append(f"{key}: {bad} are not supported")
            continue
        base_key = k.replace(".base_layer.", ".") if ".base_layer." in k else k
        base_given[base_key] = v
    if errors:
        raise _refuse(source, errors)

    # Modules, kinds, ranks.
    unknown = [p for p in pairs if p not in model.layers]
    if unknown:
        errors.append(f"module(s) {unknown} are not adapted layers of this model (wrong base model?)")
    for p, sides in pairs.items():
        for side in "AB":
            if side not in sides:
                errors.append(f"module '{p}': lora_{side} is missing")
    if errors:
        raise _refuse(source, errors)
    paths = [p for p in model.layers if p in pairs]  # the model's order
    for p in paths:
        layer = model.layers[p]
        is_emb = isinstance(layer, LoRAEmbedding)
        if isinstance(layer, CustomLayer) or is_emb != (kinds[p] == "embedding"):
            errors.append(f"module '{p}': the file holds {'embedding' if kinds[p] == 'embedding' else 'linear/conv'} LoRA weights "
                          f"but the model's layer is {type(layer.base).__name__}")
            continue
        problem = _conv_problem(layer)
        if problem:
            errors.append(problem)
            continue
        a = pairs[p]["A"]
        if a.dim() == 0 or a.shape[0] == 0:
            errors.append(f"module '{p}': lora_A has shape {tuple(a.shape)}: rank must be > 0")
        elif a.shape[0] != lora.rank(p):
            errors.append(f"module '{p}': lora_A has rank {a.shape[0]} but the config gives r={lora.rank(p)} (r / rank_pattern)")
    for p in model.layers:
        selected = lora.selects(p)
        if selected is True and p not in pairs:
            errors.append(f"module '{p}' is selected by target_modules but has no weights in the file (missing keys "
                          f"{PREFIX}{_module_key(p, 'lora_A.weight')} / lora_B)")
        elif selected is False and p in pairs:
            errors.append(f"module '{p}' has weights in the file but target_modules does not select it (unexpected keys)")
    # Base weights carried along (save_embedding_layers): accepted only when equal to the model's.
    base_sd = model.state_dict()
    for k, v in base_given.items():
        if k not in base_sd:
            errors.append(f"unexpected key {PREFIX if prefixed else ''}{k}: neither a LoRA weight nor a weight of this model")
            continue
        t = base_sd[k]
        if not isinstance(v, Tensor) or tuple(v.shape) != tuple(t.shape) or not torch.equal(v.to(device=t.device, dtype=t.dtype), t):
            errors.append(f"the file carries base weight '{k}' (PEFT save_embedding_layers) and it differs from the model's "
                          f"({tuple(v.shape)} vs {tuple(t.shape)}): the adapter was trained with a modified or resized base. "
                          f"Load that weight into the base model first if that is intended")
    if errors:
        raise _refuse(source, errors)

    config = TaskConfig(ranks={p: lora.rank(p) for p in paths}, alphas={p: lora.alpha_for(p) for p in paths},
                        dropout=float(lora.dropout), rslora=lora.rslora, init="paper")
    tensors = {}
    for p in paths:
        tensors[_module_key(p, "lora_A.weight")] = pairs[p]["A"]
        tensors[_module_key(p, "lora_B.weight")] = pairs[p]["B"]
    _padding_warning(model, paths, "loading")
    return config, tensors, source


# --- saving --------------------------------------------------------------------------------------
def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def save_peft_adapter(model: Model, path: str | os.PathLike, task: str, *, task_type: str | None = None) -> None:
    """Write ``task`` as a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained(base_model, path)`` loads with the same outputs.

    ``task_type`` (e.g. ``"CAUSAL_LM"``) is written to the config for PEFT's model class choice.
    """
    model.task_config(task)  # (checks the name)
    config = model.task_config(task)
    paths = [p for p, layer in model.layers.items() if task in layer.adapters]
    errors = []
    for p in paths:
        layer = model.layers[p]
        if isinstance(layer, CustomLayer):
            errors.append(f"layer '{p}' is a registered custom type: PEFT cannot represent it")
        elif (problem := _conv_problem(layer)) is not None:
            errors.append(problem)
    if errors:
        raise ValueError(f"task {task!r} cannot be written as a PEFT adapter:\n  " + "\n  ".join(errors))
    _padding_warning(model, paths, "saving")

    names = [n for n, _ in model.model.named_modules() if n]
    # A path that is a dot-suffix of another module's name would also select that module in PEFT's
    # suffix matching: then list everything explicitly (regex target, every module in the patterns).
    ambiguous = any(n != p and n.endswith("." + p) for p in paths for n in names)
    r0 = _most_common([config.ranks[p] for p in paths])
    a0 = _most_common([config.alphas[p] for p in paths])
    order = sorted(paths, key=len, reverse=True)  # PEFT takes the first matching pattern: longest first
    rank_pattern = {re.escape(p): config.ranks[p] for p in order if ambiguous or config.ranks[p] != r0}
    alpha_pattern = {re.escape(p): config.alphas[p] for p in order if ambiguous or config.alphas[p] != a0}
    targets: Any = ("^(?:" + "|".join(re.escape(p) for p in order) + ")$") if ambiguous else list(paths)
    convs1d = [p for p in paths if isinstance(model.layers[p], LoRAHFConv1D)]
    name_or_path = getattr(getattr(model.model, "config", None), "name_or_path", None) or None
    cfg = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": name_or_path,
        "r": r0, "lora_alpha": a0, "lora_dropout": config.dropout, "use_rslora": config.rslora,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "target_modules": targets,
        "fan_in_fan_out": bool(convs1d) and len(convs1d) == len([p for p in paths if not isinstance(model.layers[p], LoRAEmbedding)]),
        "bias": "none", "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_dora": False,
    }
    tensors = {}
    for p in paths:
        ad = model.layers[p].adapters[task]
        emb = isinstance(model.layers[p], LoRAEmbedding)
        tensors[PREFIX + _module_key(p, "lora_embedding_A" if emb else "lora_A.weight")] = ad.lora_A.weight
        tensors[PREFIX + _module_key(p, "lora_embedding_B" if emb else "lora_B.weight")] = ad.lora_B.weight
    # Both files or neither: a crash between them must never pair new weights with an old config.
    atomic_save_folder(path, {WEIGHTS_NAME: lambda f: atomic_save_safetensors(tensors, f, {"format": "pt"}),
                              CONFIG_NAME: lambda f: atomic_write_text(f, json.dumps(cfg, indent=2) + "\n")})
