"""``task=lm_eval``: EleutherAI's lm-evaluation-harness on the quantized model, one pass per budget.

The model under evaluation is the quantized one, at each budget of ``lm_eval.budgets``: either a saved
checkpoint (``lm_eval.checkpoint``: a checkpoint folder, loaded onto the base model with :func:`load_quantized`,
or a transformers folder of :func:`mobiquant.hf.save_pretrained`, loaded whole) or the
configured ``quant`` method run as :func:`mobiquant.tasks.quantize.run` runs it (same model, calibration
windows, method objects and checkpoints), with the ``baselines`` beside it. Each variant is wrapped in
lm-eval's ``HFLM`` and evaluated with ``lm_eval.simple_evaluate``; the average bits are measured on the
tokens lm-eval sent through the model (padding included when ``lm_eval.batch_size`` > 1).

Tasks are lm-eval task names: the local ones in :mod:`mobiquant.lm_eval_tasks` (built from files on disk,
``lm_eval.data``) or any task of lm-eval's registry (``hellaswag``, ``arc_easy``, ...; those download
their data from the hub). Outputs in the run directory: ``lm_eval.csv`` (one row per method x budget x
task x metric, rewritten atomically after each pass), ``lm_eval.md`` and the W&B run.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig

from ..configcheck import path_hint
from ..io.checkpoint import CheckpointError, load_quantized
from ..io.fileio import atomic_write_text
from ..io.results import write_csv
from ..lm_eval_tasks import LOCAL_TASKS, TASKS_DIR
from ..methods.core import QuantMethod, RunContext, Variant
from ..patching import (
    reset_counts,
    set_budget,
    set_static,
    static_k_for_bits,
    storage_bits,
)
from ..quant.config import MoBiConfig
from .session import (
    QUIET_LOGGERS,
    ConfigError,
    budget_list,
    checkpoint_serving,
    open_session,
    pos_int,
    row_avg_bits,
    use_backend,
    validate,
)

log = logging.getLogger("mobiquant")

CSV_NAME, MD_NAME = "lm_eval.csv", "lm_eval.md"
COLUMNS = [
    "model",
    "method",
    "budget",
    "avg_bits",
    "storage_bits",
    "request",
    "task",
    "metric",
    "value",
    "stderr",
    "n_examples",
    "limit",
    "num_fewshot",
    "eval_seconds",
    "checkpoint",
    "lm_eval_version",
]
_BUDGET_TOL = 1e-6


@dataclass
class Plan:
    """Everything checked before any model is loaded."""

    tasks: list[str]
    budgets: list[float]
    limit: int | float | None
    num_fewshot: int | None
    metadata: dict[str, str]
    registry: bool  # lm-eval's own task registry is needed (not only the local tasks)
    methods: list[QuantMethod]  # run as the pipeline runs them (without the checkpoint's method)
    checkpoint: Path | None = None
    checkpoint_config: MoBiConfig | None = None
    checkpoint_routed: bool = False
    main: str = ""  # the method under study: checkpoint folder name or quant.name


# ---------------------------------------------------------------------------- validation
def _budgets(cfg: DictConfig) -> list[float]:
    node = cfg.lm_eval.get("budgets")
    key = "lm_eval.budgets"
    if node is None:
        node, key = cfg.budget.get("budgets"), "budget.budgets"
    return budget_list(node, key)


def _limit(value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"lm_eval.limit={value!r} is invalid: expected null, a positive integer or a fraction in (0, 1]"
        )
    if isinstance(value, int):
        return pos_int(value, "lm_eval.limit", "null, a positive integer or a fraction in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"lm_eval.limit={value} is invalid: a float limit is a fraction in (0, 1]")
    return value


def _tasks(cfg: DictConfig) -> list[str]:
    tasks = cfg.lm_eval.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, (list, ListConfig)) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"lm_eval.tasks={tasks!r} must be a non-empty list of lm-eval task names")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"lm_eval.tasks={list(tasks)} names a task twice")
    return list(tasks)


def _local_metadata(cfg: DictConfig, tasks: list[str]) -> dict[str, str]:
    """The text files the local tasks are built from; each must exist."""
    data = cfg.lm_eval.get("data") or {}
    meta = {}
    for task in tasks:
        key = LOCAL_TASKS.get(task)
        if key is None:
            continue
        path = data.get(key)
        if not path:
            raise ConfigError(f"lm_eval task {task!r} is built from a local file: set lm_eval.data.{key}")
        if not Path(path).is_file():
            raise ConfigError(
                f"lm_eval.data.{key}: file {path} does not exist (task {task!r} is built from it)"
                f"{path_hint(cfg, str(path))}"
            )
        meta[key] = str(path)
    return meta


def _lm_eval_tasks():
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"task=lm_eval needs lm-evaluation-harness: pip install 'mobiquant[lm_eval]' ({e})") from e
    return TaskManager


@functools.lru_cache(maxsize=2)
def known_tasks(registry: bool) -> frozenset[str]:
    """Task, group and tag names: the local ones, and lm-eval's registry with ``registry`` (an index of
    thousands of YAML files: seconds, so it is built once per process)."""
    return frozenset(_lm_eval_tasks()(include_path=str(TASKS_DIR), include_defaults=registry).all_tasks)


def check_tasks(tasks: Sequence[str]) -> bool:
    """Every name must be a local task or one of lm-eval's; returns whether lm-eval's registry is needed."""
    registry = not all(t in LOCAL_TASKS for t in tasks)
    known = known_tasks(registry)
    unknown = [t for t in tasks if t not in known and not (t.endswith(".yaml") and Path(t).is_file())]
    if unknown:
        raise ConfigError(
            f"lm_eval.tasks: {unknown} unknown to lm-eval; local tasks: {sorted(LOCAL_TASKS)}, or any task, group "
            "or tag of lm-eval's registry (e.g. hellaswag, arc_easy, lambada_openai; `lm-eval ls tasks` lists them)"
        )
    return registry


def task_manager(plan: Plan):
    """lm-eval's TaskManager with the local tasks (built from ``plan.metadata``); its registry if needed."""
    return _lm_eval_tasks()(include_path=str(TASKS_DIR), include_defaults=plan.registry, metadata=plan.metadata)


def validate_lm_eval(cfg: DictConfig) -> Plan:
    """Check the ``lm_eval`` block and the rest of the config; no model is loaded, nothing is downloaded."""
    if cfg.get("lm_eval") is None:
        raise ConfigError("task=lm_eval needs the `lm_eval` config block (conf/lm_eval/default.yaml)")
    tasks = _tasks(cfg)
    budgets = _budgets(cfg)
    limit = _limit(cfg.lm_eval.get("limit"))
    fewshot = cfg.lm_eval.get("num_fewshot")
    if fewshot is not None and (isinstance(fewshot, bool) or not isinstance(fewshot, int) or fewshot < 0):
        raise ConfigError(f"lm_eval.num_fewshot={fewshot!r} is invalid: expected null or an integer >= 0")
    pos_int(cfg.lm_eval.batch_size, "lm_eval.batch_size")
    iters = cfg.lm_eval.get("bootstrap_iters", 0)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"lm_eval.bootstrap_iters={iters!r} is invalid: expected an integer >= 0")
    if cfg.lm_eval.get("max_length") is not None:
        pos_int(cfg.lm_eval.max_length, "lm_eval.max_length", "null or a positive integer")
    metadata = _local_metadata(cfg, tasks)
    methods, _ = validate(cfg)  # model, data, calibration and every method's settings
    plan_kwargs: dict[str, Any] = {}
    if cfg.lm_eval.get("checkpoint"):
        folder = Path(str(cfg.lm_eval.checkpoint))
        mobi, routed = checkpoint_serving(folder, budgets, "lm_eval.checkpoint", tol=_BUDGET_TOL)
        # the checkpoint stands in for `quant`; the baselines still run
        plan_kwargs = dict(checkpoint=folder, checkpoint_config=mobi, checkpoint_routed=routed, main=folder.name)
        methods = methods[1:]
    else:
        main = methods[0]
        served = main.budgets(budgets)
        missing = [b for b in budgets if not any(abs(b - s) < _BUDGET_TOL for s in served)]
        if missing:
            raise ConfigError(
                f"budgets {missing} are not achievable by quant={main.name} (it serves "
                f"{[f'{s:g}' for s in main.budgets([x / 4 for x in range(4, 33)])]} of the 0.25-bit grid)"
            )
        plan_kwargs["main"] = main.name
    registry = check_tasks(tasks)
    return Plan(
        tasks=tasks,
        budgets=budgets,
        limit=limit,
        num_fewshot=fewshot,
        metadata=metadata,
        registry=registry,
        methods=methods,
        **plan_kwargs,
    )


# ---------------------------------------------------------------------------- variants
def checkpoint_variants(plan: Plan, base: torch.nn.Module, copy_base: bool) -> Iterator[Variant]:
    """The checkpoint loaded onto the base model (or, for a transformers folder, loaded whole in the base
    model's dtype and device), at each budget (thresholds, or static views)."""
    from .. import hf

    assert plan.checkpoint is not None
    try:
        if hf.folder_config(plan.checkpoint) is not None:
            model = hf.load_folder(plan.checkpoint, like=base)
        else:
            model = copy.deepcopy(base) if copy_base else base
            load_quantized(model, plan.checkpoint)
    except CheckpointError as e:
        raise ConfigError(f"lm_eval.checkpoint: {e}") from e
    for b in plan.budgets:
        if plan.checkpoint_routed:
            set_budget(model, b)
        else:
            set_static(model, static_k_for_bits(plan.checkpoint_config, b))
        yield Variant(plan.main, b, model, storage_bits(model), checkpoint=str(plan.checkpoint))


def method_variants(plan: Plan, ctx: RunContext) -> Iterator[Variant]:
    """Each method run as the pipeline runs it, keeping the requested budgets (and the FP reference)."""
    for method in plan.methods:
        for v in method.run(ctx, plan.budgets):
            if math.isnan(v.budget) or any(abs(v.budget - b) < _BUDGET_TOL for b in plan.budgets):
                yield v


# ---------------------------------------------------------------------------- lm-eval
def hflm(model: torch.nn.Module, tokenizer, batch_size: int, max_length: int | None):
    """lm-eval's HF wrapper around an in-memory model (no hub look-up for a revision hash)."""
    from lm_eval.models.huggingface import HFLM

    class InMemoryHFLM(HFLM):
        def get_model_info(self) -> dict:
            return {
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype),
                "model_revision": None,
                "model_sha": "",
            }

    return InMemoryHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a missing stderr
        return math.nan


def result_rows(results: dict, request: str) -> list[dict]:
    """(task, metric, value, stderr, n_examples) of one ``simple_evaluate`` result, for the tasks of ``request``."""
    rows = []
    for task, metrics in results["results"].items():
        n = (results.get("n-samples") or {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            rows.append(
                {
                    "request": request,
                    "task": task,
                    "metric": metric if filt == "none" else key,
                    "value": _float(value),
                    "stderr": _float(metrics.get(f"{metric}_stderr,{filt}")),
                    "n_examples": n,
                }
            )
    return rows


def evaluate_variant(
    plan: Plan, cfg: DictConfig, variant: Variant, tokenizer, tasks: list[str], tm: Any
) -> tuple[list[dict], float]:
    """One lm-eval pass of ``variant`` over ``tasks``; its rows and the measured average bits."""
    import lm_eval

    model = variant.model
    reset_counts(model)
    use_backend(model, cfg.eval.get("backend", "auto"))
    lm = hflm(model, tokenizer, int(cfg.lm_eval.batch_size), cfg.lm_eval.get("max_length"))
    seed = int(cfg.seed)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=tm,
        limit=plan.limit,
        num_fewshot=plan.num_fewshot,
        bootstrap_iters=int(cfg.lm_eval.get("bootstrap_iters", 0)),
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    avg_bits = row_avg_bits(variant)
    reset_counts(model, track=False)
    return split_by_request(results, tasks), avg_bits


def split_by_request(results: dict, requests: Sequence[str]) -> list[dict]:
    """Rows of one pass, each labelled with the requested name it came from (a task, or a group's subtask)."""
    groups = results.get("group_subtasks") or {}

    def members(name: str) -> list[str]:
        out = [name]
        for child in groups.get(name, []):
            out += members(child)
        return out

    claimed: dict[str, str] = {}
    for request in requests:
        for name in members(request):
            claimed.setdefault(name, request)
    unmatched = [r for r in requests if r not in results["results"] and r not in groups]
    rows = []
    for task in results["results"]:
        # a tag (e.g. ai2_arc) expands to tasks that carry no trace of it: give them the one such request
        request = claimed.get(task) or (unmatched[0] if len(unmatched) == 1 else task)
        one = {"results": {task: results["results"][task]}, "n-samples": results.get("n-samples", {})}
        rows += result_rows(one, request)
    return rows


def markdown_table(df: pd.DataFrame) -> str:
    """Methods x budgets (with measured average bits) against task/metric, ``value ± stderr``."""
    if df.empty:
        return "(no results)"
    d = df.copy()
    d["budget"] = d["budget"].map(lambda b: "FP" if pd.isna(b) else f"{float(b):g}")
    d["cell"] = [
        f"{v:.4g}" + ("" if pd.isna(s) else f" ± {s:.2g}") for v, s in zip(d["value"], d["stderr"], strict=True)
    ]
    d["column"] = d["task"] + " " + d["metric"]
    index = ["method", "budget", "avg_bits"]
    d["avg_bits"] = d["avg_bits"].map(lambda b: f"{b:.3f}")
    pivot = d.pivot_table(index=index, columns="column", values="cell", aggfunc="first", sort=False)
    header = "| method | budget | avg bits | " + " | ".join(pivot.columns) + " |"
    lines = [header, "|" + " --- |" * (3 + len(pivot.columns))]
    for key, row in pivot.iterrows():
        lines.append("| " + " | ".join(key) + " | " + " | ".join("" if pd.isna(c) else c for c in row) + " |")
    return "\n".join(lines)


def _key(method: str, budget: float, request: str) -> tuple:
    return (method, "FP" if budget is None or math.isnan(budget) else round(float(budget), 6), request)


def _previous(path: Path, plan: Plan) -> list[dict]:
    """Rows of an earlier run in this folder with the same limit and few-shot setting (resume)."""
    if not path.exists():
        return []
    df = pd.read_csv(path)
    if not set(COLUMNS) <= set(df.columns):
        missing = sorted(set(COLUMNS) - set(df.columns))
        raise ConfigError(f"{path} is not a mobiquant lm_eval table (columns {missing} missing)")
    same = df["limit"].map(_setting).eq(_setting(plan.limit)) & df["num_fewshot"].map(_setting).eq(
        _setting(plan.num_fewshot)
    )
    return df[same].to_dict("records")


def _setting(x: Any) -> str:
    """``limit`` / ``num_fewshot`` as written to and read back from the CSV (None and NaN alike)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{float(x):g}"


def run(cfg: DictConfig) -> float:
    """Evaluate the quantized model with lm-eval at every budget; returns the mean of ``quant``'s
    first metric (``acc`` where the first task has it) over its budgets on the first task."""
    import lm_eval

    t_start = time.perf_counter()
    # Bootstrap stderrs in this process: lm-eval's pool would fork a process holding the model (and CUDA).
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    quiet = (*QUIET_LOGGERS, "lm_eval", "lm-eval")
    with open_session(cfg, "lm_eval", check=validate_lm_eval, quiet=quiet, quiet_level=logging.ERROR) as ses:
        plan: Plan = ses.checked
        tracker = ses.tracker
        tm = task_manager(plan)
        base, tokenizer = ses.load()  # another base model than the folder was made with: refused here
        out_dir = ses.out_dir
        csv_path = out_dir / CSV_NAME
        rows = _previous(csv_path, plan) if cfg.get("resume", True) else []
        done = {_key(r["method"], r["budget"], r["request"]) for r in rows}
        variants: list[Iterator[Variant]] = []
        if plan.checkpoint is not None:
            variants.append(checkpoint_variants(plan, base, copy_base=bool(plan.methods)))
        if plan.methods:
            variants.append(method_variants(plan, ses.context()))
        for stream in variants:
            for variant in stream:
                todo = [t for t in plan.tasks if _key(variant.method, variant.budget, t) not in done]
                b = "FP" if math.isnan(variant.budget) else f"{variant.budget:g}"
                if not todo:
                    log.info("[%s] budget %s: all tasks present in %s, skipped", variant.method, b, csv_path)
                    continue
                t0 = time.perf_counter()
                new, avg_bits = evaluate_variant(plan, cfg, variant, tokenizer, todo, tm)
                seconds = time.perf_counter() - t0
                common = {
                    "model": cfg.model.name,
                    "method": variant.method,
                    "budget": variant.budget,
                    "avg_bits": avg_bits,
                    "storage_bits": variant.storage_bits,
                    "limit": plan.limit,
                    "num_fewshot": plan.num_fewshot,
                    "eval_seconds": seconds,
                    "checkpoint": variant.checkpoint,
                    "lm_eval_version": lm_eval.__version__,
                }
                new = [{**common, **r} for r in new]
                rows += new
                done |= {_key(variant.method, variant.budget, t) for t in todo}
                write_csv(pd.DataFrame(rows, columns=COLUMNS), csv_path)
                for r in new:
                    log.info(
                        "[%s] budget %s  %s %s %.4g  (avg bits %.3f, %.0fs)",
                        r["method"],
                        b,
                        r["task"],
                        r["metric"],
                        r["value"],
                        avg_bits,
                        seconds,
                    )
                tracker.log_metrics(
                    {
                        **{f"lm_eval/{r['task']}/{r['metric']}/{r['method']}": r["value"] for r in new},
                        f"lm_eval/avg_bits/{variant.method}": avg_bits,
                    }
                )
        df = pd.DataFrame(rows, columns=COLUMNS)
        write_csv(df, csv_path)
        md = markdown_table(df)
        atomic_write_text(out_dir / MD_NAME, md + "\n")
        tracker.log_table("lm_eval", df, md)
        print(f"\nlm-eval ({cfg.model.name}; tasks {', '.join(plan.tasks)}; limit {plan.limit}):\n\n{md}")
        print(f"\nwall time {(time.perf_counter() - t_start) / 60:.1f} min; outputs in {out_dir}")
        sel = df[(df["method"] == plan.main) & (df["request"] == plan.tasks[0])]
        if sel.empty:
            return math.nan
        metric = "acc" if (sel["metric"] == "acc").any() else sel["metric"].iloc[0]
        return float(sel[sel["metric"] == metric]["value"].mean())
