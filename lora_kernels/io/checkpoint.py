"""Task checkpoints (safetensors + config metadata) and full checkpoints (base + every task).

Loading is where data gets lost and code gets executed, so every load here

- reads **safetensors only**: a pickle file (``.pt``/``.bin``/zip archives) is refused with the way to
  convert it, and is never unpickled;
- checks **everything before writing anything**: the exact key set (missing and unexpected keys are
  named), shapes (``A [r, in]``, ``B [out, r]``, ``r > 0`` and the same for A and B), dtypes
  (floating point only, cast to the model's dtype), finite values (after the cast, so an fp32 value
  that overflows fp16 is caught) and every config field's type;
- leaves the model exactly as it was when it refuses: no half-made task, existing tasks untouched;
- writes **in place** into an existing task (hot-swap): the same tensors keep their storage, so a
  ``torch.compile``d model keeps its graph and captured CUDA graphs stay valid.

Files are written atomically: a temporary file in the same folder, flushed, then ``os.replace``d
onto the real name, so a crash mid-save never leaves a truncated checkpoint under that name.

File format of :func:`save_task`: tensors under the task's state-dict keys (``<path>.lora_A.weight``,
``<path>.lora_B.weight``) and the metadata entry ``"lora_kernels"``: a JSON object
``{"format": 1, "version": ..., "task": ..., "ranks": {path: int}, "alphas": {path: float},
"rslora": bool, "dropout": float, "init": str, "custom_modules": [path, ...]}``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from typing import Any, Mapping

import torch
from torch import Tensor

from ..layers import CustomLayer, LoRAConv, LoRAEmbedding, LoRAHFConv1D, LoRALayer, LoRALinear
from ..layers.base import INITS
from ..model import Model, TaskConfig

__all__ = ["CheckpointError", "save_task", "load_task", "save_checkpoint", "load_checkpoint", "full_state_dict",
           "load_full_state_dict", "task_configs", "add_tasks"]

FORMAT = 1
META_KEY = "lora_kernels"
TASK_PREFIX = "@tasks."  # full checkpoints: "@tasks.<task>.<key>" (task names hold no '.')
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class CheckpointError(ValueError):
    """A file or state dict was refused; the model was not changed."""


def _refuse(source: str, problems: list[str] | str) -> CheckpointError:
    if isinstance(problems, str):
        problems = [problems]
    return CheckpointError(f"refusing to load {source} (nothing was changed):\n  " + "\n  ".join(problems))


# --- files ---------------------------------------------------------------------------------------
def atomic_save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    # Copies on the CPU, contiguous and unshared: safetensors refuses views of one storage.
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(cpu, tmp, metadata=dict(metadata))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _pickle_message(path: str) -> str:
    return (f"'{path}' is a pickle file (torch.save / .bin / .pt); lora_kernels never unpickles files, because "
            "unpickling runs arbitrary code. If you trust it, convert it once with safetensors: "
            "`import torch, safetensors.torch as st; st.save_file(torch.load(p, weights_only=True), p + '.safetensors')`, "
            "then load the task into an existing task (add_task first) or use "
            "model.load_state_dict(..., task=...) followed by model.save_task(...)")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (on the CPU) and metadata of a safetensors file; anything else is refused.

    The file is sniffed, not trusted by its name: zip archives (``torch.save``) and pickle streams
    are refused with a conversion hint and never unpickled; a truncated or corrupt header is a
    :class:`CheckpointError`.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    source = f"'{path}'"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: '{path}'")
    if os.path.isdir(path):
        raise _refuse(source, "it is a folder, not a safetensors file (a PEFT adapter folder loads with load_peft_adapter)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    # torch.save's zip archive, or a pickle stream (0x80 = PROTO; a safetensors header length can also
    # start with 0x80, e.g. 1920 bytes, and then byte 8 opens its JSON)
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[8:9] != b"{"):
        raise _refuse(source, _pickle_message(path))
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if size < 10 or header_len > size - 8 or head[8:9] != b"{":
        if path.lower().endswith(PICKLE_SUFFIXES):  # named like a pickle (old protocols have no magic)
            raise _refuse(source, _pickle_message(path))
        if size < 10:
            raise _refuse(source, f"the file has {size} bytes: too short to be safetensors (truncated?)")
        raise _refuse(source, f"not a safetensors file or truncated: header says {header_len} bytes of JSON, the file has {size - 8} after the length")
    try:
        tensors = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors' own checks: offsets past the end, bad JSON, bad dtype ...
        raise _refuse(source, f"corrupt or truncated safetensors file: {type(e).__name__}: {e}") from None
    return tensors, metadata


# --- configs -------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in JSON")


def parse_json(text: str, what: str) -> Any:
    """Strict JSON: NaN / Infinity are refused (Python's json accepts them by default)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{what} is not valid JSON: {e}") from None


def config_to_dict(config: TaskConfig, custom_modules: list[str] = ()) -> dict[str, Any]:
    return {"ranks": dict(config.ranks), "alphas": dict(config.alphas), "rslora": config.rslora,
            "dropout": config.dropout, "init": config.init, "custom_modules": list(custom_modules)}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def config_from_dict(obj: Any, what: str) -> tuple[TaskConfig, list[str]]:
    """Type-check a config dict (from JSON): ``(TaskConfig, custom module paths)``."""
    errors = []
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    known = {"ranks", "alphas", "rslora", "dropout", "init", "custom_modules", "format", "version", "task"}
    unknown = sorted(set(obj) - known)
    if unknown:
        errors.append(f"unknown field(s) {unknown} (a newer file format?)")
    ranks, alphas = obj.get("ranks"), obj.get("alphas")
    if not isinstance(ranks, dict) or not all(isinstance(k, str) and _is_int(v) and v > 0 for k, v in ranks.items()):
        errors.append(f"'ranks' must map module paths to positive ints, got {ranks!r}")
    if not isinstance(alphas, dict) or not all(isinstance(k, str) and _is_num(v) and v != 0 for k, v in alphas.items()):
        errors.append(f"'alphas' must map module paths to finite non-zero numbers, got {alphas!r}")
    elif isinstance(ranks, dict) and set(ranks) != set(alphas):
        errors.append(f"'ranks' and 'alphas' name different modules: {sorted(set(ranks) ^ set(alphas))}")
    rslora, dropout, init = obj.get("rslora", False), obj.get("dropout", 0.0), obj.get("init", "paper")
    if not isinstance(rslora, bool):
        errors.append(f"'rslora' must be true or false, got {rslora!r}")
    if not _is_num(dropout) or not 0.0 <= dropout < 1.0:
        errors.append(f"'dropout' must be a number in [0, 1), got {dropout!r}")
    if not isinstance(init, str) or init not in INITS:
        errors.append(f"'init' must be one of {INITS}, got {init!r}")
    custom = obj.get("custom_modules", [])
    if not isinstance(custom, list) or not all(isinstance(p, str) for p in custom):
        errors.append(f"'custom_modules' must be a list of module paths, got {custom!r}")
    if "format" in obj and obj["format"] != FORMAT:
        errors.append(f"'format' {obj['format']!r} is not supported (this version reads format {FORMAT})")
    if errors:
        raise CheckpointError(f"{what} has a bad config:\n  " + "\n  ".join(errors))
    config = TaskConfig(ranks=dict(ranks), alphas={k: float(v) for k, v in alphas.items()}, dropout=float(dropout),
                        rslora=rslora, init=init)
    return config, list(custom)


def custom_modules(model: Model, task: str) -> list[str]:
    return [p for p, layer in model._layers.items() if isinstance(layer, CustomLayer) and task in layer.adapters]


def task_module_paths(model: Model, task: str) -> list[str]:
    return [p for p, layer in model._layers.items() if task in layer.adapters]


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def expected_shapes(layer: LoRALayer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(A shape, B shape)`` of a rank-``r`` adapter of a built-in layer (None for other types)."""
    base = layer.base
    if isinstance(layer, (LoRALinear, LoRAEmbedding, LoRAHFConv1D)):
        n_in, n_out = layer.dims()
        return (r, n_in), (n_out, r)
    if isinstance(layer, LoRAConv):
        g = base.groups
        k = tuple(base.weight.shape[2:])
        return (r, base.in_channels // g, *k), (base.out_channels, r // g, *(1,) * len(k))
    return None


# --- the core: validate, then create or hot-swap -------------------------------------------------
def _check_tensors(given: Mapping[str, Any], targets: Mapping[str, Tensor]) -> list[str]:
    """Exact key set, shapes, dtype policy and finiteness of ``given`` against ``targets``."""
    errors = []
    missing = [k for k in targets if k not in given]
    unexpected = [k for k in given if k not in targets]
    if missing:
        errors.append(f"missing keys: {missing}")
    if unexpected:
        errors.append(f"unexpected keys: {unexpected}")
    for k, t in targets.items():
        v = given.get(k)
        if v is None:
            continue
        errors += _check_value(k, v, t.shape, t.dtype)
    return errors


def _check_value(k: str, v: Any, shape, dtype: torch.dtype) -> list[str]:
    if not isinstance(v, Tensor):
        return [f"{k}: expected a tensor, got {type(v).__name__}"]
    if tuple(v.shape) != tuple(shape):
        return [f"{k}: shape {tuple(v.shape)} does not match the model's {tuple(shape)}"]
    if not v.dtype.is_floating_point:
        return [f"{k}: dtype {v.dtype} refused: LoRA weights must be floating point (they are cast to the model's {dtype})"]
    if not bool(torch.isfinite(v).all()):
        return [f"{k}: holds NaN or Inf values"]
    if v.dtype != dtype and not bool(torch.isfinite(v.to(dtype)).all()):
        return [f"{k}: values overflow the model's dtype {dtype} (cast from {v.dtype})"]
    return []


def _prevalidate(model: Model, config: TaskConfig, custom: list[str], tensors: Mapping[str, Tensor]) -> list[str]:
    """Checks possible before the task exists: module paths, key set and shapes of built-in layers."""
    errors = []
    paths = list(config.ranks) + custom
    unknown = [p for p in paths if p not in model._layers]
    if unknown:
        return [f"module path(s) {unknown} are not adapted layers of this model; adapted layers: {list(model._layers)}"]
    wrong_kind = [p for p in config.ranks if isinstance(model._layers[p], CustomLayer)]
    wrong_kind += [p for p in custom if not isinstance(model._layers[p], CustomLayer)]
    if wrong_kind:
        return [f"module path(s) {wrong_kind} are of another layer kind in this model (custom vs built-in)"]
    targets: dict[str, tuple] = {}
    for p, r in config.ranks.items():
        shapes = expected_shapes(model._layers[p], r)
        if shapes is None:
            continue
        targets[_key(p, "lora_A.weight")], targets[_key(p, "lora_B.weight")] = shapes
    known_prefixes = tuple(_key(p, "") for p in custom) if custom else ()
    given_builtin = {k: v for k, v in tensors.items() if not (known_prefixes and k.startswith(known_prefixes))}
    missing = [k for k in targets if k not in given_builtin]
    unexpected = [k for k in given_builtin if k not in targets]
    if missing:
        errors.append(f"missing keys: {missing}")
    if unexpected:
        errors.append(f"unexpected keys: {unexpected}")
    for k, shape in targets.items():
        if k in tensors:
            dtype = model._layers[k.rsplit(".", 2)[0] if k.count(".") >= 2 else ""].base.weight.dtype
            errors += _check_value(k, tensors[k], shape, dtype)
    return errors


def _compatibility(model: Model, task: str, config: TaskConfig, custom: list[str]) -> list[str]:
    have = model._tasks[task]
    errors = []
    if set(have.ranks) != set(config.ranks) or set(custom_modules(model, task)) != set(custom):
        mine = set(task_module_paths(model, task))
        theirs = set(config.ranks) | set(custom)
        errors.append(f"the task adapts other modules: only in the model {sorted(mine - theirs)}, only in the file {sorted(theirs - mine)}")
    else:
        diff_r = {p: (have.ranks[p], r) for p, r in config.ranks.items() if have.ranks[p] != r}
        if diff_r:
            errors.append(f"ranks differ (model, file): {diff_r}")
        diff_a = {p: (have.alphas[p], a) for p, a in config.alphas.items() if have.alphas[p] != a}
        if diff_a:
            errors.append(f"alphas differ (model, file): {diff_a}")
    if have.rslora != config.rslora:
        errors.append(f"rslora differs (model {have.rslora}, file {config.rslora})")
    if have.dropout != config.dropout:
        errors.append(f"dropout differs (model {have.dropout}, file {config.dropout})")
    if errors:
        errors.append(f"to replace the task, remove_task({task!r}) first or load it under another name")
    return errors


def _copy_in(targets: Mapping[str, Tensor], tensors: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(tensors[k])  # casts to the parameter's dtype and device; storage unchanged


def load_into_task(model: Model, task: str, config: TaskConfig | None, custom: list[str], tensors: Mapping[str, Tensor],
                   source: str) -> None:
    """Validate ``tensors`` for ``task`` and write them: into the existing task in place (hot-swap),
    or into a new task made with ``config``. Refuses (``CheckpointError``) without changing anything."""
    from .merge import merged_task

    if not isinstance(task, str):
        raise TypeError(f"a task name is a str, got {type(task).__name__}: {task!r}")
    if task in model._tasks:
        if merged_task(model) == task:
            raise _refuse(source, f"task {task!r} is merged into the base weights; unmerge() before replacing its weights")
        if config is not None:
            errors = _compatibility(model, task, config, custom)
            if errors:
                raise _refuse(source, [f"the file does not fit the existing task {task!r}:"] + errors)
        targets = model._task_state(task, keep_vars=True)
        errors = _check_tensors(tensors, targets)
        if errors:
            raise _refuse(source, errors)
        _copy_in(targets, tensors)
        for layer in model._layers.values():
            layer.clear_cache()
        return
    if config is None:
        raise _refuse(source, f"it has no lora_kernels task config, so task {task!r} cannot be created from it; create it with "
                              "add_task(...) first and load into it")
    errors = _prevalidate(model, config, custom, tensors)
    if errors:
        raise _refuse(source, errors)
    try:
        model.add_task(task, rank=dict(config.ranks), alpha=dict(config.alphas), dropout=config.dropout, init=config.init,
                       rslora=config.rslora, modules=[p for p in model._layers if p in config.ranks or p in custom])
    except (ValueError, TypeError) as e:
        raise _refuse(source, f"the task could not be created: {e}") from None
    try:
        targets = model._task_state(task, keep_vars=True)
        errors = _check_tensors(tensors, targets)
        if errors:
            raise _refuse(source, errors)
        _copy_in(targets, tensors)
    except BaseException:
        model.remove_task(task)  # no half-made task
        raise


# --- task files ----------------------------------------------------------------------------------
def save_task(model: Model, path: str | os.PathLike, task: str) -> None:
    """Write ``task`` to ``path`` (safetensors) with its config as metadata, atomically."""
    from .. import __version__

    model._check_task(task)
    config = model._tasks[task]
    meta = {"format": FORMAT, "version": __version__, "task": task, **config_to_dict(config, custom_modules(model, task))}
    atomic_save_safetensors(model._task_state(task), path, {"format": "pt", META_KEY: json.dumps(meta)})


def read_task_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], TaskConfig | None, list[str]]:
    tensors, metadata = read_safetensors(path)
    if META_KEY not in metadata:
        return tensors, None, []
    config, custom = config_from_dict(parse_json(metadata[META_KEY], f"'{os.fspath(path)}' metadata"), f"'{os.fspath(path)}'")
    return tensors, config, custom


def load_task(model: Model, path: str | os.PathLike, task: str) -> None:
    """Load ``task`` from a file written by :func:`save_task` (or any safetensors file with the task's
    keys, into an existing task). Created from the file's config when absent; loaded in place
    (hot-swap, same tensors) when present and compatible (same modules, ranks, alphas, rslora,
    dropout). Refuses anything else without changing the model."""
    source = f"'{os.fspath(path)}'"
    try:
        tensors, config, custom = read_task_file(path)
    except CheckpointError as e:
        if str(e).startswith("refusing"):
            raise
        raise _refuse(source, str(e)) from None
    load_into_task(model, task, config, custom, tensors, source)


# --- full checkpoints: base + every task ----------------------------------------------------------
def task_configs(model: Model) -> dict[str, dict[str, Any]]:
    """Every task's config as JSON-able dicts, in task order (rebuild them with :func:`add_tasks`)."""
    return {t: config_to_dict(c, custom_modules(model, t)) for t, c in model._tasks.items()}


def add_tasks(model: Model, configs: Mapping[str, Any]) -> None:
    """Create the tasks described by :func:`task_configs` that the model lacks (weights as at init).

    Existing tasks must be compatible. All-or-nothing: on error the tasks created here are removed.
    """
    parsed = {t: config_from_dict(c, f"config of task {t!r}") for t, c in configs.items()}
    errors = []
    for t, (config, custom) in parsed.items():
        if t in model._tasks:
            errors += _compatibility(model, t, config, custom)
    if errors:
        raise CheckpointError("refusing to add the tasks (nothing was changed):\n  " + "\n  ".join(errors))
    created = []
    try:
        for t, (config, custom) in parsed.items():
            if t not in model._tasks:
                model.add_task(t, rank=dict(config.ranks), alpha=dict(config.alphas), dropout=config.dropout, init=config.init,
                               rslora=config.rslora, modules=[p for p in model._layers if p in config.ranks or p in custom])
                created.append(t)
    except BaseException:
        for t in created:
            model.remove_task(t)
        raise


def full_state_dict(model: Model) -> dict[str, Tensor]:
    """Base model and every task in one flat dict: the base under the original model's keys, each
    task under ``"@tasks.<task>.<key>"``. The values share storage with the model, so
    ``torch.distributed.checkpoint.load(full_state_dict(model), ...)`` loads in place."""
    from .merge import merged_task

    if merged_task(model) is not None:
        raise RuntimeError(f"task {merged_task(model)!r} is merged into the base weights; unmerge() before taking a full state dict")
    out = dict(model.state_dict())
    for t in model._tasks:
        for k, v in model._task_state(t).items():
            out[f"{TASK_PREFIX}{t}.{k}"] = v
    return out


def _split_full(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    base, tasks = {}, {}
    for k, v in sd.items():
        if k.startswith(TASK_PREFIX):
            t, _, rest = k[len(TASK_PREFIX):].partition(".")
            tasks.setdefault(t, {})[rest] = v
        else:
            base[k] = v
    return base, tasks


def load_full_state_dict(model: Model, sd: Mapping[str, Tensor], configs: Mapping[str, Any] | None = None,
                         source: str = "the full state dict") -> None:
    """Load what :func:`full_state_dict` gave: base and every task (tasks missing from the model are
    created from ``configs``). Everything is checked first; the model's task set must equal the
    state dict's. Base floating tensors are cast to the model's dtype, other base tensors must match."""
    from .merge import merged_task

    if merged_task(model) is not None:
        raise _refuse(source, f"task {merged_task(model)!r} is merged into the base weights; unmerge() first")
    base_sd, task_sds = _split_full(sd)
    parsed = {t: config_from_dict(c, f"config of task {t!r}") for t, c in (configs or {}).items()}
    base_targets = model.state_dict(keep_vars=True)
    _, _, base_errors = model.state_errors(base_sd, base_targets)
    errors = [f"base: {e}" for e in base_errors]
    extra_tasks = [t for t in model._tasks if t not in task_sds]
    if extra_tasks:
        errors.append(f"the model has task(s) {extra_tasks} that the checkpoint lacks (remove_task them first)")
    for t, tsd in task_sds.items():
        if t in model._tasks:
            compat = _compatibility(model, t, *parsed[t]) if t in parsed else []
            errors += compat or [f"task {t!r}: {e}" for e in _check_tensors(tsd, model._task_state(t, keep_vars=True))]
        elif t not in parsed:
            errors.append(f"task {t!r} is not in the model and the checkpoint carries no config for it")
        else:
            errors += [f"task {t!r}: {e}" for e in _prevalidate(model, *parsed[t], tsd)]
    if errors:
        raise _refuse(source, errors)
    created = []
    try:
        for t in task_sds:
            if t not in model._tasks:
                add_tasks(model, {t: configs[t]})
                created.append(t)
        task_targets = {t: model._task_state(t, keep_vars=True) for t in task_sds}
        errors = [f"task {t!r}: {e}" for t in created for e in _check_tensors(task_sds[t], task_targets[t])]
        if errors:
            raise _refuse(source, errors)
    except BaseException:
        for t in created:
            model.remove_task(t)
        raise
    _copy_in(base_targets, base_sd)
    for t, targets in task_targets.items():
        _copy_in(targets, task_sds[t])
    for layer in model._layers.values():
        layer.clear_cache()


def save_checkpoint(model: Model, path: str | os.PathLike) -> None:
    """Base model and every task in one safetensors file (atomically), task configs as metadata.

    While a task is merged, the unmerged base weights are saved (the merge is not part of the file).
    """
    from .. import __version__
    from .merge import merged_state

    state = merged_state(model)
    sd = dict(model.state_dict())
    if state is not None:
        for p, original in state.originals.items():
            sd[_key(p, "weight")] = original
    for t in model._tasks:
        for k, v in model._task_state(t).items():
            sd[f"{TASK_PREFIX}{t}.{k}"] = v
    # Tied weights (one tensor under two keys) are stored once per key: safetensors refuses shared storage.
    meta = {"format": FORMAT, "version": __version__, "tasks": task_configs(model)}
    atomic_save_safetensors(sd, path, {"format": "pt", META_KEY: json.dumps(meta)})


def load_checkpoint(model: Model, path: str | os.PathLike) -> None:
    """Load a :func:`save_checkpoint` file: base weights and every task (created when absent)."""
    source = f"'{os.fspath(path)}'"
    tensors, metadata = read_safetensors(path)
    if META_KEY not in metadata:
        raise _refuse(source, "it has no lora_kernels metadata: not a file written by save_checkpoint")
    meta = parse_json(metadata[META_KEY], f"{source} metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), dict) or meta.get("format") != FORMAT:
        raise _refuse(source, f"its lora_kernels metadata is not a full-checkpoint header of format {FORMAT}")
    try:
        load_full_state_dict(model, tensors, meta["tasks"], source)
    except CheckpointError as e:
        if str(e).startswith("refusing"):
            raise
        raise _refuse(source, str(e)) from None
