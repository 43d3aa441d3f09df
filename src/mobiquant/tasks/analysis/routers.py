"""``task=routers``: how the routers of one MoBiQuant checkpoint spend the bits, per layer and site.

The checkpoint of ``quant`` (a routed MoBiQuant) is calibrated, or reloaded from the run directory. For
each budget ``B`` (``analysis.routers.budgets``; default ``budget.budgets`` within the slice range) the
model is set to ``B`` (``set_budget``: thresholds only) and run on the evaluation windows of
``analysis.dataset`` (the perplexity protocol: its perplexity is reported too), while every quantized
linear counts how many tokens used ``k`` slices. From these counts:

* a *site* is one router's input site in a block (q/k/v share one router, gate/up another, o_proj and
  down_proj one each), named after its first linear (``self_attn_q_proj``); with
  ``router.placement=linear`` every linear is its own site;
* ``share_k`` of a site: the fraction of tokens that used ``k`` slices there (the linears of a site read
  the same input through the same router, so they count alike; the share is weighted by their
  parameters all the same);
* achieved bits of a site or a layer: ``sum_k share_k * (b_1 + ... + b_k)`` with ``share_k`` weighted by
  the parameters of its linears, i.e. the parameter-weighted average code bits of its weights over the
  tokens; the same over every linear of the model is ``achieved_bits(model)``, the global figure every
  results table reports. Every linear sees every token, so the parameter-weighted mean of the layer
  figures is the global one;
* deviation of a layer: its achieved bits minus the global achieved bits at that budget.

Outputs in the run directory: ``router_sites.csv`` (budget x layer x site: linears, parameters, tokens,
``share_k1..K``, achieved bits), ``router_layers.csv`` (budget x layer: parameters, ``share_k..``,
achieved bits, global bits, deviation), ``router_budgets.csv`` (budget: achieved bits, perplexity),
``router_bits.png`` (heat-maps layer x budget of achieved bits and of the deviation),
``router_k_shares.png`` (stacked bars of the ``k`` shares per layer, one panel per budget),
``routers.md`` (summary: per-layer deviation, first layers against the rest), and the same in W&B.

With the ``adjacent`` gate policy (``router.policy=adjacent``) a budget equal to a view's bits (4 bits of
``[2, 2, 2, 2]``) sends every token through that view, so layers deviate only at budgets between views;
with ``free`` a token may use any number of slices at any budget. The thresholds
are fitted per router (:func:`mobiquant.patching.fit_budget_thresholds`): every router meets the budget
on the calibration windows, so a layer deviates only as far as its router's scores on the analysed text
differ from those on the calibration windows (and the threshold table is interpolated between its
budgets); no layer is given more bits than another by design.

The task returns the mean absolute per-layer deviation over every layer and budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig, ListConfig

from ...evaluation import perplexity
from ...io.fileio import atomic_write_text
from ...io.results import write_csv
from ...methods.core import MoBiQuant
from ...nn.linear import MoBiLinear
from ...patching import achieved_bits, find_blocks, reset_counts, set_budget
from ..session import ConfigError, open_session, validate
from .common import (
    analysis_dataset,
    analysis_inputs,
    log_to_wandb,
    markdown_table,
    pyplot,
    routed_mobiquant,
    save_figure,
    single_process,
)

log = logging.getLogger("mobiquant")


def router_budgets(cfg: DictConfig, method, grid: Sequence[float]) -> list[float]:
    """``analysis.routers.budgets`` (or the budget grid in the slice range), checked before any work."""
    mobi = method.mobi
    lo, hi = mobi.min_bits, mobi.max_bits
    budgets = cfg.analysis.routers.get("budgets")
    if budgets is None:
        return method.budgets(grid)
    if not isinstance(budgets, (list, ListConfig)) or not budgets:
        raise ConfigError(f"analysis.routers.budgets={budgets!r} must be a non-empty list of average bits (or null)")
    out = []
    for i, b in enumerate(budgets):
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ConfigError(f"analysis.routers.budgets[{i}]={b!r} is not a number")
        if not lo <= b <= hi:
            raise ConfigError(
                f"analysis.routers.budgets[{i}]={b} is out of range: quant.mobi.slice_bits="
                f"{list(mobi.slice_bits)} serves {lo} to {hi} bits"
            )
        out.append(float(b))
    return sorted(set(out))


def early_count(cfg: DictConfig, n_blocks: int) -> int:
    v = cfg.analysis.routers.get("early_layers")
    if v is None:
        return max(1, n_blocks // 4)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < n_blocks:
        raise ConfigError(
            f"analysis.routers.early_layers={v!r} is invalid: expected null or an integer from 1 "
            f"to {n_blocks - 1} (this model has {n_blocks} blocks)"
        )
    return v


def site_layout(model) -> list[list[tuple[str, list[MoBiLinear]]]]:
    """Per block, its router sites in order, each with its quantized linears."""
    _, blocks = find_blocks(model)
    layout = []
    for block in blocks:
        sites: dict[str, list[MoBiLinear]] = {}
        for name, m in block.named_modules():
            if isinstance(m, MoBiLinear):
                sites.setdefault(getattr(m, "site", None) or name.replace(".", "_"), []).append(m)
        layout.append(list(sites.items()))
    return layout


def _weighted(linears: Sequence[MoBiLinear]) -> tuple[np.ndarray, int, float]:
    """Parameter x token counts per ``k`` summed over ``linears``; their parameters; tokens seen."""
    counts = sum(float(m.in_features * m.out_features) * m.k_counts.numpy() for m in linears)
    params = sum(m.in_features * m.out_features for m in linears)
    return np.asarray(counts, dtype=np.float64), params, float(linears[0].k_counts.sum())


def count_rows(model, budget: float) -> tuple[list[dict], list[dict]]:
    """Site and layer rows from the token counts of the last forward passes."""
    widths = None
    site_rows, layer_rows = [], []
    for layer, sites in enumerate(site_layout(model)):
        layer_counts, layer_params = 0.0, 0
        for site, linears in sites:
            if widths is None:
                s = linears[0].slicer
                widths = np.array([s.bits_at(k) for k in range(1, s.num_slices + 1)], dtype=np.float64)
            counts, params, tokens = _weighted(linears)
            share = counts / counts.sum()
            site_rows.append(
                {
                    "budget": budget,
                    "layer": layer,
                    "site": site,
                    "linears": len(linears),
                    "params": params,
                    "tokens": tokens,
                    **{f"share_k{k}": float(v) for k, v in enumerate(share, start=1)},
                    "achieved_bits": float((share * widths).sum()),
                }
            )
            layer_counts = layer_counts + counts
            layer_params += params
        share = layer_counts / layer_counts.sum()
        layer_rows.append(
            {
                "budget": budget,
                "layer": layer,
                "params": layer_params,
                **{f"share_k{k}": float(v) for k, v in enumerate(share, start=1)},
                "achieved_bits": float((share * widths).sum()),
            }
        )
    return site_rows, layer_rows


# ---------------------------------------------------------------------------- figures
def plot_bits(layers: pd.DataFrame, path) -> object:
    plt = pyplot()
    bits = layers.pivot_table(index="layer", columns="budget", values="achieved_bits")
    dev = layers.pivot_table(index="layer", columns="budget", values="deviation")
    fig, axes = plt.subplots(1, 2, figsize=(2 * (2.2 + 0.55 * bits.shape[1]), max(3.0, 1.5 + 0.22 * bits.shape[0])))
    lim = max(float(np.abs(dev.to_numpy()).max()), 1e-6)
    for ax, data, title, kw in (
        (axes[0], bits, "achieved bits", {"cmap": "viridis"}),
        (axes[1], dev, "deviation from the model's achieved bits", {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}),
    ):
        im = ax.imshow(data.to_numpy(), aspect="auto", **kw)
        ax.set_xticks(range(data.shape[1]), [f"{c:g}" for c in data.columns])
        ax.set_yticks(range(data.shape[0]), [str(i) for i in data.index], fontsize=7)
        ax.set_xlabel("budget (average bits)")
        ax.set_ylabel("layer (block)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_shares(layers: pd.DataFrame, path, slice_widths: Sequence[int]) -> object:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    budgets = sorted(layers["budget"].unique())
    ncols = min(4, len(budgets))
    nrows = math.ceil(len(budgets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False, sharey=True)
    cols = [c for c in layers.columns if c.startswith("share_k")]
    colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.9, len(cols)))
    for ax, b in zip(axes.flat, budgets, strict=False):
        sub = layers[layers["budget"] == b].sort_values("layer")
        bottom = np.zeros(len(sub))
        for c, color, w in zip(cols, colors, slice_widths, strict=False):
            ax.bar(sub["layer"], sub[c], bottom=bottom, color=color, width=0.85, label=f"k={c[7:]} ({w} bits)")
            bottom += sub[c].to_numpy()
        ax.set_title(f"budget {b:g}", fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(budgets) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel("share of tokens x weights")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return save_figure(fig, path)


# ---------------------------------------------------------------------------- summary
def summary_markdown(
    cfg,
    dataset: str,
    windows,
    per_budget: pd.DataFrame,
    layers: pd.DataFrame,
    sites: pd.DataFrame,
    early: int,
    ckpt_note: str,
) -> str:
    n, T = windows.shape
    bits = layers.pivot_table(index="layer", columns="budget", values="achieved_bits")
    bits.columns = [f"{c:g}" for c in bits.columns]
    per_layer = (
        layers.groupby("layer")
        .agg(mean_deviation=("deviation", "mean"), mean_abs_deviation=("abs_deviation", "mean"))
        .reset_index()
    )
    n_blocks = int(layers["layer"].max()) + 1
    is_early = layers["layer"] < early
    site_kind = (
        sites.assign(w=sites["params"] * sites["achieved_bits"])
        .groupby(["site", "budget"])
        .agg(w=("w", "sum"), params=("params", "sum"))
        .reset_index()
    )
    site_kind["bits"] = site_kind["w"] / site_kind["params"]
    site_table = site_kind.pivot_table(index="site", columns="budget", values="bits", sort=False)
    site_table.columns = [f"{c:g}" for c in site_table.columns]
    lines = [
        f"# Routers of the MoBiQuant checkpoint: {cfg.model.name}",
        "",
        f"Checkpoint: {ckpt_note}. Slices {list(cfg.quant.mobi.slice_bits)}, router placement "
        f"`{cfg.router.placement}`, gate policy `{cfg.router.policy}`. Text `{dataset}`: {n} windows of {T} tokens.",
        "",
        "## Per budget",
        "",
        markdown_table(
            per_budget[
                ["budget", "achieved_bits", "ppl", "max_abs_deviation", "early_abs_deviation", "rest_abs_deviation"]
            ]
        ),
        "",
        f"`early_abs_deviation`: mean |deviation| of the first {early} of {n_blocks} layers; `rest`: the others.",
        "",
        "## Achieved bits per layer (rows) and budget (columns)",
        "",
        markdown_table(bits.reset_index(), "{:.3f}"),
        "",
        "## Deviation from the model's achieved bits, per layer, over all budgets",
        "",
        markdown_table(
            per_layer.assign(
                mean_deviation=per_layer["mean_deviation"].map("{:+.3f}".format),
                mean_abs_deviation=per_layer["mean_abs_deviation"].map("{:.3f}".format),
            )
        ),
        "",
        f"First {early} layers: mean |deviation| {layers.loc[is_early, 'abs_deviation'].mean():.3f} bits; other "
        f"layers: {layers.loc[~is_early, 'abs_deviation'].mean():.3f} bits. Thresholds are fitted per router to "
        "meet each budget on the calibration windows, so deviations measure how the routers' scores on this "
        "text differ from those, not an allocation between layers.",
        "",
        "## Achieved bits per site (all layers, parameter-weighted)",
        "",
        markdown_table(site_table.reset_index(), "{:.3f}"),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the task
def run(cfg: DictConfig) -> float:
    """``task=routers``; returns the mean absolute per-layer deviation over layers and budgets."""
    t_start = time.perf_counter()

    def check(cfg: DictConfig) -> tuple[MoBiQuant, list[float], str]:
        methods, grid = validate(cfg)
        single_process(cfg, "routers")
        method = routed_mobiquant(methods[0], "routers")
        return method, router_budgets(cfg, method, grid), analysis_dataset(cfg)

    with open_session(cfg, "routers", check=check) as ses:
        method, budgets, dataset = ses.checked
        windows, ctx, calib_rows = analysis_inputs(ses, dataset)
        early = early_count(cfg, ses.n_blocks)
        model, seconds, ckpt, _ = method.calibrated(ctx)
        resumed = not calib_rows
        ckpt_note = (
            f"reloaded from `{ckpt}`"
            if resumed
            else f"calibrated in {seconds:.0f} s" + (f", saved to `{ckpt}`" if ckpt else "")
        )
        ses.use_backend(model)
        site_rows, layer_rows, budget_rows = [], [], []
        for b in budgets:
            set_budget(model, b)
            reset_counts(model, track=True)
            t0 = time.perf_counter()
            r = perplexity(model, windows, batch_size=cfg.eval.batch_size)
            total = achieved_bits(model)
            s_rows, l_rows = count_rows(model, b)
            reset_counts(model, track=False)
            for row in l_rows:
                row["global_bits"] = total
                row["deviation"] = row["achieved_bits"] - total
                row["abs_deviation"] = abs(row["deviation"])
            devs = np.array([row["abs_deviation"] for row in l_rows])
            budget_rows.append(
                {
                    "model": cfg.model.name,
                    "dataset": dataset,
                    "budget": b,
                    "achieved_bits": total,
                    "ppl": r["ppl"],
                    "nll": r["nll"],
                    "n_tokens": r["n_tokens"],
                    "n_windows": r["n_windows"],
                    "seqlen": r["seqlen"],
                    "max_abs_deviation": float(devs.max()),
                    "early_abs_deviation": float(devs[:early].mean()),
                    "rest_abs_deviation": float(devs[early:].mean()) if len(devs) > early else math.nan,
                    "eval_seconds": time.perf_counter() - t0,
                    "checkpoint": ckpt,
                }
            )
            site_rows += s_rows
            layer_rows += l_rows
            log.info(
                "[routers] budget %g: achieved %.3f bits, ppl %.3f, largest layer deviation %.3f",
                b,
                total,
                r["ppl"],
                devs.max(),
            )
        out = ses.out_dir
        sites, layers, per_budget = pd.DataFrame(site_rows), pd.DataFrame(layer_rows), pd.DataFrame(budget_rows)
        write_csv(sites, out / "router_sites.csv")
        write_csv(layers, out / "router_layers.csv")
        write_csv(per_budget, out / "router_budgets.csv")
        mobi = method.mobi
        widths = list(mobi.view_bits)
        images = {
            "router_bits": plot_bits(layers, out / "router_bits.png"),
            "router_k_shares": plot_shares(layers, out / "router_k_shares.png", widths),
        }
        md = summary_markdown(cfg, dataset, windows, per_budget, layers, sites, early, ckpt_note)
        atomic_write_text(out / "routers.md", md + "\n")
        metric = float(layers["abs_deviation"].mean())
        summary = {
            "mean_abs_deviation": metric,
            **{f"achieved_bits@{r.budget:g}": r.achieved_bits for r in per_budget.itertuples()},
            **{f"ppl@{r.budget:g}": r.ppl for r in per_budget.itertuples()},
        }
        log_to_wandb(
            ses.tracker, "routers", {"sites": sites, "layers": layers, "budgets": per_budget}, images, summary, md
        )
        print("\n" + md)
        print(f"\nwall time {(time.perf_counter() - t_start) / 60:.1f} min; outputs in {out}")
        return metric
