"""``experiment=compare`` in smoke form: FP, every baseline and MoBiQuant in one run, on a tiny model."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mobiquant.io.results import method_summary
from mobiquant.tasks.quantize import run
from test_pipeline import SHARED, smoke_cfg  # tests/ is on sys.path (pytest's default import mode)

# The compare preset's method list, on the tiny random LLaMA with smoke-sized data.
TINY = [
    "experiment=compare",
    "model=tiny-llama",
    "logger=none",
    "group_size=32",
    "router.hidden=8",
    "data.calib.nsamples=4",
    "data.calib.seqlen=64",
    "eval.seqlen=64",
    "eval.max_windows=2",
    "calib.progress_bar=false",
    "budget.budgets=[2,3,3.5,4,6]",
    "torch_threads=1",
]


@pytest.mark.slow
def test_compare_smoke_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    pytest.importorskip("hqq")
    if not SHARED.exists():
        pytest.skip("../shared/data is not beside the repository (experiment=compare evaluates WikiText-2 from it)")
    run(smoke_cfg(tmp_path, *TINY))
    out = tmp_path / "run"
    df = pd.read_csv(out / "results.csv")
    wanted = {
        "fp",
        "rtn",
        "matryoshka",
        "mobiquant_static",
        "mixed_layer",
        "mobiquant_sites",
        "hqq",
        "gptq",
        "lwc",
        "mobiquant",
        "mobiquant_a4",
    }
    assert wanted <= set(df["method"]), wanted - set(df["method"])
    assert df["ppl"].map(math.isfinite).all()
    for name in ("elasticity.png", "results.md", "calibration.csv"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "**" in md and "cost of covering the grid" in md  # best per budget marked, cost table present
    # Fractional budgets: MoBiQuant and the mixed-precision baseline serve 3.5; bit-specific methods do not.
    at_35 = set(df.loc[df["budget"] == 3.5, "method"])
    assert {"mobiquant", "mobiquant_a4", "mixed_layer", "mobiquant_sites"} <= at_35
    assert not at_35 & {"rtn", "lwc", "gptq"}
    summary = method_summary(df[df["dataset"] == df["dataset"].iloc[0]]).set_index("method")
    # One calibration covers MoBiQuant's grid; lwc needs one per integer bit-width it serves.
    assert summary.loc["mobiquant", "n_calibrations"] == 1
    lwc_budgets = sorted(df.loc[df["method"] == "lwc", "budget"].unique())
    assert summary.loc["lwc", "n_calibrations"] == len(lwc_budgets) >= 3
    # Storage: one elastic checkpoint holds every precision in less than the bit-specific models together.
    assert summary.loc["mobiquant", "stored_bytes_all_precisions"] < summary.loc["rtn", "stored_bytes_all_precisions"]
