"""Block-wise calibration, sequential over transformer blocks, each block optimised by Lightning.

For block ``i``: its inputs come from the already-quantized blocks ``0..i-1`` (the quantized trajectory),
its targets are the full-precision block applied to the full-precision trajectory (as in OmniQuant).
Only LWC parameters and routers learn; pretrained weights stay frozen.

* Stage 1 (base slice): every token uses slice 1 only; minimise output MSE.
* Stage 2 (joint): all slices, routers on; each step samples a target budget in ``[b_1, sum b]`` and
  minimises output MSE + ``lambda * (soft_bits - target)^2``. Hard gates meet the target exactly (the
  threshold is the batch's score quantile), so the router learns which tokens deserve more slices.

After a block is trained it is frozen (packed codes, the real checkpoint), its routers' bits->threshold
tables are fitted on their calibration activations, and the quantized trajectory is pushed through the
packed block at ``propagate_budget`` (default: the middle of the range) to become the next block's inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .dist import broadcast_object, is_rank_zero, world_size
from .nn.linear import MoBiLinear
from .nn.router import TokenRouter, budget_bits
from .patching import (
    ROUTERS_ATTR,
    discover_sites,
    find_blocks,
    fit_budget_thresholds,
    quantize_block,
    router_homes,
    static_k_for_bits,
)
from .quant.config import MoBiConfig

log = logging.getLogger(__name__)


@dataclass
class CalibConfig:
    """Optimisation settings (paper: 128 x 2048 tokens, 20 epochs, batch 1, AdamW, LWC lr 1e-3..1e-2)."""

    epochs_stage1: int = 10
    epochs_stage2: int = 10
    batch_size: int = 1
    lr_lwc: float = 1e-2  # measured best for LWC and MoBiQuant (docs/RESULTS.md, "Clipping learning rate")
    lr_router: float = 1e-3
    # Learning rate of the shared clipping in stage 2. None: ``lr_lwc``; 0 keeps the clipping stage 1 trained
    # for its view (the base slice by default) and stage 2 trains the routers only.
    lr_lwc_stage2: float | None = None
    weight_decay: float = 0.0
    budget_loss_weight: float = 0.1
    # Stage-2 reconstruction term: "mse", or "log_mse" (scale-free: a step at a low budget, whose MSE is
    # orders of magnitude larger, no longer dominates the shared LWC parameters).
    stage2_loss: str = "mse"
    budget_sampling: str = "uniform"  # "uniform" in [b_1, sum b] or "cycle" over `budgets`
    # The view stage 1 trains the clipping for: bits (a prefix sum of the slice widths, e.g. 4 for the first
    # two slices of [2, 2, 2, 2]); None or "base": the base slice alone (the paper); "anchor": the view the
    # grid is anchored at (MoBiConfig.anchor_bits), else the base slice. The clipping is shared by every
    # view, so stage 1 decides which views it serves best (docs/RESULTS.md: anchor 4 with stage 1 on the
    # 4-bit view gained 6% at 4 bits on SmolLM2-135M).
    stage1_bits: float | str | None = "anchor"
    budgets: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
    gradient_clip_val: float | None = 1.0
    precision: str | int = "32-true"
    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    seed: int = 0
    progress_bar: bool = True
    # Budget at which calibration inputs are pushed through a finished block to form the next block's
    # inputs. None: the middle of the slice range (5 bits for [2, 2, 2, 2]); pushing them at the lowest
    # budgets feeds later blocks near-random inputs on small models. "matched": one input stream per
    # budget trained (the budgets of budget_sampling=cycle, else every view's bits; and stage 1's view),
    # each pushed through the finished blocks at its own budget, and every step reads the stream of its
    # budget: each budget learns to correct the error its own upstream blocks make, as a bit-specific
    # calibration does (costs one block forward per stream per block and a stream's memory each).
    propagate_budget: float | str | None = None
    # Final budget-conditioned threshold fit (patching.fit_budget_thresholds): budget grid step and how
    # many calibration windows it runs per budget. 0 windows keeps the per-block tables only.
    threshold_step: float = 0.25
    threshold_windows: int = 4
    threshold_tokens: int = 1 << 16
    # Where the cached block inputs/targets live: "device" (the model's device), "cpu" (pinned host
    # memory, streamed to the device batch by batch), or "auto" (device when the three tensors take
    # under half of the free accelerator memory, else cpu).
    inputs_on: str = "auto"
    # Under DDP: "global" (each of N ranks takes batch_size / N windows per step: the same optimisation as
    # one device) or "per_device" (each rank takes batch_size: N x fewer steps, an N x larger batch).
    batch_scope: str = "global"
    # Host-device synchronisation interval, in optimizer steps: the loss is checked for NaN/inf and the
    # step metrics are logged every this many steps. 1 stops at the first non-finite step; a larger value
    # lets a GPU run ahead of the host (a non-finite loss then stops the block at the next check, naming the
    # first bad step).
    sync_every: int = 1
    # With MoBiConfig.view_steps, what the per-view step and zero point fit weighs: "block" (each group's error
    # by the group's block of the FP input second-moment matrix: the group's output error; measured better at
    # every budget, docs/RESULTS.md) or "diag" (each input column's error by its mean squared FP activation)
    view_fit: str = "block"
    # With MoBiConfig.view_steps: per view, the block's output error on this many calibration windows decides
    # between the fitted pairs, the learned shared pair and their blends (view_select_mix, view_select_by); 0
    # keeps the fitted pairs at every view. On long calibrations the learned pair can be the better one at the
    # high views (docs/RESULTS.md, "Paper protocol with a step and zero point per view").
    view_select_windows: int = 4
    # the blends tried per view (1: the fitted pair, 0: the learned shared pair; MoBiLinear.blend_view_pair)
    view_select_mix: Sequence[float] = (0.0, 0.5, 1.0)
    # one blend per view for all the block's linears ("block") or for each router site in turn ("site")
    view_select_by: str = "block"
    # With MoBiConfig.view_steps (else ignored): after the choice, tune the step and zero point per group of these views
    # (1-based; None: every view) for view_tune_epochs epochs on the packed block's output MSE at each view
    # (codes fixed; Adam at lr_view_tune on the log step and the zero point; inputs: the stream nearest to the
    # view's bits). 0 epochs: no tuning (docs/RESULTS.md, "Tuning each view's pairs on the block output"). A list:
    # the epochs of each view of view_tune_views, in its order (e.g. views [1, 3, 4], epochs [1, 2, 2]; 0 skips one).
    view_tune_epochs: int | Sequence[int] = 0
    view_tune_views: Sequence[int] | None = None
    lr_view_tune: float = 1e-3

    def __post_init__(self):
        if self.epochs_stage1 < 0 or self.epochs_stage2 < 0 or self.epochs_stage1 + self.epochs_stage2 == 0:
            raise ValueError(
                f"epochs_stage1={self.epochs_stage1}, epochs_stage2={self.epochs_stage2}: both must be >= 0 "
                "and at least one positive"
            )
        if self.stage2_loss not in ("mse", "log_mse"):
            raise ValueError(f"stage2_loss must be 'mse' or 'log_mse', got {self.stage2_loss!r}")
        if self.budget_sampling not in ("uniform", "cycle"):
            raise ValueError(f"budget_sampling must be 'uniform' or 'cycle', got {self.budget_sampling!r}")
        if self.batch_scope not in ("global", "per_device"):
            raise ValueError(f"batch_scope must be 'global' or 'per_device', got {self.batch_scope!r}")
        if self.view_fit not in ("diag", "block"):
            raise ValueError(f"view_fit must be 'diag' or 'block', got {self.view_fit!r}")
        if not self.view_select_mix or any(not 0.0 <= float(t) <= 1.0 for t in self.view_select_mix):
            raise ValueError(
                f"view_select_mix must be a non-empty list of blends in [0, 1] (1: the fitted pair, 0: the "
                f"learned shared pair), got {list(self.view_select_mix)}"
            )
        if self.view_select_by not in ("block", "site"):
            raise ValueError(f"view_select_by must be 'block' or 'site', got {self.view_select_by!r}")
        if self.view_select_windows < 0:
            raise ValueError(f"view_select_windows must be >= 0 (0: no choice), got {self.view_select_windows}")
        epochs = self.view_tune_epochs
        if isinstance(epochs, (int, float)) and not isinstance(epochs, bool):
            if epochs < 0 or int(epochs) != epochs:
                raise ValueError(f"view_tune_epochs must be an integer >= 0 (0: no tuning), got {epochs}")
        elif (
            isinstance(epochs, (str, bytes))
            or not isinstance(epochs, Sequence)
            or not epochs
            or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in epochs)
        ):
            raise ValueError(
                f"view_tune_epochs must be an integer >= 0 or a list of them (one per view of view_tune_views), "
                f"got {epochs!r}"
            )
        elif self.view_tune_views is None or len(self.view_tune_views) != len(epochs):
            raise ValueError(
                f"view_tune_epochs={list(epochs)} needs view_tune_views of the same length (the views they tune, "
                f"in order), got {None if self.view_tune_views is None else list(self.view_tune_views)}"
            )
        if self.view_tune_views is not None and (
            not self.view_tune_views or any(isinstance(k, bool) or int(k) != k or k < 1 for k in self.view_tune_views)
        ):
            raise ValueError(
                f"view_tune_views must be None (every view) or a non-empty list of views 1..K, "
                f"got {list(self.view_tune_views)}"
            )
        if not self.lr_view_tune > 0:
            raise ValueError(f"lr_view_tune must be positive, got {self.lr_view_tune}")
        if self.inputs_on not in ("auto", "device", "cpu"):
            raise ValueError(f"inputs_on must be 'auto', 'device' or 'cpu', got {self.inputs_on!r}")
        if self.lr_lwc_stage2 is not None and self.lr_lwc_stage2 < 0:
            raise ValueError(f"lr_lwc_stage2 must be >= 0 or None (= lr_lwc), got {self.lr_lwc_stage2}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1 (steps between host-device checks), got {self.sync_every}")
        pb = self.propagate_budget
        if isinstance(pb, str) and pb != "matched" or not isinstance(pb, (str, type(None))) and not pb > 0:
            raise ValueError(f"propagate_budget must be a positive budget, 'matched' or None (the middle), got {pb!r}")
        s1 = self.stage1_bits
        if not (s1 is None or (s1 in ("base", "anchor") if isinstance(s1, str) else s1 > 0)):
            raise ValueError(f"stage1_bits must be a positive bit-width, 'base', 'anchor' or None, got {s1!r}")


def _rank_batch(cfg: CalibConfig, tr: L.Trainer) -> int:
    """Windows per step on each rank: under DDP with the global batch (the default) each rank takes its share
    of ``cfg.batch_size`` (at least one window); Lightning's distributed sampler gives each rank its own shard."""
    return max(1, cfg.batch_size // max(1, tr.world_size)) if cfg.batch_scope == "global" else cfg.batch_size


def _static_view_mse(
    block: nn.Module, linears: Sequence[MoBiLinear], k: int, x: torch.Tensor, y: torch.Tensor, kwargs, batch_size: int
) -> float:
    """The packed block's output MSE against ``y`` with ``linears`` at static view ``k`` (their last view if fewer)."""
    for m in linears:
        m.set_static(min(k, m.num_slices))
    return float(F.mse_loss(run_block_batched(block, x, kwargs, batch_size).float(), y.float()))


def _callbacks(callbacks: Callbacks | None) -> list[Any]:
    """A Trainer's callbacks: the shared list, or a fresh one from the function."""
    return list((callbacks() if callable(callbacks) else callbacks) or [])


def tune_view_views(mobi: MoBiConfig, cfg: CalibConfig) -> list[int]:
    """The views whose pairs calibration tunes (``cfg.view_tune_views``, checked against the slices; those of a
    positive number of epochs)."""
    k_max = len(mobi.slice_bits)
    views = list(range(1, k_max + 1)) if cfg.view_tune_views is None else sorted({int(k) for k in cfg.view_tune_views})
    if views[-1] > k_max:
        raise ValueError(f"calib.view_tune_views={list(views)}: slices {list(mobi.slice_bits)} have views 1..{k_max}")
    epochs = view_tune_epochs_of(cfg)
    return [k for k in views if epochs(k) > 0]


def view_tune_epochs_of(cfg: CalibConfig) -> Callable[[int], int]:
    """``view -> epochs`` of :attr:`CalibConfig.view_tune_epochs` (one number for every view, or one per view of
    ``view_tune_views``)."""
    epochs = cfg.view_tune_epochs
    if isinstance(epochs, (int, float)):
        return lambda k: int(epochs)
    assert cfg.view_tune_views is not None  # CalibConfig checks the lengths
    table = {int(k): int(e) for k, e in zip(cfg.view_tune_views, epochs, strict=True)}
    return lambda k: table.get(k, 0)


def stage1_slices(mobi: MoBiConfig, cfg: CalibConfig) -> int:
    """How many slices stage 1 trains: the base alone, the anchored view, or the view of ``cfg.stage1_bits``
    bits."""
    bits = cfg.stage1_bits
    if bits == "anchor":
        bits = mobi.anchor_bits  # always a view when set (MoBiConfig checks it)
    if bits is None or bits == "base":
        return 1
    k = static_k_for_bits(mobi, float(bits))
    if k is not None:
        return k
    views = list(mobi.view_bits)
    raise ValueError(
        f"calib.stage1_bits={cfg.stage1_bits} is not a view of slices {list(mobi.slice_bits)}: "
        f"allowed {views} (or 'base', 'anchor')"
    )


# ---------------------------------------------------------------------------- the per-block Trainer
#: ``lightning.Trainer`` arguments calibration sets for every block, and what decides each of them instead.
OWNED_TRAINER_ARGS: dict[str, str] = {
    "max_epochs": "each block trains calib.epochs_stage1 + calib.epochs_stage2 epochs: set those",
    "min_epochs": "each block trains calib.epochs_stage1 + calib.epochs_stage2 epochs: set those",
    "max_steps": "each block trains calib.epochs_stage1 + calib.epochs_stage2 epochs: set those",
    "min_steps": "each block trains calib.epochs_stage1 + calib.epochs_stage2 epochs: set those",
    "max_time": "each block trains calib.epochs_stage1 + calib.epochs_stage2 epochs: set those",
    "logger": "the logger group sets the loggers (logger=wandb, csv or none)",
    "callbacks": "the callbacks group sets them (callbacks=lr_monitor, or +callbacks.<name>={_target_: ...})",
    "enable_checkpointing": "it is on when the callbacks include a ModelCheckpoint",
    "enable_progress_bar": "set calib.progress_bar",
    "log_every_n_steps": "steps are logged every calib.sync_every steps: set that",
    "use_distributed_sampler": "each block's windows are split between ranks by Lightning's distributed sampler",
}
#: ``lightning.Trainer`` arguments :class:`CalibConfig` carries (``calib.<key>``): a Trainer value must agree.
CALIB_TRAINER_ARGS = ("accelerator", "devices", "strategy", "precision", "gradient_clip_val")
#: Calibration's defaults for the other Trainer arguments (a ``trainer`` value replaces them).
TRAINER_DEFAULTS: dict[str, Any] = {"enable_model_summary": False, "num_sanity_val_steps": 0, "deterministic": False}

TrainerArgs = Mapping[str, Any] | Callable[[], Mapping[str, Any]]
Callbacks = Sequence[Any] | Callable[[], Sequence[Any]]


def check_trainer_args(
    args: Mapping[str, Any], calib: CalibConfig | Mapping[str, Any], prefix: str = "trainer"
) -> None:
    """Refuse Trainer arguments calibration owns, and those that disagree with ``calib`` (one line naming the key)."""
    for key, value in args.items():
        if key in OWNED_TRAINER_ARGS:
            raise ValueError(f"{prefix}.{key} is set by calibration for every block: {OWNED_TRAINER_ARGS[key]}")
        if key in CALIB_TRAINER_ARGS:
            own = calib.get(key) if isinstance(calib, Mapping) else getattr(calib, key)
            if value != own and str(value) != str(own):
                follows = "" if key == "gradient_clip_val" else f" (by default it follows trainer.{key})"
                raise ValueError(
                    f"{prefix}.{key}={value!r} conflicts with calib.{key}={own!r}: calibration uses "
                    f"calib.{key}{follows}; set them alike"
                )


def _trainer_class(target: Any) -> type[L.Trainer]:
    if isinstance(target, str):
        import importlib

        module, _, name = target.rpartition(".")
        target = getattr(importlib.import_module(module), name)
    if not (isinstance(target, type) and issubclass(target, L.Trainer)):
        raise ValueError(f"trainer._target_={target!r} is not lightning.Trainer or a subclass of it")
    return target


def block_trainer(
    cfg: CalibConfig,
    epochs: int,
    loggers: Any = False,
    callbacks: Sequence[Any] = (),
    trainer: TrainerArgs | None = None,
) -> L.Trainer:
    """The Trainer of one block: ``trainer``'s arguments (any ``lightning.Trainer`` argument but the ones
    calibration owns, :data:`OWNED_TRAINER_ARGS`), ``cfg``'s, and the per-block ones calibration sets."""
    extra = dict((trainer() if callable(trainer) else trainer) or {})
    cls = _trainer_class(extra.pop("_target_", L.Trainer))
    check_trainer_args(extra, cfg)
    cbs = list(callbacks)
    if cfg.progress_bar:  # plain tqdm: no refresh thread, readable in log files
        cbs.append(L.pytorch.callbacks.TQDMProgressBar(refresh_rate=1))
    owned = {
        "max_epochs": epochs,
        "logger": loggers,
        "callbacks": cbs,
        "enable_checkpointing": any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in cbs),
        "enable_progress_bar": cfg.progress_bar,
        "log_every_n_steps": cfg.sync_every,
    }
    carried = {key: getattr(cfg, key) for key in CALIB_TRAINER_ARGS}  # equal to `extra`'s (checked above)
    return cls(**{**TRAINER_DEFAULTS, **extra, **carried, **owned})


# ---------------------------------------------------------------------------- block inputs
class _StopForward(Exception):
    pass


def inputs_device(
    model: nn.Module, n_tokens: int, hidden: int, dtype: torch.dtype, where: str = "auto", copies: int = 3
) -> torch.device:
    """Where calibration tensors (``copies`` of ``[n_tokens, hidden]``) are kept: see ``CalibConfig.inputs_on``."""
    device = next(model.parameters()).device
    if where == "cpu" or device.type != "cuda":
        return torch.device("cpu")
    if where == "device":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    need = copies * n_tokens * hidden * torch.empty((), dtype=dtype).element_size()
    return device if need < free / 2 else torch.device("cpu")


def accelerator_for(device: torch.device) -> str:
    """The Lightning accelerator that trains where ``device`` is (``gpu`` for CUDA)."""
    return "gpu" if device.type == "cuda" else device.type


def check_accelerator(device: torch.device, cfg: CalibConfig) -> None:
    """Each block's Trainer moves the block to ``cfg.accelerator`` while its inputs and position embeddings stay
    on the model's device: the two must agree (``calibrate`` picks the accelerator from the model's device)."""
    acc = str(cfg.accelerator).lower()
    if acc == "auto":
        acc = "gpu" if torch.cuda.is_available() else "cpu"
    runs_on = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}.get(acc)
    if runs_on is not None and runs_on != device.type:
        raise ValueError(
            f"calib.accelerator={cfg.accelerator!r} calibrates on {runs_on}, but the model is on {device}: "
            f"set accelerator={accelerator_for(device)!r} (trainer=gpu on the command line) or move the model"
        )


def _to_store(t: torch.Tensor, store: torch.device) -> torch.Tensor:
    t = t.to(store)
    return t.pin_memory() if store.type == "cpu" and torch.cuda.is_available() else t


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, ids: torch.Tensor, store: torch.device | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states entering the first block for every row of ``ids`` ``[n, T]``, and its call kwargs.

    ``store``: where the states are kept (default: the model's device)."""
    _, blocks = find_blocks(model)
    inputs: list[torch.Tensor] = []
    kwargs_box: dict[str, Any] = {}

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach() if store is None else hidden.detach().to(store))
        if not kwargs_box:
            kw = dict(kwargs)
            kw.pop("hidden_states", None)
            kw["past_key_values"] = None
            kw.pop("past_key_value", None)
            kw["use_cache"] = False
            kwargs_box.update(kw)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for row in ids:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    x = torch.cat(inputs)
    return (x if store is None else _to_store(x, store)), kwargs_box


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block_batched(
    block: nn.Module,
    x: torch.Tensor,
    kwargs: dict[str, Any],
    batch_size: int,
    before_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The block's outputs for ``x`` in batches, kept where ``x`` is (streamed to the block's device)."""
    device = next(block.parameters()).device
    outs = []
    for i, start in enumerate(range(0, x.shape[0], batch_size)):
        if before_batch is not None:
            before_batch(i)
        out = run_block(block, x[start : start + batch_size].to(device, non_blocking=True), kwargs)
        outs.append(out.to(x.device))
    y = torch.cat(outs)
    return y.pin_memory() if x.is_pinned() else y


class InputMoments:
    """Second moments of the inputs of the named linears of a block, over every forward while attached:
    ``with moments.attached(block): ...`` then ``moments.mean()`` -> ``{name: tensor}`` (float64): per column
    (``[in]``, the mean squared activation) or, with ``group_size``, the diagonal blocks of the mean ``x x^T``
    (``[n_groups, group_size, group_size]``; a ragged last group zero-padded)."""

    def __init__(self, names: Sequence[str], group_size: int | None = None):
        self.names = list(names)
        self.group_size = group_size
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def _moment(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return (x.double() ** 2).sum(0)
        gs = self.group_size
        pad = (-x.shape[-1]) % gs
        xg = F.pad(x.float(), (0, pad)).reshape(x.shape[0], -1, gs)
        return torch.einsum("ngi,ngj->gij", xg, xg).double()

    @contextlib.contextmanager
    def attached(self, block: nn.Module):
        hooks = []
        for name in self.names:

            def hook(_mod, args, _out, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                self.sums[name] = self.sums.get(name, 0) + self._moment(x)
                self.counts[name] = self.counts.get(name, 0) + x.shape[0]

            hooks.append(block.get_submodule(name).register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    def mean(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.names if not self.counts.get(n)]
        if missing:
            raise RuntimeError(f"no input reached {missing} while measuring input moments")
        return {n: self.sums[n] / self.counts[n] for n in self.names}


# ---------------------------------------------------------------------------- Lightning module
def _block_mobi(block: nn.Module) -> list[MoBiLinear]:
    return [m for m in block.modules() if isinstance(m, MoBiLinear)]


def _block_routers(block: nn.Module) -> list[TokenRouter]:
    return list(getattr(block, ROUTERS_ATTR, {}).values())


class BlockCalibration(L.LightningModule):
    """Learns the LWC parameters and routers of one transformer block against its FP outputs."""

    def __init__(
        self,
        block: nn.Module,
        block_kwargs: dict[str, Any],
        cfg: CalibConfig,
        mobi: MoBiConfig,
        block_index: int,
        step_offset: int = 0,
        streams: Mapping[float, torch.Tensor] | None = None,
    ):
        """``streams`` (``calib.propagate_budget=matched``): the block's inputs per budget; batches then carry
        window indices, and each step reads the stream nearest to the budget it trains."""
        super().__init__()
        self.block = block
        self.streams = dict(streams) if streams else None
        self.block_kwargs = block_kwargs
        self.cfg = cfg
        self.mobi = mobi
        self.block_index = block_index
        self.step_offset = step_offset
        self.linears = _block_mobi(block)
        self.routers = _block_routers(block)
        self.gen = torch.Generator().manual_seed(cfg.seed * 100_003 + block_index)
        self._cycle = 0
        self._last: torch.Tensor | None = None  # (loss, mse) of the latest step, on the device
        self._bad_step: torch.Tensor | None = None  # first step with a non-finite loss (-1: none), on the device
        self.has_routing = bool(self.routers) and cfg.epochs_stage2 > 0
        self.stage1_k = stage1_slices(mobi, cfg)
        # the bits stage 1 trains at (its view, the full view without routing): the stream a stage-1 step reads
        self.stage1_view_bits = float(mobi.view_bits[self.stage1_k - 1] if self.has_routing else mobi.max_bits)

    # -- stage control
    @property
    def stage(self) -> int:
        return 1 if self.current_epoch < self.cfg.epochs_stage1 or not self.has_routing else 2

    def _sample_budget(self) -> float:
        lo, hi = self.mobi.min_bits, self.mobi.max_bits
        if self.cfg.budget_sampling == "cycle":
            b = list(self.cfg.budgets)[self._cycle % len(self.cfg.budgets)]
            self._cycle += 1
            return float(min(max(b, lo), hi))
        return float(lo + (hi - lo) * torch.rand((), generator=self.gen))

    def _configure_stage(self) -> float | None:
        if self.stage == 1:
            for m in self.linears:
                m.set_static(self.stage1_k) if self.has_routing else m.set_static(m.num_slices)
            return None
        target = self._sample_budget()
        for m in self.linears:
            m.set_routed()
            m.target_bits = target
        for r in self.routers:
            r.clear_cache()
        return target

    # -- Lightning hooks
    def training_step(self, batch, batch_idx):
        x, y = batch
        target = self._configure_stage()
        if self.streams is not None:  # x holds window indices: read them from the stream of this step's budget
            stream = self.streams[nearest_stream(self.streams, self.stage1_view_bits if target is None else target)]
            x = stream[x.to(stream.device)].to(y.device, non_blocking=True)
        out = run_block(self.block, x, self.block_kwargs)
        mse = F.mse_loss(out.float(), y.float())
        loss = torch.log(mse + 1e-12) if target is not None and self.cfg.stage2_loss == "log_mse" else mse
        if target is not None and self.cfg.budget_loss_weight > 0:
            loss = loss + self.cfg.budget_loss_weight * self._budget_loss(target)
        self._last = torch.stack([loss.detach(), mse.detach()])
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        first_bad = ~torch.isfinite(self._last[0]) & (self._bad_step < 0)
        self._bad_step = torch.where(first_bad, torch.full_like(self._bad_step, self.global_step), self._bad_step)
        if (self.global_step + 1) % self.cfg.sync_every == 0:
            self._check_finite()
        self.log_dict(
            {
                "calib/loss": loss.detach(),
                "calib/mse": mse.detach(),
                "calib/block": float(self.block_index),
                "calib/stage": float(self.stage),
                "calib/step": float(self.step_offset + self.global_step),
            },
            prog_bar=False,
            on_step=True,
            on_epoch=False,
            batch_size=x.shape[0],
        )
        self.log("mse", mse.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss

    @property
    def final_loss(self) -> float:
        return float(self._last[0]) if self._last is not None else math.nan

    @property
    def final_mse(self) -> float:
        return float(self._last[1]) if self._last is not None else math.nan

    def _check_finite(self) -> None:
        """One host-device synchronisation: stop if any step since the start had a non-finite loss."""
        if self._bad_step is None or (step := int(self._bad_step)) < 0:
            return
        per_epoch = max(1, int(self.trainer.num_training_batches)) if self._trainer is not None else 1
        stage = 1 if step < self.cfg.epochs_stage1 * per_epoch or not self.has_routing else 2
        raise FloatingPointError(
            f"non-finite loss in block {self.block_index} at step {step} (stage {stage}); earlier blocks are kept"
        )

    def on_train_end(self):
        self._check_finite()

    def _budget_loss(self, target: float) -> torch.Tensor:
        num, den = 0.0, 0
        params_by_router: dict[int, int] = {}
        for m in self.linears:
            if m.router is not None:
                params_by_router[id(m.router)] = params_by_router.get(id(m.router), 0) + m.in_features * m.out_features
        for r in self.routers:
            if r.last_soft is None or id(r) not in params_by_router:
                continue
            w = params_by_router[id(r)]
            num = num + w * budget_bits(r.last_soft, r.slice_bits)
            den += w
        if den == 0:
            return torch.zeros((), device=self.device)
        return (num / den - target) ** 2

    def on_train_epoch_start(self):
        if self.current_epoch == self.cfg.epochs_stage1 and self.has_routing and self.cfg.epochs_stage1 > 0:
            log.debug("block %d: stage 2 (joint slices + routers)", self.block_index)
        if self.cfg.lr_lwc_stage2 is not None and self._trainer is not None:
            lr = self.cfg.lr_lwc_stage2 if self.stage == 2 else self.cfg.lr_lwc
            for opt in self.trainer.optimizers:
                opt.param_groups[0]["lr"] = lr

    def configure_optimizers(self):
        lwc = [p for m in self.linears for p in (m.gamma, m.beta) if p is not None]
        groups = [{"params": lwc, "lr": self.cfg.lr_lwc, "weight_decay": self.cfg.weight_decay}]
        router_params = [p for r in self.routers for p in r.parameters()]
        if router_params and self.has_routing:
            groups.append({"params": router_params, "lr": self.cfg.lr_router, "weight_decay": 0.0})
        return torch.optim.AdamW(groups)


class ViewPairTuning(L.LightningModule):
    """Tunes view ``k``'s step and zero point per group of every linear of a packed block (codes fixed) on the
    block's output MSE at static view ``k``: the output-error counterpart of the least-squares fit at packing,
    learned per view as ``lwc`` learns its clipping for one bit-width. Parameters: a log-step offset and a
    zero-point offset per group (both start at 0: the pair as packed or chosen); :meth:`write_pairs` stores the
    tuned pairs (fp16) in the layers. Its caller removes the layers' ``weight_override`` after the fit."""

    def __init__(self, block: nn.Module, k: int, block_kwargs: dict[str, Any], cfg: CalibConfig):
        super().__init__()
        self.block = block
        self.k = k
        self.block_kwargs = block_kwargs
        self.cfg = cfg
        self.linears = [m for m in _block_mobi(block) if k <= m.num_slices and m.scale.dim() == 3]
        self.log_step = nn.ParameterList(
            [nn.Parameter(torch.zeros(m.scale.shape[1:], device=m.scale.device)) for m in self.linears]
        )
        self.d_zero = nn.ParameterList(
            [nn.Parameter(torch.zeros(m.zero.shape[1:], device=m.zero.device)) for m in self.linears]
        )
        self._codes = [m.view_codes(k).float() for m in self.linears]  # exact: codes are below 2^24

    def _pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.linears[i]
        return m.scale[self.k - 1].float() * torch.exp(self.log_step[i]), m.zero[self.k - 1].float() + self.d_zero[i]

    def on_fit_start(self) -> None:
        for i, m in enumerate(self.linears):
            m.weight_override = lambda i=i, m=m: m.view_weight(self.k, *self._pair(i), self._codes[i])

    def training_step(self, batch, batch_idx):
        x, y = batch
        mse = F.mse_loss(run_block(self.block, x, self.block_kwargs).float(), y.float())
        self.log("calib/view_tune_mse", mse.detach(), on_step=True, on_epoch=False, batch_size=x.shape[0])
        return mse

    def configure_optimizers(self):
        return torch.optim.Adam([*self.log_step, *self.d_zero], lr=self.cfg.lr_view_tune)

    @torch.no_grad()
    def write_pairs(self) -> None:
        limit = torch.finfo(torch.float16).max
        for i, m in enumerate(self.linears):
            scale, zero = self._pair(i)
            m.scale[self.k - 1].copy_(scale.clamp(-limit, limit).half())
            m.zero[self.k - 1].copy_(zero.clamp(-limit, limit).half())
            m.clear_cache()


def tune_view_pairs(
    block: nn.Module,
    views: Mapping[int, torch.Tensor],
    y: torch.Tensor,
    kwargs: dict[str, Any],
    cfg: CalibConfig,
    block_index: int,
    make_trainer: Callable[[int], L.Trainer],
) -> dict[int, tuple[float, float, bool]]:
    """:class:`ViewPairTuning` of each view ``k`` of ``views`` (its block inputs; targets ``y``), one Trainer
    (``make_trainer(epochs)``) each. The block's output MSE at static view ``k`` on all of ``x`` is measured
    before and after; the tuned pairs are kept only if it fell (rank 0's decision under DDP). Returns
    ``{k: (MSE before, MSE after, kept)}``."""
    out = {}
    device = next(block.parameters()).device
    all_linears = _block_mobi(block)
    for k, x in views.items():
        module = ViewPairTuning(block, k, kwargs, cfg)
        if not module.linears:
            continue
        before = _static_view_mse(block, all_linears, k, x, y, kwargs, cfg.batch_size)
        packed = [(m.scale[k - 1].clone(), m.zero[k - 1].clone()) for m in module.linears]
        tr = make_trainer(view_tune_epochs_of(cfg)(k))
        loader = DataLoader(
            TensorDataset(x, y),
            batch_size=_rank_batch(cfg, tr),
            shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed * 7919 + 31 * block_index + k),
        )
        try:
            tr.fit(module, loader)
        finally:
            for m in module.linears:
                m.weight_override = None
        module.to(device)  # the Trainer's teardown leaves the module (and the block) on the CPU
        module.write_pairs()
        after = _static_view_mse(block, all_linears, k, x, y, kwargs, cfg.batch_size)
        keep = bool(broadcast_object(after < before))
        if not keep:
            with torch.no_grad():
                for m, (scale, zero) in zip(module.linears, packed, strict=True):
                    m.scale[k - 1].copy_(scale)
                    m.zero[k - 1].copy_(zero)
                    m.clear_cache()
        out[k] = (before, after, keep)
        del module, tr, loader
        gc.collect()
    return out


# ---------------------------------------------------------------------------- driver
@dataclass
class BlockReport:
    block: int
    final_loss: float
    final_mse: float
    seconds: float
    steps: int
    peak_mem_mb: float = math.nan  # peak accelerator memory allocated during the block (CUDA only)
    # views not read with their fitted pair after the per-view choice, as "view:share of the fitted pair"
    # (calib.view_select_*; e.g. "1:0.5 6:0"), "" when every view kept it or no choice was made (calibration.csv
    # leaves the column out when every block has "")
    view_blends: str = ""
    # accelerator memory still allocated when the block is done (CUDA only): what the next block starts from
    end_mem_mb: float = math.nan


@dataclass
class CalibrationResult:
    blocks: list[BlockReport] = field(default_factory=list)
    seconds: float = 0.0  # this process
    # earlier processes of a resumed calibration: the time each had spent when it saved its last block
    earlier_seconds: float = 0.0

    def as_rows(self) -> list[dict]:
        return [vars(b) for b in self.blocks]


def _trainable_only_quant(block: nn.Module) -> None:
    for p in block.parameters():
        p.requires_grad_(False)
    for m in _block_mobi(block):
        for p in (m.gamma, m.beta):
            if p is not None:
                p.requires_grad_(True)
    for r in _block_routers(block):
        r.requires_grad_(True)


@torch.no_grad()
def _fit_block_thresholds(block: nn.Module, x: torch.Tensor, kwargs, cfg: CalibConfig) -> None:
    """Fit each router's bits->tau table on the activations it sees for the quantized inputs ``x``."""
    routers_ = _block_routers(block)
    if not routers_:
        return
    acts: dict[int, list[torch.Tensor]] = {id(r): [] for r in routers_}
    hooks = []
    for m in _block_mobi(block):
        r = m.router
        if r is None:
            continue
        m.set_static(m.num_slices)
        if not m.router_home:  # a borrower's input is not the router's
            continue

        def hook(mod, args, r=r):
            if not acts[id(r)] or acts[id(r)][-1] is not args[0]:
                acts[id(r)].append(args[0])

        hooks.append(m.register_forward_pre_hook(hook))
    try:
        run_block_batched(block, x, kwargs, cfg.batch_size)
    finally:
        for h in hooks:
            h.remove()
    for r in routers_:
        xs = torch.cat([a.reshape(-1, a.shape[-1]) for a in acts[id(r)]])
        if xs.shape[0] > cfg.threshold_tokens:
            idx = torch.randperm(xs.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
            xs = xs[idx[: cfg.threshold_tokens]]
        r.fit_thresholds(xs)


@torch.no_grad()
def _choose_view_pairs(
    block: nn.Module,
    x: torch.Tensor | Mapping[int, torch.Tensor],
    y: torch.Tensor,
    kwargs,
    cfg: CalibConfig,
    groups: Sequence[Sequence[MoBiLinear]] | None = None,
) -> dict[int, tuple[float, ...]]:
    """Per view ``k``, a blend of the fitted per-view pairs and the learned shared pair for each group of linears
    (``MoBiLinear.blend_view_pair``, ``t`` from ``cfg.view_select_mix``; 1 is the fitted pair) that lowers the
    output MSE of the packed block at static view ``k`` on inputs ``x`` (or ``x[k]``; targets ``y``): the groups
    in turn, each keeping the best ``t`` given the others (one group, all the block's linears, by default), the fitted
    pair unless another is strictly better. Returns the views where some group left its fitted pair, with
    each group's ``t`` (rank 0's choice under DDP, so the ranks stay identical)."""
    if groups is None:
        groups = [_block_mobi(block)]
    groups = [[m for m in g if m.shared_pair is not None] for g in groups]
    groups = [g for g in groups if g]
    linears = [m for g in groups for m in g]
    if not linears:
        return {}

    def set_blends(k: int, ts: Sequence[float]) -> None:
        for g, t in zip(groups, ts, strict=True):
            for m in g:
                if k <= m.num_slices:
                    m.blend_view_pair(k, t)

    def error(k: int, ts: Sequence[float]) -> float:
        set_blends(k, ts)
        return _static_view_mse(block, linears, k, x[k] if isinstance(x, Mapping) else x, y, kwargs, cfg.batch_size)

    tries = sorted(set(cfg.view_select_mix) - {1.0}, reverse=True)
    chosen = {}
    for k in range(1, max(m.num_slices for m in linears) + 1):
        ts = [1.0] * len(groups)
        best = error(k, ts)
        for gi in range(len(groups)):
            for t in tries:
                trial = ts[:gi] + [t] + ts[gi + 1 :]
                e = error(k, trial)
                if e < best:
                    best, ts = e, trial
        if any(t != 1.0 for t in ts):
            chosen[k] = tuple(ts)
        set_blends(k, [1.0] * len(groups))
    chosen = broadcast_object(chosen)
    for k, ts in chosen.items():
        set_blends(k, ts)
    for m in linears:
        m.drop_shared_pair()
        m.set_static(m.num_slices)
    return chosen


def propagation_budgets(mobi: MoBiConfig, cfg: CalibConfig) -> list[float]:
    """The budgets at which calibration inputs are propagated: one (``calib.propagate_budget``, the middle of
    the range by default), or for ``"matched"`` every budget stage 2 trains (the cycle's budgets, else every
    view's bits) and stage 1's view, each clamped to the views' range (the full view alone without stage 2)."""
    lo, hi = mobi.min_bits, mobi.max_bits
    pb = cfg.propagate_budget
    if pb != "matched":
        return [float(pb) if pb is not None else (lo + hi) / 2]
    if cfg.epochs_stage2 == 0:  # no stage 2: stage 1 trains the full view
        return [float(hi)]
    trained = list(cfg.budgets) if cfg.budget_sampling == "cycle" else list(mobi.view_bits)
    trained.append(mobi.view_bits[stage1_slices(mobi, cfg) - 1])
    return sorted({float(min(max(b, lo), hi)) for b in trained})


def nearest_stream(streams: Mapping[float, Any], bits: float) -> float:
    """The key of ``streams`` nearest to ``bits`` (the lower one on a tie)."""
    return min(streams, key=lambda b: (abs(b - bits), b))


def _propagate_streams(block, streams: dict[float, torch.Tensor], kwargs, cfg: CalibConfig, mobi: MoBiConfig) -> None:
    """Every stream through this packed block at its own budget, in place (one stream replaced at a time, so
    at most one extra stream of memory). The block's routers then drop their per-token results of the last
    batch (their caches refer to the inputs only weakly), so a finished block keeps nothing of it."""
    for b in streams:
        streams[b] = _propagate(block, streams[b], kwargs, cfg, mobi, b)
    for r in _block_routers(block):
        r.clear_cache()


def _propagate(block, q_x, kwargs, cfg: CalibConfig, mobi: MoBiConfig, budget: float) -> torch.Tensor:
    """The next block's inputs: the quantized trajectory through this packed block at ``budget``."""
    for m in _block_mobi(block):
        if m.router is not None:
            m.router.set_budget(min(max(budget, mobi.min_bits), mobi.max_bits))
            m.set_routed()
    out = run_block_batched(block, q_x, kwargs, cfg.batch_size)
    for m in _block_mobi(block):
        m.clear_cache()
    return out


class _CalibState:
    """Finished blocks of one calibration, saved as they complete (``block_XXX.safetensors``).

    ``state.json`` lists them with their reports (time and steps included) under a key: the MoBiConfig, the
    calibration settings, the calibration tokens and the base model's fingerprint; a state of another key
    is started over. ``seconds``: the calibration time of the processes that wrote it, up to their last
    saved block (what a resumed calibration adds its own time to).
    """

    def __init__(
        self, folder, mobi: MoBiConfig, cfg: CalibConfig, calib_ids: torch.Tensor, base_fingerprint: str | None = None
    ):
        from .io.fileio import atomic_write_text, ensure_dir

        self.folder = ensure_dir(folder)
        ids = calib_ids.detach().cpu().contiguous()
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress_bar",)}
        self.key = {
            "mobi": mobi.to_dict(),
            "calib": json.loads(json.dumps(settings, default=str)),
            "calib_ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "calib_ids_shape": list(ids.shape),
            "base_model": base_fingerprint,
        }
        meta_path = self.folder / "state.json"
        self.reports: dict[int, dict] = {}
        self.earlier_seconds = 0.0
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == self.key:
                self.reports = {int(k): v for k, v in meta.get("blocks", {}).items()}
                spent = meta.get("seconds")
                self.earlier_seconds = float(
                    spent
                    if isinstance(spent, (int, float))
                    else sum(r.get("seconds", 0.0) for r in self.reports.values())
                )
            else:
                old = meta.get("key") if isinstance(meta.get("key"), dict) else {}
                what = [k.replace("_", " ") for k in self.key if old.get(k) != self.key[k]]
                log.warning(
                    "calibration state in %s was made with other settings (%s): starting over",
                    self.folder,
                    ", ".join(what) or "unknown",
                )
                for f in self.folder.glob("block_*.safetensors"):
                    if is_rank_zero():
                        f.unlink(missing_ok=True)
        self.writer = is_rank_zero()  # under DDP every rank reads the state, rank 0 alone writes it
        self.t_start = time.perf_counter()
        self._write = lambda: (
            self.writer
            and atomic_write_text(
                meta_path,
                json.dumps(
                    {
                        "key": self.key,
                        "blocks": self.reports,
                        "seconds": self.earlier_seconds + time.perf_counter() - self.t_start,
                    },
                    indent=1,
                ),
            )
        )
        self._write()

    def _file(self, i: int) -> Path:
        return self.folder / f"block_{i:03d}.safetensors"

    def has(self, i: int) -> bool:
        return i in self.reports and self._file(i).is_file()

    def report(self, i: int) -> BlockReport:
        """The saved block's report, with the time and steps of the process that calibrated it."""
        return BlockReport(**self.reports[i])

    def save(self, i: int, block: nn.Module, report: BlockReport) -> None:
        from safetensors.torch import save

        if not self.writer:
            self.reports[i] = vars(report)
            return
        from .io.checkpoint import quantized_state
        from .io.fileio import atomic_write_bytes

        atomic_write_bytes(self._file(i), save(quantized_state(block)))
        self.reports[i] = vars(report)
        self._write()  # the JSON names a block only once its tensors are safely on disk

    def load(self, i: int, block: nn.Module) -> None:
        from safetensors.torch import load_file

        from .io.checkpoint import _assign

        tensors = load_file(str(self._file(i)))
        dtype = next(iter(_block_mobi(block))).weight.dtype
        device = next(iter(_block_mobi(block))).weight.device
        for m in _block_mobi(block):
            m.make_packed_buffers(dtype)
        with torch.no_grad():
            for name, mod in block.named_modules():
                if isinstance(mod, (MoBiLinear, TokenRouter)):
                    _assign(mod, name, tensors)
        block.to(device)
        for r in _block_routers(block):
            r.requires_grad_(False)


def _unpatch(model: nn.Module) -> list[list[list[str]]] | None:
    """A model already patched by ``quantize_model`` (fake-quant, not yet packed) back to its FP linears;
    returns its router sites, or None when it holds no ``MoBiLinear``.

    Calibration patches each block itself, after taking that block's FP outputs as targets. Given a patched
    model it used to patch the patched blocks again: the linears inside the routers were taken for weights
    to quantize and got routers of their own, which no token ever reached (``torch.cat`` of no activations
    in the threshold fit). A ``MoBiLinear`` keeps its FP weight until it is packed, so the FP model is
    recovered exactly; the routers are re-initialised by the calibration as for an FP model.
    """
    patched = [(n, m) for n, m in model.named_modules() if isinstance(m, MoBiLinear)]
    if not patched:
        return None
    if any(m.packed for _, m in patched):
        raise ValueError(
            "the model is already packed (mq.freeze or a finished calibration): calibrate the "
            "FP model, or the model right after mq.quantize_model"
        )
    sites = getattr(model, "mobiquant_sites", None)
    if sites is None:
        raise ValueError("the model holds MoBiLinear layers but no router sites: patch it with mq.quantize_model")
    for name, m in patched:
        lin = nn.Linear(
            m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(m.weight)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    _, blocks = find_blocks(model)
    for block in blocks:
        if hasattr(block, ROUTERS_ATTR):
            delattr(block, ROUTERS_ATTR)
    return sites


def calibrate(
    model: nn.Module,
    calib_ids: torch.Tensor,
    mobi: MoBiConfig | None = None,
    *,
    loggers: Any = False,
    callbacks: Callbacks | None = None,
    trainer: TrainerArgs | None = None,
    state_dir: str | os.PathLike | None = None,
    **settings: Any,
) -> CalibrationResult:
    """One call from a model (FP, or patched by ``quantize_model``) to a calibrated, packed checkpoint.

    ``calib_ids``: token windows ``[n, T]``. ``mobi``: the slices and routers (default: the config the model
    was patched with, else ``MoBiConfig()``). ``settings``: any ``CalibConfig`` field (``epochs_stage1=2``,
    ``batch_size=4``, ...; the defaults are the paper's protocol); the accelerator follows the model's
    device unless given. ``callbacks`` and ``trainer`` (more ``lightning.Trainer`` arguments) reach every
    block's Trainer (:func:`calibrate_model`). Afterwards ``set_budget`` works at once and
    ``save_quantized`` writes the checkpoint.
    """
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(CalibConfig)})
    if unknown:
        raise TypeError(f"calibrate() got unknown settings {unknown}; allowed: the fields of CalibConfig")
    mobi = mobi or getattr(model, "mobiquant_config", None) or MoBiConfig()
    if "accelerator" not in settings:
        settings["accelerator"] = accelerator_for(next(model.parameters()).device)
    return calibrate_model(
        model,
        calib_ids,
        mobi,
        CalibConfig(**settings),
        loggers=loggers,
        callbacks=callbacks,
        trainer=trainer,
        state_dir=state_dir,
    )


def calibrate_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    mobi: MoBiConfig,
    cfg: CalibConfig | None = None,
    loggers: Any = False,
    callbacks: Callbacks | None = None,
    on_block_end: Callable[[int, BlockReport], None] | None = None,
    state_dir: str | os.PathLike | None = None,
    trainer: TrainerArgs | None = None,
) -> CalibrationResult:
    """Quantize and calibrate ``model`` in place on token windows ``calib_ids`` ``[n, T]``.

    Each block is fitted by its own ``lightning.Trainer`` (:func:`block_trainer`): ``loggers`` and
    ``callbacks`` (a list shared by every block, or a function returning a fresh one per block) are its
    loggers and callbacks; ``trainer`` adds any other Trainer argument (a mapping, or a function returning
    one per block: ``num_nodes``, ``profiler``, ``accumulate_grad_batches``, ...). The arguments calibration
    owns (:data:`OWNED_TRAINER_ARGS`: the epochs, loggers, callbacks, checkpointing, progress bar, logging
    interval) are refused, and those :class:`CalibConfig` carries must agree with it.

    ``model`` is the FP model, or the same right after ``quantize_model`` (its sites are kept, the FP
    weights restored first). Returns per-block reports; afterwards every block is packed and every router
    has threshold tables,
    so ``set_budget`` works at once. With ``state_dir``, every finished block is saved there as it
    completes; calling again with the same arguments and folder reloads the finished blocks, rebuilds
    the next block's inputs by running them, and continues with the first unfinished block. The result
    is the same as an uninterrupted run (each block's randomness is seeded by its index).
    """
    cfg = cfg or CalibConfig()
    check_accelerator(next(model.parameters()).device, cfg)
    stage1_slices(mobi, cfg)  # a bad stage1_bits fails here, before any work
    tune = tune_view_views(mobi, cfg)  # bad views fail here, before any work
    if tune:
        if not mobi.view_steps:
            log.info("calib.view_tune_epochs: no view has a pair of its own (view_steps=false): nothing to tune")
    if isinstance(trainer, Mapping):
        check_trainer_args({k: v for k, v in trainer.items() if k != "_target_"}, cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    state = None
    if state_dir is not None:
        from .io.checkpoint import base_fingerprint

        state = _CalibState(state_dir, mobi, cfg, calib_ids, base_fingerprint(model))
    t_start = time.perf_counter()
    sites = _unpatch(model) or discover_sites(model, mobi)
    homes = router_homes(model, sites, mobi)  # placement 'sublayer': the linears that borrow their router's decisions
    _, blocks = find_blocks(model)
    device = next(model.parameters()).device
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    prop = propagation_budgets(mobi, cfg)
    store = (
        inputs_device(model, calib_ids.numel(), hidden, next(model.parameters()).dtype, cfg.inputs_on, 2 + len(prop))
        if hidden
        else device
    )
    if store != device:
        log.info("calibration inputs kept in pinned host memory and streamed to %s", device)
    fp_x, kwargs = capture_block_inputs(model, calib_ids, store)
    # the quantized trajectory: one stream per propagation budget (calib.propagate_budget)
    streams = {b: fp_x.clone() for b in prop}
    # thresholds are fitted on the stream nearest to the middle of the range (the default's only stream)
    main = nearest_stream(streams, (mobi.min_bits + mobi.max_bits) / 2)
    if len(prop) > 1:
        log.info("calibration inputs propagated at %s bits, each budget trained on its own", [f"{b:g}" for b in prop])
    result = CalibrationResult()
    step_offset = 0
    on_cuda = device.type == "cuda"
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        # FP targets before patching; with view_steps also each linear's input moments (the FP block's
        # activations on the calibration windows), which weight the per-view step fit at packing
        moments = InputMoments(
            [n for group in sites[i] for n in group] if mobi.view_steps else [],
            mobi.group_size if cfg.view_fit == "block" else None,
        )
        with moments.attached(block):
            fp_y = run_block_batched(block, fp_x, kwargs, cfg.batch_size)
        torch.manual_seed(cfg.seed * 1_000_003 + i)  # router init: the same whether resumed or not
        quantize_block(block, sites[i], mobi, None if homes is None else homes[i])
        if state is not None and state.has(i):
            state.load(i, block)
            report = state.report(i)
            log.info("block %d: resumed from %s", i, state.folder)
            step_offset += report.steps
            fp_x = fp_y
            _propagate_streams(block, streams, kwargs, cfg, mobi)
            result.blocks.append(report)
            if on_block_end is not None:
                on_block_end(i, report)
            continue
        _trainable_only_quant(block)
        matched = len(streams) > 1
        module = BlockCalibration(block, kwargs, cfg, mobi, i, step_offset, streams if matched else None)
        epochs = cfg.epochs_stage1 + (cfg.epochs_stage2 if module.has_routing else 0)
        block_tr = block_trainer(cfg, epochs, loggers, _callbacks(callbacks), trainer)
        loader = DataLoader(
            TensorDataset(torch.arange(len(fp_y)) if matched else streams[main], fp_y),
            batch_size=_rank_batch(cfg, block_tr),
            shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed + i),
        )
        if epochs > 0:
            block_tr.fit(module, loader)
        steps, final_loss, final_mse = int(block_tr.global_step), module.final_loss, module.final_mse
        # the Trainer and the module refer to each other: without a collection, each finished block's
        # trainer keeps its loader's tensors (the block's inputs and FP targets) alive for several blocks
        del module, block_tr, loader
        gc.collect()
        block.to(device)
        block.eval()
        col_weight = moments.mean()
        choose = mobi.view_steps and cfg.view_select_windows > 0
        for name, m in block.named_modules():
            if isinstance(m, MoBiLinear):
                m.target_bits = None
                m.freeze(col_weight.get(name), keep_shared=choose)
        blends: dict[int, tuple[float, ...]] = {}
        if choose:
            n = cfg.view_select_windows
            groups = None
            if cfg.view_select_by == "site":
                groups = [[cast(MoBiLinear, block.get_submodule(name)) for name in site] for site in sites[i]]
            views = {k: streams[nearest_stream(streams, bits)][:n] for k, bits in enumerate(mobi.view_bits, 1)}
            blends = _choose_view_pairs(block, views, fp_y[:n], kwargs, cfg, groups)
            log.info("block %d: views not on their fitted pair (view: share of it): %s", i, blends or "none")
        for r in _block_routers(block):
            r.requires_grad_(False)
            r.clear_cache()
        if mobi.view_steps and tune:
            tuned = tune_view_pairs(
                block,
                {k: streams[nearest_stream(streams, mobi.view_bits[k - 1])] for k in tune},
                fp_y,
                kwargs,
                cfg,
                i,
                lambda epochs: block_trainer(cfg, epochs, loggers, _callbacks(callbacks), trainer),
            )
            log.info(
                "block %d: view pairs tuned (view: block MSE before -> after) %s",
                i,
                {k: f"{a:.4g} -> {b:.4g}" + ("" if kept else " (not kept)") for k, (a, b, kept) in tuned.items()},
            )
        _fit_block_thresholds(block, streams[main], kwargs, cfg)
        fp_x = fp_y
        step_offset += steps
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else math.nan
        report = BlockReport(
            i,
            final_loss,
            final_mse,
            time.perf_counter() - t0,
            steps,
            peak,
            " ".join(f"{k}:" + "/".join(f"{t:g}" for t in ts) for k, ts in sorted(blends.items())),
            torch.cuda.memory_allocated(device) / 2**20 if on_cuda else math.nan,
        )
        if state is not None:
            state.save(i, block, report)
        _propagate_streams(block, streams, kwargs, cfg, mobi)
        result.blocks.append(report)
        if on_block_end is not None:
            on_block_end(i, report)
    model.mobiquant_config = mobi
    model.mobiquant_sites = sites
    if cfg.threshold_windows > 0 and len(mobi.slice_bits) > 1:
        n = int(round((mobi.max_bits - mobi.min_bits) / cfg.threshold_step))
        grid = [mobi.min_bits + i * (mobi.max_bits - mobi.min_bits) / n for i in range(n + 1)]
        t0 = time.perf_counter()
        log.info(
            "budget-conditioned thresholds: %d budgets x %d windows ...",
            len(grid),
            min(cfg.threshold_windows, calib_ids.shape[0]),
        )
        fit_budget_thresholds(model, list(calib_ids[: cfg.threshold_windows].split(1)), grid)
        ranks = world_size()
        log.info(
            "budget-conditioned thresholds for %d budgets in %.1fs (%d rank%s)",
            len(grid),
            time.perf_counter() - t0,
            ranks,
            "s" if ranks > 1 else "",
        )
    result.seconds = time.perf_counter() - t_start
    result.earlier_seconds = state.earlier_seconds if state is not None else 0.0
    return result
