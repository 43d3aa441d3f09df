"""``task=lm_eval``: lm-evaluation-harness on the quantized tiny model (experiment=lm_eval_smoke), a saved
checkpoint at several budgets, resume, bad inputs rejected before work, and the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

pytest.importorskip("lm_eval")

from mobiquant.__main__ import CONF_DIR, resolve_task  # noqa: E402
from mobiquant.tasks import lm_eval as harness  # noqa: E402
from mobiquant.tasks import session  # noqa: E402
from mobiquant.tasks.session import ConfigError  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"
REPO = Path(CONF_DIR).parent

if not WIKI.is_file():
    pytest.skip(f"{WIKI} is not beside the repository", allow_module_level=True)


def lm_eval_cfg(out: Path, *overrides: str, experiment: str = "lm_eval_smoke", cache: Path | None = None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"experiment={experiment}", "torch_threads=1", *overrides], return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(out)
        if cache is not None:
            cfg.paths.cache_dir = str(cache)
        cfg.paths.shared_data_dir = str(SHARED)
    return cfg


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One ``experiment=lm_eval_smoke`` run (FP, RTN and MoBiQuant at 2 and 8 bits) with W&B offline."""
    tmp = tmp_path_factory.mktemp("lm_eval_smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(tmp / "wandb_dir"))
        (tmp / "wandb_dir").mkdir()
        cfg = lm_eval_cfg(tmp / "run", "logger=wandb", cache=tmp / "cache")
        assert cfg.task == "lm_eval"
        value = resolve_task(cfg.task)(cfg)
    return tmp / "run", value


def _rows(df, method, budget, metric):
    b = df["budget"].astype(float)
    sel = df[
        (df["method"] == method)
        & (b.isna() if budget is None else (b - budget).abs() < 1e-9)
        & (df["metric"] == metric)
    ]
    assert len(sel) == 1, (method, budget, metric, len(sel))
    return sel.iloc[0]


def test_smoke_evaluates_every_method_and_budget(smoke):
    out, value = smoke
    df = pd.read_csv(out / harness.CSV_NAME)
    assert list(df.columns) == harness.COLUMNS
    passes = {(m, "FP" if pd.isna(b) else float(b)) for m, b in zip(df["method"], df["budget"], strict=True)}
    assert passes == {("fp", "FP"), ("rtn", 3.0), ("rtn", 8.0), ("mobiquant", 3.0), ("mobiquant", 8.0)}
    assert set(df["task"]) == {"wikitext2_lastword"} and set(df["metric"]) == {"acc", "perplexity"}
    assert len(df) == 2 * len(passes)
    assert (df["n_examples"] == 8).all() and (df["limit"] == 8).all()
    assert df["value"].map(math.isfinite).all() and df["stderr"].map(math.isfinite).all()
    assert df["acc" == df["metric"]]["value"].between(0, 1).all()
    # average bits are measured on the tokens lm-eval sent through the routed model
    for b in (3.0, 8.0):
        assert abs(_rows(df, "mobiquant", b, "acc")["avg_bits"] - b) < 0.5
    assert _rows(df, "fp", None, "acc")["avg_bits"] == 32
    # the quantized model is what was evaluated: its likelihoods move with the budget and differ from FP
    ppl = {b: _rows(df, "mobiquant", b, "perplexity")["value"] for b in (3.0, 8.0)}
    fp = _rows(df, "fp", None, "perplexity")["value"]
    assert ppl[3.0] != ppl[8.0] and ppl[3.0] != fp
    assert abs(math.log(ppl[8.0]) - math.log(fp)) < abs(math.log(ppl[3.0]) - math.log(fp))
    # the returned value: mean accuracy of `quant` over its budgets
    assert value == pytest.approx(df[(df["method"] == "mobiquant") & (df["metric"] == "acc")]["value"].mean())
    md = (out / harness.MD_NAME).read_text()
    assert md.startswith("| method | budget | avg bits |") and "wikitext2_lastword acc" in md
    assert (out / "checkpoints" / "mobiquant" / "mobiquant.json").is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].glob("files/media/table/lm_eval_*.table.json"))
    assert tables, "lm_eval table not logged to W&B"
    assert len(json.loads(tables[0].read_text())["data"]) == len(df)


def test_checkpoint_at_several_budgets_matches_the_in_memory_model(smoke, tmp_path):
    out, _ = smoke
    ckpt = out / "checkpoints" / "mobiquant"
    cfg = lm_eval_cfg(
        tmp_path / "run",
        "logger=none",
        "baselines=none",
        f"lm_eval.checkpoint={ckpt}",
        "lm_eval.budgets=[3,4,8]",
        cache=tmp_path / "cache",
    )
    harness.run(cfg)
    df = pd.read_csv(tmp_path / "run" / harness.CSV_NAME)
    assert set(df["method"]) == {"mobiquant"} and sorted(set(df["budget"])) == [3.0, 4.0, 8.0]
    assert set(df["checkpoint"]) == {str(ckpt)}
    first = pd.read_csv(out / harness.CSV_NAME)
    for b in (3.0, 8.0):  # the reloaded checkpoint scores exactly as the model that was saved
        assert _rows(df, "mobiquant", b, "perplexity")["value"] == pytest.approx(
            _rows(first, "mobiquant", b, "perplexity")["value"], rel=1e-6
        )
    bits = [_rows(df, "mobiquant", b, "acc")["avg_bits"] for b in (3.0, 4.0, 8.0)]
    assert bits[0] < bits[1] < bits[2] and abs(bits[1] - 4.0) < 0.5


def test_a_transformers_folder_is_evaluated_like_its_checkpoint(smoke, tmp_path):
    """lm_eval.checkpoint may be the transformers folder `python -m mobiquant.hf export` writes: loaded whole
    (no base model patched), it scores as the checkpoint it was exported from."""
    import mobiquant as mq

    out, _ = smoke
    folder = mq.export_hf(out / "checkpoints" / "mobiquant", tmp_path / "hf")
    cfg = lm_eval_cfg(
        tmp_path / "run", "logger=none", "baselines=none", f"lm_eval.checkpoint={folder}", "lm_eval.budgets=[3,8]"
    )
    harness.run(cfg)
    df = pd.read_csv(tmp_path / "run" / harness.CSV_NAME)
    assert set(df["checkpoint"]) == {str(folder)}
    first = pd.read_csv(out / harness.CSV_NAME)
    for b in (3.0, 8.0):
        assert _rows(df, "hf", b, "perplexity")["value"] == pytest.approx(
            _rows(first, "mobiquant", b, "perplexity")["value"], rel=1e-6
        )
    with pytest.raises(ConfigError, match=r"outside what checkpoint .* serves"):
        harness.run(lm_eval_cfg(tmp_path / "bad", "logger=none", f"lm_eval.checkpoint={folder}", "lm_eval.budgets=[1]"))


def test_rerun_in_the_same_folder_skips_finished_passes(smoke, monkeypatch):
    out, _ = smoke
    before = pd.read_csv(out / harness.CSV_NAME)

    def no_eval(*a, **k):
        raise AssertionError("a finished pass was evaluated again")

    monkeypatch.setattr(harness, "evaluate_variant", no_eval)
    harness.run(lm_eval_cfg(out, "logger=none", cache=out.parent / "cache"))
    pd.testing.assert_frame_equal(before, pd.read_csv(out / harness.CSV_NAME))


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("lm_eval.tasks=[no_such_task_xyz]", "unknown to lm-eval"),
        ("lm_eval.tasks=[]", "non-empty list"),
        ("lm_eval.data.wikitext2_path=/nonexistent/wiki.test.raw", "does not exist"),
        ("lm_eval.budgets=[2,9]", "lm_eval.budgets[1]=9 is outside"),
        ("lm_eval.budgets=[1.5]", "not achievable by quant=mobiquant"),
        ("lm_eval.limit=0", "lm_eval.limit=0"),
        ("lm_eval.limit=1.5", "fraction in (0, 1]"),
        ("lm_eval.checkpoint=/nonexistent/ckpt", "does not exist"),
    ],
)
def test_bad_inputs_fail_before_any_work(override, fragment, tmp_path, monkeypatch):
    def no_model(cfg):
        raise AssertionError("the model was loaded before the configuration was checked")

    monkeypatch.setattr(session, "load_base_model", no_model)
    with pytest.raises(ConfigError) as e:
        harness.run(lm_eval_cfg(tmp_path / "run", override, "logger=none"))
    assert fragment in str(e.value)
    assert not (tmp_path / "run").exists()


def test_checkpoint_budget_outside_its_slices(smoke, tmp_path, monkeypatch):
    out, _ = smoke
    monkeypatch.setattr(session, "load_base_model", lambda cfg: pytest.fail("model loaded"))
    cfg = lm_eval_cfg(
        tmp_path / "run", "logger=none", f"lm_eval.checkpoint={out}/checkpoints/mobiquant", "lm_eval.budgets=[1]"
    )
    fragment = r"outside what checkpoint .* serves \(slices \[3, 1, 1, 1, 1, 1\]\): allowed 3 <= bits <= 8"
    with pytest.raises(ConfigError, match=fragment):
        harness.run(cfg)


def test_cli_names_the_bad_value(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MOBIQUANT_SHARED_DATA": str(SHARED)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mobiquant",
            "experiment=lm_eval_smoke",
            "lm_eval.budgets=[9]",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mobiquant: invalid configuration: lm_eval.budgets[0]=9 is outside the achievable range" in proc.stderr


def test_results_are_split_by_requested_task_group_and_tag():
    results = {
        "results": {
            "grp": {"acc,none": 0.5, "acc_stderr,none": 0.1},
            "grp_a": {"alias": "a", "acc,none": 0.4, "acc_stderr,none": 0.05},
            "t1": {"acc,none": 0.2, "acc_stderr,none": "N/A", "exact_match,strict-match": 0.3},
            "arc_x": {"acc,none": 0.7, "acc_stderr,none": 0.01},  # from a tag that leaves no trace
        },
        "group_subtasks": {"grp": ["grp_a"]},
        "n-samples": {"grp_a": {"original": 10, "effective": 5}, "t1": {"original": 3, "effective": 3}},
    }
    rows = harness.split_by_request(results, ["grp", "t1", "some_tag"])
    by = {(r["task"], r["metric"]): r for r in rows}
    assert by[("grp", "acc")]["request"] == "grp" and by[("grp_a", "acc")]["request"] == "grp"
    assert by[("grp_a", "acc")]["n_examples"] == 5 and by[("grp_a", "acc")]["stderr"] == 0.05
    assert math.isnan(by[("t1", "acc")]["stderr"])
    assert by[("t1", "exact_match,strict-match")]["value"] == 0.3
    assert by[("arc_x", "acc")]["request"] == "some_tag"
    assert len(rows) == 5


@pytest.mark.slow
def test_smollm2_lm_eval_fp_against_rtn(tmp_path):
    """The real SmolLM2-135M through task=lm_eval: FP beats RTN 2-bit by far, RTN 8-bit stays near FP."""
    from mobiquant.io.models import ModelNotAvailableError, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModelNotAvailableError as err:
        pytest.skip(str(err))
    cfg = lm_eval_cfg(
        tmp_path / "run",
        "logger=none",
        "quant=rtn",
        "baselines=fp",
        "lm_eval.budgets=[2,8]",
        "lm_eval.limit=16",
        "lm_eval.bootstrap_iters=0",
        experiment="lm_eval_demo",
    )
    harness.run(cfg)
    df = pd.read_csv(tmp_path / "run" / harness.CSV_NAME)
    assert len(df) == 6 and (df["n_examples"] == 16).all() and df["value"].map(math.isfinite).all()
    fp, rtn2, rtn8 = (_rows(df, m, b, "perplexity")["value"] for m, b in (("fp", None), ("rtn", 2.0), ("rtn", 8.0)))
    assert rtn2 > 100 * fp  # 2-bit RTN destroys SmolLM2 (WikiText-2 ppl 3.9e6, REFERENCE_NUMBERS.md)
    assert abs(rtn8 / fp - 1) < 0.05
    assert _rows(df, "fp", None, "acc")["value"] > _rows(df, "rtn", 2.0, "acc")["value"]
