"""Lightning from config: the `trainer` group builds every block's Trainer, the `callbacks` group its callbacks;
the per-block settings calibration owns are refused with one line naming the key."""

from __future__ import annotations

import lightning as L
import pandas as pd
import pytest
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.profilers import SimpleProfiler

import mobiquant as mq
from mobiquant.__main__ import CONF_DIR
from mobiquant.calibration import OWNED_TRAINER_ARGS, CalibConfig, block_trainer
from mobiquant.configcheck import preflight
from mobiquant.tasks.quantize import run
from mobiquant.tasks.session import build_callbacks, trainer_args
from test_pipeline import smoke_cfg
from tiny_models import build_tiny_llama, token_batches


class Seen(L.Callback):
    """Records, per block, the Trainer settings it was built with."""

    made: list[Seen] = []

    def __init__(self):
        self.fits: list[dict] = []
        Seen.made.append(self)

    def on_fit_start(self, trainer, pl_module):
        self.fits.append(
            {
                "max_epochs": trainer.max_epochs,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "profiler": type(trainer.profiler).__name__,
                "limit_train_batches": trainer.limit_train_batches,
            }
        )


def test_block_trainer_takes_any_trainer_argument():
    cb = Seen()
    args = {"_target_": "lightning.Trainer", "num_nodes": 2, "profiler": "simple", "accumulate_grad_batches": 2}
    trainer = block_trainer(CalibConfig(progress_bar=False), 3, False, [cb], args)
    assert trainer.num_nodes == 2 and trainer.accumulate_grad_batches == 2
    assert isinstance(trainer.profiler, SimpleProfiler)
    assert trainer.max_epochs == 3 and cb in trainer.callbacks  # calibration's own settings
    assert trainer.logger is None and not trainer.checkpoint_callback
    defaults = block_trainer(CalibConfig(progress_bar=False), 1, False, [], {"num_sanity_val_steps": 2})
    assert defaults.num_nodes == 1 and defaults.num_sanity_val_steps == 2  # calibration's defaults give way


@pytest.mark.parametrize("key", sorted(OWNED_TRAINER_ARGS))
def test_owned_arguments_are_refused(key):
    with pytest.raises(ValueError, match=rf"^trainer\.{key} is set by calibration for every block: ") as e:
        block_trainer(CalibConfig(), 1, False, [], {key: 1})
    assert "\n" not in str(e.value)


def test_arguments_calib_carries_must_agree():
    with pytest.raises(ValueError, match=r"trainer.accelerator='gpu' conflicts with calib.accelerator='cpu'"):
        block_trainer(CalibConfig(), 1, False, [], {"accelerator": "gpu"})
    with pytest.raises(ValueError, match="not lightning.Trainer or a subclass"):
        block_trainer(CalibConfig(), 1, False, [], {"_target_": "builtins.dict"})
    trainer = block_trainer(CalibConfig(progress_bar=False), 1, False, [], {"accelerator": "cpu", "devices": 1})
    assert trainer.max_epochs == 1


def test_calibrate_gives_every_block_fresh_callbacks_and_the_trainer_arguments():
    Seen.made.clear()
    model = build_tiny_llama(0)
    ids = token_batches(1, batch=4, seqlen=16, seed=0)[0]
    trainer = {"accumulate_grad_batches": 2, "profiler": "simple", "limit_train_batches": 1.0}
    mq.calibrate(
        model,
        ids,
        mq.MoBiConfig(group_size=32, router_hidden=8),
        callbacks=lambda: [Seen()],
        trainer=trainer,
        epochs_stage1=1,
        epochs_stage2=1,
        batch_size=2,
        progress_bar=False,
        threshold_windows=1,
        threshold_step=2.0,
    )
    assert len(Seen.made) == 2  # one per block
    expected = {"max_epochs": 2, "accumulate_grad_batches": 2, "profiler": "SimpleProfiler", "limit_train_batches": 1.0}
    assert [cb.fits for cb in Seen.made] == [[expected], [expected]]
    with pytest.raises(ValueError, match=r"trainer\.max_steps is set by calibration"):  # before any work
        mq.calibrate(build_tiny_llama(0), ids, trainer={"max_steps": 5}, progress_bar=False)


def test_groups_compose_into_trainer_arguments_and_callbacks(tmp_path):
    cfg = smoke_cfg(tmp_path, "trainer=gpu", "trainer.num_nodes=2", "callbacks=lr_monitor", "logger=csv")
    args = trainer_args(cfg)
    assert args["_target_"] == "lightning.Trainer" and args["num_nodes"] == 2
    assert args["accelerator"] == "gpu" and args["precision"] == "bf16-mixed"
    assert "float32_matmul_precision" not in args  # mobiquant's own key of the group
    assert args["default_root_dir"] == str(tmp_path / "run" / "lightning")
    callbacks = build_callbacks(cfg)
    assert len(callbacks) == 1 and isinstance(callbacks[0], LearningRateMonitor)
    assert build_callbacks(cfg)[0] is not callbacks[0]  # built afresh for every block
    node = {"_target_": "lightning.pytorch.profilers.SimpleProfiler", "extended": False}
    cfg.trainer.profiler = node  # a `_target_` node: built
    assert isinstance(trainer_args(cfg)["profiler"], SimpleProfiler)
    assert build_callbacks(smoke_cfg(tmp_path)) == []  # callbacks=default: none


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_epochs=3"], "trainer.max_epochs is set by calibration for every block: each block trains"),
        (["+trainer.callbacks=[]"], "trainer.callbacks is set by calibration for every block: the callbacks group"),
        (["+trainer.enable_progress_bar=false"], "trainer.enable_progress_bar is set by calibration"),
        (["calib.accelerator=gpu"], "trainer.accelerator='cpu' conflicts with calib.accelerator='gpu'"),
        (["+trainer.gradient_clip_val=0.5"], "trainer.gradient_clip_val=0.5 conflicts with calib.gradient_clip_val"),
        (["trainer.num_nodes=abc"], "trainer.num_nodes='abc' is invalid: expected an integer"),
        (
            ["+trainer.max_epoch=3"],
            "trainer.max_epoch is not a setting of trainer (Trainer); did you mean `max_epochs`",
        ),
        (["callbacks=lr_monitor"], "callbacks.lr_monitor (LearningRateMonitor) logs to the Trainer's logger"),
        (["callbacks=nope"], "callbacks=nope is unknown; allowed: default, lr_monitor"),
        (["+callbacks.x._target_=builtins.dict"], "callbacks.x._target_=builtins.dict is not a Lightning callback"),
        (["logger=csv", "callbacks=lr_monitor", "+callbacks.lr_monitor.every=1"], "callbacks.lr_monitor.every is not"),
    ],
)
def test_config_errors_name_the_key_before_any_work(overrides, message):
    got = preflight(["experiment=smoke", *overrides], CONF_DIR)
    assert got is not None and message in got and "\n" not in got


def test_run_with_a_learning_rate_monitor_and_a_profiler(tmp_path):
    cfg = smoke_cfg(tmp_path, "logger=csv", "callbacks=lr_monitor", "trainer.profiler=simple", "baselines=none")
    run(cfg)
    metrics = pd.concat(pd.read_csv(p) for p in (tmp_path / "run" / "csv").rglob("metrics.csv"))
    lrs = [c for c in metrics.columns if c.startswith("lr-AdamW")]
    assert lrs and metrics[lrs].notna().any().all()  # every block's Trainer had the monitor
