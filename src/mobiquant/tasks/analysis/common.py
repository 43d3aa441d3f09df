"""What the analysis tasks share: config checks, the analysed text and calibration context of their
session (:func:`mobiquant.tasks.session.open_session`, as every task), per-token forward passes and W&B
logging.

The session loads the model and the calibration windows as :func:`mobiquant.tasks.quantize.run` does (the
same :class:`~mobiquant.methods.RunContext`, so checkpoints saved by an earlier run of the task in its
run directory are reloaded); what is measured differs per task.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
from omegaconf import DictConfig

from ...io.results import save_figure as save_figure  # re-exported: the analyses import it from here
from ...io.tracking import Tracker
from ...methods.core import MoBiQuant, QuantMethod, RunContext
from ..session import ConfigError, Session

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
def analysis_inputs(ses: Session, dataset: str) -> tuple[torch.Tensor, RunContext, list[dict]]:
    """The analysed windows of ``data.eval.<dataset>``, the calibration context and its rows (only the
    calibrations this run does; ``calibration.csv`` is rewritten after each block, and a run that
    calibrates nothing keeps the earlier file)."""
    calib_rows: list[dict] = []
    ctx = ses.context(calib_rows, calib_csv=ses.out_dir / "calibration.csv")
    windows = ses.eval_windows(dataset)
    log.info("analysed text %s: %d windows of %d tokens", dataset, windows.shape[0], windows.shape[1])
    return windows, ctx, calib_rows


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
