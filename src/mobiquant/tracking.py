"""Experiment tracking: Lightning loggers for calibration, plus run-level W&B logging.

The W&B run is the one behind Lightning's ``WandbLogger`` (so per-block calibration losses and the
results land in the same run). It is always finished, with a non-zero exit code when the job failed,
so a Hydra multirun carries on with its next job.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, logger_cfg: DictConfig | None, run_config: dict | None = None):
        from hydra.utils import instantiate

        self.loggers: list = []
        self.wandb_run = None
        for name, node in (logger_cfg or {}).items():
            if node is None or "_target_" not in node:
                continue
            lg = instantiate(node)
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
        self.wandb_run.log({f"calib_blocks/{method}/final_mse": report.final_mse,
                            f"calib_blocks/{method}/seconds": report.seconds,
                            f"calib_blocks/{method}/block": block})

    def log_results(self, df: pd.DataFrame, plot_path: Path | None, markdown: str | None = None) -> None:
        if self.wandb_run is None:
            return
        import wandb

        clean = df.astype({c: "string" for c in df.columns if df[c].dtype == object}).fillna(pd.NA)
        table = wandb.Table(dataframe=clean.astype(object).where(clean.notna(), None))
        payload = {"results": table}
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

    def log_metrics(self, metrics: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(metrics)

    def log_table(self, key: str, df: pd.DataFrame, markdown: str | None = None) -> None:
        """``df`` as the W&B table ``key`` (and ``markdown`` in the run summary under ``<key>_markdown``)."""
        if self.wandb_run is None:
            return
        import wandb

        clean = df.astype({c: "string" for c in df.columns if df[c].dtype == object}).fillna(pd.NA)
        self.wandb_run.log({key: wandb.Table(dataframe=clean.astype(object).where(clean.notna(), None))})
        if markdown:
            self.wandb_run.summary[f"{key}_markdown"] = markdown

    def log_checkpoint(self, folder: str | None, name: str) -> None:
        if self.wandb_run is None or folder is None:
            return
        import wandb

        art = wandb.Artifact(name=name, type="quantized-model")
        art.add_dir(folder)
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


def plain_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def wandb_env_default() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
