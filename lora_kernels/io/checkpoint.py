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
from ..validation import CheckpointError, check_value, is_int, is_num, refuse, stage

__all__ = ["CheckpointError", "save_task", "load_task", "save_checkpoint", "load_checkpoint", "full_state_dict",
           "load_full_state_dict", "task_configs", "add_tasks"]

FORMAT = 1
META_KEY = "lora_kernels"
TASK_PREFIX = "@tasks."  # full checkpoints: "@tasks.<task>.<key>" (task names hold no '.')
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


_refuse = refuse  # (kept for the module's own call sites)


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
        os.chmod(tmp, _mode_for(path, 0o666))
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
        os.chmod(tmp, _mode_for(path, 0o666))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mode_for(path: str, default: int) -> int:
    """The permissions a rewritten ``path`` keeps (its own when it exists, else ``default`` less the
    umask): temp files are created 0600, and a re-save must not turn a shared 0644 file private."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0o022)  # read the umask (there is no other way), then put it back
        os.umask(umask)
        return default & ~umask


def atomic_save_folder(path: str | os.PathLike, files: Mapping[str, Any]) -> None:
    """Write several files as one folder, all or nothing: into a temporary folder next to ``path``,
    then swapped in by renames. ``files`` maps a file name to ``write(file_path)``.

    Files of an existing folder that are not rewritten (a README, a tokenizer) are carried over. A
    crash never leaves a mix of old and new files under ``path``: at worst (between the two renames)
    the old folder waits under ``.<name>.*.old`` and the new one under ``.<name>.*.tmp``.
    """
    import shutil

    folder = os.path.abspath(os.fspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"'{folder}' exists and is not a folder")
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + name + ".", suffix=".tmp")
    try:
        for file_name, write in files.items():
            write(os.path.join(tmp, file_name))
        if os.path.isdir(folder):
            for entry in os.listdir(folder):
                if entry in files:
                    continue
                src = os.path.join(folder, entry)
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, os.path.join(tmp, entry), symlinks=True)
                else:
                    shutil.copy2(src, os.path.join(tmp, entry), follow_symlinks=False)
        os.chmod(tmp, _mode_for(folder, 0o777))
        if os.path.isdir(folder):
            old = tmp[: -len(".tmp")] + ".old"
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    if not os.path.isfile(path):  # a FIFO or device would block the read (or never end)
        raise _refuse(source, "it is not a regular file (a pipe, socket or device); write it to a file first")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    looks_safetensors = size >= 10 and header_len <= size - 8 and head[8:9] == b"{"
    # Safetensors first: its first byte is the low byte of the header length, 0x80 for 1 in 256
    # lengths, so "starts with 0x80" alone would refuse valid files as pickles.
    if not looks_safetensors and (head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"):  # torch.save's zip, or a pickle
        raise _refuse(source, _pickle_message(path))
    if not looks_safetensors:
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


_is_int, _is_num = is_int, is_num


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
    return [p for p, layer in model.layers.items() if isinstance(layer, CustomLayer) and task in layer.adapters]


def task_module_paths(model: Model, task: str) -> list[str]:
    return [p for p, layer in model.layers.items() if task in layer.adapters]


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
    if isinstance(v, Tensor) and not v.is_meta and not v.dtype.is_floating_point:
        return [f"{k}: dtype {v.dtype} refused: LoRA weights must be floating point (they are cast to the model's {dtype})"]
    return check_value(k, v, shape, dtype, finite=True)


def _prevalidate(model: Model, config: TaskConfig, custom: list[str], tensors: Mapping[str, Tensor]) -> list[str]:
    """Checks possible before the task exists: module paths, key set and shapes of built-in layers."""
    errors = []
    paths = list(config.ranks) + custom
    unknown = [p for p in paths if p not in model.layers]
    if unknown:
        return [f"module path(s) {unknown} are not adapted layers of this model; adapted layers: {list(model.layers)}"]
    wrong_kind = [p for p in config.ranks if isinstance(model.layers[p], CustomLayer)]
    wrong_kind += [p for p in custom if not isinstance(model.layers[p], CustomLayer)]
    if wrong_kind:
        return [f"module path(s) {wrong_kind} are of another layer kind in this model (custom vs built-in)"]
    targets: dict[str, tuple] = {}
    for p, r in config.ranks.items():
        shapes = expected_shapes(model.layers[p], r)
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
            dtype = model.layers[k.rsplit(".", 2)[0] if k.count(".") >= 2 else ""].base.weight.dtype
            errors += _check_value(k, tensors[k], shape, dtype)
    for k, v in tensors.items():  # custom layers' entries: their shapes are checked when the task is built
        if k not in targets and isinstance(v, Tensor) and v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
            errors.append(f"{k}: holds NaN or Inf values")
    return errors


def _compatibility(model: Model, task: str, config: TaskConfig, custom: list[str]) -> list[str]:
    have = model.task_config(task)
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
            t.copy_(tensors[k])  # values staged to the parameter's dtype and device; storage unchanged


def load_into_task(model: Model, task: str, config: TaskConfig | None, custom: list[str], tensors: Mapping[str, Tensor],
                   source: str) -> None:
    """Validate ``tensors`` for ``task`` and write them: into the existing task in place (hot-swap),
    or into a new task made with ``config``. Refuses (``CheckpointError``) without changing anything."""
    from .merge import merged_task

    if not isinstance(task, str):
        raise TypeError(f"a task name is a str, got {type(task).__name__}: {task!r}")
    if task in model.tasks:
        if merged_task(model) == task:
            raise _refuse(source, f"task {task!r} is merged into the base weights; unmerge() before replacing its weights")
        if config is not None:
            errors = _compatibility(model, task, config, custom)
            if errors:
                raise _refuse(source, [f"the file does not fit the existing task {task!r}:"] + errors)
        targets = model.state_dict(task=task, keep_vars=True)
        errors = _check_tensors(tensors, targets)
        if errors:
            raise _refuse(source, errors)
        staged = stage(tensors, targets, source)
        try:
            with model.changing(f"reload task {task!r}", [task]):
                _copy_in(targets, staged)
        except RuntimeError as e:
            raise _refuse(source, str(e)) from None
        return
    if config is None:
        raise _refuse(source, f"it has no lora_kernels task config, so task {task!r} cannot be created from it; create it with "
                              "add_task(...) first and load into it")
    errors = _prevalidate(model, config, custom, tensors)
    if errors:
        raise _refuse(source, errors)
    try:  # the weights are written before the task is published: no call sees its fresh init
        model.add_task(task, rank=dict(config.ranks), alpha=dict(config.alphas), dropout=config.dropout, init=config.init,
                       rslora=config.rslora, modules=[p for p in model.layers if p in config.ranks or p in custom],
                       weights=tensors)
    except (ValueError, TypeError, RuntimeError) as e:
        raise _refuse(source, f"the task could not be created: {e}") from None


# --- task files ----------------------------------------------------------------------------------
def save_task(model: Model, path: str | os.PathLike, task: str) -> None:
    """Write ``task`` to ``path`` (safetensors) with its config as metadata, atomically."""
    from .. import __version__

    model.task_config(task)  # (checks the name)
    config = model.task_config(task)
    meta = {"format": FORMAT, "version": __version__, "task": task, **config_to_dict(config, custom_modules(model, task))}
    atomic_save_safetensors(model.state_dict(task=task), path, {"format": "pt", META_KEY: json.dumps(meta)})


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
    return {t: config_to_dict(c, custom_modules(model, t)) for t, c in ((t, model.task_config(t)) for t in model.tasks)}


def add_tasks(model: Model, configs: Mapping[str, Any]) -> None:
    """Create the tasks described by :func:`task_configs` that the model lacks (weights as at init).

    Existing tasks must be compatible. All-or-nothing: on error the tasks created here are removed.
    """
    parsed = {t: config_from_dict(c, f"config of task {t!r}") for t, c in configs.items()}
    errors = []
    for t, (config, custom) in parsed.items():
        if t in model.tasks:
            errors += _compatibility(model, t, config, custom)
    if errors:
        raise CheckpointError("refusing to add the tasks (nothing was changed):\n  " + "\n  ".join(errors))
    created = []
    try:
        for t, (config, custom) in parsed.items():
            if t not in model.tasks:
                model.add_task(t, rank=dict(config.ranks), alpha=dict(config.alphas), dropout=config.dropout, init=config.init,
                               rslora=config.rslora, modules=[p for p in model.layers if p in config.ranks or p in custom])
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
    for t in model.tasks:
        for k, v in model.state_dict(task=t, keep_vars=True).items():  # the live tensors (pool slots), detached
            out[f"{TASK_PREFIX}{t}.{k}"] = v.detach()
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
    extra_tasks = [t for t in model.tasks if t not in task_sds]
    if extra_tasks:
        errors.append(f"the model has task(s) {extra_tasks} that the checkpoint lacks (remove_task them first)")
    for t, tsd in task_sds.items():
        if t in model.tasks:
            compat = _compatibility(model, t, *parsed[t]) if t in parsed else []
            errors += compat or [f"task {t!r}: {e}" for e in _check_tensors(tsd, model.state_dict(task=t, keep_vars=True))]
        elif t not in parsed:
            errors.append(f"task {t!r} is not in the model and the checkpoint carries no config for it")
        else:
            errors += [f"task {t!r}: {e}" for e in _prevalidate(model, *parsed[t], tsd)]
    if errors:
        raise _refuse(source, errors)
    # Existing tasks and the base: converted before anything is written or created.
    task_targets = {t: model.state_dict(task=t, keep_vars=True) for t in task_sds if t in model.tasks}
    staged_base = stage(base_sd, base_targets, source)
    staged_tasks = {t: stage(task_sds[t], targets, source) for t, targets in task_targets.items()}
    with model.changing("load a full checkpoint"):
        _load_full(model, sd, configs, source, parsed, task_sds, base_targets, task_targets, staged_base, staged_tasks)


def _load_full(model, sd, configs, source, parsed, task_sds, base_targets, task_targets, staged_base, staged_tasks) -> None:
    created = []
    try:  # new tasks are created with their weights (published complete); existing ones are written below
        # The checkpoint's task order (its configs; safetensors sorts the tensors' keys): every
        # process of a DDP job must create tasks, hence parameters, in the same order.
        for t in [*(t for t in parsed if t in task_sds), *(t for t in task_sds if t not in parsed)]:
            if t not in model.tasks:
                config, custom = parsed[t]
                model.add_task(t, rank=dict(config.ranks), alpha=dict(config.alphas), dropout=config.dropout, init=config.init,
                               rslora=config.rslora, modules=[p for p in model.layers if p in config.ranks or p in custom],
                               weights=task_sds[t])
                created.append(t)
    except BaseException as e:
        for t in created:
            model.remove_task(t)
        if isinstance(e, (ValueError, TypeError, RuntimeError)) and not isinstance(e, CheckpointError):
            raise _refuse(source, f"a task could not be created: {e}") from None
        raise
    _copy_in(base_targets, staged_base)
    for t, targets in task_targets.items():
        _copy_in(targets, staged_tasks[t])


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
    for t in model.tasks:
        for k, v in model.state_dict(task=t).items():
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
