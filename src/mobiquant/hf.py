"""Hugging Face integration: a quantized model as a transformers folder that ``from_pretrained`` loads.

The folder is what ``save_pretrained`` writes for any model: the base model's ``config.json`` (its
``model_type``, so ``AutoModelForCausalLM`` finds the class) with a ``quantization_config`` entry, the
weights in ``model.safetensors`` (sharded above ``max_shard_size``), the generation config and, when
given, the tokenizer. ``quantization_config`` holds ``quant_method: "mobiquant"``, the
:class:`~mobiquant.patching.MoBiConfig`, the router sites, the compute dtype, the budget plan's
description and the budget served on load. The weights are the model's own state dict: the FP embeddings,
norms and ``lm_head``, and per MoBiLinear its bit-planes, fp16 steps and zero points (the tensors of
:mod:`mobiquant.io.checkpoint`, under their module names), per router its MLP and threshold tables, and the
budget plan as ``mobiquant_plan_tensors.{budgets,taus,local}``.

``import mobiquant`` registers the quantization config and the quantizer with transformers (when
transformers is imported, so ``mobiquant --help`` stays fast): ``from_pretrained`` then builds the model on
the meta device, lets the quantizer swap its block linears for packed MoBiLinears and add the routers,
shaped by the config and the weight files' headers, loads the weights, and installs the plan and the
budget. The model keeps ``mobiquant.set_budget``; ``save_pretrained`` and ``push_to_hub`` write the same
layout again. :func:`save_pretrained` writes a model quantized in memory, :func:`export_hf` a checkpoint
folder of :mod:`mobiquant.io.checkpoint`. ``MOBIQUANT_BUDGET`` overrides the budget served on load (lm-eval:
``python -m mobiquant.hf lm_eval ...``, see :func:`main`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import __version__
from .elastic.plan import BudgetPlan
from .io.checkpoint import COMPUTE_DTYPES, CheckpointError, check_sites, config_from_meta, load_quantized, read_meta
from .nn.linear import MoBiLinear
from .patching import (
    MoBiConfig,
    budget_plan,
    install_plan,
    mobi_linears,
    quantize_model,
    routers,
    set_budget,
    set_static,
    static_k_for_bits,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUANT_METHOD = "mobiquant"
#: Version of this folder layout (``quantization_config.format_version``); this code reads the versions listed.
HF_FORMAT_VERSION = 2
READABLE_HF_VERSIONS = (1, 2)  # 2: config.view_steps (a step and zero point per view)
#: Environment variable that overrides the budget a loaded model serves (average bits).
BUDGET_ENV = "MOBIQUANT_BUDGET"
#: The budget plan's tensors, under this module name in the weights (removed from the model once installed).
PLAN_MODULE = "mobiquant_plan_tensors"
WHERE = "config.json: quantization_config"
_FIELDS = ("quant_method", "format_version", "mobiquant_version", "config", "sites", "compute_dtype", "plan", "budget")
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _routed(mobi: MoBiConfig) -> bool:
    return bool(mobi.routers) and len(mobi.slice_bits) > 1


def check_budget(mobi: MoBiConfig, budget: Any, where: str) -> float:
    """``budget`` as a float the model serves: in ``[min, max]`` bits when routed, else a static view's bits."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise CheckpointError(f"{where}: budget must be a number of average bits, got {budget!r}")
    if _routed(mobi):
        if not mobi.min_bits <= budget <= mobi.max_bits:
            raise CheckpointError(
                f"{where}: budget {budget} is outside [{mobi.min_bits}, {mobi.max_bits}] bits "
                f"(slices {list(mobi.slice_bits)})"
            )
    elif static_k_for_bits(mobi, float(budget)) is None:
        views = [sum(mobi.slice_bits[:k]) for k in range(1, len(mobi.slice_bits) + 1)]
        raise CheckpointError(f"{where}: budget {budget} is not a view of this model (no routers): allowed {views}")
    return float(budget)


def serve(model: nn.Module, budget: float) -> None:
    """Serve ``budget`` average bits: :func:`set_budget` when the model routes, else the static view."""
    mobi = cast(MoBiConfig, model.mobiquant_config)
    if _routed(mobi):
        set_budget(model, budget)
    else:
        k = static_k_for_bits(mobi, budget)
        if k is None:
            raise ValueError(f"budget {budget} is not a static view of slices {list(mobi.slice_bits)}")
        set_static(model, k)


class MoBiQuantHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a MoBiQuant folder (``quant_method: "mobiquant"``).

    ``config``: the :class:`MoBiConfig` fields; ``sites``: per block, the groups of linear names that share a
    router; ``compute_dtype``: the dtype the packed linears dequantize to; ``plan``: the budget plan's
    linears, readings and settings (its tensors are in the weights), or null; ``budget``: the average bits
    a loaded model serves (null: every linear at its widest view, as :func:`~mobiquant.load_quantized` leaves
    it; ``MOBIQUANT_BUDGET`` overrides it).
    """

    def __init__(
        self,
        config: dict | None = None,
        sites: list | None = None,
        compute_dtype: str = "float32",
        plan: dict | None = None,
        budget: float | None = None,
        format_version: int = HF_FORMAT_VERSION,
        mobiquant_version: str | None = None,
        quant_method: str = QUANT_METHOD,
    ):
        self.quant_method = quant_method  # type: ignore[assignment]  # a registered name, not transformers' enum
        self.format_version = format_version
        self.mobiquant_version = mobiquant_version or __version__
        self.config = dict(config or {})
        self.sites = sites if sites is not None else []
        self.compute_dtype = compute_dtype
        self.plan = plan
        self.budget = budget
        self.post_init()

    def post_init(self) -> None:
        """Check every field (one line naming it); raises :class:`CheckpointError`."""
        if self.quant_method != QUANT_METHOD:
            raise CheckpointError(f"{WHERE}: quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}")
        version = self.format_version
        if isinstance(version, bool) or version not in READABLE_HF_VERSIONS:
            raise CheckpointError(
                f"{WHERE}: format_version {version!r} is not one this mobiquant reads ({list(READABLE_HF_VERSIONS)})"
            )
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{WHERE}: field 'config' must be an object of MoBiConfig fields")
        self.config = config_from_meta({"config": self.config}, WHERE).to_dict()
        check_sites(self.sites, WHERE)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise CheckpointError(
                f"{WHERE}: field 'compute_dtype' must be one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}"
            )
        if self.plan is not None:
            plan = self.plan
            ok = (
                isinstance(plan, dict)
                and isinstance(plan.get("linears"), list)
                and all(isinstance(n, str) for n in plan["linears"])
                and isinstance(plan.get("reading"), list)
                and isinstance(plan.get("settings", {}), dict)
            )
            if not ok:
                raise CheckpointError(
                    f"{WHERE}: field 'plan' must be null or an object with 'linears' (names), 'reading' (one per "
                    "budget) and 'settings'"
                )
        if self.budget is not None:
            self.budget = check_budget(self.mobi_config, self.budget, WHERE)

    @property
    def mobi_config(self) -> MoBiConfig:
        return MoBiConfig(**self.config)

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs: Any):
        unknown = sorted(set(config_dict) - set(_FIELDS))
        if unknown:
            raise CheckpointError(f"{WHERE}: unknown field(s) {unknown}; allowed: {list(_FIELDS)}")
        config = cls(**config_dict)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_model(cls, model: nn.Module, budget: float | None = None) -> MoBiQuantHfConfig:
        """The config of an in-memory quantized model (packed: :func:`mobiquant.freeze` or a calibration)."""
        mobi = cast(MoBiConfig | None, getattr(model, "mobiquant_config", None))
        linears = list(mobi_linears(model))
        if mobi is None or not linears:
            raise ValueError("the model is not quantized by mobiquant: call mobiquant.quantize_model and calibrate")
        unpacked = [name for name, m in linears if not m.packed]
        if unpacked:
            raise CheckpointError(f"{unpacked[0]} is not packed: call mobiquant.freeze(model) before saving")
        dtypes = {str(m.weight_dtype).removeprefix("torch.") for _, m in linears}
        plan = budget_plan(model)
        return cls(
            config=mobi.to_dict(),
            sites=[[list(g) for g in block] for block in cast(list, model.mobiquant_sites)],
            compute_dtype=sorted(dtypes)[0],
            plan=plan.meta() if plan is not None else None,
            budget=budget,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "mobiquant_version": self.mobiquant_version,
            "config": dict(self.config),
            "sites": [[list(g) for g in block] for block in self.sites],
            "compute_dtype": self.compute_dtype,
            "plan": None if self.plan is None else dict(self.plan),
            "budget": self.budget,
        }


class _PlanTensors(nn.Module):
    """The budget plan's tensors while the weights load (then turned into a :class:`BudgetPlan`)."""

    budgets: torch.Tensor
    taus: torch.Tensor
    local: torch.Tensor

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        for key, (shape, dtype) in shapes.items():
            self.register_buffer(key, torch.empty(shape, dtype=dtype, device="meta"))


def weight_header(files: Iterable[str | os.PathLike]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor of the safetensors ``files``, read from their headers."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise CheckpointError(f"{f}: a mobiquant model's weights are safetensors files")
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                out[key] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), torch.float32))
    return out


def _checkpoint_files(model: nn.Module, files: Sequence[str] | None) -> list[str]:
    if files:
        return [str(f) for f in files]
    # transformers versions that do not pass the files to the quantizer: the local folder being loaded
    folder = Path(str(getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "")))
    found = sorted(str(p) for p in folder.glob("model*.safetensors")) if folder.is_dir() else []
    if not found:
        raise CheckpointError(
            "the quantizer was not given the weight files and found none in a local folder: this transformers "
            "version cannot load mobiquant folders (download the folder and load it from disk)"
        )
    return found


def _stored(header: dict, key: str, folder: str) -> tuple[tuple[int, ...], torch.dtype]:
    if key not in header:
        raise CheckpointError(
            f"{folder}: the weights have no tensor {key!r}; the folder is incomplete or not this model"
        )
    return header[key]


def _adopt_stored(module: nn.Module, name: str, header: dict, folder: str) -> None:
    """Give ``module``'s parameters and buffers the shapes (buffers) and dtypes stored under ``name.*``."""
    for attr, current in list(module.named_parameters()) + list(module.named_buffers()):
        key = f"{name}.{attr}"
        shape, dtype = _stored(header, key, folder)
        owner_name, _, leaf = attr.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            if shape != tuple(current.shape):
                raise CheckpointError(
                    f"{folder}: tensor {key} has shape {shape}, the config implies {tuple(current.shape)}"
                )
            owner._parameters[leaf] = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
        else:  # the threshold tables' length is a calibration setting, not part of the config
            owner._buffers[leaf] = torch.empty(shape, dtype=dtype, device="meta")


def _check_packed(m: MoBiLinear, name: str, header: dict, folder: str) -> None:
    for attr in [f"plane{e}" for e in range(m.num_slices)] + ["scale", "zero", "bias"]:
        built = getattr(m, attr)
        if built is None:
            continue
        shape, dtype = _stored(header, f"{name}.{attr}", folder)
        exact_dtype = attr != "bias"  # the bias follows the model's dtype, as the other float weights do
        if shape != tuple(built.shape) or (exact_dtype and dtype != built.dtype):
            raise CheckpointError(
                f"{folder}: tensor {name}.{attr} does not fit the config: expected shape {tuple(built.shape)} "
                f"{str(built.dtype).removeprefix('torch.')} (slices {list(m.slice_bits)}, group size "
                f"{m.slicer.group_size}, word bits {m.word_bits}, in={m.in_features}, out={m.out_features}), "
                f"stored {shape} {str(dtype).removeprefix('torch.')}"
            )


def build_skeleton(model: nn.Module, qc: MoBiQuantHfConfig, header: dict, folder: str) -> None:
    """Swap ``model``'s block linears (on the meta device) for empty packed MoBiLinears and add the routers
    and the plan's tensors, shaped as ``qc`` and the stored tensors say; the weights are loaded next."""
    mobi = qc.mobi_config
    try:
        quantize_model(model, mobi, sites=qc.sites)
    except (AttributeError, IndexError, KeyError, ValueError) as e:
        raise CheckpointError(f"{WHERE} does not fit {type(model).__name__}: {e}") from e
    for name, m in mobi_linears(model):
        m.make_packed_buffers(m.weight.dtype)  # the dtype the linear had: the model's
        _check_packed(m, name, header, folder)
    for name, r in routers(model):
        _adopt_stored(r, name, header, folder)
    if qc.plan is not None:
        shapes = {k: _stored(header, f"{PLAN_MODULE}.{k}", folder) for k in ("budgets", "taus", "local")}
        G, L = math.prod(shapes["budgets"][0]), len(qc.plan["linears"])
        for k in ("taus", "local"):
            if shapes[k][0] != (L, G):
                raise CheckpointError(
                    f"{folder}: tensor {PLAN_MODULE}.{k} has shape {shapes[k][0]}, expected {(L, G)} "
                    f"({L} plan linears x {G} budgets)"
                )
        model.add_module(PLAN_MODULE, _PlanTensors(shapes))


def finish_loading(model: nn.Module, qc: MoBiQuantHfConfig) -> None:
    """After the weights loaded: counters and caches, frozen routers, the plan installed, the budget served."""
    for name, m in mobi_linears(model):
        for key, t in m.state_dict(keep_vars=True).items():
            if t is not None and t.is_meta:
                raise CheckpointError(f"{name}.{key} was not loaded from the weights")
        m.reset_counts()  # built under the meta device with the module
        m.clear_cache()
    for _, r in routers(model):
        r.requires_grad_(False)
        r.clear_cache()
    holder = getattr(model, PLAN_MODULE, None)
    if holder is not None:
        delattr(model, PLAN_MODULE)
        state = {f"plan.{k}": t for k, t in holder.state_dict().items()}
        try:
            install_plan(model, BudgetPlan.from_state(state, qc.plan or {}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{WHERE}: the budget plan is invalid: {e}") from e
    budget = qc.budget
    env = os.environ.get(BUDGET_ENV, "").strip()
    if env:
        try:
            budget = check_budget(cast(MoBiConfig, model.mobiquant_config), float(env), f"{BUDGET_ENV}={env}")
        except ValueError as e:
            raise CheckpointError(f"{BUDGET_ENV}={env} is not a number of average bits") from e
    if budget is not None:
        serve(model, budget)


def hf_state_dict(model: nn.Module, qc: MoBiQuantHfConfig) -> dict[str, torch.Tensor]:
    """What ``save_pretrained`` writes: the state dict and the budget plan; ``qc`` is updated from the model."""
    fresh = MoBiQuantHfConfig.from_model(model, budget=qc.budget)
    qc.config, qc.sites, qc.compute_dtype, qc.plan = fresh.config, fresh.sites, fresh.compute_dtype, fresh.plan
    qc.mobiquant_version = __version__
    state = model.state_dict()
    plan = budget_plan(model)
    if plan is not None:
        state.update({f"{PLAN_MODULE}.{k.removeprefix('plan.')}": t for k, t in plan.state().items()})
    return state


class MoBiQuantHfQuantizer(HfQuantizer):
    """Loads MoBiQuant folders (pre-quantized only: quantizing happens in :func:`mobiquant.calibrate`)."""

    requires_calibration = True
    quantization_config: MoBiQuantHfConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("mobiquant models cannot be offloaded to disk (device_map with 'disk')")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        files = _checkpoint_files(model, checkpoint_files)
        folder = str(Path(files[0]).parent)
        build_skeleton(model, self.quantization_config, weight_header(files), folder)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        finish_loading(model, self.quantization_config)
        return model

    def get_state_dict_and_metadata(self, model):
        return hf_state_dict(model, self.quantization_config), {}

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make ``quant_method: "mobiquant"`` known to transformers (done on import of this module)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoBiQuantHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoBiQuantHfQuantizer)


register()


# ---------------------------------------------------------------------------- reading folders
def folder_config(folder: str | os.PathLike) -> MoBiConfig | None:
    """The :class:`MoBiConfig` of a transformers folder holding a mobiquant model (``config.json`` with
    ``quantization_config.quant_method: "mobiquant"``, as :func:`save_pretrained` writes), or None when
    ``folder`` is not one (e.g. a mobiquant checkpoint folder, read by :func:`~mobiquant.load_quantized`)."""
    import json

    file = Path(folder) / "config.json"
    if not file.is_file():
        return None
    try:
        qc = json.loads(file.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{file}: not a readable transformers config ({e})") from e
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return None
    return MoBiQuantHfConfig.from_dict(qc).mobi_config


def load_folder(folder: str | os.PathLike, like: nn.Module) -> nn.Module:
    """The model of a mobiquant transformers folder, on the device and in the dtype of the model ``like``."""
    from transformers import AutoModelForCausalLM

    p = next(like.parameters())
    model: nn.Module = AutoModelForCausalLM.from_pretrained(str(folder), dtype=p.dtype)
    return model.to(p.device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------- writing folders
def _pretrained(model: nn.Module) -> PreTrainedModel:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"a transformers PreTrainedModel is needed, got {type(model).__name__}")
    return model


def attach(model: nn.Module, budget: float | None = None) -> PreTrainedModel:
    """Make an in-memory quantized model save and push like one loaded by ``from_pretrained``:
    ``model.save_pretrained(folder)``, ``model.push_to_hub(repo)``. ``budget``: served on load."""
    pm = _pretrained(model)
    qc = MoBiQuantHfConfig.from_model(pm, budget=budget)
    pm.config.quantization_config = qc
    setattr(pm, "hf_quantizer", MoBiQuantHfQuantizer(qc, pre_quantized=True))  # noqa: B010 - not a module
    return pm


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    budget: float | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> Path:
    """Write a packed model as a transformers folder (``AutoModelForCausalLM.from_pretrained`` loads it after
    ``import mobiquant``); returns the folder. ``budget``: the average bits served on load (default: the
    one the model was loaded with, else none: the widest view). ``kwargs`` go to ``model.save_pretrained``
    (``max_shard_size``, ``push_to_hub``, ...)."""
    pm = _pretrained(model)
    current = getattr(pm, "hf_quantizer", None)
    if budget is not None or not isinstance(current, MoBiQuantHfQuantizer):
        keep = current.quantization_config.budget if isinstance(current, MoBiQuantHfQuantizer) else None
        attach(pm, budget if budget is not None else keep)
    pm.save_pretrained(str(folder), **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return Path(folder)


def _base_model(name: str, dtype: str) -> tuple[nn.Module, Any]:
    if name == "tiny":  # model=tiny-llama of the app; the fingerprint check tells a different one apart
        from .tiny import tiny_llama

        return tiny_llama(dtype=dtype)
    from .io.models import load_model

    return load_model(name, dtype=dtype)


def export_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    base_model: nn.Module | str | os.PathLike | None = None,
    *,
    budget: float | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> Path:
    """Write the checkpoint folder ``checkpoint`` (:func:`mobiquant.save_quantized`) as a transformers folder
    ``out``. ``base_model``: the FP model it was calibrated from, a model or what
    :func:`mobiquant.io.models.load_model` loads (default: the name the checkpoint records; its tokenizer is
    saved too). ``budget``: served on load."""
    meta = read_meta(checkpoint)
    if base_model is None:
        base_model = meta["base_model"]["name_or_path"]
        if not base_model:
            raise CheckpointError(f"{checkpoint} does not name its base model: pass base_model=")
    if isinstance(base_model, (str, os.PathLike)):
        try:
            model, tok = _base_model(os.fspath(base_model), meta["compute_dtype"])
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot load the base model {os.fspath(base_model)!r}: {e}; pass base_model=") from e
        tokenizer = tokenizer if tokenizer is not None else tok
    else:
        model = base_model
    load_quantized(model, checkpoint)
    return save_pretrained(model, out, budget=budget, tokenizer=tokenizer, **kwargs)


# ---------------------------------------------------------------------------- command line
def lm_eval(argv: Sequence[str], budget: float | None = None) -> None:
    """Run lm-eval's command line (``lm_eval ARGS``) with the mobiquant quantizer registered, so that
    ``--model hf --model_args pretrained=<folder>`` loads a mobiquant folder (at ``budget`` when given)."""
    if budget is not None:
        os.environ[BUDGET_ENV] = str(budget)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mobiquant.hf export CKPT OUT`` and ``python -m mobiquant.hf lm_eval [--budget B] ARGS``."""
    p = argparse.ArgumentParser(
        prog="python -m mobiquant.hf",
        description="Hugging Face folders of mobiquant models: export a checkpoint, evaluate with lm-eval.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a checkpoint folder (mobiquant.json) as a transformers folder")
    ex.add_argument("checkpoint", help="checkpoint folder (mobiquant.json + quantized.safetensors)")
    ex.add_argument("out", help="transformers folder to write")
    ex.add_argument("--base", help="the FP base model (default: the one the checkpoint names)")
    ex.add_argument("--budget", type=float, help="average bits served on load (default: the widest view)")
    ev = sub.add_parser(
        "lm_eval",
        help="lm-eval's command line with mobiquant folders loadable (--model hf --model_args pretrained=DIR)",
    )
    ev.add_argument("--budget", type=float, help=f"average bits to evaluate at (sets {BUDGET_ENV})")
    args, rest = p.parse_known_args(argv)
    if args.command == "export":
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        try:
            out = export_hf(args.checkpoint, args.out, args.base, budget=args.budget)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(out)
        return 0
    lm_eval(rest, budget=args.budget)
    return 0


if __name__ == "__main__":  # the registered module's functions and classes, not a second copy of them
    from mobiquant.hf import main as _main

    sys.exit(_main())
