"""Experiment tracking: Lightning loggers for calibration, plus run-level W&B logging.

The W&B run is the one behind Lightning's ``WandbLogger`` (so per-block calibration losses and the
results land in the same run). It is always finished, with a non-zero exit code when the job failed,
so a Hydra multirun carries on with its next job.

Runs that belong together share a W&B group (``run_group``: the sweep, else the experiment), carry the
values that set them apart in their name (``run_name``) and are tagged with method, model and budgets
(``run_tags``). The summary holds one value per method, dataset and budget (``ppl/<method>/<dataset>/
b<budget>``) and the whole curve in one number (``OBJECTIVE``, see ``curve_summary``), which the Optuna
preset and the W&B sweep files optimise.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Summary key of the whole elasticity curve of `quant`: the mean log-perplexity over its budget grid on the
# first evaluation corpus (what `mobiquant` returns to a sweeper; lower is better).
OBJECTIVE = "objective"
# Overrides that never tell two runs apart in a name: where outputs and logs go, how the job is launched.
NAME_SKIP = (
    "hydra",
    "logger",
    "logger_group",
    "paths",
    "experiment",
    "torch_threads",
    "save_checkpoints",
    "resume",
    "run",
    "tags",
    "task_name",
    "hparams_search",
)


def wandb_table(df: pd.DataFrame) -> Any:
    """``df`` as a ``wandb.Table``: text columns as strings, every missing value (NaN, None, NA) as ``None``."""
    import wandb

    clean = df.astype({c: "string" for c in df.columns if df[c].dtype == object})
    return wandb.Table(dataframe=clean.astype(object).where(clean.notna(), None))


class Tracker:
    def __init__(self, logger_cfg: DictConfig | None, run_config: dict | None = None):
        from hydra.utils import instantiate

        self.loggers: list = []
        self.wandb_run = None
        for _name, node in (logger_cfg or {}).items():
            if node is None or "_target_" not in node:
                continue
            is_wandb = str(node._target_).endswith("WandbLogger")
            lg = instantiate(node, **(wandb_identity(node, run_config or {}) if is_wandb else {}))
            self.loggers.append(lg)
            if type(lg).__name__ == "WandbLogger":
                self.wandb_run = lg.experiment  # starts the run now
                if run_config is not None:
                    self.wandb_run.config.update(run_config, allow_val_change=True)
                try:
                    self.wandb_run.define_metric("calib/*", step_metric="calib/step")
                except Exception:  # older wandb: plain step axis
                    pass
        for lg in self.loggers:
            if hasattr(lg, "log_hyperparams") and run_config is not None and type(lg).__name__ != "WandbLogger":
                lg.log_hyperparams(run_config)

    @property
    def lightning_loggers(self):
        return self.loggers or False

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self.wandb_run, "dir", None) if self.wandb_run is not None else None

    def log_row(self, row: dict) -> None:
        if self.wandb_run is None:
            return
        tag = f"{row['method']}/{row['dataset']}"
        self.wandb_run.log({f"eval/{tag}/ppl": row["ppl"], f"eval/{tag}/avg_bits": row["avg_bits"]})

    def log_block(self, method: str, block: int, report: Any) -> None:
        if self.wandb_run is None:
            return
        self.wandb_run.log(
            {
                f"calib_blocks/{method}/final_mse": report.final_mse,
                f"calib_blocks/{method}/seconds": report.seconds,
                f"calib_blocks/{method}/block": block,
            }
        )

    def log_results(self, df: pd.DataFrame, plot_path: Path | None, markdown: str | None = None) -> None:
        if self.wandb_run is None:
            return
        import wandb

        payload = {"results": wandb_table(df)}
        for ds in df["dataset"].unique():
            sub = df[(df["dataset"] == ds) & df["budget"].notna()]
            if sub.empty:
                continue
            xs, ys, keys = [], [], []
            for method, g in sub.groupby("method", sort=False):
                g = g.sort_values("avg_bits")
                xs.append(g["avg_bits"].astype(float).tolist())
                ys.append(g["ppl"].astype(float).tolist())
                keys.append(method)
            payload[f"elasticity/{ds}"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=keys, title=f"perplexity vs average bits ({ds})", xname="avg bits"
            )
        if plot_path is not None and Path(plot_path).exists():
            payload["elasticity_png"] = wandb.Image(str(plot_path))
        self.wandb_run.log(payload)
        if markdown:
            self.wandb_run.summary["results_markdown"] = markdown

    def log_summary(self, values: dict) -> None:
        """Values that describe the finished run (one each), written to the W&B run summary."""
        if self.wandb_run is None:
            return
        for k, v in values.items():
            self.wandb_run.summary[k] = v
        # the per-row history (eval/<method>/<dataset>/...) would leave its last row, one budget, in the
        # summary: the per-budget keys above replace it
        for k in [k for k in self.wandb_run.summary.keys() if k.startswith("eval/")]:
            del self.wandb_run.summary[k]

    def log_metrics(self, metrics: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(metrics)

    def log_table(self, key: str, df: pd.DataFrame, markdown: str | None = None) -> None:
        """``df`` as the W&B table ``key`` (and ``markdown`` in the run summary under ``<key>_markdown``)."""
        if self.wandb_run is None:
            return
        self.wandb_run.log({key: wandb_table(df)})
        if markdown:
            self.wandb_run.summary[f"{key}_markdown"] = markdown

    def log_checkpoint(self, folder: str | None, name: str) -> None:
        if self.wandb_run is None or folder is None:
            return
        import wandb

        art = wandb.Artifact(name=name, type="quantized-model")
        for path in artifact_files(folder):
            art.add_file(str(path), name=str(path.relative_to(folder)))
        self.wandb_run.log_artifact(art)

    def finish(self, failed: bool) -> None:
        for lg in self.loggers:
            try:
                lg.finalize("failed" if failed else "success")
            except Exception as e:  # never mask the job's own error
                log.warning("logger %s failed to finalize: %s", type(lg).__name__, e)
        if self.wandb_run is not None:
            import wandb

            wandb.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


def artifact_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files of a checkpoint folder that make the artifact: every file below it but the temporaries
    of our atomic writers (a write in progress, or one left by a killed process) and the folders they make."""
    from .fileio import is_temporary_name

    folder = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_temporary_name(d))
        out += [Path(dirpath, f) for f in sorted(filenames) if not is_temporary_name(f)]
    return out


# ---------------------------------------------------------------------------- run identity
def _hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hc) -> bool:
    from hydra.types import RunMode

    try:
        return hc is not None and hc.mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - a partial Hydra config (compose API): a single run
        return False


def run_group(config: dict) -> str | None:
    """The W&B group: ``logger_group`` when set, else the W&B sweep id under ``wandb agent``, else the
    multirun's sweep directory (every job of one ``-m`` sweep together), else the experiment
    (``task_name``)."""
    if config.get("logger_group"):
        return str(config["logger_group"])
    if os.environ.get("WANDB_SWEEP_ID"):
        return os.environ["WANDB_SWEEP_ID"]
    hc = _hydra_config()
    if _is_multirun(hc):
        return str(hc.sweep.dir)
    return str(config["task_name"]) if config.get("task_name") else None


def job_overrides() -> list[str]:
    """The command-line (and sweeper) overrides of this Hydra job, ``[]`` outside Hydra."""
    hc = _hydra_config()
    try:
        return [str(o) for o in hc.overrides.task] if hc is not None else []
    except Exception:  # noqa: BLE001
        return []


def run_name(config: dict, overrides: list[str] | None = None) -> str:
    """``<task_name>-<quant>`` followed by the job's overrides that set it apart (the swept values:
    ``seed=1``, ``router.hidden=32``), e.g. ``smoke-rtn-seed=1``."""
    quant = (config.get("quant") or {}).get("name", "")
    parts = [str(config.get("task_name", "run")), str(quant)]
    for ov in job_overrides() if overrides is None else overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if key.split(".")[0].split("/")[0] in NAME_SKIP:
            continue
        if key == "quant" and value == quant:  # already the second part
            continue
        parts.append(f"{key}={value}")
    return "-".join(p for p in parts if p)


def run_tags(config: dict) -> list[str]:
    """The configured ``tags`` plus ``method:``, ``model:`` and ``budgets:`` (W&B caps tags at 64 chars)."""
    tags = [str(t) for t in config.get("tags") or []]
    quant = (config.get("quant") or {}).get("name")
    model = (config.get("model") or {}).get("name")
    budgets = (config.get("budget") or {}).get("budgets") or []
    if quant:
        tags.append(f"method:{quant}")
    if model:
        tags.append(f"model:{model}")
    if budgets:
        tags.append("budgets:" + ",".join(f"{float(b):g}" for b in budgets))
    return list(dict.fromkeys(t[:64] for t in tags))


def wandb_identity(node: DictConfig, config: dict) -> dict:
    """Keyword overrides for the ``WandbLogger`` node: group, name and tags where the config leaves them
    open (``null``); a value set in ``logger.wandb`` is kept."""
    out: dict[str, Any] = {}
    if node.get("group") is None:
        out["group"] = run_group(config)
    if node.get("name") is None:
        out["name"] = run_name(config)
    out["tags"] = list(dict.fromkeys([*(node.get("tags") or []), *run_tags(config)]))
    return out


def curve_summary(df: pd.DataFrame, main: str, datasets: list[str]) -> dict[str, float]:
    """Per method and dataset: ``ppl/<method>/<dataset>/b<budget>`` (``ppl/<method>/<dataset>`` for FP),
    the curve's mean log-perplexity ``curve/<method>/<dataset>/mean_log_ppl``; and ``OBJECTIVE``, that
    mean for ``main`` on the first dataset (NaN when it has no rows)."""
    out: dict[str, float] = {}
    for (method, ds), g in df.groupby(["method", "dataset"], sort=False):
        for b, ppl in zip(g["budget"], g["ppl"], strict=True):
            key = f"ppl/{method}/{ds}" if pd.isna(b) else f"ppl/{method}/{ds}/b{float(b):g}"
            out[key] = float(ppl)
        q = g[g["budget"].notna()]
        if not q.empty:
            out[f"curve/{method}/{ds}/mean_log_ppl"] = float(q["ppl"].astype(float).map(math.log).mean())
    out[OBJECTIVE] = out.get(f"curve/{main}/{datasets[0]}/mean_log_ppl", math.nan) if datasets else math.nan
    return out


def plain_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def wandb_env_default() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
