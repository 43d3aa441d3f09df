"""Quantized checkpoints: a folder with ``quantized.safetensors`` and ``mobiquant.json``.

The tensor file holds what a packed MoBiQuant model adds to its base model: per MoBiLinear the
bit-plane codes (``plane0..planeK-1``), fp16 steps and zero points, and bias; per router its MLP, its
current threshold and its bits->threshold table; the budget plan, when the model has one (``plan.*``:
the deployed per-linear thresholds at every grid budget, :mod:`mobiquant.elastic.plan`). The JSON names the
format version, the MoBiQuant config, the router sites, the base model (reference and fingerprint) and
the tensor file's sha256, and its own sha256 (``meta_sha256``, over its canonical JSON without that key).
Loading checks the JSON (checksum, then a schema: keys, types, a plain tensor file name, the compute dtype,
the config's fields) and, per linear, the stored tensors' shapes against what the config implies. Files
are written to temporary names and renamed into place, JSON last: a folder whose JSON exists is complete.

:func:`mobiquant.hf.export_hf` (``python -m mobiquant.hf export``) writes such a folder, with its base
model, as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads (:mod:`mobiquant.hf`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..elastic.plan import BudgetPlan
from ..nn.linear import MoBiLinear
from ..patching import budget_plan, find_blocks, fuse_sites, install_plan, mobi_linears, quantize_model, routers
from ..quant.config import MoBiConfig
from .fileio import discard, ensure_dir, fsync_dir, sha256_file, stage_bytes, writing

FORMAT = "mobiquant"
FORMAT_VERSION = 3
#: Versions this code reads: 1 (no budget plan), 2 (an optional budget plan: ``plan.*`` tensors, ``plan`` key),
#: 3 (``config.view_steps``: with it true, every linear's ``scale``/``zero`` hold a pair per view,
#: ``[K, out, n_groups]``; absent in versions 1 and 2, read as false).
READABLE_VERSIONS = (1, 2, 3)
CONFIG_NAME = "mobiquant.json"
TENSORS_NAME = "quantized.safetensors"
#: The compute dtypes a checkpoint may name (``torch.<name>``).
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
#: Word sizes of the packed bit-planes (:mod:`mobiquant.quant.packing`).
WORD_BITS = (8, 32)
#: The top-level keys of ``mobiquant.json`` and their JSON types: required, then optional.
REQUIRED_KEYS: dict[str, type] = {
    "format": str,
    "format_version": int,
    "config": dict,
    "sites": list,
    "compute_dtype": str,
    "base_model": dict,
    "tensors": dict,
}
OPTIONAL_KEYS: dict[str, type] = {"plan": dict, "extra": dict, "meta_sha256": str}
_BASE_MODEL_KEYS: dict[str, tuple[type, ...]] = {
    "name_or_path": (str, type(None)),
    "architecture": (str,),
    "fingerprint": (str,),
}
_TENSORS_KEYS: dict[str, tuple[type, ...]] = {"file": (str,), "sha256": (str,), "bytes": (int,), "count": (int,)}


class CheckpointError(RuntimeError):
    """A quantized checkpoint is missing, truncated, corrupted or does not fit the base model."""


def _architecture_hash(model: nn.Module) -> Any:
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    h.update(type(model).__name__.encode())
    if cfg is not None:
        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
            h.update(f"{key}={getattr(cfg, key, None)};".encode())
    return h


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the base model's architecture and input embedding (never quantized), bit for bit."""
    h = _architecture_hash(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        w = emb.weight.detach().float().reshape(-1)[: 1 << 20].cpu().contiguous()
        h.update(w.numpy().tobytes())
    return h.hexdigest()


#: Embedding values a checkpoint records of its base model (evenly strided), and how far a model loaded in another
#: dtype may round them: bf16 rounds to 2^-9 of a value, fp16 to 2^-12 (and below its normal range to 2^-25
#: absolute); another model's embedding differs by about its size.
BASE_SAMPLE = 512
BASE_SAMPLE_RTOL = 2.0**-7


def base_sample(model: nn.Module) -> dict[str, Any]:
    """The base model's architecture (sha256) and :data:`BASE_SAMPLE` values of its input embedding (fp32): what
    tells the same model apart from another in any floating dtype, where :func:`base_fingerprint` is exact."""
    out: dict[str, Any] = {"architecture_sha256": _architecture_hash(model).hexdigest(), "embedding_sample": []}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        w = emb.weight.detach().reshape(-1)
        n = min(BASE_SAMPLE, w.numel())
        idx = (torch.arange(n, dtype=torch.int64) * (w.numel() - 1)) // max(n - 1, 1)  # exact at any size
        idx = idx.to(w.device)
        out["embedding_sample"] = w[idx].float().cpu().tolist()
    return out


def same_base(model: nn.Module, base: dict) -> bool:
    """Whether ``model`` is the base model a checkpoint's ``base_model`` record describes: its exact fingerprint,
    or (a record with a sample) the same architecture and embedding values equal up to a dtype's rounding."""
    if base_fingerprint(model) == base["fingerprint"]:
        return True
    if "embedding_sample" not in base or "architecture_sha256" not in base:
        return False
    mine = base_sample(model)
    if mine["architecture_sha256"] != base["architecture_sha256"]:
        return False
    a = torch.tensor(mine["embedding_sample"], dtype=torch.float64)
    b = torch.tensor(base["embedding_sample"], dtype=torch.float64)
    if a.shape != b.shape:
        return False
    return bool(((a - b).abs() <= BASE_SAMPLE_RTOL * torch.maximum(a.abs(), b.abs()) + 2.0**-24).all())


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, m in mobi_linears(model):
        if not m.packed:
            raise CheckpointError(f"{name} is not packed: call mobiquant.freeze(model) before saving")
        for e in range(m.num_slices):
            state[f"{name}.plane{e}"] = m.plane(e)
        state[f"{name}.scale"] = m.scale
        state[f"{name}.zero"] = m.zero
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias
    for name, r in routers(model):
        for key, t in r.state_dict().items():
            state[f"{name}.{key}"] = t
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _serialize(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``state``: the same bytes for the same tensors, in every process.

    safetensors writes its metadata map in hash order, which changes from one process to the next; the
    header is written again with the metadata keys sorted (same length, same tensor entries and offsets).
    """
    data = save(state, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # pragma: no cover - serde_json writes the same compact JSON
        return data
    return data[:8] + text.ljust(n) + data[8 + n :]


def save_quantized(
    model: nn.Module, folder: str | os.PathLike, base_model: str | None = None, extra: dict | None = None
) -> Path:
    """Write ``model`` (packed) to ``folder`` atomically; returns the folder.

    Both files are first written in full to temporary names (this is where a full disk fails, leaving an
    earlier checkpoint in ``folder`` as it was). Then the old JSON is removed, the tensor file renamed into
    place and the new JSON last: at every instant the folder is the old checkpoint, an incomplete one
    (no JSON: calibrated anew by a resumed run), or the new one.
    """
    folder = ensure_dir(folder)
    cfg: MoBiConfig = model.mobiquant_config
    state = quantized_state(model)
    plan = budget_plan(model)
    if plan is not None:
        state.update(plan.state())
    dtypes = {str(m._compute_dtype).removeprefix("torch.") for _, m in mobi_linears(model)}
    data = _serialize(state, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "sites": model.mobiquant_sites,
        "compute_dtype": sorted(dtypes)[0] if dtypes else "float32",
        "base_model": {
            "name_or_path": base_model or getattr(getattr(model, "config", None), "_name_or_path", None),
            "architecture": type(model).__name__,
            "fingerprint": base_fingerprint(model),
            **base_sample(model),
        },
        "tensors": {
            "file": TENSORS_NAME,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "count": len(state),
        },
    }
    if plan is not None:
        meta["plan"] = plan.meta()
    if extra:
        meta["extra"] = extra
    meta = json.loads(json.dumps(meta))  # the JSON as it will be read back (tuples as lists, keys as strings)
    meta["meta_sha256"] = meta_digest(meta)
    tensors_path, meta_path = folder / TENSORS_NAME, folder / CONFIG_NAME
    staged: list[tuple[Path, Path]] = []
    try:
        staged.append((stage_bytes(tensors_path, data), tensors_path))
        del data
        staged.append((stage_bytes(meta_path, json.dumps(meta, indent=2).encode()), meta_path))
        with writing(meta_path):
            if meta_path.exists():
                meta_path.unlink()
                fsync_dir(folder)
        for tmp, final in staged:
            with writing(final):
                os.replace(tmp, final)
            fsync_dir(folder)
    except BaseException:
        for tmp, _ in staged:
            discard(tmp)
        raise
    return folder


def meta_digest(meta: dict) -> str:
    """sha256 of the canonical JSON of ``meta`` without its ``meta_sha256`` key (sorted keys, no spaces)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "string", int: "integer", dict: "object", list: "array", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_type(where: Path, field: str, value: Any, types: tuple[type, ...]) -> None:
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise CheckpointError(
            f"{where}: field {field!r} must be {_type_name(types)}, got {type(value).__name__} {value!r:.80}"
        )


def _check_fields(where: Path, prefix: str, obj: dict, spec: dict[str, tuple[type, ...]]) -> None:
    for key, types in spec.items():
        if key not in obj:
            raise CheckpointError(f"{where}: required field '{prefix}{key}' is missing (fields: {list(spec)})")
        _check_type(where, f"{prefix}{key}", obj[key], types)


def check_tensor_file_name(where: Path, name: str) -> None:
    """``tensors.file`` is a plain file name inside the checkpoint folder: never a path that leaves it."""
    seps = {"/", "\\", os.sep, os.altsep} - {None}
    if not name or name in (".", "..") or os.path.isabs(name) or any(sep in name for sep in seps) or "\0" in name:
        raise CheckpointError(
            f"{where}: field 'tensors.file' must be a plain file name inside the checkpoint folder "
            f"(no absolute path, '..' or path separator), got {name!r}"
        )


def config_from_meta(meta: dict, where: Path | str = CONFIG_NAME) -> MoBiConfig:
    """The :class:`MoBiConfig` of a checkpoint's ``config``; unknown keys or invalid values are refused."""
    allowed = [f.name for f in dataclasses.fields(MoBiConfig)]
    config = meta["config"]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {unknown} in 'config'; allowed: {allowed}")
    word_bits = config.get("word_bits", 32)
    if isinstance(word_bits, bool) or word_bits not in WORD_BITS:
        raise CheckpointError(f"{where}: field 'config.word_bits' must be one of {list(WORD_BITS)}, got {word_bits!r}")
    try:
        # Checkpoints written before gate policies existed used free (nested-minimum) gates.
        return MoBiConfig(**{"router_policy": "free", **config})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: field 'config' is invalid: {e}") from e


def check_meta(meta: dict, where: Path | str = CONFIG_NAME) -> None:
    """Check the schema of a checkpoint's JSON (format and version already checked): keys and their types,
    the tensor file name, the compute dtype, the router sites and the config."""
    where = Path(where)
    allowed = list(REQUIRED_KEYS) + list(OPTIONAL_KEYS)
    unknown = sorted(set(meta) - set(allowed))
    if unknown:
        raise CheckpointError(f"{where}: unknown top-level field(s) {unknown}; allowed: {allowed}")
    for key, typ in REQUIRED_KEYS.items():
        if key not in meta:
            raise CheckpointError(f"{where}: required field {key!r} is missing (required: {list(REQUIRED_KEYS)})")
        _check_type(where, key, meta[key], (typ,))
    for key, typ in OPTIONAL_KEYS.items():
        if key in meta:
            _check_type(where, key, meta[key], (typ,))
    _check_fields(where, "base_model.", meta["base_model"], _BASE_MODEL_KEYS)
    base = meta["base_model"]
    if "architecture_sha256" in base:
        _check_type(where, "base_model.architecture_sha256", base["architecture_sha256"], (str,))
    if "embedding_sample" in base and not (
        isinstance(base["embedding_sample"], list)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in base["embedding_sample"])
    ):
        raise CheckpointError(f"{where}: field 'base_model.embedding_sample' must be a list of numbers")
    _check_fields(where, "tensors.", meta["tensors"], _TENSORS_KEYS)
    check_tensor_file_name(where, meta["tensors"]["file"])
    for key in ("bytes", "count"):
        if meta["tensors"][key] < 0:
            raise CheckpointError(f"{where}: field 'tensors.{key}' must be >= 0, got {meta['tensors'][key]}")
    if meta["compute_dtype"] not in COMPUTE_DTYPES:
        raise CheckpointError(
            f"{where}: field 'compute_dtype' must be one of {list(COMPUTE_DTYPES)}, got {meta['compute_dtype']!r}"
        )
    check_sites(meta["sites"], where)
    config_from_meta(meta, where)


def check_sites(sites: Any, where: Path | str = CONFIG_NAME) -> None:
    """``sites`` is an array (per block) of arrays (per router) of linear names."""
    ok = isinstance(sites, list) and all(
        isinstance(block, list)
        and all(isinstance(group, list) and all(isinstance(n, str) for n in group) for group in block)
        for block in sites
    )
    if not ok:
        raise CheckpointError(
            f"{where}: field 'sites' must be an array (per block) of arrays (per router) of linear names (strings)"
        )


def read_meta(folder: str | os.PathLike) -> dict:
    """The checked JSON of the checkpoint in ``folder`` (format, version, checksum and schema)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}: not a mobiquant checkpoint, or its save was interrupted")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is corrupted") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a mobiquant checkpoint (format={meta.get('format')!r})")
    if "meta_sha256" in meta:  # checkpoints written before the JSON had its own checksum have none
        recorded = meta["meta_sha256"]
        if not isinstance(recorded, str) or recorded != meta_digest(meta):
            raise CheckpointError(
                f"{cfg_path}: {CONFIG_NAME} was modified after it was written (its field 'meta_sha256' does not "
                f"match the sha256 of its canonical JSON)"
            )
    version = meta.get("format_version")
    if isinstance(version, str) and version.strip().lstrip("+-").isdigit():
        raise CheckpointError(
            f"{cfg_path}: field 'format_version' is the string {version!r}, but must be an integer: write "
            f"{version.strip()} without quotes (this mobiquant reads versions {list(READABLE_VERSIONS)})"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{cfg_path} has format version {version!r} ({type(version).__name__}); this mobiquant reads the "
            f"integer versions {list(READABLE_VERSIONS)}"
        )
    check_meta(meta, cfg_path)
    return meta


def load_quantized(model: nn.Module, folder: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Patch the FP base ``model`` in place with the checkpoint in ``folder``; returns the model."""
    folder = Path(folder)
    meta = read_meta(folder)
    tfile = folder / meta["tensors"]["file"]  # a plain file name (read_meta)
    if not tfile.is_file():
        raise CheckpointError(f"checkpoint tensor file {tfile} is missing")
    size = os.path.getsize(tfile)
    if size != meta["tensors"]["bytes"]:
        raise CheckpointError(
            f"{tfile} has {size} bytes but {meta['tensors']['bytes']} were written: truncated or replaced"
        )
    digest = sha256_file(tfile)
    if digest != meta["tensors"]["sha256"]:
        raise CheckpointError(f"{tfile} is corrupted: sha256 {digest} does not match the recorded one")
    if check_base and not same_base(model, meta["base_model"]):
        base = meta["base_model"]
        hint = (
            ""
            if "embedding_sample" in base
            else " (this checkpoint records its base model bit for bit: load that model in the dtype it was calibrated "
            f"in, {meta['compute_dtype']}, then cast it)"
        )
        raise CheckpointError(
            f"checkpoint {folder} was built for base model {base['name_or_path']!r} ({base['architecture']}); "
            f"the model given to load it into is a different one{hint}"
        )
    try:
        state = load_file(str(tfile))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {tfile}: {e}") from e
    cfg = config_from_meta(meta, folder / CONFIG_NAME)
    compute_dtype = getattr(torch, meta["compute_dtype"])  # one of COMPUTE_DTYPES (read_meta)
    try:
        find_blocks(model)
        quantize_model(model, cfg, sites=meta["sites"])
    except (AttributeError, IndexError, ValueError) as e:
        raise CheckpointError(f"checkpoint {folder} does not fit this model's structure: {e}") from e
    for _, m in mobi_linears(model):
        m.make_packed_buffers(compute_dtype)
    plan_state = {k: state.pop(k) for k in [k for k in state if k.startswith("plan.")]}
    plan = None
    if "plan" in meta:
        try:
            plan = BudgetPlan.from_state(plan_state, meta["plan"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {folder}: its budget plan is invalid: {e}") from e
    elif plan_state:
        raise CheckpointError(f"checkpoint {folder} has plan tensors but no plan in {CONFIG_NAME}")
    expected = set(quantized_state(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint tensors do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name, m in mobi_linears(model):
        _check_packed_shapes(m, name, state, cfg)
    with torch.no_grad():
        for name, m in list(mobi_linears(model)) + list(routers(model)):
            _assign(m, name, state)
    for _, m in mobi_linears(model):
        m.clear_cache()
    for _, r in routers(model):
        r.requires_grad_(False)
    try:
        install_plan(model, plan)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {folder}: {e}") from e
    fuse_sites(model)  # as mobiquant.freeze leaves a model: one launch per router site
    return model


def _check_packed_shapes(m: MoBiLinear, name: str, state: dict[str, torch.Tensor], cfg: MoBiConfig) -> None:
    """The stored tensors of linear ``name`` have the shapes and dtypes of its freshly built packed buffers.

    The config decides them: plane ``e`` is ``[out_features, ceil(in_features / (word_bits // slice_bits[e]))]``
    words, the steps and zero points are ``[out_features, ceil(in_features / group_size)]``.
    """
    dims = f"in_features={m.in_features}, out_features={m.out_features}"
    why = {f"plane{e}": f"config slice_bits[{e}]={b}, word_bits={cfg.word_bits}" for e, b in enumerate(m.slice_bits)}
    why.update(scale=f"config group_size={cfg.group_size}", zero=f"config group_size={cfg.group_size}", bias="")
    for attr, reason in why.items():
        key, built = f"{name}.{attr}", getattr(m, attr)
        if built is None or key not in state:
            continue
        t = state[key]
        if t.shape != built.shape or t.dtype != built.dtype:
            decided = f"{reason}, {dims}" if reason else dims
            raise CheckpointError(
                f"checkpoint tensor {key} does not fit the config: expected shape {tuple(built.shape)} "
                f"{str(built.dtype).removeprefix('torch.')} ({decided}), stored {tuple(t.shape)} "
                f"{str(t.dtype).removeprefix('torch.')}"
            )


def _assign(module: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Put the checkpoint tensors named ``name.*`` into ``module``'s own parameters and buffers."""
    for attr, current in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
        key = f"{name}.{attr}"
        if key not in state or current is None:
            continue
        t = state[key]
        owner_name, _, leaf = attr.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            if current.shape != t.shape:
                raise CheckpointError(f"{key}: checkpoint shape {tuple(t.shape)} != model {tuple(current.shape)}")
            current.copy_(t)
        else:  # buffers take the stored tensor as is (dtype and shape are part of the format)
            owner._buffers[leaf] = t.to(current.device)
