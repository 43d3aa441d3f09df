"""``mobiquant-report DIR`` / ``python -m mobiquant.report DIR``: one report over a sweep's runs.

Collects every ``results.csv`` under ``DIR`` (a Hydra multirun directory, a single run directory, or a
folder holding several of them), labels each job by the overrides that differ between jobs (read from
its ``.hydra/overrides.yaml``), and writes into ``DIR/report/`` (or ``--out``):

* ``report.csv`` (and ``report.parquet`` when pyarrow is installed): the tidy table, one row per
  job x method x budget x dataset, with the job's ``label``, ``overrides`` and one ``ov.<key>``
  column per swept key;
* ``jobs.csv``: one row per job (status, main method, mean ppl over its budgets per dataset);
* ``report.md``: leaderboard, ppl tables (label x budget) per dataset, the Pareto front;
* ``elasticity_<key>.png``: the main method's elasticity curves overlaid per value of each swept key
  (mean over the other keys, min-max band), and ``pareto.png``: ppl vs achieved bits of every
  quantized result with its Pareto front;
* a W&B summary run (offline unless ``--wandb online``; ``--wandb disabled`` skips it) holding the
  tables, the plots and the Markdown, grouped with the sweep's runs.

Results of different models, corpora or sequence lengths are only put side by side when an override
tells the jobs apart; otherwise the report stops with an error (``--allow-mixed`` to go on anyway).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io.results import atomic_write_text, is_missing, markdown_table, read_results, readable_log_axis, write_csv
from .io.tracking import wandb_table

log = logging.getLogger("mobiquant.report")

OV = "ov."  # prefix of the per-key override columns
SKIP_DIRS = {".submitit", ".hydra", "wandb", "checkpoints", "csv", "report", "__pycache__"}
BASELINE_NAMES = {"fp", "fp16", "rtn"}


class ReportError(ValueError):
    """The directory cannot be reported on (empty, unreadable or mixed-up inputs)."""


@dataclass
class Report:
    root: Path
    df: pd.DataFrame  # tidy rows
    jobs: pd.DataFrame  # one row per job directory (finished or not)
    axes: list[str]  # override keys that differ between jobs
    group: str | None = None  # W&B group of the sweep's runs, when it can be recovered
    tags: list[str] = field(default_factory=list)

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(self.df["dataset"]))


# ---------------------------------------------------------------------------- collecting
def find_job_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) holding a ``results.csv`` or a Hydra job record."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        here = Path(dirpath)
        if "results.csv" in filenames or (here / ".hydra" / "overrides.yaml").is_file():
            found.append(here)
    return sorted(found, key=_natural_key)


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def parse_override(text: str) -> tuple[str, str]:
    key, sep, value = str(text).partition("=")
    key = key.lstrip("+")
    return key, (value if sep else "(deleted)")


def _read_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    data = yaml.safe_load(path.read_text()) or []
    if not isinstance(data, list):
        raise ReportError(f"{path} is not a list of overrides")
    return [str(o) for o in data]


def _read_config(job: Path) -> Any:
    path = job / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - a broken config only loses labels, not results
        log.warning("cannot read %s: %s", path, e)
        return None


def _literal(cfg: Any, key: str) -> Any:
    """``key`` of an unresolved job config when it is a plain value (no interpolation), else None."""
    if cfg is None:
        return None
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001
        return None
    if OmegaConf.is_config(node):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:  # noqa: BLE001
            return None
    return node


def _sweep_group(job: Path, cfg: Any) -> str | None:
    """The W&B group the job's runs used (``logger_group``), recovered without the job's environment.

    A literal value is taken as is; the presets' ``${oc.env:WANDB_SWEEP_ID,${hydra:sweep.dir}}`` is
    rebuilt from ``.hydra/hydra.yaml`` (the sweep directory as the job saw it; under ``wandb agent``
    the sweep id is unknown here: pass ``--group``).
    """
    if cfg is None:
        return None
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=False).get("logger_group")
    hydra_yaml = job / ".hydra" / "hydra.yaml"
    if raw is None:  # mobiquant.io.tracking.run_group: the sweep directory of a multirun, else task_name
        try:
            multirun = "MULTIRUN" in str(OmegaConf.load(hydra_yaml).hydra.mode)
        except Exception:  # noqa: BLE001
            multirun = False
        if not multirun:
            return None if "task_name" not in cfg else str(_literal(cfg, "task_name"))
        raw = "${hydra:sweep.dir}"
    if "${" not in str(raw):
        return str(raw)
    if "${hydra:sweep.dir}" not in str(raw) or not hydra_yaml.is_file():
        return None
    try:
        h = OmegaConf.load(hydra_yaml).hydra
        out = Path(str(h.runtime.output_dir))
        subdir = OmegaConf.select(h, "sweep.subdir", default=None)
        subdir = "" if subdir is None else str(subdir)
        sweep_abs = out.parent if subdir and out.name == Path(subdir).name else out
        raw_dir = str(OmegaConf.to_container(h.sweep, resolve=False)["dir"])
        sweep = str(sweep_abs) if os.path.isabs(raw_dir) else os.path.relpath(sweep_abs, str(h.runtime.cwd))
    except Exception:  # noqa: BLE001
        return None
    value = str(raw).replace("${hydra:sweep.dir}", sweep)
    value = re.sub(r"^\$\{oc\.env:WANDB_SWEEP_ID,(.*)\}$", r"\1", value)
    return None if "${" in value else value


def _main_method(cfg: Any, df: pd.DataFrame) -> str:
    name = _literal(cfg, "quant.name")
    methods = list(dict.fromkeys(df["method"]))
    if isinstance(name, str) and name in methods:
        return name
    rest = [m for m in methods if m not in BASELINE_NAMES]
    return (rest or methods)[0]


def collect(root: str | os.PathLike, allow_mixed: bool = False) -> Report:
    """Every job under ``root`` as one tidy DataFrame (see the module docstring)."""
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root} does not exist")
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory: pass a multirun (or run) directory")
    dirs = find_job_dirs(root)
    if not dirs:
        raise ReportError(
            f"{root} holds no results.csv and no Hydra job directory: pass a multirun directory "
            "(outputs/<task_name>/multiruns/<time>) or a run directory"
        )
    jobs, frames, parsed = [], [], {}
    for d in dirs:
        rel = "." if d == root else d.relative_to(root).as_posix()
        overrides = _read_overrides(d)
        parsed[rel] = dict(parse_override(o) for o in overrides)
        cfg = _read_config(d)
        job = {
            "job": rel,
            "sweep": Path(rel).parent.as_posix() if rel != "." else ".",
            "overrides": " ".join(overrides),
            "task_name": _literal(cfg, "task_name"),
            "group": _sweep_group(d, cfg),
            "tags": _literal(cfg, "tags") or [],
        }
        csv = d / "results.csv"
        if not csv.is_file():
            jobs.append({**job, "status": "no results", "main_method": None, "n_rows": 0})
            continue
        try:
            df = read_results(csv)
        except Exception as e:  # noqa: BLE001 - a clear message naming the file
            raise ReportError(f"{csv} cannot be read as a mobiquant results table: {e}") from e
        if df.empty:
            jobs.append({**job, "status": "empty", "main_method": None, "n_rows": 0})
            continue
        main = _main_method(cfg, df)
        df = df.assign(
            job=rel, sweep=job["sweep"], overrides=job["overrides"], main_method=main, is_main=df["method"] == main
        )
        frames.append(df)
        jobs.append({**job, "status": "ok", "main_method": main, "n_rows": len(df)})
    jobs_df = pd.DataFrame(jobs)
    if not frames:
        missing = ", ".join(jobs_df["job"])
        raise ReportError(f"no finished job under {root}: {len(jobs_df)} job(s) without results.csv ({missing})")

    axes = _varying_keys(parsed)
    for key in axes:
        jobs_df[OV + key] = [parsed[j].get(key) for j in jobs_df["job"]]
    jobs_df["label"] = _labels(jobs_df, axes)
    df = pd.concat(frames, ignore_index=True)
    per_job = jobs_df.set_index("job")
    df["label"] = df["job"].map(per_job["label"])
    for key in axes:
        df[OV + key] = df["job"].map(per_job[OV + key])
    if not allow_mixed:
        check_not_mixed(df, axes, root)
    _add_scores(jobs_df, df)
    front = ["sweep", "job", "label"] + [OV + k for k in axes]
    df = df[front + [c for c in df.columns if c not in front]]
    groups = {g for g in jobs_df["group"] if g}
    tags = sorted({t for ts in jobs_df["tags"] for t in (ts if isinstance(ts, list) else [])})
    return Report(
        root=root,
        df=df,
        jobs=jobs_df.drop(columns=["tags"]),
        axes=axes,
        group=groups.pop() if len(groups) == 1 else None,
        tags=tags,
    )


def _varying_keys(parsed: dict[str, dict[str, str]]) -> list[str]:
    keys: list[str] = []
    for ov in parsed.values():
        keys += [k for k in ov if k not in keys]
    return [k for k in keys if len({ov.get(k) for ov in parsed.values()}) > 1]


def _labels(jobs: pd.DataFrame, axes: list[str]) -> list[str]:
    if not axes:
        base = [j if j != "." else "run" for j in jobs["job"]]
    else:
        base = [
            " ".join(f"{k}={'(default)' if v is None else v}" for k, v in zip(axes, row, strict=True))
            for row in jobs[[OV + k for k in axes]].itertuples(index=False)
        ]
    counts = pd.Series(base).value_counts()
    return [b if counts[b] == 1 or not axes else f"{b} [{j}]" for b, j in zip(base, jobs["job"], strict=True)]


def check_not_mixed(df: pd.DataFrame, axes: list[str], root: Path) -> None:
    """Stop when jobs ran different models / corpora / sequence lengths and no swept key explains it."""
    per_job = df.groupby("job", sort=False).agg(
        model=("model", lambda s: ", ".join(sorted(map(str, s.dropna().unique())))),
        datasets=("dataset", lambda s: ", ".join(sorted(map(str, s.unique())))),
        seqlen=("seqlen", lambda s: ", ".join(sorted(map(str, s.dropna().unique())))),
    )
    for j, row in per_job.iterrows():
        if "," in row["model"]:
            raise ReportError(f"{root / j}/results.csv mixes results of several models ({row['model']})")
    ov = df.drop_duplicates("job").set_index("job")[[OV + k for k in axes]] if axes else None
    what = {"model": "models", "datasets": "evaluation corpora", "seqlen": "sequence lengths"}
    for attr, noun in what.items():
        if per_job[attr].nunique() <= 1:
            continue
        explained = ov is not None and any(
            per_job[attr].groupby(ov[OV + k].fillna("(default)")).nunique().max() == 1 for k in axes
        )
        if not explained:
            seen = "; ".join(
                f"{v} in {', '.join(g.index[:4])}{' ...' if len(g) > 4 else ''}" for v, g in per_job.groupby(attr)[attr]
            )
            differ = f"the jobs differ only in {', '.join(axes)}" if axes else "the jobs have the same overrides"
            raise ReportError(
                f"results of different {noun} are mixed under {root} ({seen}), but no override tells them "
                f"apart ({differ}). Report each sweep on its own, or pass --allow-mixed"
            )


def _add_scores(jobs: pd.DataFrame, df: pd.DataFrame) -> None:
    """Per job and dataset: mean ppl and mean log-ppl (the task's return value) of the main method over
    its budgets."""
    main = quantized(df[df["is_main"]])
    first = next(iter(dict.fromkeys(df["dataset"])))
    budgets = (
        main[main["dataset"] == first]
        .groupby("job")["budget"]
        .apply(lambda b: ",".join(f"{v:g}" for v in sorted(b.unique())))
    )
    jobs["budgets"] = jobs["job"].map(budgets)  # a mean over other budgets is another metric
    for ds in dict.fromkeys(df["dataset"]):
        sel = main[main["dataset"] == ds]
        jobs[f"mean_ppl.{ds}"] = jobs["job"].map(sel.groupby("job")["ppl"].mean())
        # the run's `objective` (mobiquant.io.tracking.curve_summary), what the sweepers minimise
        jobs[f"mean_log_ppl.{ds}"] = jobs["job"].map(
            sel.assign(lp=np.log(sel["ppl"].astype(float))).groupby("job")["lp"].mean()
        )


# ---------------------------------------------------------------------------- analysis
def _sort_values(values) -> list:
    vals = list(dict.fromkeys(values))
    try:
        return sorted(vals, key=lambda v: float(v))
    except (TypeError, ValueError):
        return sorted(vals, key=str)


def pareto_front(df: pd.DataFrame, x: str = "avg_bits", y: str = "ppl") -> pd.DataFrame:
    """Rows no other row beats on both fewer (or equal) bits and lower (or equal) perplexity."""
    d = df.dropna(subset=[x, y]).sort_values([x, y])
    keep, best = [], math.inf
    for idx, v in zip(d.index, d[y], strict=True):
        if v < best:
            keep.append(idx)
            best = v
    return d.loc[keep]


def quantized(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of quantized variants (the FP reference has no budget)."""
    return df[df["budget"].notna()]


SEED_KEYS = ("seed",)  # overrides that repeat a configuration: aggregated (mean +- std), never compared


METHOD_KEYS = ("quant",)  # the method's own name tells these jobs apart


def config_label(row_overrides: dict[str, Any], axes: list[str]) -> str:
    """The job's label without its seed (jobs that differ only in the seed share it) and without ``quant``
    (the method names it)."""
    return " ".join(
        f"{k}={row_overrides[k]}" for k in axes if k not in SEED_KEYS + METHOD_KEYS and row_overrides.get(k) is not None
    )


def _with_config(df: pd.DataFrame) -> pd.DataFrame:
    axes = [c.removeprefix(OV) for c in df.columns if c.startswith(OV)]
    cfg = (
        [config_label({k: r[OV + k] for k in axes if not is_missing(r[OV + k])}, axes) for _, r in df.iterrows()]
        if axes
        else [""] * len(df)
    )
    return df.assign(config=cfg)


def curves_by(df: pd.DataFrame, key: str | None) -> pd.DataFrame:
    """Main-method curves per method and value of ``key`` (per method and configuration when None; a seed
    key gives one curve per method and seed): mean, std, min and max ppl and mean avg bits per (dataset,
    method, value, budget), over the jobs that share them. Methods are never averaged together."""
    main = quantized(df[df["is_main"]])
    if key is None:
        main = _with_config(main)
        values = main["config"]
    else:
        values = main[OV + key].fillna("(default)")
    g = main.assign(_v=values).groupby(["dataset", "method", "_v", "budget"], sort=False)
    out = g.agg(
        avg_bits=("avg_bits", "mean"),
        ppl=("ppl", "mean"),
        ppl_std=("ppl", "std"),
        ppl_min=("ppl", "min"),
        ppl_max=("ppl", "max"),
        n_jobs=("job", "nunique"),
    ).reset_index()
    out["ppl_std"] = out["ppl_std"].fillna(0.0)
    return out.rename(columns={"_v": "value"}).sort_values(["dataset", "method", "value", "avg_bits"])


def seed_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, method, configuration (the label without the seed) and budget: mean and std of ppl
    over the seeds (``n_seeds`` jobs), and mean achieved bits; FP rows have budget NaN."""
    d = _with_config(df)
    d = d.assign(_b=d["budget"].fillna(-1.0))
    g = d.groupby(["dataset", "method", "config", "_b"], sort=False)
    out = g.agg(
        avg_bits=("avg_bits", "mean"), ppl_mean=("ppl", "mean"), ppl_std=("ppl", "std"), n_seeds=("job", "nunique")
    ).reset_index()
    out["budget"] = out["_b"].where(out["_b"] >= 0)
    return out.drop(columns="_b")[
        ["dataset", "method", "config", "budget", "avg_bits", "ppl_mean", "ppl_std", "n_seeds"]
    ]


# ---------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> Path:
    """The figure as PNG (``path``) and as PDF beside it, for a paper."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        fig.savefig(path, dpi=150)
        fig.savefig(path.with_suffix(".pdf"))
    finally:
        plt.close(fig)
    return path


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, n), figsize=(6 * max(1, n), 4.2), squeeze=False)
    return fig, axes[0]


def _finish_axes(ax, title: str) -> None:
    ax.set_xlabel("average bits per weight (achieved)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    readable_log_axis(ax)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)


def plot_curves(df: pd.DataFrame, key: str | None, path: str | os.PathLike, title: str = "") -> Path:
    """Elasticity curves of the main method: one line per method and value of ``key`` (per method and
    configuration when None), mean over the jobs sharing them with a +-std band (seeds and the other keys);
    FP as a dashed reference line. Written as PNG and PDF."""
    curves = curves_by(df, key)
    datasets = list(dict.fromkeys(df["dataset"]))
    fig, axes = _figure(len(datasets))
    fp = df[df["budget"].isna()]
    methods = list(dict.fromkeys(curves["method"]))
    for ax, ds in zip(axes, datasets, strict=False):
        sub = curves[curves["dataset"] == ds]
        for method in methods:
            m = sub[sub["method"] == method]
            for v in _sort_values(m["value"]):
                g = m[m["value"] == v].sort_values("avg_bits")
                what = (f"{key}={v}" if key else str(v)) if v != "" else ""
                label = f"{method} {what}".strip() if len(methods) > 1 or not what else what
                n = int(g["n_jobs"].max())
                (line,) = ax.plot(g["avg_bits"], g["ppl"], marker="o", label=label + (f" (n={n})" if n > 1 else ""))
                if n > 1:
                    ax.fill_between(
                        g["avg_bits"],
                        (g["ppl"] - g["ppl_std"]).clip(lower=g["ppl_min"]),
                        g["ppl"] + g["ppl_std"],
                        color=line.get_color(),
                        alpha=0.15,
                        lw=0,
                    )
        ref = fp[fp["dataset"] == ds]["ppl"]
        if not ref.empty:
            ax.axhline(float(ref.mean()), color="k", ls="--", lw=1, label=f"FP ({ref.mean():.2f})")
        _finish_axes(ax, f"{title} {ds}".strip())
    return _save(fig, Path(path))


def plot_pareto(df: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Perplexity vs achieved bits of every quantized result (all jobs, all methods) and its front."""
    q = quantized(df)
    datasets = list(dict.fromkeys(df["dataset"]))
    fig, axes = _figure(len(datasets))
    for ax, ds in zip(axes, datasets, strict=False):
        sub = q[q["dataset"] == ds]
        for method, g in sub.groupby("method", sort=False):
            ax.scatter(g["avg_bits"], g["ppl"], s=18, alpha=0.7, label=method)
        front = pareto_front(sub)
        if not front.empty:  # staircase up to the largest bit-width: nothing beats it to the right
            xs = [*front["avg_bits"], float(sub["avg_bits"].max())]
            ys = [*front["ppl"], float(front["ppl"].iloc[-1])]
            ax.step(xs, ys, where="post", color="k", lw=1.2, label="Pareto front")
            ax.scatter(front["avg_bits"], front["ppl"], s=60, facecolors="none", edgecolors="k")
        _finish_axes(ax, f"{title} {ds} (Pareto)".strip())
    return _save(fig, Path(path))


# ---------------------------------------------------------------------------- markdown
def markdown(report: Report) -> str:
    df, jobs = report.df, report.jobs
    ok = jobs[jobs["status"] == "ok"]
    parts = [
        f"# Sweep report: {report.root}",
        "",
        f"{len(ok)} finished job(s) of {len(jobs)}; swept: "
        + (", ".join(f"`{k}`" for k in report.axes) or "nothing (one configuration)")
        + (f"; W&B group `{report.group}`" if report.group else "")
        + ".",
    ]
    bad = jobs[jobs["status"] != "ok"]
    if not bad.empty:
        parts += [
            "",
            "Jobs without results (failed, killed or still running): "
            + ", ".join(f"`{j}` ({s})" for j, s in zip(bad["job"], bad["status"], strict=True))
            + ".",
        ]
    first = report.datasets[0]
    score_cols = [c for c in ok.columns if c.startswith("mean_ppl.")]
    board = ok[["label", "main_method", "budgets", *score_cols]].sort_values(f"mean_ppl.{first}")
    parts += [
        "",
        f"## Leaderboard (mean ppl of the main method over its budgets; sorted by {first})",
        "",
        markdown_table(board.rename(columns={c: c.removeprefix("mean_ppl.") for c in score_cols}), "{:.3f}"),
    ]
    if board["budgets"].nunique() > 1:
        parts += ["", "The jobs cover different budgets: compare means only between rows with the same budgets."]
    for ds in report.datasets:
        sub = quantized(df[df["is_main"] & (df["dataset"] == ds)])
        if sub.empty:
            continue
        sub = sub.assign(b=sub["budget"].map(lambda b: f"{float(b):g} bit"))
        pivot = sub.pivot_table(index="label", columns="b", values="ppl", aggfunc="mean")
        pivot = pivot[sorted(pivot.columns, key=lambda c: float(c.split()[0]))]
        order = [lab for lab in board["label"] if lab in pivot.index]
        parts += [
            "",
            f"## {ds}: ppl of the main method per budget",
            "",
            markdown_table(pivot.loc[order].reset_index(), "{:.3f}"),
        ]
        fp = df[(df["dataset"] == ds) & df["budget"].isna()]["ppl"]
        if not fp.empty:
            parts += ["", f"FP reference: {fp.mean():.3f}"]
        if any(k in SEED_KEYS for k in report.axes):
            parts += [
                "",
                f"## {ds}: mean +- std over seeds (main method of each configuration)",
                "",
                markdown_table(seed_table(df, ds), "{:.3f}"),
            ]
        front = pareto_front(quantized(df[df["dataset"] == ds]))
        parts += [
            "",
            f"### {ds}: Pareto front (all methods and jobs)",
            "",
            markdown_table(front[["label", "method", "budget", "avg_bits", "ppl"]], "{:.3f}"),
        ]
    return "\n".join(parts) + "\n"


def seed_table(df: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Rows method x configuration, columns budgets, cells ``mean +- std (n)`` of the main method's ppl."""
    s = seed_summary(quantized(df[df["is_main"]]))
    s = s[s["dataset"] == dataset]
    s = s.assign(
        b=s["budget"].map(lambda b: f"{float(b):g} bit"),
        cell=[
            f"{m:.3f} +- {sd:.3f} (n={n})" if n > 1 else f"{m:.3f} (n=1)"
            for m, sd, n in zip(s["ppl_mean"], s["ppl_std"].fillna(0.0), s["n_seeds"], strict=True)
        ],
    )
    pivot = s.pivot_table(index=["method", "config"], columns="b", values="cell", aggfunc="first")
    pivot = pivot[sorted(pivot.columns, key=lambda c: float(c.split()[0]))]
    return pivot.reset_index()


# ---------------------------------------------------------------------------- writing
def has_parquet() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def write_report(report: Report, out: str | os.PathLike | None = None) -> dict[str, Path]:
    out = Path(out) if out is not None else report.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    write_csv(report.df, out / "report.csv")
    paths["csv"] = out / "report.csv"
    write_csv(report.jobs, out / "jobs.csv")
    paths["jobs"] = out / "jobs.csv"
    if has_parquet():
        report.df.to_parquet(out / "report.parquet", index=False)
        paths["parquet"] = out / "report.parquet"
    else:
        log.warning("pyarrow is not installed: report.parquet skipped (pip install pyarrow)")
    atomic_write_text(out / "report.md", markdown(report))
    paths["markdown"] = out / "report.md"
    title = str(report.df["model"].iloc[0])
    # one line per method and configuration, seeds averaged (+-std); then one figure per swept key
    paths["elasticity"] = plot_curves(report.df, None, out / "elasticity.png", title)
    for key in report.axes:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
        paths[f"elasticity:{key}"] = plot_curves(report.df, key, out / f"elasticity_{name}.png", title)
    paths["pareto"] = plot_pareto(report.df, out / "pareto.png", title)
    for key, p in list(paths.items()):
        if p.suffix == ".png":
            paths[f"{key} (pdf)"] = p.with_suffix(".pdf")
    return paths


def log_to_wandb(
    report: Report,
    paths: dict[str, Path],
    mode: str = "offline",
    project: str = "mobiquant",
    group: str | None = None,
    out: str | os.PathLike | None = None,
) -> str | None:
    """One W&B run (job_type ``report``) with the tables, plots and Markdown; returns its directory."""
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    out = Path(out) if out is not None else paths["csv"].parent
    run = wandb.init(
        project=project,
        group=group or report.group,
        job_type="report",
        name=f"report-{report.root.resolve().name}",
        tags=["report", *report.tags],
        dir=str(out),
        mode=mode,
        config={"root": str(report.root), "axes": report.axes, "n_jobs": int(len(report.jobs))},
    )
    try:
        payload: dict[str, Any] = {"report/results": wandb_table(report.df), "report/jobs": wandb_table(report.jobs)}
        for p in paths.values():
            if p.suffix == ".png":
                payload[f"report/{p.stem}"] = wandb.Image(str(p))
        run.log(payload)
        run.summary["report_markdown"] = paths["markdown"].read_text()
        ok = report.jobs[report.jobs["status"] == "ok"]
        first = f"mean_ppl.{report.datasets[0]}"
        if first in ok and ok[first].notna().any():
            best = ok.loc[ok[first].idxmin()]
            run.summary["best/label"] = best["label"]
            run.summary["best/mean_ppl"] = float(best[first])
        run_dir = run.dir
    except BaseException:
        wandb.finish(exit_code=1)
        raise
    wandb.finish()
    return str(Path(run_dir).parent)


def load_report(path: str | os.PathLike) -> pd.DataFrame:
    """The tidy table from ``report.parquet`` / ``report.csv``, a report folder, or a sweep directory
    (collected on the fly)."""
    path = Path(path)
    if path.is_file():
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    for cand in (
        path / "report.parquet",
        path / "report.csv",
        path / "report" / "report.parquet",
        path / "report" / "report.csv",
    ):
        if cand.is_file() and (cand.suffix != ".parquet" or has_parquet()):
            return load_report(cand)
    return collect(path).df


# ---------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mobiquant-report",
        description="Collect the results.csv files of a sweep into one report: report.csv/.parquet, "
        "report.md, comparison plots and a W&B summary run.",
    )
    p.add_argument("dir", help="multirun directory (or run directory, or a folder of them)")
    p.add_argument("--out", help="output folder (default: DIR/report)")
    p.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default=os.environ.get("WANDB_MODE")
        if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled")
        else "offline",
        help="W&B summary run mode (default: $WANDB_MODE, else offline)",
    )
    p.add_argument("--project", default="mobiquant", help="W&B project (default: mobiquant)")
    p.add_argument("--group", help="W&B group (default: the sweep's own group when it can be recovered)")
    p.add_argument(
        "--allow-mixed",
        action="store_true",
        help="report results of different models/corpora even without an override telling them apart",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = collect(args.dir, allow_mixed=args.allow_mixed)
    except ReportError as e:
        print(f"mobiquant-report: {e}", file=sys.stderr)
        return 2
    paths = write_report(report, args.out)
    run_dir = log_to_wandb(
        report, paths, mode=args.wandb, project=args.project, group=args.group, out=args.out or paths["csv"].parent
    )
    n_ok = int((report.jobs["status"] == "ok").sum())
    print(f"{n_ok}/{len(report.jobs)} job(s), {len(report.df)} rows; swept: {', '.join(report.axes) or '-'}")
    for key, path in paths.items():
        print(f"  {key:>24}: {path}")
    if run_dir:
        hint = f"; upload with `wandb sync {run_dir}`" if args.wandb == "offline" else ""
        print(f"  {'wandb':>24}: {run_dir}{hint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
