"""What the analysis tasks share: config checks, the run session (model, text, calibration context,
tracker), per-token forward passes and W&B logging.

A session is the first half of :func:`mobiquant.tasks.quantize.run` (same model loading, calibration windows,
evaluation windows, :class:`~mobiquant.methods.RunContext`, so checkpoints saved by one task are
reloaded by another in the same run directory); what is measured differs per task.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
from omegaconf import DictConfig

from ...io.results import concat_rows, write_csv
from ...io.results import save_figure as save_figure  # re-exported: the analyses import it from here
from ...io.tracking import Tracker, plain_config
from ...methods.core import MoBiQuant, QuantMethod, RunContext
from ...patching import find_blocks
from ..quantize import ConfigError, load_base_model, load_token_ids, prepare_run, run_context

log = logging.getLogger("mobiquant")


# ---------------------------------------------------------------------------- config checks
def analysis_dataset(cfg: DictConfig) -> str:
    """The ``data.eval`` corpus the analysis runs on (``analysis.dataset``; default: the first one).

    The calibration text must not be that text: the analysis would then measure errors on the very
    tokens the quantizers were fitted to.
    """
    names = list(cfg.data.eval.keys())
    name = cfg.analysis.get("dataset")
    if name is None:
        name = names[0]
    if name not in names:
        raise ConfigError(f"analysis.dataset={name!r} is not an evaluation corpus; allowed: {', '.join(names)}")
    spec, calib = cfg.data.eval[name], cfg.data.calib
    same_paths = list(spec.get("paths") or []) == list(calib.get("paths") or [])
    if spec.corpus == calib.corpus and spec.split == calib.split and same_paths:
        raise ConfigError(
            f"analysis.dataset={name!r} is the calibration text itself (corpus {spec.corpus!r}, split "
            f"{spec.split!r}): choose an evaluation split that calibration does not read"
        )
    return str(name)


def single_process(cfg: DictConfig, task: str) -> None:
    if str(cfg.trainer.get("strategy", "auto")).startswith("ddp"):
        raise ConfigError(
            f"task={task} runs in one process: trainer={cfg.trainer.strategy} is not supported "
            "(use trainer=cpu or trainer=gpu)"
        )


def routed_mobiquant(method: QuantMethod, task: str) -> MoBiQuant:
    """The ``quant`` method as a MoBiQuant checkpoint with routers, or a ConfigError saying what is needed."""
    if type(method) is not MoBiQuant or method.static:
        raise ConfigError(
            f"task={task} analyses a routed MoBiQuant checkpoint: quant={method.name} is not one (use quant=mobiquant)"
        )
    mobi = method.mobi
    if len(mobi.slice_bits) < 2 or not mobi.routers:
        raise ConfigError(
            f"task={task}: quant.mobi.slice_bits={list(mobi.slice_bits)} (routers={mobi.routers}) "
            "has no router to analyse; use at least two slices"
        )
    return method


def resolve_layers(layers: Sequence[int], n_blocks: int, key: str) -> list[int]:
    """Block indices (negative ones counted from the end), checked against the model's depth."""
    out = []
    for i, v in enumerate(layers):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}[{i}]={v!r} is not an integer block index")
        if not -n_blocks <= v < n_blocks:
            raise ConfigError(
                f"{key}[{i}]={v} is outside this model's {n_blocks} blocks: allowed {-n_blocks} to {n_blocks - 1}"
            )
        if v % n_blocks not in out:
            out.append(v % n_blocks)
    return out


# ---------------------------------------------------------------------------- session
@dataclass
class Session:
    cfg: DictConfig
    out_dir: Path
    tracker: Tracker
    base: nn.Module
    tokenizer: Any
    ctx: RunContext
    dataset: str
    windows: torch.Tensor  # LongTensor [n, seqlen] of the analysed corpus
    tokenizer_name: str = ""
    calib_rows: list[dict] = field(default_factory=list)

    def fp_model(self) -> nn.Module:
        return copy.deepcopy(self.base)

    @property
    def n_blocks(self) -> int:
        return len(find_blocks(self.base)[1])

    @property
    def blocks_name(self) -> str:
        return find_blocks(self.base)[0]


@contextlib.contextmanager
def open_session(cfg: DictConfig, dataset: str) -> Iterator[Session]:
    """Load the model and text, build the calibration context; always closes the tracker (W&B run)."""
    from ...io.data import calibration_windows, eval_windows

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out_dir = prepare_run(cfg)
    tracker = Tracker(cfg.get("logger"), plain_config(cfg))
    failed = True
    calib_rows: list[dict] = []
    try:
        log.info("loading model %s", cfg.model.path)
        base, tokenizer = load_base_model(cfg)
        log.info("calibration text: %s (%s)", cfg.data.calib.corpus, cfg.data.calib.split)
        calib_ids = calibration_windows(
            load_token_ids(cfg.data.calib, tokenizer), cfg.data.calib.nsamples, cfg.data.calib.seqlen, cfg.seed
        )
        windows = eval_windows(
            load_token_ids(cfg.data.eval[dataset], tokenizer), cfg.eval.seqlen, cfg.eval.get("max_windows")
        )
        log.info("analysed text %s: %d windows of %d tokens", dataset, windows.shape[0], windows.shape[1])

        ctx = run_context(cfg, base, calib_ids, out_dir, tracker, calib_rows)
        session = Session(
            cfg,
            out_dir,
            tracker,
            base,
            tokenizer,
            ctx,
            dataset,
            windows,
            getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
            calib_rows,
        )
        yield session
        failed = False
    finally:
        if calib_rows:  # only calibrations done by this run; a resumed run keeps the earlier file
            write_csv(concat_rows(calib_rows).dropna(axis=1, how="all"), out_dir / "calibration.csv")
        tracker.finish(failed)


# ---------------------------------------------------------------------------- forward passes
@contextlib.contextmanager
def capture_blocks(model: nn.Module, blocks_name: str, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks keeping the output hidden states ``[batch, T, d]`` of the chosen blocks of the stack
    ``blocks_name`` (found on the FP model: ``find_blocks`` looks for ``nn.Linear``s, which a quantized
    model no longer has)."""
    blocks = model.get_submodule(blocks_name)
    box: dict[int, torch.Tensor] = {}
    hooks = []
    for i in layers:

        def hook(mod, args, out, i=i):
            box[i] = (out[0] if isinstance(out, (tuple, list)) else out).detach()

        hooks.append(blocks[i].register_forward_hook(hook))
    try:
        yield box
    finally:
        for h in hooks:
            h.remove()


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits


# ---------------------------------------------------------------------------- outputs
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """A plain Markdown table (no extra dependency)."""

    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(str(c) for c in df.columns) + " |", "|---" * len(df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def log_to_wandb(
    tracker: Tracker,
    prefix: str,
    tables: dict[str, pd.DataFrame],
    images: dict[str, Path],
    summary: dict[str, float],
    markdown: str,
) -> None:
    """Tables, figures, scalar results and the Markdown summary into the run's W&B run (if any)."""
    run = tracker.wandb_run
    if run is None:
        return
    import wandb

    payload: dict[str, Any] = {}
    for name, df in tables.items():
        clean = df.astype({c: "string" for c in df.columns if df[c].dtype == object})
        payload[f"{prefix}/tables/{name}"] = wandb.Table(dataframe=clean.astype(object).where(clean.notna(), None))
    for name, path in images.items():
        payload[f"{prefix}/figures/{name}"] = wandb.Image(str(path))
    run.log(payload)
    for key, value in summary.items():
        run.summary[f"{prefix}/{key}"] = value
    run.summary[f"{prefix}/markdown"] = markdown
