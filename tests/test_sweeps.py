"""Sweeps: ablation presets, the Optuna preset, launchers (a real submitit_local multirun with a failing
job; the SLURM job rendered without a cluster), W&B sweep definitions and the executed notebook."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from mobiquant.__main__ import CONF_DIR
from mobiquant.tasks.session import validate

REPO = Path(CONF_DIR).parent
SWEEPS = REPO / "sweeps"
NOTEBOOK = REPO / "notebooks" / "elasticity.ipynb"
# The ablation presets at smoke size: tiny random LLaMA, a few short windows, one epoch per stage.
TINY = [
    "model=tiny-llama",
    "debug=fast",
    "group_size=32",
    "router.hidden=8",
    "calib.progress_bar=false",
    "torch_threads=1",
]
PRESETS = {  # preset -> number of jobs its `-m` sweep expands to
    "ablation_slices": 4,
    "ablation_router": 20,
    "ablation_budget_loss": 5,
    "ablation_calib_samples": 4,
    "ablation_group_size": 2,
    "ablation_seeds": 3,
    "ablation_router_policy": 2,
    "ablation_grid_anchor": 4,
    "ablation_stage2": 10,
    "ablation_view_steps": 8,
}


def _compose(overrides, tmp_path=None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _task_cfg(cfg, tmp_path):
    """The job's config as the task sees it (no hydra node; outputs in tmp)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def _expand(params: dict, extra=()) -> list[list[str]]:
    """The job list Hydra's basic sweeper makes from `hydra.sweeper.params` plus command-line sweeps."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(extra))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def test_presets_are_all_listed():
    found = {p.stem for p in Path(CONF_DIR, "experiment").glob("ablation_*.yaml")}
    assert found == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_ablation_preset_sweeps_its_axis(preset, tmp_path):
    cfg = _compose([f"experiment={preset}"])
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    jobs = _expand(params)
    assert len(jobs) == PRESETS[preset]
    task = _task_cfg(cfg, tmp_path)
    assert task.task_name == preset and "ablation" in task.tags
    assert task.logger_group == cfg.hydra.sweep.dir  # one W&B group per sweep
    assert cfg.logger.wandb.group == task.logger_group  # what the W&B logger receives
    for job in jobs:  # every job of the sweep is a valid configuration (nothing is loaded)
        methods, grid = validate(_task_cfg(_compose([f"experiment={preset}", *job]), tmp_path))
        assert methods[0].budgets(grid), job


def test_view_steps_preset_reads_the_codes_eight_ways(tmp_path):
    from mobiquant.calibration import CalibConfig

    cfg = _compose(["experiment=ablation_view_steps"])
    seen = []
    for job in _expand(OmegaConf.to_container(cfg.hydra.sweeper.params)):
        task = _task_cfg(_compose(["experiment=ablation_view_steps", *job]), tmp_path)
        methods, _ = validate(task)
        c, own = task.calib, methods[0].calib_overrides
        views = own["view_tune_views"]
        views = None if views is None else list(views)
        epochs = own["view_tune_epochs"]
        epochs = epochs if isinstance(epochs, int) else list(epochs)
        seen.append((methods[0].mobi.view_steps, c.view_fit, c.view_select_windows, epochs, views))
        CalibConfig(**own)  # the method's calibration settings build (per-view epochs checked there)
    assert seen == [
        (False, "block", 0, 0, None),
        (True, "diag", 0, 0, None),
        (True, "block", 0, 0, None),
        (True, "block", 4, 0, None),
        (True, "block", 4, 1, [1]),
        (True, "block", 4, 1, [1, 3, 4]),
        (True, "block", 4, [1, 2, 2], [1, 3, 4]),
        (True, "block", 4, 1, None),
    ]
    shipped = validate(_task_cfg(_compose(["quant=mobiquant"]), tmp_path))[0][0]
    own = shipped.calib_overrides
    assert own["view_tune_epochs"] == 1 and list(own["view_tune_views"]) == [1, 3, 4]


def test_stage2_preset_changes_one_calibration_lever_per_job(tmp_path):
    from mobiquant.methods.core import MoBiQuant

    cfg = _compose(["experiment=ablation_stage2"])
    jobs = _expand(OmegaConf.to_container(cfg.hydra.sweeper.params))
    changed, overrides = [], []
    for job in jobs:
        methods, _ = validate(_task_cfg(_compose(["experiment=ablation_stage2", *job]), tmp_path))
        method = methods[0]
        assert isinstance(method, MoBiQuant) and method.mobi.slice_bits == (3, 1, 1, 1, 1, 1)
        changed.append(sorted(method.calib_overrides))
        overrides.append(dict(method.calib_overrides))
    tune = ["view_tune_epochs", "view_tune_views"]
    cyc = ["budget_sampling", "budgets", "propagate_budget", *tune]
    levers = [
        cyc,
        [*cyc, "lr_lwc"],
        [*cyc, "lr_lwc"],
        [*cyc, "lr_lwc_stage2"],
        ["budget_sampling", "propagate_budget", *tune],
        cyc,
        cyc,
        [*cyc, "epochs_stage1", "epochs_stage2"],
        cyc,
        cyc,
    ]
    assert changed == [sorted(x) for x in levers]
    assert [o["propagate_budget"] for o in overrides] == ["matched"] * 5 + [3.0, None] + ["matched"] * 3
    shipped = validate(_task_cfg(_compose(["quant=mobiquant"]), tmp_path))[0][0]
    assert dict(shipped.calib_overrides) == overrides[0]  # the 'default' lever is quant=mobiquant as shipped
    paper = validate(_task_cfg(_compose(["quant=mobiquant_paper"]), tmp_path))[0][0]
    assert paper.calib_overrides["propagate_budget"] is None  # the paper's preset: one stream at the middle
    assert list(overrides[-2]["budgets"]).count(3) == 2  # w3: 3 bits twice per cycle
    assert list(overrides[-1]["budgets"]).count(6) == 2  # w6: 6 bits twice per cycle


def test_slices_preset_layouts(tmp_path):
    cfg = _compose(["experiment=ablation_slices"])
    jobs = _expand(OmegaConf.to_container(cfg.hydra.sweeper.params))
    got = [tuple(_compose(["experiment=ablation_slices", *j]).quant.mobi.slice_bits) for j in jobs]
    assert got == [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1), (4, 2, 2), (2, 2, 2)]
    # command-line sweeps replace the preset's values for the same key and add new axes
    assert (
        len(
            _expand(
                OmegaConf.to_container(cfg.hydra.sweeper.params),
                ["quant.mobi.slice_bits=[2,2,2,2],[4,2,2]", "seed=0,1,2"],
            )
        )
        == 6
    )


def test_wandb_sweep_id_names_the_group(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    assert _task_cfg(_compose(["experiment=ablation_seeds"]), tmp_path).logger_group == "abc123"


def test_optuna_preset(tmp_path):
    cfg = _compose(["hparams_search=elasticity_optuna", "experiment=ablation_seeds"])
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("OptunaSweeper") and sw.direction == "minimize"
    assert sw.sampler._target_ == "optuna.samplers.TPESampler" and sw.n_trials > 1
    assert {"router", "router.hidden", "router.budget_loss_weight"} <= set(sw.params)
    task = _task_cfg(cfg, tmp_path)
    assert task.baselines == {} and "optuna" in task.tags
    # every search-space parameter is an override the task accepts
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    for ov in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sw.params.items() if k != "seed"]):
        create_optuna_distribution_from_override(ov)
        one = ov.sweep_iterator().__next__() if ov.is_discrete_sweep() else ov.value().start
        validate(_task_cfg(_compose(["hparams_search=elasticity_optuna", f"{ov.key_or_group}={one}"]), tmp_path))


@pytest.mark.parametrize(
    "launcher,target", [("local", "LocalLauncher"), ("slurm", "SlurmLauncher"), ("joblib", "JoblibLauncher")]
)
def test_launcher_presets_compose(launcher, target):
    cfg = _compose([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)


# ---------------------------------------------------------------------------- SLURM without a cluster
def _fake_bin(tmp_path: Path, captured: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "sbatch": f'#!/bin/sh\nfor a; do f="$a"; done\ncp "$f" "{captured}"\necho "Submitted batch job 4242"\n',
        "srun": "#!/bin/sh\nexit 0\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_slurm_launcher_renders_submitit_job(tmp_path, monkeypatch):
    """`hydra/launcher=slurm` through the plugin's own launch(): the sbatch script submitit writes."""
    import submitit
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import setup_globals
    from hydra.types import HydraContext
    from hydra.utils import instantiate

    captured = tmp_path / "captured.sbatch"
    monkeypatch.setenv("PATH", f"{_fake_bin(tmp_path, captured)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.core.core.Job, "results", lambda self: ["not run"])
    setup_globals()
    sweep = tmp_path / "sweep"
    cfg = _compose(
        [
            "experiment=ablation_slices",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=a100",
            "hydra.launcher.array_parallelism=2",
            "hydra.launcher.timeout_min=90",
            f"hydra.sweep.dir={sweep}",
        ]
    )  # job name: conf/hydra/default.yaml
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(
        hydra_context=HydraContext(config_loader=None, callbacks=Callbacks()), task_function=lambda c: 0.0, config=cfg
    )
    jobs = _expand(OmegaConf.to_container(cfg.hydra.sweeper.params))
    assert launcher.launch(jobs, initial_job_idx=0) == ["not run"] * 4
    text = captured.read_text()
    for line in (
        "#SBATCH --partition=a100",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --time=90",
        "#SBATCH --array=0-3%2",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --nodes=1",
        "#SBATCH --job-name=mobiquant",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in text, f"{line} missing from:\n{text}"
    assert f"#SBATCH --output={sweep}/.submitit/%A_%a/%A_%a_0_log.out" in text
    assert "-m submitit.core._submit" in text and sys.executable in text
    # the pickled array task carries each job's overrides
    import cloudpickle

    pkls = sorted((sweep / ".submitit").rglob("*_submitted.pkl"))
    assert len(pkls) == 4
    args = [cloudpickle.loads(p.read_bytes()).args for p in pkls]
    assert sorted(a[0][0] for a in args) == sorted(j[0] for j in jobs)


# ---------------------------------------------------------------------------- a real local multirun
@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """Three jobs through submitit_local: job 0 has an invalid value (0 calibration samples), jobs 1-2
    are smoke-sized runs of the calibration-samples ablation."""
    tmp = tmp_path_factory.mktemp("local_sweep")
    sweep = tmp / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    cmd = [
        sys.executable,
        "-m",
        "mobiquant",
        "-m",
        "experiment=ablation_calib_samples",
        "data.calib.nsamples=0,2,4",
        *TINY,
        "logger=csv",
        "hydra/launcher=local",
        f"paths.cache_dir={tmp / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    return sweep, proc


def test_local_multirun_keeps_the_results_of_good_jobs(local_sweep):
    sweep, proc = local_sweep
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # the sweep reports its failure ...
    assert "data.calib.nsamples=0 is invalid" in out and "Error executing job with overrides" in out
    assert not (sweep / "0" / "results.csv").exists()
    for job, n in (("1", 2), ("2", 4)):  # ... after every other job ran to the end
        df = pd.read_csv(sweep / job / "results.csv")
        assert set(df["method"]) == {"mobiquant", "fp"}, job
        # the default slices [3, 1, 1, 1, 1, 1] serve 3-8 bits
        assert sorted(df.loc[df["method"] == "mobiquant", "budget"]) == [4.0, 8.0]
        assert yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())[0] == f"data.calib.nsamples={n}"
        assert (sweep / job / "elasticity.png").exists()
    logs = list((sweep / ".submitit").rglob("*_log.err"))
    assert len(logs) == 3


def test_local_multirun_jobs_share_one_group(local_sweep):
    sweep, _ = local_sweep
    groups = set()
    for job in ("1", "2"):
        hp = yaml.safe_load(next((sweep / job / "csv").rglob("hparams.yaml")).read_text())
        groups.add(hp["logger_group"])
        assert hp["tags"] == ["ablation", "calib_samples"]
    assert groups == {str(sweep)}


def test_report_and_notebook_on_the_local_multirun(local_sweep, tmp_path):
    from mobiquant.report import collect, main

    sweep, _ = local_sweep
    rep = collect(sweep)
    assert rep.axes == ["data.calib.nsamples"] and rep.group == str(sweep)
    assert list(rep.jobs["status"]) == ["no results", "ok", "ok"]
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--wandb", "disabled"]) == 0
    assert (out / "report.csv").exists() and (out / "elasticity_data.calib.nsamples.png").exists()

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["MOBIQUANT_REPORT"] = str(out)
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        del os.environ["MOBIQUANT_REPORT"]
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "2 job(s)" in text and "data.calib.nsamples" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # elasticity curves and the Pareto front


def test_notebook_is_committed_with_its_outputs():
    """`make notebook` executed it on `make run`'s results: every code cell ran, none failed, figures included."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code) and all(c.outputs for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) >= 3
    assert "outputs/demo/runs/" in "".join(o.get("text", "") for o in code[0].outputs)  # make run's results


# ---------------------------------------------------------------------------- W&B sweep definitions
def _agent_argv(spec: dict) -> list[str]:
    """The command `wandb agent` runs for the first configuration of a sweep (its own helpers)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    first = {}
    for k, p in spec["parameters"].items():
        first[k] = {"value": p["values"][0] if "values" in p else p["min"]}
    sweep_vars = create_sweep_command_args({"args": first})
    sweep_vars.update(env=["/usr/bin/env"], interpreter=[sys.executable])
    argv = []
    for c in create_sweep_command(list(spec["command"])):
        argv += sweep_vars.get(c[2:-1], []) if c.startswith("${") and c.endswith("}") else [c]
    return argv


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_wandb_sweep_definition(path, monkeypatch, tmp_path):
    from mobiquant.io.tracking import OBJECTIVE

    spec = yaml.safe_load(path.read_text())
    assert spec["method"] in ("grid", "random", "bayes") and spec["parameters"]
    assert spec["metric"] == {"name": OBJECTIVE, "goal": "minimize"}  # the runs' summary key
    cmd = spec["command"]
    assert cmd[:4] == ["${env}", "${interpreter}", "-m", "mobiquant"] and cmd[-1] == "${args_no_hyphens}"
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp1")
    monkeypatch.setenv("WANDB_RUN_ID", "run1")
    argv = _agent_argv(spec)
    assert argv[:4] == ["/usr/bin/env", sys.executable, "-m", "mobiquant"]
    overrides = argv[4:]
    assert any(o.startswith(tuple(spec["parameters"])) for o in overrides)
    cfg = _compose(overrides)  # Hydra parses and composes the run
    assert cfg.hydra.run.dir == "outputs/wandb_sweeps/swp1/run1"
    task = _task_cfg(cfg, tmp_path)
    assert task.logger_group == "swp1" and task.logger.wandb.mode == "online"
    validate(task)


@pytest.mark.slow
def test_optuna_search_minimises_the_returned_metric(tmp_path):
    """Two real trials at smoke size (in-process basic launcher): the study's best value is the lowest
    mean ppl over the budget grid among the trials' results.csv."""
    from mobiquant.report import collect

    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    tiny = [o for o in TINY if not o.startswith("router.hidden")]  # a command-line value would fix it
    cmd = [
        sys.executable,
        "-m",
        "mobiquant",
        "-m",
        "hparams_search=elasticity_optuna",
        *tiny,
        "logger=none",
        "hydra.sweeper.n_trials=2",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) >= {"router", "router.hidden"}
    rep = collect(sweep)
    scores = rep.jobs["mean_log_ppl.wiki_extract"]  # the task's return value, the run's `objective`
    assert len(scores) == 2 and best["best_value"] == pytest.approx(scores.min())
