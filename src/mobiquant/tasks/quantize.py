"""The experiment: load model and text, run every configured method, evaluate every budget, report.

Outputs in the run directory: ``results.csv`` (one row per method x budget x dataset, rewritten
atomically after each evaluation), ``results.md``, ``elasticity.png``, ``calibration.csv``,
``checkpoints/<method>/`` and, with the W&B logger, an offline (or online) W&B run.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ..configcheck import (
    TRAINER_OWN_KEYS,
    ConfigError,
    check_callbacks,
    check_config,
    check_schema,
    check_trainer,
    explicit_overrides,
)
from ..dist import is_rank_zero
from ..io.fileio import ensure_writable_dir, remove_stray_temporaries
from ..io.results import (
    atomic_write_text,
    concat_rows,
    has_row,
    is_non_increasing,
    method_summary,
    plot_elasticity,
    ppl_table,
    read_results,
    summary_markdown,
    write_csv,
)
from ..io.runfolder import ON_MISMATCH, RunFolder, RunFolderError, open_run_folder
from ..io.tracking import OBJECTIVE, Tracker, curve_summary, plain_config, wandb_env_default
from ..methods.core import QuantMethod, RunContext, Variant
from ..patching import achieved_bits, mobi_linears, reset_counts

log = logging.getLogger("mobiquant")


# ---------------------------------------------------------------------------- validation
def _num(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} is not a number")
    return float(value)


def _pos_int(value: Any, key: str, allowed: str = "a positive integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")
    return value


def build_methods(cfg: DictConfig) -> list[QuantMethod]:
    """The method under study (``quant``) first, then the baselines; each validated by construction."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    nodes: list[tuple[str, DictConfig]] = [("quant", cfg.quant)]
    for name, node in (cfg.get("baselines") or {}).items():
        nodes.append((f"baselines.{name}", node))
    methods, names = [], set()
    for key, node in nodes:
        if node is None or "_target_" not in node:
            raise ConfigError(f"{key} has no _target_: every quant config must name its method class")
        try:
            method = instantiate(node, _convert_="all")
        except InstantiationException as e:
            cause = e.__cause__ or e
            raise ConfigError(f"{key} ({node.get('name', '?')}): {cause}") from e
        if not isinstance(method, QuantMethod):
            raise ConfigError(f"{key}: _target_ {node._target_} does not build a QuantMethod")
        if method.name in names:
            continue  # e.g. quant=rtn together with the rtn baseline
        names.add(method.name)
        methods.append(method)
    return methods


def budget_list(node: Any, key: str) -> list[float]:
    """The average bit-widths of config list ``key``: a non-empty list of numbers in [1, 8]."""
    if not isinstance(node, (list, ListConfig)) or len(node) == 0:
        raise ConfigError(f"{key}={node!r} must be a non-empty list of average bit-widths in [1, 8]")
    out = []
    for i, b in enumerate(node):
        v = _num(b, f"{key}[{i}]")
        if not 1.0 <= v <= 8.0:
            raise ConfigError(f"{key}[{i}]={b} is outside the achievable range: allowed 1 <= bits <= 8")
        out.append(v)
    return out


def validate(cfg: DictConfig) -> tuple[list[QuantMethod], list[float]]:
    """Check the whole config before any model is loaded; returns the methods and the budget grid."""
    check_config(cfg, schema=False)  # required values, model folder, data files
    grid = budget_list(cfg.budget.get("budgets"), "budget.budgets")
    _pos_int(cfg.group_size, "group_size")
    _pos_int(cfg.data.calib.nsamples, "data.calib.nsamples")
    seqlen = _pos_int(cfg.data.calib.seqlen, "data.calib.seqlen")
    if seqlen < 2:
        raise ConfigError(f"data.calib.seqlen={seqlen} is too short: at least 2 tokens")
    _pos_int(cfg.eval.seqlen, "eval.seqlen")
    _pos_int(cfg.eval.get("batch_size", 1), "eval.batch_size")
    on_mismatch = OmegaConf.select(cfg, "run.on_mismatch", default="refuse")
    if on_mismatch not in ON_MISMATCH:
        raise ConfigError(f"run.on_mismatch={on_mismatch!r} is invalid; allowed: {', '.join(ON_MISMATCH)}")
    if cfg.eval.get("backend", "auto") not in ("auto", "torch", "triton"):
        raise ConfigError(f"eval.backend={cfg.eval.backend!r} is invalid; allowed: auto, torch, triton")
    if cfg.eval.get("max_windows") is not None:
        _pos_int(cfg.eval.max_windows, "eval.max_windows", "a positive integer or null")
    if not cfg.data.get("eval"):
        raise ConfigError("data.eval is empty: name at least one evaluation corpus")
    from ..io import data as data_mod

    known = getattr(data_mod, "CORPORA", None)
    for key, spec in [("data.calib", cfg.data.calib)] + [(f"data.eval.{k}", v) for k, v in cfg.data.eval.items()]:
        if known is not None and spec.corpus not in known:
            raise ConfigError(f"{key}.corpus={spec.corpus!r} is unknown; allowed: {sorted(known)}")
    from hydra.errors import InstantiationException

    check_schema(cfg)  # keys and types of calib, quant and the baselines, from the classes they build
    check_trainer(cfg)  # lightning.Trainer arguments, none that calibration owns
    check_callbacks(cfg)
    try:
        calib = instantiate_calib(cfg)
    except InstantiationException as e:
        raise ConfigError(f"calib: {e.__cause__ or e}") from e
    methods = build_methods(cfg)
    main = methods[0]
    if not main.budgets(grid):
        raise ConfigError(
            f"quant={main.name}: none of budget.budgets={grid} is achievable by this method "
            f"(e.g. slices {getattr(getattr(main, 'mobi', None), 'slice_bits', '?')})"
        )
    check_stage1(methods, calib, grid)
    unserved = unserved_budgets(methods, grid)
    if unserved and "budget.budgets" in explicit_overrides():
        i, b = unserved[0]
        raise ConfigError(
            f"budget.budgets[{i}]={b:g} is served by no method of this run ({served_ranges(methods, grid)}): "
            "remove it, or add a method that serves it"
        )
    return methods, grid


def unserved_budgets(methods: list[QuantMethod], grid: list[float]) -> list[tuple[int, float]]:
    """``(index, budget)`` of the grid budgets that no method evaluates."""
    served = [float(b) for m in methods for b in m.budgets(grid) if not math.isnan(float(b))]
    return [(i, b) for i, b in enumerate(grid) if not any(abs(b - s) < 1e-9 for s in served)]


def served_ranges(methods: list[QuantMethod], grid: list[float]) -> str:
    """What each quantizing method evaluates of ``grid``: ``mobiquant 3-8 bits, rtn 2, 3, 4 bits``."""
    parts = []
    for m in methods:
        bs = sorted(float(b) for b in m.budgets(grid) if not math.isnan(float(b)))
        if bs:
            mobi = getattr(m, "mobi", None)
            span = (
                f"{mobi.min_bits:g}-{mobi.max_bits:g}" if mobi is not None and not getattr(m, "static", False) else None
            )
            parts.append(f"{m.name} {span or ', '.join(f'{b:g}' for b in bs)} bits")
    return "; ".join(parts) or "none"


def check_stage1(methods: list[QuantMethod], calib, grid: list[float]) -> None:
    """``calib.stage1_bits`` (or a method's own ``calib.stage1_bits``) names a view of every slice layout
    it calibrates."""
    import dataclasses

    from ..calibration import stage1_slices

    for i, m in enumerate(methods):
        for mobi, overrides in m.calibrations(grid):
            settings = dataclasses.replace(calib, **overrides) if overrides else calib
            try:
                stage1_slices(mobi, settings)
            except ValueError:
                views = list(mobi.view_bits)
                own = "stage1_bits" in overrides
                key = (
                    ("quant" if i == 0 else f"baselines ({m.name})") + ".calib.stage1_bits"
                    if own
                    else "calib.stage1_bits"
                )
                raise ConfigError(
                    f"{key}={settings.stage1_bits!r} is not a view of {m.name}'s slices {list(mobi.slice_bits)}: "
                    f"allowed {views}, 'base' or 'anchor'"
                ) from None


def instantiate_calib(cfg: DictConfig):
    from hydra.utils import instantiate

    return instantiate(cfg.calib, _convert_="all")


def trainer_args(cfg: DictConfig) -> dict[str, Any]:
    """The `trainer` group as `lightning.Trainer` arguments (nested `_target_` nodes built, e.g. a profiler),
    `_target_` (the Trainer class) included; calibration adds the per-block ones it owns."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = cfg.get("trainer")
    if node is None:
        return {}
    plain = OmegaConf.to_container(node, resolve=True)
    assert isinstance(plain, dict)
    args = {str(k): v for k, v in plain.items() if k not in TRAINER_OWN_KEYS}
    target = args.pop("_target_", None)
    built = dict(instantiate(args, _convert_="all")) if args else {}
    if target is not None:
        built["_target_"] = target
    return built


def build_callbacks(cfg: DictConfig) -> list:
    """The `callbacks` group's callbacks, freshly built (every block's Trainer receives its own)."""
    from hydra.utils import instantiate

    return [instantiate(node, _convert_="all") for node in (cfg.get("callbacks") or {}).values() if node is not None]


# ---------------------------------------------------------------------------- model and data
def load_base_model(cfg: DictConfig):
    if cfg.model.path == "tiny":
        from ..tiny import tiny_llama

        return tiny_llama(**cfg.model.get("tiny", {}), dtype=cfg.model.dtype)
    from ..dist import local_device
    from ..io.models import load_model

    return load_model(
        cfg.model.path, dtype=cfg.model.dtype, device=local_device(str(cfg.model.device)), cache_dir=cfg.paths.cache_dir
    )


def load_token_ids(spec: DictConfig, tokenizer) -> torch.Tensor:
    from ..io.data import corpus_joiner, load_corpus, tokenize_corpus

    kwargs = {}
    if spec.get("paths"):
        kwargs["paths"] = list(spec.paths)
    docs = load_corpus(spec.corpus, split=spec.split, **kwargs)
    if not any(d.strip() for d in docs):
        where = f"files {', '.join(map(str, kwargs['paths']))}" if "paths" in kwargs else f"split {spec.split!r}"
        raise ValueError(f"corpus {spec.corpus} ({where}) holds no text")
    return tokenize_corpus(docs, tokenizer, joiner=corpus_joiner(spec.corpus))


def prepare_run(cfg: DictConfig) -> Path:
    """Process settings every task shares (threads, seed, W&B mode, model cache) and the run folder,
    checked writable so that a read-only folder fails here, before any work; stray temporaries of the
    cache are removed."""
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    torch.manual_seed(cfg.seed)
    wandb_env_default()
    os.environ["MOBIQUANT_CACHE"] = str(cfg.paths.cache_dir)
    out = ensure_writable_dir(cfg.paths.output_dir)
    if is_rank_zero():  # temporaries of killed conversions and cache writes (owner gone, or a day old)
        for p in remove_stray_temporaries(cfg.paths.cache_dir):
            log.info("removed stray temporary %s", p)
    return out


def calibration_table(rows: list[dict]) -> pd.DataFrame:
    """``calibration.csv``: one row per method and block."""
    return concat_rows(rows).dropna(axis=1, how="all")


def run_context(
    cfg: DictConfig,
    base,
    calib_ids: torch.Tensor,
    out_dir: Path,
    tracker: Tracker,
    calib_rows: list[dict] | None = None,
    calib=None,
    calib_csv: Path | None = None,
    run_id: str | None = None,
    base_fingerprint: str | None = None,
) -> RunContext:
    """What the methods of a run may use: FP copies of ``base``, the calibration windows, the run folder,
    and a block callback that logs each finished block and puts it into ``calib_rows`` when given (in place
    of an earlier row of the same method and block), each row with ``run_id``; with ``calib_csv``, the
    rows are written there (atomically) after every block."""
    n_blocks = _n_blocks(base)

    def on_block_end(tag: str, i: int, report) -> None:
        if calib_rows is not None:
            row = {"method": tag, **vars(report), **({"run_id": run_id} if run_id else {})}
            same = [k for k, r in enumerate(calib_rows) if r.get("method") == tag and r.get("block") == i]
            if same:
                calib_rows[same[0]] = row
            else:
                calib_rows.append(row)
            if calib_csv is not None and is_rank_zero():
                write_csv(calibration_table(calib_rows), calib_csv)
        log.info("[%s] block %d/%d  mse %.3g  %.1fs", tag, i + 1, n_blocks, report.final_mse, report.seconds)
        tracker.log_block(tag, i, report)

    return RunContext(
        fp_model=lambda: copy.deepcopy(base),
        calib_ids=calib_ids,
        output_dir=out_dir,
        calib=calib if calib is not None else instantiate_calib(cfg),
        loggers=tracker.lightning_loggers,
        callbacks=lambda: build_callbacks(cfg),
        trainer=lambda: trainer_args(cfg),
        on_block_end=on_block_end,
        save_checkpoints=bool(cfg.save_checkpoints),
        base_model_name=str(cfg.model.path),
        resume=bool(cfg.get("resume", True)),
        base_fingerprint=base_fingerprint,
    )


# ---------------------------------------------------------------------------- run
def _row_avg_bits(variant: Variant) -> float:
    if any(True for _ in mobi_linears(variant.model)):
        return achieved_bits(variant.model)
    if "avg_bits" in variant.extra:
        return float(variant.extra["avg_bits"])
    return float(variant.budget)


def run(cfg: DictConfig) -> float:
    """Run one experiment; returns the mean log-perplexity of ``quant`` over its budgets on the first
    evaluation corpus (``tracking.OBJECTIVE``, what a sweeper minimises)."""
    from ..evaluation import perplexity
    from ..io.checkpoint import base_fingerprint
    from ..io.data import calibration_windows, eval_windows

    t_start = time.perf_counter()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):  # keep the console to our progress
        logging.getLogger(name).setLevel(logging.WARNING)
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
    out_dir = prepare_run(cfg)
    # Under trainer=ddp every rank runs this function (see mobiquant.dist); rank 0 alone evaluates,
    # writes and logs, the others take part in each block's fit.
    rank0 = is_rank_zero()
    # The folder's lock, its identity (refused before any work if another configuration made it) and
    # its stray temporaries; on_mismatch=new_subrun moves the run into a sub-run folder.
    folder = open_run_folder(out_dir, cfg, str(OmegaConf.select(cfg, "run.on_mismatch", default="refuse")), rank0)
    try:
        out_dir = _follow(cfg, out_dir, folder)
        tracker = Tracker(cfg.get("logger") if rank0 else None, plain_config(cfg))
    except BaseException:
        folder.release()
        raise
    failed = True
    try:
        log.info("loading model %s", cfg.model.path)
        base, tokenizer = load_base_model(cfg)
        tok_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
        fingerprint = base_fingerprint(base)
        folder.bind_base_model(fingerprint, str(cfg.model.path))  # another base model: refused here
        out_dir = _follow(cfg, out_dir, folder)
        results_path = out_dir / "results.csv"
        resume = bool(cfg.get("resume", True))
        rows: list[dict] = _previous_rows(results_path, folder) if resume else []
        calib_csv = out_dir / "calibration.csv"
        calib_rows: list[dict] = _previous_rows(calib_csv, folder, check=False) if resume else []

        log.info("calibration text: %s (%s) ...", cfg.data.calib.corpus, cfg.data.calib.split)
        t0 = time.perf_counter()
        calib_tokens = load_token_ids(cfg.data.calib, tokenizer)
        log.info("calibration text: %d tokens in %.1fs", calib_tokens.numel(), time.perf_counter() - t0)
        calib_ids = calibration_windows(calib_tokens, cfg.data.calib.nsamples, cfg.data.calib.seqlen, cfg.seed)
        eval_sets = {}
        for name, spec in cfg.data.eval.items():
            ids = load_token_ids(spec, tokenizer)
            eval_sets[name] = eval_windows(ids, cfg.eval.seqlen, cfg.eval.get("max_windows"))
            log.info("eval %s: %d windows of %d tokens", name, eval_sets[name].shape[0], cfg.eval.seqlen)

        ctx = run_context(
            cfg,
            base,
            calib_ids,
            out_dir,
            tracker,
            calib_rows,
            calib_csv=calib_csv,
            run_id=folder.run_id,
            base_fingerprint=fingerprint,
        )
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
                    for _, m in mobi_linears(variant.model):
                        m.backend = cfg.eval.get("backend", "auto")
                    t0 = time.perf_counter()
                    r = perplexity(variant.model, windows, batch_size=cfg.eval.batch_size)
                    row = {
                        "model": cfg.model.name,
                        "method": variant.method,
                        "budget": variant.budget,
                        "avg_bits": _row_avg_bits(variant),
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
            failed = False
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
        failed = False
        return summary[OBJECTIVE]
    finally:
        try:
            tracker.finish(failed)
        finally:
            folder.release()


def _follow(cfg: DictConfig, out_dir: Path, folder: RunFolder) -> Path:
    """The run's folder after :mod:`mobiquant.io.runfolder` picked it: a sub-run becomes ``paths.output_dir``
    (where the loggers write)."""
    if folder.path != out_dir:
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder.path)
    return folder.path


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


def _df(rows):
    return concat_rows(rows) if rows else concat_rows([]).iloc[0:0]


def _n_blocks(model) -> int:
    from ..patching import find_blocks

    return len(find_blocks(model)[1])
