"""The experiment: load model and text, run every configured method, evaluate every budget, report.

Outputs in the run directory: ``results.csv`` (one row per method x budget x dataset, rewritten
atomically after each evaluation), ``windows.csv`` (each evaluation window's summed NLL, likewise:
perplexities over any first windows, paired comparisons; ``io.results.first_windows_ppl``),
``results.md``, ``elasticity.png``, ``calibration.csv``, ``checkpoints/<method>/`` and, with the W&B
logger, an offline (or online) W&B run.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from ..io.results import (
    atomic_write_text,
    concat_rows,
    has_row,
    is_missing,
    is_non_increasing,
    method_summary,
    plot_elasticity,
    ppl_table,
    read_results,
    summary_markdown,
    window_rows,
    write_csv,
)
from ..io.runfolder import RunFolder, RunFolderError
from ..io.tracking import OBJECTIVE, curve_summary
from ..methods.core import QuantMethod
from ..patching import mobi_linears, reset_counts
from .session import (  # noqa: F401  (ConfigError, instantiate_calib, validate: also imported from here)
    ConfigError,
    calibration_table,
    instantiate_calib,
    open_session,
    row_avg_bits,
    served_ranges,
    unserved_budgets,
    validate,
)

log = logging.getLogger("mobiquant")


# ---------------------------------------------------------------------------- run
def run(cfg: DictConfig) -> float:
    """Run one experiment; returns the mean log-perplexity of ``quant`` over its budgets on the first
    evaluation corpus (``tracking.OBJECTIVE``, what a sweeper minimises)."""
    from ..evaluation import perplexity

    t_start = time.perf_counter()
    # The session checks the config, takes the run folder (its lock, its identity: refused before any work
    # if another configuration made it; on_mismatch=new_subrun moves the run into a sub-run folder) and
    # always closes the tracker. Under trainer=ddp every rank runs this function (see mobiquant.dist);
    # rank 0 alone evaluates, writes and logs, the others take part in each block's fit.
    with open_session(cfg, "quantize", check=_check) as ses:
        methods, grid = ses.checked
        rank0, tracker = ses.rank0, ses.tracker
        ses.load()  # another base model than the folder was made with: refused here
        tok_name, dtype = ses.tokenizer_name, ses.dtype
        folder, out_dir = ses.folder, ses.out_dir
        results_path = out_dir / "results.csv"
        resume = bool(cfg.get("resume", True))
        rows: list[dict] = _previous_rows(results_path, folder) if resume else []
        calib_csv = out_dir / "calibration.csv"
        calib_rows: list[dict] = _previous_rows(calib_csv, folder, check=False) if resume else []
        windows_csv = out_dir / "windows.csv"
        win_rows: list[dict] = _previous_rows(windows_csv, folder, check=False) if resume else []

        ctx = ses.context(calib_rows, calib_csv=calib_csv, run_id=folder.run_id)  # the calibration text
        eval_sets = {}
        for name in cfg.data.eval:
            eval_sets[name] = ses.eval_windows(name)
            log.info("eval %s: %d windows of %d tokens", name, eval_sets[name].shape[0], cfg.eval.seqlen)

        logged_ckpts: set[str] = set()
        for method in methods:
            budgets = method.budgets(grid)
            todo = [(b, ds) for b in budgets for ds in eval_sets if not has_row(_df(rows), method.name, b, ds)]
            if not todo:
                log.info("[%s] all results present in %s: skipped", method.name, results_path)
                continue
            log.info("[%s] budgets %s", method.name, [f"{b:g}" for b in budgets])
            for variant in method.run(ctx, grid):
                if not rank0:
                    continue
                for ds, windows in eval_sets.items():
                    if has_row(_df(rows), variant.method, variant.budget, ds):
                        continue
                    reset_counts(variant.model)
                    ses.use_backend(variant.model)
                    t0 = time.perf_counter()
                    r = perplexity(variant.model, windows, batch_size=cfg.eval.batch_size)
                    row = {
                        "model": cfg.model.name,
                        "method": variant.method,
                        "budget": variant.budget,
                        "avg_bits": row_avg_bits(variant),
                        "storage_bits": variant.storage_bits,
                        "dataset": ds,
                        "seqlen": r["seqlen"],
                        "n_windows": r["n_windows"],
                        "n_tokens": r["n_tokens"],
                        "ppl": r["ppl"],
                        "nll": r["nll"],
                        "tokenizer": tok_name,
                        "dtype": dtype,
                        "calib_seconds": variant.calib_seconds,
                        "n_calibrations": variant.n_calibrations,
                        "eval_seconds": time.perf_counter() - t0,
                        "quant_params": sum(m.in_features * m.out_features for _, m in mobi_linears(variant.model)),
                        "checkpoint": variant.checkpoint,
                        "run_id": folder.run_id,
                    }
                    reset_counts(variant.model, track=False)
                    win_rows = [w for w in win_rows if not _same_eval(w, variant.method, variant.budget, ds)] + [
                        {**w, "run_id": folder.run_id}
                        for w in window_rows(variant.method, variant.budget, ds, r["window_nll"], r["seqlen"])
                    ]  # an evaluation cut before its results row is redone: its earlier windows are replaced
                    write_csv(pd.DataFrame(win_rows), windows_csv)  # before results.csv: a row there has its windows
                    rows.append(row)
                    write_csv(concat_rows(rows), results_path)
                    tracker.log_row(row)
                    b = "FP" if math.isnan(variant.budget) else f"{variant.budget:g}"
                    log.info(
                        "[%s] budget %s  %s ppl %.3f  (avg bits %.3f, storage %.3f)",
                        variant.method,
                        b,
                        ds,
                        r["ppl"],
                        row["avg_bits"],
                        row["storage_bits"],
                    )
                if variant.checkpoint and variant.checkpoint not in logged_ckpts:
                    logged_ckpts.add(variant.checkpoint)
                    tracker.log_checkpoint(variant.checkpoint, Path(variant.checkpoint).name)
        if not rank0:
            return math.nan
        df = concat_rows(rows)
        write_csv(df, results_path)
        if calib_rows:
            write_csv(calibration_table(calib_rows), calib_csv)
        plot = plot_elasticity(df, out_dir / "elasticity.png", title=cfg.model.name)
        md = "\n\n".join(f"### {ds}\n\n{ppl_table(df, ds)}" for ds in eval_sets)
        md += "\n\n### cost of covering the grid\n\n" + summary_markdown(method_summary(df))
        atomic_write_text(out_dir / "results.md", md + "\n")
        tracker.log_results(df, plot, md)
        main = methods[0]
        summary = curve_summary(df, main.name, list(eval_sets))
        tracker.log_summary(summary)
        wall = time.perf_counter() - t_start
        print(f"\nResults ({cfg.model.name}, seqlen {cfg.eval.seqlen}, group size {cfg.group_size}; ppl):\n")
        print(md)
        for ds in eval_sets:
            if main.name in set(df["method"]) and len(main.budgets(grid)) > 1:
                mono = is_non_increasing(df, main.name, ds)
                print(f"\n{main.name} curve on {ds} non-increasing in average bits: {mono}")
        print(
            f"\n{OBJECTIVE} (mean log-ppl of {main.name} over its budgets, {next(iter(eval_sets))}): "
            f"{summary[OBJECTIVE]:.4f}"
        )
        print(f"wall time {wall / 60:.1f} min; outputs in {out_dir}")
        return summary[OBJECTIVE]


def _check(cfg: DictConfig) -> tuple[list[QuantMethod], list[float]]:
    """:func:`validate`, a warning naming the budgets of a preset grid that no method serves, and the
    fp32 matmul precision of ``trainer.float32_matmul_precision``."""
    methods, grid = validate(cfg)
    unserved = unserved_budgets(methods, grid)
    if unserved:  # a preset grid shared by other layouts; a list given on the command line is refused
        log.warning(
            "budgets %s of budget.budgets are served by no method of this run (%s): skipped",
            ", ".join(f"{b:g}" for _, b in unserved),
            served_ranges(methods, grid),
        )
    if cfg.trainer.get("float32_matmul_precision"):  # "high": TF32 tensor cores for fp32 matmuls on GPUs
        torch.set_float32_matmul_precision(str(cfg.trainer.float32_matmul_precision))
    return methods, grid


def _previous_rows(path: Path, folder: RunFolder, check: bool = True) -> list[dict]:
    """The rows of ``results.csv`` (or ``calibration.csv``) a resumed run keeps: all of them, which must
    carry this run's id (``check``: else the folder is refused), or those of this run's id."""
    df = read_results(path) if check else (pd.read_csv(path) if path.is_file() else pd.DataFrame())
    if df.empty:
        return []
    ids = df["run_id"].astype(str) if "run_id" in df.columns else pd.Series("none", index=df.index)
    if check and (ids != folder.run_id).any():
        others = sorted(set(ids) - {folder.run_id})
        raise RunFolderError(
            f"run folder {folder.path}: {path.name} holds rows of another run (run_id {', '.join(others)}; this "
            f"run is {folder.run_id}): move {path.name} away, or choose another folder (hydra.run.dir=<folder>)"
        )
    return df[ids == folder.run_id].to_dict("records")


def _same_eval(w: dict, method: str, budget: float, dataset: str) -> bool:
    b = w["budget"]
    same_budget = b == budget or (is_missing(b) and math.isnan(budget))
    return w["method"] == method and w["dataset"] == dataset and bool(same_budget)


def _df(rows):
    return concat_rows(rows) if rows else concat_rows([]).iloc[0:0]
