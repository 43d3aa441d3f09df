"""Results tables: one row per (method, budget, dataset), written atomically; the elasticity plot."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pandas as pd

from .fileio import atomic_write_bytes, atomic_write_text

COLUMNS = [
    "model",
    "method",
    "budget",
    "avg_bits",
    "storage_bits",
    "dataset",
    "seqlen",
    "n_windows",
    "n_tokens",
    "ppl",
    "nll",
    "tokenizer",
    "dtype",
    "calib_seconds",
    "n_calibrations",
    "eval_seconds",
    "quant_params",
    "checkpoint",
]
KEY = ["method", "budget", "dataset"]


def is_missing(v: Any) -> bool:
    """``None``, ``NaN`` or ``pd.NA`` (and not an error for lists and other values ``pd.isna`` maps elementwise)."""
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def markdown_table(frame: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """``frame`` as a plain Markdown table: a header row, ``|---|`` rules, floats by ``floatfmt``, missing
    values empty, ``|`` inside a cell escaped."""

    def cell(v: Any) -> str:
        text = "" if is_missing(v) else floatfmt.format(v) if isinstance(v, float) else str(v)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|---" * len(frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    df = pd.read_csv(path)
    missing = [c for c in KEY + ["ppl"] if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a mobiquant results table: columns {missing} are missing")
    return df


def has_row(df: pd.DataFrame, method: str, budget: float, dataset: str) -> bool:
    if df.empty:
        return False
    b = df["budget"].astype(float)
    same_budget = (
        b.isna()
        if budget is None or (isinstance(budget, float) and math.isnan(budget))
        else ((b - float(budget)).abs() < 1e-9)
    )
    return bool(((df["method"] == method) & same_budget & (df["dataset"] == dataset)).any())


def ppl_table(df: pd.DataFrame, dataset: str | None = None, mark_best: bool = True) -> str:
    """Markdown table methods x budgets (ppl), best (lowest) per budget column in bold."""
    if dataset is not None:
        df = df[df["dataset"] == dataset]
    if df.empty:
        return "(no results)"
    d = df.copy()
    d["budget"] = d["budget"].map(lambda b: "FP" if pd.isna(b) else f"{float(b):g}")
    pivot = d.pivot_table(index="method", columns="budget", values="ppl", aggfunc="first")
    cols = sorted(pivot.columns, key=lambda c: (c != "FP", float(c) if c != "FP" else 0.0))
    pivot = pivot[cols]
    out = pivot.map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    if mark_best:
        for c in cols:
            if c == "FP" or pivot[c].notna().sum() < 2:
                continue
            best = pivot[c].idxmin()
            out.loc[best, c] = f"**{out.loc[best, c]}**"
    return markdown_table(out.rename(columns=lambda c: f"{c} bit" if c != "FP" else c).reset_index())


def plot_elasticity(df: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Perplexity vs achieved average bits, one line per method, log-scale ppl; one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(df["dataset"]))
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(6 * max(1, len(datasets)), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=False):
        sub = df[df["dataset"] == ds]
        for method, g in sub.groupby("method", sort=False):
            g = g.sort_values("avg_bits")
            if g["budget"].isna().all():  # FP: a horizontal reference line
                ax.axhline(
                    float(g["ppl"].iloc[0]), color="k", ls="--", lw=1, label=f"{method} ({g['ppl'].iloc[0]:.2f})"
                )
                continue
            ax.plot(g["avg_bits"], g["ppl"], marker="o", label=method)
        readable_log_axis(ax)
        ax.set_xlabel("average bits per weight (achieved)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{title} {ds}".strip())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path.with_suffix(".pdf"), close=False)  # a vector copy for papers
    return save_figure(fig, path)


def readable_log_axis(ax) -> None:
    """Log-scale perplexity with plain tick labels (``20``, ``25``, ``263.5``, never ``2.635x10^2``): a
    range under 20x gets up to eight ticks from 1-1.5-2-3-4-5-6-8 per decade (about six evenly spaced ones
    when fewer than four of those fall in it), a wider one 1-2-5 steps per decade."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if hi / max(lo, 1e-12) < 20:
        decades = range(math.floor(math.log10(max(lo, 1e-12))), math.ceil(math.log10(max(hi, 1e-12))) + 1)
        ticks = [m * 10.0**k for k in decades for m in (1, 1.5, 2, 3, 4, 5, 6, 8) if lo <= m * 10.0**k <= hi]
        if len(ticks) >= 4:
            ticks = ticks[:: math.ceil(len(ticks) / 8)]
        else:
            linear = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
            ticks = [float(t) for t in linear if lo <= t <= hi and t > 0]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
    ax.set_ylim(lo, hi)


def save_figure(fig, path: Path, close: bool = True) -> Path:
    """Write a matplotlib figure atomically (format from the suffix, PNG by default) and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=120, format=path.suffix.lstrip(".") or "png")
    finally:
        if close:
            plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def is_non_increasing(df: pd.DataFrame, method: str, dataset: str, tol: float = 0.0) -> bool:
    g = df[(df["method"] == method) & (df["dataset"] == dataset)].sort_values("avg_bits")
    p = g["ppl"].to_list()
    return all(b <= a * (1 + tol) for a, b in pairwise(p))


def concat_rows(rows: Iterable[dict]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    return df.reindex(columns=COLUMNS + [c for c in df.columns if c not in COLUMNS])


#: ``windows.csv``: one row per (method, budget, dataset, window), the window's summed NLL and token count.
WINDOW_COLUMNS = ["method", "budget", "dataset", "window", "nll_sum", "n_tokens"]


def window_rows(method: str, budget: float, dataset: str, window_nll: Iterable[float], seqlen: int) -> list[dict]:
    """The ``windows.csv`` rows of one evaluation (:func:`mobiquant.evaluation.perplexity`'s ``window_nll``)."""
    return [
        {"method": method, "budget": budget, "dataset": dataset, "window": i, "nll_sum": v, "n_tokens": seqlen - 1}
        for i, v in enumerate(window_nll)
    ]


def first_windows_ppl(windows: pd.DataFrame, n: int | None = None) -> pd.DataFrame:
    """Perplexity of every (method, budget, dataset) of ``windows.csv`` rows over its first ``n`` windows (all
    when ``None``): columns method, budget, dataset, n_windows, ppl. An evaluation of every window so also gives
    the numbers of an earlier run that read only the first ``n``."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be None or an integer >= 1, got {n!r}")
    missing = set(WINDOW_COLUMNS) - set(windows.columns)
    if missing:
        raise ValueError(f"not windows.csv rows: columns {sorted(missing)} are missing")
    keep = windows if n is None else windows[windows["window"] < n]
    g = keep.groupby(["method", "budget", "dataset"], sort=False, dropna=False)
    out = g.agg(n_windows=("window", "size"), nll_sum=("nll_sum", "sum"), n_tokens=("n_tokens", "sum")).reset_index()
    out["ppl"] = (out["nll_sum"] / out["n_tokens"]).map(math.exp)
    return out[["method", "budget", "dataset", "n_windows", "ppl"]]


def method_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: calibration wall time and count to cover its budgets, and the bytes needed to store
    every precision it serves (one shared checkpoint, or one per bit-width)."""
    rows = []
    for method, g in df.groupby("method", sort=False):
        first = g[g["dataset"] == g["dataset"].iloc[0]]
        # one entry per stored artifact: the checkpoint folder when shared, else each budget
        art = first.assign(_art=first["checkpoint"].fillna(first["budget"].astype(str)))
        per_art = art.drop_duplicates("_art")
        params = float(first["quant_params"].max()) if "quant_params" in first else math.nan
        if not params:  # nothing quantized (the FP reference)
            params = math.nan
        rows.append(
            {
                "method": method,
                "budgets": len(first),
                "n_calibrations": int(per_art["n_calibrations"].fillna(0).sum()),
                "calib_seconds": float(per_art["calib_seconds"].fillna(0).sum()),
                "stored_bytes_all_precisions": float((per_art["storage_bits"] * params / 8).sum(min_count=1)),
            }
        )
    return pd.DataFrame(rows)


def summary_markdown(summary: pd.DataFrame) -> str:
    rows = [
        (
            r.method,
            r.budgets,
            r.n_calibrations,
            f"{r.calib_seconds:.0f}",
            "n/a" if math.isnan(r.stored_bytes_all_precisions) else f"{r.stored_bytes_all_precisions / 1e6:.1f}",
        )
        for r in summary.itertuples()
    ]
    columns = ["method", "budgets", "calibrations", "calibration time (s)", "bytes for every precision (MB)"]
    return markdown_table(pd.DataFrame(rows, columns=columns))
