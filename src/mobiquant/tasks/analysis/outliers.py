"""``task=outliers``: the outlier-migration analysis (docs/DESIGN.md, sections 'Motivation' and 'Analyses').

One command calibrates bit-specific LWC checkpoints at every bit-width of ``analysis.outliers.bits``
(default A = 3, B = 4) and the MoBiQuant checkpoint of ``quant``, or reloads them from the run directory,
then measures on the evaluation text (``analysis.dataset``, never the calibration text):

Models ("variants"). ``lwc-wA@B`` is the LWC model calibrated at A bits and run at B bits: its learned
clipping (``gamma``/``beta`` per row and group, i.e. the window ``[sigmoid(beta) min, sigmoid(gamma) max]``)
is kept and the FP weights are re-quantized round-to-nearest at B bits inside that window
(:func:`requantize_lwc`). ``lwc-wA@A`` is the calibrated checkpoint itself (re-quantizing at A gives the
same codes bit for bit). A packed checkpoint keeps only the A-bit codes, so the clipping is recorded while
each block is calibrated (:class:`ClippingRecorder`, a Lightning callback of ``calibrate_model``) and
saved beside the checkpoint (``lwc_clipping.safetensors``). ``mobiquant@B`` is the MoBiQuant checkpoint
at budget B (``set_budget``: thresholds only), with its measured average bits.

Per-token errors against the FP model, for every scored token (window positions ``0..T-2``, the
positions whose next-token prediction perplexity scores), at each site:

* ``block<i>``: the output hidden state of transformer block ``i`` (``analysis.outliers.layers``),
  ``|h_q - h_fp|^2 / |h_fp|^2`` (``block_error: relative``, the default) or ``mean((h_q - h_fp)^2)``
  (``mse``);
* ``kl``: ``KL(p_fp || p_q)`` of the next-token distributions (final logits);
* ``dnll``: ``NLL_q - NLL_fp`` of the actual next token.

Outputs in the run directory:

* ``token_errors.csv``: one row per scored token (window, position, token, next token, FP NLL), one
  column ``<variant>:<site>`` per variant and site (and ``<variant>:nll``).
* ``ppl_matrix.csv`` / ``ppl_matrix.png``: the cross-precision perplexity matrix, rows "calibrated at"
  (``lwc-wA`` for each A, and ``mobiquant``), columns "run at" (each bit-width), with the achieved
  average bits of each cell; the FP perplexity as its own row.
* ``jaccard.csv``: for every site and every pair of variants, the Jaccard overlap ``|S1 & S2| / |S1 | S2|``
  of their top-p% token sets (``top_percent``, default 10: the ``round(p/100 * n)`` tokens of
  largest error, at least one), with the overlap two independent random sets of that size would have
  on average (``f / (2 - f)``, ``f`` the fraction). Pairs are labelled: ``same checkpoint, other bits``
  (``lwc-wA@A`` vs ``lwc-wA@B``: the migration the paper describes), ``bit-specific checkpoints``
  (``lwc-wA@A`` vs ``lwc-wB@B``), ``mobiquant, other budget``, ``same bits, other checkpoint`` (a control)
  and ``other``.
* ``top_tokens.csv``: the top-p% experiment (below); ``error_scatter.png``: per-token error at A against
  at B at the ranking site; ``outliers.md``: the summary; all logged to W&B when the W&B logger is on.

The top-p% experiment (our definition). For each checkpoint ``lwc-wA`` and each other bit-width B, let
``L = min(A, B)``, ``H = max(A, B)``. A *token-precision split* runs the ``lwc-wA`` checkpoint with the
tokens of a set S at one precision and every other token at the other one: in every quantized linear,
the rows of S use the weights of ``lwc-wA@L`` (or ``@H``) and the other rows those of ``lwc-wA@H`` (or
``@L``), exactly as a per-token router would (attention then mixes tokens as usual). S, of p% of the
scored tokens, is one of

* ``top at A``: the tokens of largest error (site ``rank_by``, default ``kl``) when run at A, the
  calibration precision ("the A-bit ranking");
* ``top at B``: the tokens of largest error when the same checkpoint runs at B;
* ``random``: a random set of the same size (seeded by ``seed``).

Split ``low`` keeps S at the lower precision L and runs the rest at H; split ``high`` gives S the
higher precision H and keeps the rest at L. For each we report the perplexity over all scored tokens,
the mean NLL of S and of the rest, and (from the uniform runs) the NLL of S when every token runs at L
and at H. If the tokens most hurt at A were also the tokens most hurt at B (no migration), the A-bit and
B-bit rankings would pick the same S and give the same perplexity; the gap between the ``top at A`` and
``top at B`` rows, next to the ``random`` row, is how much the ranking by one precision misjudges the
tokens that matter at the other.

The task returns the Jaccard overlap, at the ranking site, of ``lwc-wA@A`` and ``lwc-wA@B`` for the
first two bit-widths (A, B) listed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig

from ...calibration import CalibConfig, calibrate_model
from ...io.checkpoint import read_meta
from ...io.fileio import atomic_write_bytes, atomic_write_text
from ...io.results import write_csv
from ...methods.core import LWC, MoBiQuant, RunContext
from ...nn.linear import MoBiLinear
from ...patching import (
    achieved_bits,
    find_blocks,
    freeze,
    mobi_linears,
    quantize_model,
    reset_counts,
    set_budget,
)
from ...quant.config import MoBiConfig
from ..session import ConfigError, instantiate_calib, open_session, validate
from .common import (
    analysis_dataset,
    analysis_inputs,
    capture_blocks,
    forward_logits,
    log_to_wandb,
    markdown_table,
    pyplot,
    resolve_layers,
    routed_mobiquant,
    save_figure,
    single_process,
)

log = logging.getLogger("mobiquant")

CLIPPING_NAME = "lwc_clipping.safetensors"
SETS = ("top at A", "top at B", "random")


# ---------------------------------------------------------------------------- settings
@dataclass
class OutlierSettings:
    bits: list[int]
    layers: list[int]  # as configured; negative ones are resolved once the model is loaded
    block_error: str
    top_percent: float
    rank_by: str
    mobiquant: bool
    lwc_init: float
    scatter_points: int
    lwc_calib: CalibConfig  # the top-level calib with analysis.outliers.lwc_calib on top


def outlier_settings(cfg: DictConfig, quant) -> OutlierSettings:
    """Check ``analysis.outliers`` (and what it needs of the rest) before any work; ConfigError otherwise."""
    node = cfg.analysis.outliers
    key = "analysis.outliers"
    bits = node.get("bits")
    if not isinstance(bits, (list, ListConfig)) or len(bits) < 2:
        raise ConfigError(f"{key}.bits={bits!r} must list at least two bit-widths, e.g. [3, 4]")
    for i, b in enumerate(bits):
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise ConfigError(f"{key}.bits[{i}]={b!r} is out of range: LWC bit-widths are integers from 1 to 8")
    if len(set(bits)) != len(bits):
        raise ConfigError(f"{key}.bits={list(bits)} lists a bit-width twice")
    use_mobi = bool(node.get("mobiquant", True))
    if use_mobi:
        mobi = routed_mobiquant(quant, "outliers").mobi
        for i, b in enumerate(bits):
            if not mobi.min_bits <= b <= mobi.max_bits:
                raise ConfigError(
                    f"{key}.bits[{i}]={b} is out of range for the MoBiQuant row: quant.mobi.slice_bits="
                    f"{list(mobi.slice_bits)} serves {mobi.min_bits} to {mobi.max_bits} bits "
                    f"(or set {key}.mobiquant=false)"
                )
    p = node.get("top_percent")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
        raise ConfigError(f"{key}.top_percent={p!r} is invalid: expected a percentage p with 0 < p <= 100")
    layers = node.get("layers")
    if not isinstance(layers, (list, ListConfig)):
        raise ConfigError(f"{key}.layers={layers!r} must be a list of block indices (may be empty)")
    for i, v in enumerate(layers):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}.layers[{i}]={v!r} is not an integer block index")
    block_error = node.get("block_error", "relative")
    if block_error not in ("relative", "mse"):
        raise ConfigError(f"{key}.block_error={block_error!r} is invalid; allowed: relative, mse")
    rank_by = str(node.get("rank_by", "kl"))
    if rank_by not in ("kl", "dnll") and not (rank_by.startswith("block") and rank_by[5:].lstrip("-").isdigit()):
        raise ConfigError(f"{key}.rank_by={rank_by!r} is invalid; allowed: kl, dnll, block<i> (i in {key}.layers)")
    lwc_init = node.get("lwc_init", 4.0)
    if isinstance(lwc_init, bool) or not isinstance(lwc_init, (int, float)):
        raise ConfigError(f"{key}.lwc_init={lwc_init!r} is not a number")
    points = node.get("scatter_points", 20000)
    if isinstance(points, bool) or not isinstance(points, int) or points <= 0:
        raise ConfigError(f"{key}.scatter_points={points!r} is invalid: expected a positive integer")
    overrides = {k: v for k, v in (node.get("lwc_calib") or {}).items() if v is not None}
    try:
        lwc_calib = dataclasses.replace(instantiate_calib(cfg), **dict(overrides))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}.lwc_calib={dict(overrides)!r}: {e}") from e
    if lwc_calib.epochs_stage1 < 1:
        raise ConfigError(
            f"calib.epochs_stage1={lwc_calib.epochs_stage1} (with {key}.lwc_calib): LWC learns its "
            "clipping in stage 1 only, so task=outliers needs at least one stage-1 epoch"
        )
    return OutlierSettings(
        [int(b) for b in bits],
        [int(v) for v in layers],
        block_error,
        float(p),
        rank_by,
        use_mobi,
        float(lwc_init),
        int(points),
        lwc_calib,
    )


def resolve_rank_site(rank_by: str, layers: Sequence[int], n_blocks: int) -> str:
    if rank_by in ("kl", "dnll"):
        return rank_by
    i = int(rank_by[5:])
    if not -n_blocks <= i < n_blocks or i % n_blocks not in layers:
        raise ConfigError(
            f"analysis.outliers.rank_by={rank_by!r} names a block that is not measured: "
            f"add it to analysis.outliers.layers (measured: {list(layers)})"
        )
    return f"block{i % n_blocks}"


# ---------------------------------------------------------------------------- LWC at another bit-width
class ClippingRecorder(L.Callback):
    """Keeps each block's learned LWC parameters as its fit ends, before the block is packed.

    Packing stores the codes of the calibrated bit-width only; running the checkpoint at another
    bit-width needs the clipping itself. With ``folder`` (the calibration's resume state), each block's
    parameters are also written there, so a resumed calibration finds those of its reloaded blocks.
    """

    def __init__(self, prefix: str, folder: Path | None = None):
        self.prefix, self.folder = prefix, folder
        self.tensors: dict[str, torch.Tensor] = {}
        self.blocks: set[int] = set()

    def _file(self, i: int) -> Path:
        return Path(self.folder) / f"clip_{i:03d}.safetensors"

    def on_train_end(self, trainer, pl_module) -> None:
        from safetensors.torch import save

        i = pl_module.block_index
        tensors = {}
        for name, m in pl_module.block.named_modules():
            if isinstance(m, MoBiLinear) and m.gamma is not None:
                tensors[f"{self.prefix}.{i}.{name}.gamma"] = m.gamma.detach().float().cpu().clone()
                tensors[f"{self.prefix}.{i}.{name}.beta"] = m.beta.detach().float().cpu().clone()
        self.tensors.update(tensors)
        self.blocks.add(i)
        if self.folder is not None:
            atomic_write_bytes(self._file(i), save(tensors))

    def collect(self, n_blocks: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        for i in range(n_blocks):
            if i in self.blocks:
                continue
            if self.folder is None or not self._file(i).is_file():
                raise RuntimeError(f"no learned clipping was recorded for block {i}")
            self.tensors.update(load_file(str(self._file(i))))
        return dict(self.tensors)


def requantize_lwc(model: nn.Module, clipping: dict[str, torch.Tensor], bits: int, group_size: int) -> nn.Module:
    """Quantize the FP ``model`` in place at ``bits`` with learned LWC parameters ``clipping``
    (``<linear name>.gamma`` / ``.beta``): the same clipping window, a ``bits``-bit grid inside it."""
    quantize_model(model, MoBiConfig(slice_bits=(bits,), group_size=group_size, lwc_init=0.0))
    with torch.no_grad():
        for name, m in mobi_linears(model):
            for attr in ("gamma", "beta"):
                key = f"{name}.{attr}"
                if key not in clipping:
                    raise ValueError(f"the learned clipping has no {key}: it was recorded for another model")
                getattr(m, attr).copy_(clipping[key])
    return freeze(model)


@dataclass
class LwcCheckpoint:
    bits: int
    model: nn.Module  # packed, at its calibrated bit-width
    clipping: dict[str, torch.Tensor]
    seconds: float
    checkpoint: str | None
    resumed: bool


def calibration_key(calib: CalibConfig, calib_ids: torch.Tensor) -> str:
    """What an LWC calibration depends on besides its MoBiConfig: the settings and the windows."""
    settings = {k: v for k, v in dataclasses.asdict(calib).items() if k != "progress_bar"}
    ids = calib_ids.detach().cpu().contiguous().numpy().tobytes()
    return json.dumps(
        {"calib": settings, "calib_ids_sha256": hashlib.sha256(ids).hexdigest()}, sort_keys=True, default=str
    )


def lwc_checkpoint(
    ctx: RunContext, bits: int, group_size: int, lwc_init: float, calib: CalibConfig | None = None
) -> LwcCheckpoint:
    """The LWC checkpoint calibrated at ``bits`` with its learned clipping (``calib``: the settings, by
    default ``ctx.calib``), reloaded when this run directory holds both (``checkpoints/lwc-w<bits>/``)
    from a calibration with the same settings and windows, calibrated otherwise."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    calib = calib or ctx.calib
    key = calibration_key(calib, ctx.calib_ids)
    mobi = MoBiConfig(slice_bits=(bits,), group_size=group_size, lwc_init=lwc_init)
    method = LWC(group_size=group_size, lwc_init=lwc_init, bits=[bits])
    tag = f"{method.name}-w{bits}"
    folder = ctx.output_dir / "checkpoints" / tag
    sidecar = folder / CLIPPING_NAME
    if ctx.save_checkpoints and sidecar.is_file():
        saved = method._load_saved(ctx, tag, mobi)
        if saved is not None:
            with safe_open(str(sidecar), framework="pt") as fh:
                meta = fh.metadata() or {}
            if meta.get("checkpoint_sha256") != read_meta(folder)["tensors"]["sha256"]:
                log.warning("%s belongs to another checkpoint than %s: calibrating anew", sidecar, folder)
            elif meta.get("calibration") != key:
                log.warning("%s was calibrated with other settings or windows: calibrating anew", folder)
            else:
                model, seconds, ckpt = saved
                return LwcCheckpoint(bits, model, load_file(str(sidecar)), seconds, ckpt, True)
    elif ctx.save_checkpoints and folder.is_dir():
        log.warning("%s has no %s (learned clipping): calibrating anew", folder, CLIPPING_NAME)
    model = ctx.fp_model()
    prefix, blocks = find_blocks(model)
    state = ctx.state_dir(tag)
    recorder = ClippingRecorder(prefix, state)
    on_block = None if ctx.on_block_end is None else (lambda i, report: ctx.on_block_end(tag, i, report))
    t0 = time.perf_counter()
    calibrate_model(
        model,
        ctx.calib_ids,
        mobi,
        calib,
        loggers=ctx.loggers,
        callbacks=lambda: [recorder, *(ctx.callbacks() if ctx.callbacks is not None else [])],
        trainer=ctx.trainer,
        on_block_end=on_block,
        state_dir=state,
    )
    seconds = time.perf_counter() - t0
    clipping = recorder.collect(len(blocks))
    ckpt = method._save(ctx, model, tag, extra={"calib_seconds": seconds})
    if ckpt is not None:
        sha = read_meta(ckpt)["tensors"]["sha256"]
        atomic_write_bytes(sidecar, save(clipping, metadata={"checkpoint_sha256": sha, "calibration": key}))
        ctx.drop_state(tag)
    return LwcCheckpoint(bits, model, clipping, seconds, ckpt, False)


# ---------------------------------------------------------------------------- per-token errors
@dataclass
class Variant:
    name: str  # lwc-w3@4, mobiquant@3
    calibrated: str  # lwc-w3, mobiquant
    run_at: int
    model: nn.Module
    prepare: Callable[[], None] | None = None  # e.g. set_budget on a shared MoBiQuant model
    checkpoint: str | None = None


def top_mask(values: np.ndarray, percent: float) -> np.ndarray:
    """Boolean mask of the ``round(percent/100 n)`` (at least one) largest values; ties by position."""
    n = len(values)
    m = min(n, max(1, int(round(n * percent / 100.0))))
    mask = np.zeros(n, dtype=bool)
    mask[np.argsort(-values, kind="stable")[:m]] = True
    return mask


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 1.0


def random_jaccard(n_top: int, n: int) -> float:
    """Expected Jaccard of two independent random sets of ``n_top`` out of ``n`` (to first order)."""
    f = n_top / n
    return f / (2.0 - f)


def sites_of(layers: Sequence[int]) -> list[str]:
    return [f"block{i}" for i in layers] + ["kl", "dnll"]


@torch.inference_mode()
def token_errors(
    fp: nn.Module,
    variants: Sequence[Variant],
    windows: torch.Tensor,
    layers: Sequence[int],
    block_error: str = "relative",
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per scored token and variant: NLL and the error at every site (see the module docstring); and the
    achieved average bits of each variant (token counts, parameter-weighted)."""
    fp.eval()
    blocks_name = find_blocks(fp)[0]
    cols: dict[str, list[torch.Tensor]] = defaultdict(list)
    bits: dict[str, list[float]] = defaultdict(list)
    n, T = windows.shape
    for w in range(n):
        ids = windows[w : w + 1]
        with capture_blocks(fp, blocks_name, layers) as box:
            logits = forward_logits(fp, ids)
        fp_h = {i: box[i][0, :-1].float() for i in layers}
        fp_logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        del logits
        target = ids[0, 1:].to(fp_logp.device).unsqueeze(-1)
        fp_nll = -fp_logp.gather(-1, target)[:, 0]
        cols["fp:nll"].append(fp_nll.cpu())
        for v in variants:
            if v.prepare is not None:
                v.prepare()
            v.model.eval()
            reset_counts(v.model, track=True)
            with capture_blocks(v.model, blocks_name, layers) as box:
                logits = forward_logits(v.model, ids)
            bits[v.name].append(achieved_bits(v.model))
            reset_counts(v.model, track=False)
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            del logits
            nll = -logp.gather(-1, target)[:, 0]
            cols[f"{v.name}:nll"].append(nll.cpu())
            cols[f"{v.name}:kl"].append(F.kl_div(logp, fp_logp, log_target=True, reduction="none").sum(-1).cpu())
            cols[f"{v.name}:dnll"].append((nll - fp_nll).cpu())
            for i in layers:
                ref = fp_h[i]
                diff = box[i][0, :-1].float() - ref
                if block_error == "relative":
                    err = diff.pow(2).sum(-1) / ref.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
                else:
                    err = diff.pow(2).mean(-1)
                cols[f"{v.name}:block{i}"].append(err.cpu())
    df = pd.DataFrame(
        {
            "window": np.repeat(np.arange(n), T - 1),
            "position": np.tile(np.arange(T - 1), n),
            "token": windows[:, :-1].reshape(-1).numpy(),
            "next_token": windows[:, 1:].reshape(-1).numpy(),
            **{k: torch.cat(v).double().numpy() for k, v in cols.items()},
        }
    )
    # Every window is the same length, so the mean of the per-window values is the whole text's average.
    return df, {k: float(np.mean(v)) for k, v in bits.items()}


def ppl_of(nll: np.ndarray | pd.Series) -> float:
    return float(math.exp(float(np.mean(nll))))


# ---------------------------------------------------------------------------- token-precision split
class TokenPrecisionSplit:
    """Runs ``high`` with the tokens of a mask routed through the same-named linears of ``low``.

    Forward hooks on every quantized linear of ``high`` recompute the masked rows with ``low``'s weights,
    so each token uses one precision in every layer, as per-token routing does.
    """

    def __init__(self, high: nn.Module, low: nn.Module):
        self.high, self.mask = high, None
        self._low = dict(mobi_linears(low))
        self._hooks = []

    def __enter__(self):
        for name, m in mobi_linears(self.high):
            self._hooks.append(m.register_forward_hook(self._hook(self._low[name])))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook(self, low_linear: nn.Module):
        def hook(mod, args, out):
            mask = self.mask
            if mask is None or not bool(mask.any()):
                return out
            x = args[0]
            if mask.shape != x.shape[:-1]:
                raise RuntimeError(f"token mask of shape {tuple(mask.shape)} does not fit input {tuple(x.shape)}")
            out = out.clone()
            out[mask] = low_linear(x[mask]).to(out.dtype)
            return out

        return hook


@torch.inference_mode()
def split_nll(high: nn.Module, low: nn.Module, windows: torch.Tensor, low_tokens: np.ndarray) -> np.ndarray:
    """Per scored token NLL when the tokens of ``low_tokens`` (a mask over scored tokens, window-major)
    use ``low``'s weights and every other token ``high``'s. The last token of each window, never
    scored, uses ``high``."""
    n, T = windows.shape
    masks = torch.zeros(n, T, dtype=torch.bool)
    masks[:, :-1] = torch.from_numpy(low_tokens.reshape(n, T - 1))
    out = []
    high.eval()
    low.eval()
    with TokenPrecisionSplit(high, low) as split:
        for w in range(n):
            ids = windows[w : w + 1]
            split.mask = masks[w : w + 1].to(next(high.parameters()).device)
            logp = torch.log_softmax(forward_logits(high, ids)[0, :-1].float(), dim=-1)
            out.append(-logp.gather(-1, ids[0, 1:].to(logp.device).unsqueeze(-1))[:, 0].cpu())
    return torch.cat(out).double().numpy()


def top_token_experiment(
    models: dict[str, Variant],
    errors: pd.DataFrame,
    windows: torch.Tensor,
    bits: Sequence[int],
    percent: float,
    site: str,
    seed: int,
) -> pd.DataFrame:
    rows = []
    n_tokens = len(errors)
    rng = np.random.default_rng(seed)
    for a, b in itertools.permutations(bits, 2):
        lo, hi = min(a, b), max(a, b)
        low, high = models[f"lwc-w{a}@{lo}"], models[f"lwc-w{a}@{hi}"]
        nll_lo, nll_hi = errors[f"{low.name}:nll"].to_numpy(), errors[f"{high.name}:nll"].to_numpy()
        sets = {
            "top at A": top_mask(errors[f"lwc-w{a}@{a}:{site}"].to_numpy(), percent),
            "top at B": top_mask(errors[f"lwc-w{a}@{b}:{site}"].to_numpy(), percent),
        }
        rand = np.zeros(n_tokens, dtype=bool)
        rand[rng.choice(n_tokens, size=int(sets["top at A"].sum()), replace=False)] = True
        sets["random"] = rand
        for set_name, s in sets.items():
            for split in ("low", "high"):
                low_tokens = s if split == "low" else ~s
                log.info(
                    "[outliers] lwc-w%d, %s (%s%%) at %d bits, the rest at %d",
                    a,
                    set_name,
                    f"{percent:g}",
                    lo if split == "low" else hi,
                    hi if split == "low" else lo,
                )
                nll = split_nll(high.model, low.model, windows, low_tokens)
                n_low_processed = int(low_tokens.sum())  # the unscored last tokens run at `hi`
                processed = windows.numel()
                rows.append(
                    {
                        "calibrated_at": a,
                        "run_at": b,
                        "low_bits": lo,
                        "high_bits": hi,
                        "token_set": set_name,
                        "set_at_bits": lo if split == "low" else hi,
                        "rest_at_bits": hi if split == "low" else lo,
                        "split": split,
                        "top_percent": percent,
                        "rank_site": site,
                        "n_set": int(s.sum()),
                        "n_tokens": n_tokens,
                        "avg_bits": (n_low_processed * lo + (processed - n_low_processed) * hi) / processed,
                        "ppl": ppl_of(nll),
                        "nll_set": float(nll[s].mean()),
                        "nll_rest": float(nll[~s].mean()),
                        "nll_set_all_low": float(nll_lo[s].mean()),
                        "nll_set_all_high": float(nll_hi[s].mean()),
                        "ppl_all_low": ppl_of(nll_lo),
                        "ppl_all_high": ppl_of(nll_hi),
                        "jaccard_with_top_at_A": jaccard(s, sets["top at A"]),
                    }
                )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- tables
def pair_kind(a: Variant, b: Variant) -> str:
    if a.calibrated == b.calibrated:
        return "mobiquant, other budget" if a.calibrated == "mobiquant" else "same checkpoint, other bits"
    if a.run_at == b.run_at:
        return "same bits, other checkpoint"
    if a.calibrated == f"lwc-w{a.run_at}" and b.calibrated == f"lwc-w{b.run_at}":
        return "bit-specific checkpoints"
    return "other"


def jaccard_table(
    errors: pd.DataFrame, variants: Sequence[Variant], sites: Sequence[str], percent: float
) -> pd.DataFrame:
    rows = []
    n = len(errors)
    for site in sites:
        masks = {v.name: top_mask(errors[f"{v.name}:{site}"].to_numpy(), percent) for v in variants}
        for a, b in itertools.combinations(variants, 2):
            k = int(masks[a.name].sum())
            rows.append(
                {
                    "site": site,
                    "variant_a": a.name,
                    "variant_b": b.name,
                    "kind": pair_kind(a, b),
                    "top_percent": percent,
                    "n_top": k,
                    "n_tokens": n,
                    "jaccard": jaccard(masks[a.name], masks[b.name]),
                    "random_jaccard": random_jaccard(k, n),
                }
            )
    return pd.DataFrame(rows)


def matrix_table(
    errors: pd.DataFrame, variants: Sequence[Variant], avg_bits: dict[str, float], meta: dict
) -> pd.DataFrame:
    rows = [
        {
            "calibrated": "fp",
            "calibrated_at_bits": math.nan,
            "run_at_bits": math.nan,
            "avg_bits": math.nan,
            "ppl": ppl_of(errors["fp:nll"]),
            "nll": float(errors["fp:nll"].mean()),
            "checkpoint": None,
            **meta,
        }
    ]
    for v in variants:
        cal_bits = math.nan if v.calibrated == "mobiquant" else float(v.calibrated.removeprefix("lwc-w"))
        rows.append(
            {
                "calibrated": v.calibrated,
                "calibrated_at_bits": cal_bits,
                "run_at_bits": float(v.run_at),
                "avg_bits": avg_bits[v.name],
                "ppl": ppl_of(errors[f"{v.name}:nll"]),
                "nll": float(errors[f"{v.name}:nll"].mean()),
                "checkpoint": v.checkpoint,
                **meta,
            }
        )
    return pd.DataFrame(rows)


def matrix_pivot(matrix: pd.DataFrame, value: str = "ppl") -> pd.DataFrame:
    q = matrix[matrix["calibrated"] != "fp"]
    order = list(dict.fromkeys(q["calibrated"]))
    pivot = q.pivot_table(index="calibrated", columns="run_at_bits", values=value, aggfunc="first")
    pivot = pivot.loc[order]
    pivot.columns = [f"run at {int(c)}" for c in pivot.columns]
    return pivot


# ---------------------------------------------------------------------------- figures
def plot_matrix(matrix: pd.DataFrame, path: Path, title: str) -> Path:
    plt = pyplot()
    ppl = matrix_pivot(matrix, "ppl")
    bits = matrix_pivot(matrix, "avg_bits")
    fp = float(matrix.loc[matrix["calibrated"] == "fp", "ppl"].iloc[0])
    fig, ax = plt.subplots(figsize=(2.8 + 1.6 * ppl.shape[1], 1.4 + 0.7 * ppl.shape[0]))
    im = ax.imshow(np.log10(ppl.to_numpy(dtype=float)), cmap="viridis_r", aspect="auto")
    for (r, c), v in np.ndenumerate(ppl.to_numpy(dtype=float)):
        dark = im.norm(np.log10(v)) > 0.5  # viridis_r: high values are dark
        ax.text(
            c, r, f"{v:.4g}\n({bits.iat[r, c]:.2f} b)", ha="center", va="center", fontsize=8, color="w" if dark else "k"
        )
    ax.set_xticks(range(ppl.shape[1]), ppl.columns)
    ax.set_yticks(
        range(ppl.shape[0]),
        ["MoBiQuant (one checkpoint)" if r == "mobiquant" else f"LWC calibrated at {r[5:]}" for r in ppl.index],
    )
    ax.set_title(f"{title}: perplexity (FP {fp:.4g})", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 ppl")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_scatter(
    errors: pd.DataFrame,
    pairs: Sequence[tuple[str, str, str]],
    site: str,
    percent: float,
    max_points: int,
    seed: int,
    path: Path,
) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.2), squeeze=False)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(errors))
    if len(idx) > max_points:
        idx = np.sort(rng.choice(idx, size=max_points, replace=False))
    for ax, (title, a, b) in zip(axes[0], pairs, strict=True):
        x, y = errors[f"{a}:{site}"].to_numpy(), errors[f"{b}:{site}"].to_numpy()
        ta, tb = top_mask(x, percent), top_mask(y, percent)
        groups = [
            ("neither", ~ta & ~tb, "0.7"),
            (f"top {percent:g}% at {a} only", ta & ~tb, "tab:blue"),
            (f"top {percent:g}% at {b} only", ~ta & tb, "tab:orange"),
            ("both", ta & tb, "tab:red"),
        ]
        for label, m, color in groups:
            sel = idx[m[idx]]
            ax.scatter(x[sel], y[sel], s=3, alpha=0.5, color=color, label=f"{label} ({int(m.sum())})", rasterized=True)
        scale = "log" if (x > 0).all() and (y > 0).all() else "symlog"
        ax.set_xscale(scale)
        ax.set_yscale(scale)
        ax.set_xlabel(f"{site} error, {a}")
        ax.set_ylabel(f"{site} error, {b}")
        ax.set_title(f"{title}: Jaccard {jaccard(ta, tb):.2f}", fontsize=9)
        ax.legend(fontsize=7, markerscale=3)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------- summary
def summary_markdown(
    cfg: DictConfig,
    s: OutlierSettings,
    dataset: str,
    windows: torch.Tensor,
    matrix: pd.DataFrame,
    jac: pd.DataFrame,
    top: pd.DataFrame,
    site: str,
    sites: Sequence[str],
    lwc: dict[int, LwcCheckpoint],
) -> str:
    n, T = windows.shape
    ppl = matrix_pivot(matrix, "ppl").reset_index()
    bits = matrix_pivot(matrix, "avg_bits").reset_index()
    fp = float(matrix.loc[matrix["calibrated"] == "fp", "ppl"].iloc[0])
    lines = [
        f"# Outlier migration: {cfg.model.name}",
        "",
        f"Evaluation text `{dataset}`: {n} windows of {T} tokens ({n * (T - 1)} scored tokens); calibration "
        f"`{cfg.data.calib.corpus}` ({cfg.data.calib.split}), {cfg.data.calib.nsamples} x {cfg.data.calib.seqlen} "
        f"tokens; group size {cfg.group_size}; LWC bit-widths {s.bits}; top {s.top_percent:g}% tokens; "
        f"block error `{s.block_error}`; ranking site of the top-p experiment `{site}`.",
        "",
        f"LWC calibration: {s.lwc_calib.epochs_stage1} epoch(s), batch {s.lwc_calib.batch_size}, lr "
        f"{s.lwc_calib.lr_lwc:g}, clipping logits from {s.lwc_init:g}. "
        "LWC checkpoints: "
        + ", ".join(
            f"lwc-w{b} ({'reloaded' if c.resumed else f'calibrated in {c.seconds:.0f} s'})" for b, c in lwc.items()
        ),
        "",
        f"## Perplexity: calibrated at (rows) x run at (columns); FP {fp:.4g}",
        "",
        markdown_table(ppl),
        "",
        "Achieved average bits of each cell:",
        "",
        markdown_table(bits, "{:.3f}"),
        "",
        f"## Overlap (Jaccard) of the top-{s.top_percent:g}% error tokens",
        "",
    ]
    key = jac[jac["kind"] != "other"].copy()
    wide = key.pivot_table(
        index=["kind", "variant_a", "variant_b"], columns="site", values="jaccard", aggfunc="first", sort=False
    ).reset_index()
    wide = wide[["kind", "variant_a", "variant_b"] + [c for c in sites if c in wide.columns]]
    lines += [
        markdown_table(wide, "{:.3f}"),
        "",
        f"Two random sets of this size overlap by {float(jac['random_jaccard'].iloc[0]):.3f} on average.",
        "",
        f"## Top-{s.top_percent:g}% tokens kept at the other precision (ranking `{site}`)",
        "",
        "Rows: checkpoint `lwc-wA` with the token set at `set_at_bits` and every other token at `rest_at_bits`. "
        "`top at A`: the tokens most hurt when the checkpoint runs at its calibrated A bits; `top at B`: most "
        "hurt at B; `random`: a random set of the same size. NLLs are means over the set / the other tokens; "
        "`nll_set_all_low` / `_high`: the set's NLL when every token runs at the lower / higher bits.",
        "",
    ]
    cols = [
        "calibrated_at",
        "run_at",
        "token_set",
        "set_at_bits",
        "rest_at_bits",
        "avg_bits",
        "ppl",
        "nll_set",
        "nll_rest",
        "nll_set_all_low",
        "nll_set_all_high",
        "jaccard_with_top_at_A",
    ]
    lines += [markdown_table(top[cols]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the task
def run(cfg: DictConfig) -> float:
    """``task=outliers``; returns the Jaccard overlap (ranking site) of ``lwc-wA@A`` and ``lwc-wA@B``."""
    t_start = time.perf_counter()

    def check(cfg: DictConfig) -> tuple[list, OutlierSettings, str]:
        methods, _ = validate(cfg)
        single_process(cfg, "outliers")
        return methods, outlier_settings(cfg, methods[0]), analysis_dataset(cfg)

    with open_session(cfg, "outliers", check=check) as ses:
        methods, s, dataset = ses.checked
        windows, ctx, _ = analysis_inputs(ses, dataset)
        layers = resolve_layers(s.layers, ses.n_blocks, "analysis.outliers.layers")
        site = resolve_rank_site(s.rank_by, layers, ses.n_blocks)
        lwc = {b: lwc_checkpoint(ctx, b, int(cfg.group_size), s.lwc_init, s.lwc_calib) for b in s.bits}
        variants: list[Variant] = []
        for a, ck in lwc.items():
            for b in s.bits:
                model = ck.model if b == a else requantize_lwc(ses.fp_model(), ck.clipping, b, int(cfg.group_size))
                variants.append(
                    Variant(f"lwc-w{a}@{b}", f"lwc-w{a}", b, model, checkpoint=ck.checkpoint if b == a else None)
                )
        if s.mobiquant:
            method: MoBiQuant = methods[0]
            mobi_model, _, mobi_ckpt, _ = method.calibrated(ctx)
            for b in s.bits:
                variants.append(
                    Variant(
                        f"mobiquant@{b}",
                        "mobiquant",
                        b,
                        mobi_model,
                        prepare=lambda b=b: set_budget(mobi_model, b),
                        checkpoint=mobi_ckpt,
                    )
                )
        log.info("[outliers] per-token errors of %d variants on %d windows", len(variants), windows.shape[0])
        errors, avg_bits = token_errors(ses.base, variants, windows, layers, s.block_error)
        out = ses.out_dir
        write_csv(errors, out / "token_errors.csv")
        n, T = windows.shape
        meta = {
            "model": cfg.model.name,
            "dataset": dataset,
            "seqlen": T,
            "n_windows": n,
            "n_tokens": n * (T - 1),
            "tokenizer": ses.tokenizer_name,
            "group_size": int(cfg.group_size),
        }
        matrix = matrix_table(errors, variants, avg_bits, meta)
        write_csv(matrix, out / "ppl_matrix.csv")
        jac = jaccard_table(errors, variants, sites_of(layers), s.top_percent)
        write_csv(jac, out / "jaccard.csv")
        by_name = {v.name: v for v in variants}
        top = top_token_experiment(by_name, errors, windows, s.bits, s.top_percent, site, int(cfg.seed))
        write_csv(top, out / "top_tokens.csv")
        a, b = s.bits[0], s.bits[1]
        pairs = [
            ("same checkpoint", f"lwc-w{a}@{a}", f"lwc-w{a}@{b}"),
            ("bit-specific", f"lwc-w{a}@{a}", f"lwc-w{b}@{b}"),
        ]
        if s.mobiquant:
            pairs.append(("MoBiQuant", f"mobiquant@{a}", f"mobiquant@{b}"))
        images = {
            "ppl_matrix": plot_matrix(matrix, out / "ppl_matrix.png", str(cfg.model.name)),
            "error_scatter": plot_scatter(
                errors, pairs, site, s.top_percent, s.scatter_points, int(cfg.seed), out / "error_scatter.png"
            ),
        }
        md = summary_markdown(cfg, s, dataset, windows, matrix, jac, top, site, sites_of(layers), lwc)
        atomic_write_text(out / "outliers.md", md + "\n")
        sel = jac[(jac["site"] == site) & (jac["variant_a"] == f"lwc-w{a}@{a}") & (jac["variant_b"] == f"lwc-w{a}@{b}")]
        metric = float(sel["jaccard"].iloc[0])
        summary = {
            "jaccard_same_checkpoint": metric,
            **{f"ppl/{r.calibrated}@{r.run_at_bits:g}": r.ppl for r in matrix.itertuples() if r.calibrated != "fp"},
            "ppl/fp": float(matrix["ppl"].iloc[0]),
        }
        log_to_wandb(
            ses.tracker, "outliers", {"ppl_matrix": matrix, "jaccard": jac, "top_tokens": top}, images, summary, md
        )
        print("\n" + md)
        print(f"\nwall time {(time.perf_counter() - t_start) / 60:.1f} min; outputs in {out}")
        return metric
