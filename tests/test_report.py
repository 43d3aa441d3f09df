"""``mobiquant.report``: collecting a sweep's results.csv files into one labelled table, the outputs,
the W&B summary run, and the errors for empty or mixed-up directories. Synthetic job directories shaped
like Hydra's (``<sweep>/<n>/results.csv`` + ``.hydra/overrides.yaml`` + ``.hydra/config.yaml``); the
real end-to-end sweep is in test_sweeps.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mobiquant import report as rp
from mobiquant.io.results import COLUMNS, write_csv
from mobiquant.report import OV, ReportError, collect, load_report, main, pareto_front

BUDGETS = [2.0, 3.0, 4.0, 8.0]


def rows(model="tiny-llama", datasets=("wiki_extract",), scale=1.0, main="mobiquant", seqlen=64):
    out = []
    for ds in datasets:
        out.append(
            {
                "model": model,
                "method": "fp",
                "budget": math.nan,
                "avg_bits": 32.0,
                "storage_bits": 32.0,
                "dataset": ds,
                "seqlen": seqlen,
                "ppl": 10.0,
            }
        )
        for b in BUDGETS:
            out.append(
                {
                    "model": model,
                    "method": main,
                    "budget": b,
                    "avg_bits": b + 0.01,
                    "storage_bits": 9.0,
                    "dataset": ds,
                    "seqlen": seqlen,
                    "ppl": scale * (10.0 + 8.0 / b),
                }
            )
            if b in (2.0, 4.0):
                out.append(
                    {
                        "model": model,
                        "method": "rtn",
                        "budget": b,
                        "avg_bits": b,
                        "storage_bits": b,
                        "dataset": ds,
                        "seqlen": seqlen,
                        "ppl": 10.0 + 30.0 / b,
                    }
                )
    return pd.DataFrame(out).reindex(columns=COLUMNS)


def make_job(root: Path, name: str, overrides: list[str], df: pd.DataFrame | None, config: dict | None = None):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    cfg = {"task_name": "ablation_x", "tags": ["ablation", "x"], "quant": {"name": "mobiquant"}, **(config or {})}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if df is not None:
        write_csv(df, job / "results.csv")
    return job


@pytest.fixture
def sweep(tmp_path):
    """Slices x seeds (2 x 2) plus one job that failed before writing results."""
    root = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    n = 0
    for layout, scale in (("[2,2,2,2]", 1.0), ("[4,2,2]", 1.1)):
        for seed in (0, 1):
            make_job(
                root,
                str(n),
                ["experiment=ablation_slices", f"quant.mobi.slice_bits={layout}", f"seed={seed}"],
                rows(scale=scale * (1 + 0.01 * seed)),
            )
            n += 1
    make_job(root, str(n), ["experiment=ablation_slices", "quant.mobi.slice_bits=[2,2,2]", "seed=0"], None)
    (root / ".submitit" / "123").mkdir(parents=True)  # launcher logs: not jobs
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_collect_labels_jobs_by_their_varying_overrides(sweep):
    rep = collect(sweep)
    assert rep.axes == ["quant.mobi.slice_bits", "seed"]  # experiment= is common to all: not an axis
    assert set(rep.df["job"]) == {"0", "1", "2", "3"}
    assert len(rep.df) == 4 * (1 + 4 + 2)
    first = rep.df[rep.df["job"] == "0"].iloc[0]
    assert first["label"] == "quant.mobi.slice_bits=[2,2,2,2] seed=0"
    assert first[OV + "seed"] == "0" and first[OV + "quant.mobi.slice_bits"] == "[2,2,2,2]"
    assert "experiment=ablation_slices" in first["overrides"]
    assert set(rep.df.loc[rep.df["is_main"], "method"]) == {"mobiquant"}
    jobs = rep.jobs.set_index("job")
    assert jobs.loc["4", "status"] == "no results" and jobs.loc["0", "status"] == "ok"
    # the score is the task's metric: mean ppl of the main method over its budgets
    expected = sum(10.0 + 8.0 / b for b in BUDGETS) / len(BUDGETS)
    assert jobs.loc["0", "mean_ppl.wiki_extract"] == pytest.approx(expected)
    assert rep.tags == ["ablation", "x"]


def test_write_report_outputs(sweep, tmp_path):
    rep = collect(sweep)
    paths = rp.write_report(rep, tmp_path / "out")
    tidy = pd.read_csv(paths["csv"])
    assert len(tidy) == len(rep.df) and {"label", "job", "ppl", "avg_bits", OV + "seed"} <= set(tidy.columns)
    assert ("parquet" in paths) == rp.has_parquet()
    if rp.has_parquet():
        pd.testing.assert_frame_equal(pd.read_parquet(paths["parquet"]), rep.df, check_dtype=False)
    md = paths["markdown"].read_text()
    assert "| quant.mobi.slice_bits=[2,2,2,2] seed=0 | mobiquant |" in md
    assert "`4` (no results)" in md and "Pareto front" in md and "2 bit" in md
    for key in ("elasticity", "elasticity:quant.mobi.slice_bits", "elasticity:seed", "pareto"):
        assert paths[key].stat().st_size > 5000, key
        assert paths[f"{key} (pdf)"].read_bytes()[:5] == b"%PDF-", key  # a vector copy of every figure
    assert "mean +- std over seeds" in md
    assert "| mobiquant | quant.mobi.slice_bits=[4,2,2] |" in md and " +- " in md
    assert pd.read_csv(paths["jobs"])["status"].tolist().count("ok") == 4


def test_curves_average_the_other_axes(sweep):
    rep = collect(sweep)
    c = rp.curves_by(rep.df, "quant.mobi.slice_bits")
    assert set(c["value"]) == {"[2,2,2,2]", "[4,2,2]"} and (c["n_jobs"] == 2).all()
    row = c[(c["value"] == "[4,2,2]") & (c["budget"] == 2.0)].iloc[0]
    assert row["ppl_min"] < row["ppl"] < row["ppl_max"]


def test_pareto_front():
    df = pd.DataFrame({"avg_bits": [2, 2, 3, 4, 4, 8], "ppl": [20, 25, 21, 12, 11, 11.5]})
    front = pareto_front(df)
    assert list(zip(front["avg_bits"], front["ppl"], strict=True)) == [(2, 20), (4, 11)]


def test_empty_and_missing_directories(tmp_path):
    with pytest.raises(ReportError, match="holds no results.csv"):
        collect(tmp_path)
    with pytest.raises(ReportError, match="does not exist"):
        collect(tmp_path / "nope")
    make_job(tmp_path / "s", "0", ["seed=0"], None)
    with pytest.raises(ReportError, match=r"no finished job .* 1 job\(s\) without results.csv \(0\)"):
        collect(tmp_path / "s")


def test_not_a_results_table(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="0/results.csv cannot be read"):
        collect(tmp_path)


def test_mixed_models_without_distinguishing_override(tmp_path):
    # two sweeps over seeds, on different models, copied under one folder
    make_job(tmp_path / "a", "0", ["seed=0"], rows(model="tiny-llama"))
    make_job(tmp_path / "a", "1", ["seed=1"], rows(model="tiny-llama"))
    make_job(tmp_path / "b", "0", ["seed=0"], rows(model="smollm2"))
    make_job(tmp_path / "b", "1", ["seed=1"], rows(model="smollm2"))
    with pytest.raises(ReportError, match=r"different models .*tiny-llama in a/0, a/1.* differ only in seed"):
        collect(tmp_path)
    rep = collect(tmp_path, allow_mixed=True)  # the user says it is fine
    assert rep.df["label"].nunique() == 4  # same overrides: labels made unique by job


def test_mixed_models_explained_by_an_override(tmp_path):
    make_job(tmp_path, "0", ["model=tiny-llama", "seed=0"], rows(model="tiny-llama"))
    make_job(tmp_path, "1", ["model=smollm2-135m", "seed=0"], rows(model="smollm2"))
    rep = collect(tmp_path)
    assert rep.axes == ["model"]
    assert rep.df.groupby(OV + "model")["model"].nunique().max() == 1


def test_mixed_datasets_and_runs_without_overrides(tmp_path):
    make_job(tmp_path, "r1", [], rows(datasets=("wikitext2",)))
    make_job(tmp_path, "r2", [], rows(datasets=("ptb",)))
    with pytest.raises(ReportError, match=r"different evaluation corpora .*\(the jobs have the same overrides\)"):
        collect(tmp_path)


def test_one_job_mixing_models(tmp_path):
    make_job(tmp_path, "0", [], pd.concat([rows(model="a"), rows(model="b")]))
    with pytest.raises(ReportError, match="mixes results of several models"):
        collect(tmp_path)


def test_single_run_directory(tmp_path):
    make_job(tmp_path, "run", ["experiment=smoke"], rows(datasets=("wikitext2", "ptb")))
    rep = collect(tmp_path / "run")
    assert rep.axes == [] and set(rep.df["label"]) == {"run"} and rep.datasets == ["wikitext2", "ptb"]
    paths = rp.write_report(rep)
    assert paths["elasticity"].exists() and paths["csv"].parent == tmp_path / "run" / "report"


def test_main_method_from_config_or_results(tmp_path):
    make_job(tmp_path, "0", [], rows(main="lwc"), config={"quant": {"name": "lwc"}})
    assert set(collect(tmp_path).df.query("is_main")["method"]) == {"lwc"}
    make_job(tmp_path, "1", [], rows(main="gptq"), config={"quant": None})
    df = collect(tmp_path, allow_mixed=True).df
    assert set(df[df["job"] == "1"].query("is_main")["method"]) == {"gptq"}  # first non-baseline method


def test_group_recovered_from_the_hydra_record(tmp_path):
    job = make_job(
        tmp_path / "outputs" / "x" / "multiruns" / "t0",
        "0",
        ["seed=0"],
        rows(),
        config={"logger_group": "${oc.env:WANDB_SWEEP_ID,${hydra:sweep.dir}}"},
    )
    hydra = {
        "hydra": {
            "sweep": {"dir": "outputs/${task_name}/multiruns/${now:%Y}", "subdir": "${hydra.job.num}"},
            "job": {"num": 0},
            "runtime": {"cwd": str(tmp_path), "output_dir": str(job)},
        }
    }
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    assert collect(job.parent).group == "outputs/x/multiruns/t0"  # as ${hydra:sweep.dir} gave it to the job
    make_job(tmp_path / "lit", "0", [], rows(), config={"logger_group": "abc123"})
    assert collect(tmp_path / "lit").group == "abc123"


def test_load_report_from_files_and_dirs(sweep, tmp_path):
    rep = collect(sweep)
    paths = rp.write_report(rep)
    for src in (paths["csv"], paths["csv"].parent, sweep):  # report.csv, report folder, sweep dir
        df = load_report(src)
        assert len(df) == len(rep.df) and df["is_main"].dtype == bool
    assert load_report(tmp_path / "multiruns").shape[0] == len(rep.df)  # a folder of sweeps


def test_cli_with_wandb_offline_summary_run(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "rep"
    assert main([str(sweep), "--out", str(out), "--group", "g1"]) == 0
    text = capsys.readouterr().out
    assert "4/5 job(s)" in text and "wandb sync" in text
    assert (out / "report.csv").exists() and (out / "report.md").exists()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = list(runs[0].glob("files/media/table/report/results_*.table.json"))
    assert media and len(json.loads(media[0].read_text())["data"]) == 4 * 7
    assert list(runs[0].glob("files/media/images/report/pareto_*.png"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobiquant-report: ") and "holds no results.csv" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- seeds and methods
@pytest.fixture
def methods_sweep(tmp_path):
    """`-m quant=mobiquant,rtn seed=0,1`: the main method differs between jobs."""
    root = tmp_path / "methods"
    n = 0
    for quant in ("mobiquant", "rtn"):
        for seed in (0, 1):
            df = rows(main=quant, scale=(1.0 if quant == "mobiquant" else 2.0) * (1 + 0.1 * seed))
            if quant == "rtn":  # its own rows only (rows() adds rtn beside the main method)
                df = df.drop_duplicates(subset=["method", "budget", "dataset"], keep="first")
            make_job(root, str(n), [f"quant={quant}", f"seed={seed}"], df, config={"quant": {"name": quant}})
            n += 1
    return root


def test_curves_never_mix_methods(methods_sweep):
    rep = collect(methods_sweep)
    assert rep.axes == ["quant", "seed"]
    by_seed = rp.curves_by(rep.df, "seed")
    assert set(by_seed["method"]) == {"mobiquant", "rtn"}
    for (method, seed), g in by_seed.groupby(["method", "value"]):  # one job each: its own readings
        job = rep.df[rep.df["is_main"] & (rep.df["method"] == method) & (rep.df[OV + "seed"] == seed)]
        expected = job[job["budget"].notna()].set_index("budget")["ppl"]
        assert (g["n_jobs"] == 1).all()
        for b, ppl in zip(g["budget"], g["ppl"], strict=True):
            assert ppl == pytest.approx(expected[b]), (method, seed, b)
    overall = rp.curves_by(rep.df, None)  # seeds averaged per method
    assert (overall["n_jobs"] == 2).all() and set(overall["method"]) == {"mobiquant", "rtn"}


def test_seed_summary_mean_and_std_per_method_and_budget(methods_sweep):
    rep = collect(methods_sweep)
    s = rp.seed_summary(rp.quantized(rep.df[rep.df["is_main"]]))
    row = s[(s["method"] == "rtn") & (s["budget"] == 2.0)].iloc[0]
    vals = [2.0 * (1 + 0.1 * seed) * (10.0 + 8.0 / 2.0) for seed in (0, 1)]
    assert row["n_seeds"] == 2 and row["config"] == ""  # the method names the line
    assert row["ppl_mean"] == pytest.approx(sum(vals) / 2)
    assert row["ppl_std"] == pytest.approx(pd.Series(vals).std())
    md = rp.markdown(rep)
    assert "| rtn |  |" in md and "(n=2)" in md


def test_figures_have_plain_tick_labels(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mobiquant.io.results import plot_elasticity, readable_log_axis

    for lo, hi in ((261.1, 264.8), (12.0, 3000.0)):
        fig, ax = plt.subplots()
        ax.plot([2, 3, 4], [hi, (lo + hi) / 2, lo])
        ax.axhline(lo * 0.99, ls="--")
        readable_log_axis(ax)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        labels += [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]
        plt.close(fig)
        assert len(labels) >= 2, labels
        for text in labels:  # plain numbers: no mathtext powers such as 2.635x10^2
            float(text)
    df = rows()
    png = plot_elasticity(df, tmp_path / "elasticity.png", title="t")
    assert png.stat().st_size > 5000 and (tmp_path / "elasticity.pdf").read_bytes()[:5] == b"%PDF-"
