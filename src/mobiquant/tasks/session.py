"""One session for every ``task=``: the set-up and tear-down the tasks share, and the checks before it.

:func:`open_session` is used by every task (quantize, lm_eval, decode, outliers, routers)::

    with open_session(cfg, "lm_eval", check=validate_lm_eval) as ses:
        plan = ses.checked                      # what ``check`` returned
        base, tokenizer = ses.base, ses.tokenizer   # loaded on first use
        ctx = ses.context()                     # RunContext over the calibration windows

In order it: keeps the console to our progress (Lightning's and other chatty loggers raised to
``WARNING`` or more), runs ``check(cfg)`` (every configuration error before any work: :func:`validate`
and the task's own checks), prepares the process and the run folder (:func:`prepare_run`: threads, seed,
W&B mode, a writable folder, the cache's stray temporaries), takes the folder
(:func:`mobiquant.io.runfolder.open_run_folder`: its lock, its identity, the settings that decide this
task's numbers, refused before any work if another configuration made it, its stray temporaries), and
opens the tracker (W&B run). On first use it loads the base model and tokenizer (the folder then checks
or records the base model's fingerprint) and the calibration windows. On leaving it always closes the
tracker and releases the folder's lock, however the task ended.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn as nn
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
from ..io.checkpoint import CheckpointError, config_from_meta, read_meta
from ..io.fileio import ensure_writable_dir, remove_stray_temporaries
from ..io.results import concat_rows, write_csv
from ..io.runfolder import ON_MISMATCH, RunFolder, config_identity, open_run_folder
from ..io.tracking import Tracker, plain_config, wandb_env_default
from ..methods.core import QuantMethod, RunContext, Variant
from ..patching import achieved_bits, find_blocks, mobi_linears, static_k_for_bits
from ..quant.config import MoBiConfig

log = logging.getLogger("mobiquant")

#: Loggers kept quiet during a task (the console shows our progress).
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


# ---------------------------------------------------------------------------- checks
def num(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} is not a number")
    return float(value)


def pos_int(value: Any, key: str, allowed: str = "a positive integer") -> int:
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
        v = num(b, f"{key}[{i}]")
        if not 1.0 <= v <= 8.0:
            raise ConfigError(f"{key}[{i}]={b} is outside the achievable range: allowed 1 <= bits <= 8")
        out.append(v)
    return out


def validate(cfg: DictConfig) -> tuple[list[QuantMethod], list[float]]:
    """Check the whole config before any model is loaded; returns the methods and the budget grid."""
    check_config(cfg, schema=False)  # required values, model folder, data files
    grid = budget_list(cfg.budget.get("budgets"), "budget.budgets")
    pos_int(cfg.group_size, "group_size")
    pos_int(cfg.data.calib.nsamples, "data.calib.nsamples")
    seqlen = pos_int(cfg.data.calib.seqlen, "data.calib.seqlen")
    if seqlen < 2:
        raise ConfigError(f"data.calib.seqlen={seqlen} is too short: at least 2 tokens")
    pos_int(cfg.eval.seqlen, "eval.seqlen")
    pos_int(cfg.eval.get("batch_size", 1), "eval.batch_size")
    on_mismatch = OmegaConf.select(cfg, "run.on_mismatch", default="refuse")
    if on_mismatch not in ON_MISMATCH:
        raise ConfigError(f"run.on_mismatch={on_mismatch!r} is invalid; allowed: {', '.join(ON_MISMATCH)}")
    if cfg.eval.get("backend", "auto") not in ("auto", "torch", "triton"):
        raise ConfigError(f"eval.backend={cfg.eval.backend!r} is invalid; allowed: auto, torch, triton")
    if cfg.eval.get("max_windows") is not None:
        pos_int(cfg.eval.max_windows, "eval.max_windows", "a positive integer or null")
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


def checkpoint_serving(folder: Path, budgets: list[float], key: str, tol: float = 0.0) -> tuple[MoBiConfig, bool]:
    """The config of the checkpoint in ``folder`` (config key ``key``) and whether it is routed (routers over
    several slices), once it is known to serve every budget of ``budgets``: a routed checkpoint serves
    ``min_bits - tol <= bits <= max_bits + tol``, any other only its static views (the prefix sums of its
    slices). ``folder`` is a mobiquant checkpoint folder or a transformers folder holding a mobiquant model
    (:func:`mobiquant.hf.save_pretrained`). An unreadable checkpoint or a budget it does not serve is a
    :class:`ConfigError`."""
    from .. import hf

    try:
        mobi = hf.folder_config(folder) or config_from_meta(read_meta(folder), folder)
    except CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from e
    routed = mobi.routers and len(mobi.slice_bits) > 1
    if routed:
        bad = [b for b in budgets if not mobi.min_bits - tol <= b <= mobi.max_bits + tol]
        allowed = f"{mobi.min_bits:g} <= bits <= {mobi.max_bits:g}"
    else:
        bad = [b for b in budgets if static_k_for_bits(mobi, b) is None]
        allowed = f"one of {list(mobi.view_bits)} (no routers)"
    if bad:
        raise ConfigError(
            f"{key}: budgets {bad} are outside what checkpoint {folder} serves (slices {list(mobi.slice_bits)}): "
            f"allowed {allowed}"
        )
    return mobi, routed


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

    kwargs: dict[str, Any] = {}
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
    """``calibration.csv``: one row per method and block; a column empty in every row (``peak_mem_mb`` and
    ``end_mem_mb`` off CUDA, ``view_blends`` when no view changed its pair) is left out, so that a re-read
    table writes the same columns (an empty string reads back as NaN)."""
    return concat_rows(rows).replace("", float("nan")).dropna(axis=1, how="all")


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
    held_out_ids: Callable[[int], torch.Tensor] | None = None,
) -> RunContext:
    """What the methods of a run may use: FP copies of ``base``, the calibration windows, the run folder,
    and a block callback that logs each finished block and puts it into ``calib_rows`` when given (in place
    of an earlier row of the same method and block), each row with ``run_id``; with ``calib_csv``, the
    rows are written there (atomically) after every block."""
    n_blocks = len(find_blocks(base)[1])

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
        held_out_ids=held_out_ids,
    )


def calib_tokens(cfg: DictConfig, tokenizer) -> torch.Tensor:
    """The token ids of the ``data.calib`` text (its calibration windows: :func:`calib_windows`)."""
    log.info("calibration text: %s (%s) ...", cfg.data.calib.corpus, cfg.data.calib.split)
    t0 = time.perf_counter()
    tokens = load_token_ids(cfg.data.calib, tokenizer)
    log.info("calibration text: %d tokens in %.1fs", tokens.numel(), time.perf_counter() - t0)
    return tokens


def calib_windows(cfg: DictConfig, tokens: torch.Tensor) -> torch.Tensor:
    """The calibration windows of ``data.calib``: ``nsamples`` x ``seqlen`` tokens of ``tokens`` (``seed``)."""
    from ..io.data import calibration_windows

    return calibration_windows(tokens, cfg.data.calib.nsamples, cfg.data.calib.seqlen, cfg.seed)


def use_backend(model: nn.Module, backend: Literal["auto", "torch", "triton"]) -> None:
    """Every MoBiQuant linear of ``model`` computes with kernel ``backend`` (``eval.backend``)."""
    for _, m in mobi_linears(model):
        m.backend = backend


def row_avg_bits(variant: Variant) -> float:
    """The average bits a result row reports: measured on the tokens that went through a MoBiQuant model,
    else what the method recorded, else its budget."""
    if any(True for _ in mobi_linears(variant.model)):
        return achieved_bits(variant.model)
    if "avg_bits" in variant.extra:
        return float(variant.extra["avg_bits"])
    return float(variant.budget)


# ---------------------------------------------------------------------------- the session
def quiet_loggers(names: tuple[str, ...] = QUIET_LOGGERS, level: int = logging.WARNING) -> None:
    for name in names:
        logging.getLogger(name).setLevel(level)


@dataclass
class Session:
    """What a task works in: its checked settings, run folder (locked), tracker, and the base model,
    tokenizer and calibration windows (loaded on first use)."""

    cfg: DictConfig
    task: str
    checked: Any  # what the session's ``check`` returned
    out_dir: Path
    folder: RunFolder
    tracker: Tracker
    rank0: bool = True
    fingerprint: str | None = None  # the base model's (io.checkpoint.base_fingerprint), once loaded
    _model: tuple[nn.Module, Any] | None = field(default=None, repr=False)
    _calib_ids: torch.Tensor | None = field(default=None, repr=False)
    _calib_tokens: torch.Tensor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ model and text
    def load(self) -> tuple[nn.Module, Any]:
        """The base model and tokenizer, loaded once; the run folder checks (or records) the base model's
        fingerprint: another base model than the folder was made with is refused here (or, with
        ``run.on_mismatch=new_subrun``, the session moves into a sub-run: :attr:`out_dir` changes)."""
        if self._model is None:
            from ..io.checkpoint import base_fingerprint

            log.info("loading model %s", self.cfg.model.path)
            base, tokenizer = load_base_model(self.cfg)
            self.fingerprint = base_fingerprint(base)
            self.folder.bind_base_model(self.fingerprint, str(self.cfg.model.path))
            self.out_dir = follow(self.cfg, self.out_dir, self.folder)
            self._model = (base, tokenizer)
        return self._model

    @property
    def base(self) -> nn.Module:
        return self.load()[0]

    @property
    def tokenizer(self) -> Any:
        return self.load()[1]

    @property
    def tokenizer_name(self) -> str:
        tok = self.tokenizer
        return getattr(tok, "name_or_path", "") or type(tok).__name__

    @property
    def dtype(self) -> str:
        return str(next(self.base.parameters()).dtype).removeprefix("torch.")

    def fp_model(self) -> nn.Module:
        """A copy of the unquantized base model."""
        return copy.deepcopy(self.base)

    @property
    def n_blocks(self) -> int:
        return len(find_blocks(self.base)[1])

    @property
    def blocks_name(self) -> str:
        return find_blocks(self.base)[0]

    @property
    def calib_ids(self) -> torch.Tensor:
        """The calibration windows of ``data.calib``, built once."""
        if self._calib_ids is None:
            self._calib_ids = calib_windows(self.cfg, self.calib_tokens)
        return self._calib_ids

    @property
    def calib_tokens(self) -> torch.Tensor:
        """The token ids of the calibration text, tokenized once."""
        if self._calib_tokens is None:
            self._calib_tokens = calib_tokens(self.cfg, self.tokenizer)
        return self._calib_tokens

    def held_out_ids(self, count: int) -> torch.Tensor:
        """``count`` windows of the calibration text that share no token with :attr:`calib_ids`
        (:func:`mobiquant.io.data.held_out_windows`): text the calibrated model has not been fitted on. Fewer
        (with a warning) when the text holds fewer; an error naming the remedy when it holds none."""
        from ..io.data import held_out_windows

        c = self.cfg.data.calib
        try:
            ids = held_out_windows(self.calib_tokens, c.nsamples, c.seqlen, self.cfg.seed, count, allow_fewer=True)
        except ValueError as e:
            raise ConfigError(f"{e}; or set plan.windows=train (the plan built on the calibration windows)") from e
        if ids.shape[0] < count:
            log.warning("calibration text: %d held-out windows of %d tokens, not %d", ids.shape[0], c.seqlen, count)
        return ids

    def eval_windows(self, name: str) -> torch.Tensor:
        """The evaluation windows of corpus ``data.eval.<name>`` (``eval.seqlen``, ``eval.max_windows``)."""
        from ..io.data import eval_windows

        ids = load_token_ids(self.cfg.data.eval[name], self.tokenizer)
        return eval_windows(ids, self.cfg.eval.seqlen, self.cfg.eval.get("max_windows"))

    def context(
        self, calib_rows: list[dict] | None = None, calib_csv: Path | None = None, run_id: str | None = None
    ) -> RunContext:
        """:func:`run_context` over this session's base model, calibration windows, folder and tracker."""
        return run_context(
            self.cfg,
            self.base,
            self.calib_ids,
            self.out_dir,
            self.tracker,
            calib_rows,
            calib_csv=calib_csv,
            run_id=run_id,
            base_fingerprint=self.fingerprint,
            held_out_ids=self.held_out_ids,
        )

    def use_backend(self, model: nn.Module) -> None:
        """``eval.backend`` for every MoBiQuant linear of ``model``."""
        use_backend(model, self.cfg.eval.get("backend", "auto"))


@contextlib.contextmanager
def open_session(
    cfg: DictConfig,
    task: str,
    check: Callable[[DictConfig], Any] = validate,
    quiet: tuple[str, ...] = QUIET_LOGGERS,
    quiet_level: int = logging.WARNING,
) -> Iterator[Session]:
    """The session of one run of ``task`` (see the module docstring; the run folder's identity is made of
    ``task``'s settings). ``check(cfg)`` runs before anything is written (its result is
    :attr:`Session.checked`); a refused run folder raises :class:`~mobiquant.io.runfolder.RunFolderError`
    before any model is loaded."""
    quiet_loggers(quiet, quiet_level)
    checked = check(cfg)
    out_dir = prepare_run(cfg)
    # Under trainer=ddp every rank runs the task (see mobiquant.dist); rank 0 alone writes and logs.
    rank0 = is_rank_zero()
    on_mismatch = str(OmegaConf.select(cfg, "run.on_mismatch", default="refuse"))
    folder = open_run_folder(out_dir, config_identity(cfg, task), on_mismatch, rank0)
    try:
        out_dir = follow(cfg, out_dir, folder)
        tracker = Tracker(cfg.get("logger") if rank0 else None, plain_config(cfg))
    except BaseException:
        folder.release()
        raise
    failed = True
    try:
        yield Session(cfg, task, checked, out_dir, folder, tracker, rank0)
        failed = False
    finally:
        try:
            tracker.finish(failed)
        finally:
            folder.release()


def follow(cfg: DictConfig, out_dir: Path, folder: RunFolder) -> Path:
    """The run's folder after :mod:`mobiquant.io.runfolder` picked it: a sub-run becomes ``paths.output_dir``
    (where the loggers write)."""
    if folder.path != out_dir:
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder.path)
    return folder.path
