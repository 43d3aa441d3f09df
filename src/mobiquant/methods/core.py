"""Quantization methods as the pipeline sees them: each turns the FP model into evaluated variants.

A method is built from its ``conf/quant/<name>.yaml`` (``_target_``) and asked, for a budget grid, to
yield :class:`Variant`s: a model ready for evaluation at one budget plus what it cost. Methods whose
weights fit the MoBiSlice format yield models of packed ``MoBiLinear``s, so evaluation, achieved-bit
accounting and storage accounting are shared by all of them.

* ``fp``               the unquantized reference
* ``rtn``              round-to-nearest per-group asymmetric, at each integer budget
* ``lwc``              bit-specific calibrated PTQ (block-wise LWC, one slice of B bits), one calibration per bit
* ``mobiquant``        one calibrated MoBiSlice checkpoint + routers, every budget by ``set_budget``
* ``mobiquant_static`` the same kind of checkpoint, every token at the same ``k`` (any-precision, no router)
* ``gptq``             GPTQ at each integer budget
* ``matryoshka``       one 8-bit code read at 2/4/6/8 bits by MSB truncation
* ``mixed_layer``      the MoBiQuant checkpoint with static per-layer slice counts from a sensitivity measure
* ``mobiquant_sites``  the MoBiQuant checkpoint, per-layer budgets from measured cost curves, routed within
* ``hqq``              the external ``hqq`` package at each bit-width it supports
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn

from ..calibration import CalibConfig, calibrate_model
from ..dist import is_rank_zero
from ..elastic.site_budgets import allocated_bits
from ..io.checkpoint import CONFIG_NAME, load_quantized, read_meta, save_quantized
from ..patching import (
    budget_plan,
    freeze,
    install_plan,
    mobi_linears,
    quantize_model,
    routers,
    set_budget,
    set_static,
    static_k_for_bits,
    storage_bits,
)
from ..quant.config import MoBiConfig

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What a method may use: a factory for fresh FP copies, calibration windows, where to write."""

    fp_model: Callable[[], nn.Module]
    calib_ids: torch.Tensor
    output_dir: Path
    calib: CalibConfig
    loggers: Any = False
    # Every block's Trainer: fresh callbacks (the `callbacks` group) and more Trainer arguments (the `trainer`
    # group), each a function called per block (mobiquant.calibration.block_trainer).
    callbacks: Callable[[], list] | None = None
    trainer: Callable[[], dict] | None = None
    on_block_end: Callable[[str, int, Any], None] | None = None
    save_checkpoints: bool = True
    base_model_name: str | None = None
    cache: dict = field(default_factory=dict)  # calibrated models shared between methods of one run
    resume: bool = True  # keep per-block calibration state in output_dir/calib_state/<tag> and resume from it
    base_fingerprint: str | None = None  # checkpoint.base_fingerprint of the base model: others are not reused
    # ``held_out_ids(n)``: n windows of the calibration text outside ``calib_ids`` (io.data.held_out_windows)
    held_out_ids: Callable[[int], torch.Tensor] | None = None

    def state_dir(self, tag: str) -> Path | None:
        return self.output_dir / "calib_state" / tag if self.resume else None

    def drop_state(self, tag: str) -> None:
        """The finished checkpoint supersedes the per-block state."""
        folder = self.state_dir(tag)
        if folder is not None and folder.exists() and is_rank_zero():
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Variant:
    method: str
    budget: float
    model: nn.Module
    storage_bits: float
    calib_seconds: float = 0.0
    n_calibrations: int = 0
    checkpoint: str | None = None
    extra: dict = field(default_factory=dict)


def integer_budgets(grid: Sequence[float], lo: int = 1, hi: int = 8) -> list[int]:
    return sorted({int(b) for b in grid if float(b).is_integer() and lo <= b <= hi})


class QuantMethod(abc.ABC):
    """A method of the comparison: which budgets of the grid it serves, and the variants it yields."""

    calib_overrides: Mapping[str, Any] = MappingProxyType({})  # per-method `calib` overrides, if any

    name: str = "method"

    @abc.abstractmethod
    def budgets(self, grid: Sequence[float]) -> list[float]:
        """The budgets of ``grid`` this method evaluates (NaN for the unquantized reference)."""

    @abc.abstractmethod
    def run(self, ctx: RunContext, grid: Sequence[float]) -> Iterator[Variant]:
        """Yield one evaluated-ready :class:`Variant` per budget."""

    def calibrations(self, grid: Sequence[float]) -> list[tuple[MoBiConfig, Mapping[str, Any]]]:
        """The block-wise calibrations :meth:`run` makes: ``(MoBiConfig, calib overrides)`` each, so that
        the calibration settings can be checked against them before any work."""
        return []

    def _calib(self, ctx: RunContext) -> CalibConfig:
        """The run's calibration settings with this method's ``calib`` overrides applied."""
        return dataclasses.replace(ctx.calib, **self.calib_overrides) if self.calib_overrides else ctx.calib

    def _load_saved(
        self, ctx: RunContext, tag: str, mobi: MoBiConfig, calib: CalibConfig | None = None
    ) -> tuple[nn.Module, float, str] | None:
        """A checkpoint this run directory already holds with the same settings (resume), found by what it
        is, not by name: ``checkpoints/<tag>`` first, then any other folder under ``checkpoints/``.

        Same settings: the same MoBiConfig and, when ``calib`` is given, the same calibration settings and
        calibration tokens (:func:`calib_signature`); a checkpoint calibrated otherwise is calibrated anew.
        """
        root = ctx.output_dir / "checkpoints"
        if not ctx.resume or not ctx.save_checkpoints or not root.is_dir():
            return None  # resume=false: calibrate anew
        want = calib_signature(calib, ctx.calib_ids) if calib is not None else None
        folders = [root / tag] + sorted(p for p in root.iterdir() if p.name != tag)
        for folder in folders:
            if not (folder / CONFIG_NAME).is_file():
                continue
            meta = read_meta(folder)
            if ctx.base_fingerprint is not None and meta["base_model"]["fingerprint"] != ctx.base_fingerprint:
                if folder.name == tag:
                    log.warning("checkpoint %s was built for another base model: not reused", folder)
                continue
            if meta["config"] != mobi.to_dict():
                if folder.name == tag:
                    log.warning("checkpoint %s has other settings than this run: not reused", folder)
                continue
            if want is not None:
                saved = meta.get("extra", {}).get("calib") or {}
                if saved != want:
                    if folder.name == tag:
                        diff = sorted(k for k in set(want) | set(saved) if saved.get(k) != want.get(k))
                        log.warning(
                            "checkpoint %s was calibrated with other calibration settings or tokens (%s): not reused",
                            folder,
                            ", ".join(diff) if saved else "none recorded",
                        )
                    continue
            model = load_quantized(ctx.fp_model(), folder)
            log.info("[%s] resumed from checkpoint %s", tag, folder)
            return model, float(meta.get("extra", {}).get("calib_seconds", 0.0)), str(folder)
        return None

    def _save(
        self, ctx: RunContext, model: nn.Module, tag: str, extra: dict | None = None, calib: CalibConfig | None = None
    ) -> str | None:
        """Save ``model`` under ``tag``; with ``calib``, its :func:`calib_signature` goes into ``extra``."""
        if not ctx.save_checkpoints:
            return None
        if calib is not None:
            extra = {**(extra or {}), "calib": calib_signature(calib, ctx.calib_ids)}
        folder = ctx.output_dir / "checkpoints" / tag
        if not is_rank_zero():  # DDP: rank 0 writes
            return str(folder)
        save_quantized(model, folder, base_model=ctx.base_model_name, extra=extra)
        return str(folder)


#: CalibConfig fields that do not change what a calibration computes (display, where inputs are cached).
_RUNTIME_ONLY = ("progress_bar", "inputs_on")
#: CalibConfig fields added after checkpoints were first saved, with the value that means "as before": left
#: out of the signature at that value, so earlier checkpoints keep matching.
_ADDED_LATER = {"lr_lwc_stage2": None}


def checkpoint_digest(model: nn.Module) -> str:
    """A short digest of what a calibration decided (every linear's step and zero point and every router's
    weights, not the plan): what identifies a calibrated checkpoint for work derived from it."""
    import hashlib

    state: dict[str, torch.Tensor | None] = {}  # quantized_state's entries without the bit-planes (not copied)
    for name, m in mobi_linears(model):
        state.update({f"{name}.{key}": t for key, t in (("scale", m.scale), ("zero", m.zero), ("bias", m.bias))})
    for name, r in routers(model):
        state.update({f"{name}.{key}": t for key, t in r.state_dict().items()})
    h = hashlib.sha256()
    for key, t in sorted(state.items()):
        if t is None:
            continue
        h.update(key.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def calib_signature(calib: CalibConfig, calib_ids: torch.Tensor | None) -> dict:
    """What a calibrated checkpoint depends on beside its MoBiConfig: the calibration settings and a digest of
    the calibration tokens. Saved with the checkpoint; a resumed run reuses it only when this matches."""
    import hashlib

    sig = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(calib).items()
        if k not in _RUNTIME_ONLY and not (k in _ADDED_LATER and v == _ADDED_LATER[k])
    }
    if calib_ids is not None:
        ids = calib_ids.detach().to("cpu", torch.int64).contiguous()
        sig["calib_tokens"] = f"{list(ids.shape)}:{hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]}"
    return sig


class FullPrecision(QuantMethod):
    name = "fp"

    def __init__(self, name: str = "fp"):
        self.name = name

    def budgets(self, grid):
        return [math.nan]

    def run(self, ctx, grid):
        model = ctx.fp_model()
        bits = torch.finfo(next(model.parameters()).dtype).bits
        yield Variant(self.name, math.nan, model, storage_bits=float(bits), extra={"avg_bits": float(bits)})


class RTN(QuantMethod):
    """Round-to-nearest: a one-slice MoBiSlice without LWC, packed without any calibration."""

    name = "rtn"

    def __init__(self, name: str = "rtn", group_size: int = 128, bits: Sequence[int] | None = None):
        self.name, self.group_size, self.bits = name, group_size, bits

    def budgets(self, grid):
        return [float(b) for b in (self.bits or integer_budgets(grid))]

    def run(self, ctx, grid):
        for b in self.budgets(grid):
            model = ctx.fp_model()
            quantize_model(model, MoBiConfig(slice_bits=(int(b),), group_size=self.group_size, lwc_init=None))
            freeze(model)
            yield Variant(self.name, b, model, storage_bits(model), n_calibrations=0)


class LWC(QuantMethod):
    """Bit-specific calibrated PTQ: block-wise LWC with ONE slice of B bits, one calibration per B."""

    name = "lwc"

    def __init__(
        self,
        name: str = "lwc",
        group_size: int = 128,
        lwc_init: float = 4.0,
        bits: Sequence[int] | None = None,
        calib: dict | None = None,
    ):
        self.name, self.group_size, self.lwc_init, self.bits = name, group_size, lwc_init, bits
        self.calib_overrides = dict(calib or {})

    def budgets(self, grid):
        return [float(b) for b in (self.bits or integer_budgets(grid))]

    def calibrations(self, grid):
        return [(self._mobi(b), self.calib_overrides) for b in self.budgets(grid)]

    def _mobi(self, b: float) -> MoBiConfig:
        return MoBiConfig(slice_bits=(int(b),), group_size=self.group_size, lwc_init=self.lwc_init)

    def run(self, ctx, grid):
        for b in self.budgets(grid):
            mobi = self._mobi(b)
            tag = f"{self.name}-w{int(b)}"
            calib = self._calib(ctx)
            saved = self._load_saved(ctx, tag, mobi, calib)
            if saved is not None:
                model, seconds, ckpt = saved
            else:
                model = ctx.fp_model()
                t0 = time.perf_counter()
                result = calibrate_model(
                    model,
                    ctx.calib_ids,
                    mobi,
                    calib,
                    loggers=ctx.loggers,
                    callbacks=ctx.callbacks,
                    trainer=ctx.trainer,
                    on_block_end=_block_cb(ctx, tag),
                    state_dir=ctx.state_dir(tag),
                )
                seconds = time.perf_counter() - t0 + result.earlier_seconds  # every process's share
                ckpt = self._save(ctx, model, tag, extra={"calib_seconds": seconds}, calib=calib)
                if ckpt is not None:
                    ctx.drop_state(tag)
            yield Variant(self.name, b, model, storage_bits(model), seconds, 1, ckpt)


def _block_cb(ctx: RunContext, tag: str):
    if ctx.on_block_end is None:
        return None
    return lambda i, report: ctx.on_block_end(tag, i, report)


ALLOCATIONS = ("uniform", "site", "linear")


class MoBiQuant(QuantMethod):
    """One calibration of the MoBiSlice + router checkpoint; every budget of the grid by thresholds.

    ``allocation`` says how a global budget is read: ``uniform`` (every router at the budget, as in the
    paper) or a budget plan (:mod:`mobiquant.elastic.plan`) with a local budget per ``linear`` or per router
    ``site`` from measured cost curves, thresholds refitted at those budgets, and at every grid budget the
    reading (allocated or uniform) with the lower held-out calibration loss. The plan is built once after
    calibration, saved in the checkpoint, and served by ``set_budget``: what is evaluated is what a
    reloaded checkpoint runs. ``plan`` holds its settings (``step``, ``local_step``, ``sensitivity_windows``,
    ``refit_thresholds``, ``select_windows``, ``select_at``; see :func:`mobiquant.elastic.site_budgets.build_plan`).
    """

    name = "mobiquant"
    PLAN_DEFAULTS = MappingProxyType(
        {
            "step": 0.25,
            "sensitivity_windows": 8,
            "refit_thresholds": True,
            "refit_windows": 4,
            "select_windows": 2,
            "select_at": "views",
            "windows": "held_out",
            "local_step": None,
        }
    )

    def __init__(
        self,
        name: str = "mobiquant",
        mobi: MoBiConfig | dict | None = None,
        calib: dict | None = None,
        static: bool = False,
        allocation: str = "uniform",
        plan: Mapping[str, Any] | None = None,
    ):
        self.name = name
        self.mobi = mobi if isinstance(mobi, MoBiConfig) else MoBiConfig(**(mobi or {}))
        self.calib_overrides = dict(calib or {})
        self.static = static
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        self.allocation = allocation
        unknown = set(plan or {}) - set(self.PLAN_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown plan settings {sorted(unknown)}; allowed: {sorted(self.PLAN_DEFAULTS)}")
        self.plan_settings = {**self.PLAN_DEFAULTS, **(plan or {})}
        step = self.plan_settings["step"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise ValueError(f"plan.step must be a positive number of bits, got {step!r}")
        local = self.plan_settings["local_step"]
        if local is not None and (isinstance(local, bool) or not isinstance(local, (int, float)) or not local > 0):
            raise ValueError(f"plan.local_step must be null (plan.step) or a positive number of bits, got {local!r}")
        from ..elastic.site_budgets import PLAN_WINDOWS, SELECT_AT

        if self.plan_settings["select_at"] not in SELECT_AT:
            raise ValueError(f"plan.select_at must be one of {SELECT_AT}, got {self.plan_settings['select_at']!r}")
        if self.plan_settings["windows"] not in PLAN_WINDOWS:
            raise ValueError(f"plan.windows must be one of {PLAN_WINDOWS}, got {self.plan_settings['windows']!r}")
        if len(self.mobi.slice_bits) < 2 or not self.mobi.routers:
            self.allocation = "uniform"  # one view (or no routers): nothing to allocate

    def budgets(self, grid):
        lo, hi = self.mobi.min_bits, self.mobi.max_bits
        if self.static:
            sums = list(self.mobi.view_bits)
            return [float(b) for b in sums]
        return [float(b) for b in grid if lo <= b <= hi]

    def calibrations(self, grid):
        return [(self.mobi, self.calib_overrides)]

    def _cache_key(self) -> tuple:
        return ("mobiquant", repr(self.mobi.to_dict()), repr(sorted(self.calib_overrides.items())))

    def calibrated(self, ctx: RunContext) -> tuple[nn.Module, float, str | None, bool]:
        """The calibrated checkpoint; reused when another method of the run calibrated the same one."""
        key = self._cache_key()
        if key in ctx.cache:
            return (*ctx.cache[key], True)
        calib = self._calib(ctx)
        saved = self._load_saved(ctx, self.name, self.mobi, calib)
        if saved is not None:
            ctx.cache[key] = saved
            return (*saved, False)
        model = ctx.fp_model()
        t0 = time.perf_counter()
        result = calibrate_model(
            model,
            ctx.calib_ids,
            self.mobi,
            calib,
            loggers=ctx.loggers,
            callbacks=ctx.callbacks,
            trainer=ctx.trainer,
            on_block_end=_block_cb(ctx, self.name),
            state_dir=ctx.state_dir(self.name),
        )
        seconds = time.perf_counter() - t0 + result.earlier_seconds  # every process's share
        ckpt = self._save(ctx, model, self.name, extra={"calib_seconds": seconds}, calib=calib)
        if ckpt is not None:
            ctx.drop_state(self.name)
        ctx.cache[key] = (model, seconds, ckpt)
        return model, seconds, ckpt, False

    def plan_config(self, n_windows: int) -> dict:
        """What identifies this method's budget plan on ``n_windows`` calibration windows: the settings
        :func:`mobiquant.elastic.site_budgets.build_plan` records, window counts resolved as it resolves them."""
        sw, rw = self.plan_settings["sensitivity_windows"], self.plan_settings["refit_windows"]
        n_sens = int(n_windows if sw is None else min(sw, n_windows))
        return {
            "per": self.allocation,
            "step": float(self.plan_settings["step"]),
            "sensitivity_windows": n_sens,
            "refit_thresholds": bool(self.plan_settings["refit_thresholds"]),
            "refit_windows": n_sens if rw is None else min(int(rw), n_sens),
            "select_windows": int(self.plan_settings["select_windows"]),
            "select_at": str(self.plan_settings["select_at"]),
            "windows": str(self.plan_settings["windows"]),
            "local_step": None if self.plan_settings["local_step"] is None else float(self.plan_settings["local_step"]),
        }

    def plan_windows(self, ctx: RunContext) -> torch.Tensor:
        """The windows the plan is built on (``plan.windows``): the calibration windows, or as many windows of
        the calibration text outside them (sensitivity, then selection windows)."""
        if self.plan_settings["windows"] == "train":
            return ctx.calib_ids
        if ctx.held_out_ids is None:
            raise ValueError("plan.windows=held_out needs the calibration text (a run context with held_out_ids)")
        sw = self.plan_settings["sensitivity_windows"]
        n_sens = ctx.calib_ids.shape[0] if sw is None else int(sw)
        return ctx.held_out_ids(n_sens + int(self.plan_settings["select_windows"]))

    def budget_plan(self, ctx: RunContext, model: nn.Module, seconds: float) -> tuple[Any, float, str | None]:
        """This method's plan for the calibrated ``model``: from the run's cache, the loaded checkpoint, or
        built now (then saved with the checkpoint). Returns ``(plan, seconds spent building it, checkpoint)``."""
        from ..elastic.site_budgets import plan_budgets

        ids = self.plan_windows(ctx)
        want = self.plan_config(ids.shape[0])
        key = ("plan", *self._cache_key(), repr(sorted(want.items())))
        if key in ctx.cache:
            return ctx.cache[key]
        have = budget_plan(model)
        if have is not None and {k: have.settings.get(k) for k in want} == want:
            log.info("[%s] budget plan reused from the checkpoint", self.name)
            result = (have, 0.0, None)
        else:
            t0 = time.perf_counter()
            tag = f"{self.name}-plan"
            plan = plan_budgets(
                model,
                ids,
                per=self.allocation,
                step=want["step"],
                sensitivity_windows=self.plan_settings["sensitivity_windows"],
                refit_thresholds=want["refit_thresholds"],
                select_windows=want["select_windows"],
                select_at=want["select_at"],
                refit_windows=self.plan_settings["refit_windows"],
                windows=want["windows"],
                local_step=want["local_step"],
                log=log,
                state_dir=ctx.state_dir(tag),
                state_key={
                    "checkpoint": checkpoint_digest(model),
                    "calib": calib_signature(self._calib(ctx), ids),
                },
            )
            built = time.perf_counter() - t0
            chosen = sum(r == "uniform" for r in plan.reading)
            log.info(
                "[%s] budget plan for %d budgets in %.1fs (%d read uniformly)",
                self.name,
                len(plan.budgets),
                built,
                chosen,
            )
            ckpt = self._save(
                ctx, model, self.name, calib=self._calib(ctx), extra={"calib_seconds": seconds, "plan_seconds": built}
            )
            if ckpt is not None:
                ctx.drop_state(tag)  # the plan is in the checkpoint now
            result = (plan, built, ckpt)
        ctx.cache[key] = result
        return result

    def run(self, ctx, grid):
        model, seconds, ckpt, reused = self.calibrated(ctx)
        n_cal = 0 if reused else 1
        if reused:
            seconds = 0.0
        plan, plan_seconds = None, 0.0
        if not self.static and self.allocation != "uniform":
            plan, plan_seconds, plan_ckpt = self.budget_plan(ctx, model, seconds)
            ckpt = plan_ckpt or ckpt
        install_plan(model, plan)
        for b in self.budgets(grid):
            if self.static:
                set_static(model, static_k_for_bits(self.mobi, b))
            else:
                set_budget(model, b)
            extra = {"shared_checkpoint": reused}
            if plan is not None:
                # the plan names exactly the routed linears (install_plan checks it)
                local = plan.local_at(b)
                params = {n: {"params": m.in_features * m.out_features} for n, m in mobi_linears(model) if n in local}
                extra["allocated_bits"] = allocated_bits(params, local)
            yield Variant(self.name, b, model, storage_bits(model), seconds + plan_seconds, n_cal, ckpt, extra=extra)


class GPTQ(QuantMethod):
    """GPTQ (Hessian-based, act-order, damping) at each integer budget; one quantization per bit-width."""

    name = "gptq"

    def __init__(
        self,
        name: str = "gptq",
        group_size: int = 128,
        bits: Sequence[int] | None = None,
        act_order: bool = True,
        percdamp: float = 0.01,
        blocksize: int = 128,
    ):
        self.name, self.group_size, self.bits = name, group_size, bits
        self.kwargs = {"act_order": act_order, "percdamp": percdamp, "blocksize": blocksize}

    def budgets(self, grid):
        return [float(b) for b in (self.bits or integer_budgets(grid))]

    def run(self, ctx, grid):
        from .baselines import quantize_gptq

        for b in self.budgets(grid):
            model = ctx.fp_model()
            t0 = time.perf_counter()
            quantize_gptq(model, ctx.calib_ids, int(b), self.group_size, progress=False, **self.kwargs)
            seconds = time.perf_counter() - t0
            ckpt = self._save(ctx, model, f"{self.name}-w{int(b)}")
            yield Variant(self.name, b, model, storage_bits(model), seconds, 1, ckpt)


class Matryoshka(QuantMethod):
    """One 8-bit RTN code per weight, read at 2/4/6/8 bits by MSB truncation (mid-point corrected)."""

    name = "matryoshka"

    def __init__(self, name: str = "matryoshka", group_size: int = 128, slice_bits: Sequence[int] = (2, 2, 2, 2)):
        self.name, self.group_size, self.slice_bits = name, group_size, tuple(slice_bits)

    def budgets(self, grid):
        return [float(sum(self.slice_bits[:k])) for k in range(1, len(self.slice_bits) + 1)]

    def run(self, ctx, grid):
        from .baselines import quantize_matryoshka

        model = ctx.fp_model()
        quantize_matryoshka(model, self.group_size, self.slice_bits)
        ckpt = self._save(ctx, model, self.name)
        for k, b in enumerate(self.budgets(grid), start=1):
            set_static(model, k)
            yield Variant(self.name, b, model, storage_bits(model), 0.0, 0, ckpt)


class MixedLayer(QuantMethod):
    """Static per-linear slice counts chosen from a sensitivity measure; no per-token routing.

    Uses the MoBiQuant checkpoint of the same settings (shared when ``mobiquant`` runs too), so the
    comparison isolates routing granularity: per token (MoBiQuant) against per layer (this).
    """

    name = "mixed_layer"

    def __init__(
        self,
        name: str = "mixed_layer",
        mobi: MoBiConfig | dict | None = None,
        calib: dict | None = None,
        metric: str = "fisher",
        sensitivity_windows: int | None = 8,
        static: bool | None = None,
        allocation: str | None = None,
        plan: Mapping[str, Any] | None = None,
    ):
        # `static`, `allocation` and `plan` are accepted (and ignored) because this config inherits the
        # mobiquant one.
        self.name = name
        self.source = MoBiQuant(name="mobiquant", mobi=mobi, calib=calib)
        self.metric, self.sensitivity_windows = metric, sensitivity_windows

    def budgets(self, grid):
        return self.source.budgets(grid)  # every grid budget the checkpoint's routers can serve

    def calibrations(self, grid):
        return self.source.calibrations(grid)

    def run(self, ctx, grid):
        from .baselines import allocate_bits, apply_allocation, layer_sensitivity

        model, seconds, ckpt, reused = self.source.calibrated(ctx)
        sens = layer_sensitivity(model, ctx.calib_ids, metrics=(self.metric,), max_windows=self.sensitivity_windows)
        for b in self.budgets(grid):
            alloc = allocate_bits(sens, b, metric=self.metric)
            bits = apply_allocation(model, alloc)
            yield Variant(
                self.name,
                b,
                model,
                storage_bits(model),
                0.0 if reused else seconds,
                0 if reused else 1,
                ckpt,
                extra={"allocated_bits": bits},
            )


class SiteBudgets(MoBiQuant):
    """``quant=mobiquant_sites``: the MoBiQuant checkpoint read through a budget plan with a local budget per
    linear (``per="linear"``) or per router site (``per="site"``); :class:`MoBiQuant` with that allocation.
    Kept for the commands and configs written before plans were part of every checkpoint."""

    name = "mobiquant_sites"

    def __init__(
        self,
        name: str = "mobiquant_sites",
        mobi: MoBiConfig | dict | None = None,
        calib: dict | None = None,
        sensitivity_windows: int | None = 8,
        grid_step: float = 0.25,
        refit_thresholds: bool = True,
        per: str = "linear",
        select_windows: int = 2,
        refit_windows: int | None = 4,
        select_at: str = "views",
        static: bool | None = None,
        allocation: str | None = None,
        plan: Mapping[str, Any] | None = None,
    ):
        # `static`, `allocation` and `plan` are accepted because this config inherits the mobiquant one;
        # this method's own keys decide.
        if per not in ("site", "linear"):
            raise ValueError(f"per must be 'site' (one budget per router) or 'linear', got {per!r}")
        super().__init__(
            name,
            mobi,
            calib,
            static=False,
            allocation=per,
            plan={
                "step": grid_step,
                "sensitivity_windows": sensitivity_windows,
                "refit_thresholds": refit_thresholds,
                "select_windows": select_windows,
                "refit_windows": refit_windows,
                "select_at": select_at,
            },
        )


class HQQ(QuantMethod):
    """The external ``hqq`` package (Half-Quadratic Quantization), calibration-free, per bit-width."""

    name = "hqq"

    def __init__(
        self,
        name: str = "hqq",
        group_size: int = 128,
        bits: Sequence[int] | None = None,
        axis: int = 1,
        optimize: bool = True,
    ):
        self.name, self.group_size, self.bits, self.axis, self.optimize = name, group_size, bits, axis, optimize

    def budgets(self, grid):
        from .baselines import HQQ_BITS

        return [float(b) for b in (self.bits or integer_budgets(grid)) if int(b) in HQQ_BITS]

    def run(self, ctx, grid):
        from .baselines import quantize_hqq

        for b in self.budgets(grid):
            model = ctx.fp_model()
            t0 = time.perf_counter()
            quantize_hqq(model, int(b), self.group_size, axis=self.axis, optimize=self.optimize)
            seconds = time.perf_counter() - t0
            sbits = getattr(model, "hqq_storage_bits", None) or storage_bits(model)
            yield Variant(
                self.name,
                b,
                model,
                float(sbits),
                seconds,
                0,
                None,
                extra={"avg_bits": float(b), "quant_seconds": seconds},
            )


def build_method(name: str, cfg: Any) -> QuantMethod:
    """Instantiate a method from its (Hydra) config node; the node's ``_target_`` names the class."""
    from hydra.utils import instantiate

    method = instantiate(cfg, _convert_="all")
    if not isinstance(method, QuantMethod):
        raise TypeError(f"quant config {name!r} does not build a QuantMethod (got {type(method).__name__})")
    method.name = name if name else method.name
    return method
