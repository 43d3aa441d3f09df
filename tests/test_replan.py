"""benchmarks/replan.py: a saved checkpoint's plan re-read (bit-identical to the run's evaluation), re-planned with
other settings, and an interrupted re-plan resumed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import replan  # noqa: E402


@pytest.mark.parametrize(
    "text, want",
    [
        ("saved", ("saved", {})),
        ("r8:refit_windows=8", ("r8", {"refit_windows": 8})),
        (
            "a:step=0.125,select_at=all,refit_windows=none",
            ("a", {"step": 0.125, "select_at": "all", "refit_windows": None}),
        ),
        ("b:refit_thresholds=false", ("b", {"refit_thresholds": False})),
    ],
)
def test_variants_parse(text, want):
    assert replan.parse_variant(text) == want


@pytest.mark.parametrize("text", [":step=1", "x:steps=1", "x:step", "saved:step=0.5"])
def test_bad_variants_are_refused(text):
    with pytest.raises(ValueError):
        replan.parse_variant(text)


def test_a_folder_without_a_run_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="run folder"):
        replan.main([str(tmp_path)])


@pytest.mark.slow  # one tiny run of the app in a child process, then three plans and their evaluations
def test_replan_reads_the_saved_plan_as_the_run_did_and_resumes(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "mobiquant", "experiment=smoke", "quant=mobiquant", "baselines=none"]
    cmd += ["torch_threads=1", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = pd.read_csv(run / "results.csv")
    ours = results[results.method == "mobiquant"]
    budgets = sorted(ours.budget.unique())[:2]

    out = tmp_path / "replan.csv"
    argv = [str(run), "--budgets", *map(str, budgets), "--out", str(out), "--variant", "saved"]
    argv += ["--variant", "one:refit_windows=1,step=0.5", "--variant", "held:windows=held_out"]
    assert replan.main(argv) == 0
    rows = pd.read_csv(out)
    assert len(rows) == 3 * len(budgets) * ours.dataset.nunique()
    for r in rows[rows.variant == "saved"].itertuples():
        ref = ours[(ours.budget == r.budget) & (ours.dataset == r.text)]
        assert r.ppl == pytest.approx(float(ref.ppl.iloc[0]), rel=1e-9)  # what the run evaluated, re-read
        assert r.bits == pytest.approx(float(ref.avg_bits.iloc[0]), rel=1e-9)
    one = rows[rows.variant == "one"]
    assert all("refit_windows=1" in s and "step=0.5" in s for s in one.settings)
    assert (one.plan_s > 0).all()
    assert all("windows=held_out" in s for s in rows[rows.variant == "held"].settings)

    before = out.read_bytes()
    assert replan.main(argv) == 0  # every row there: nothing recomputed, nothing rewritten
    assert out.read_bytes() == before
