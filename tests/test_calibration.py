"""Block-wise calibration: a run interrupted after a block resumes and ends bit-identical."""

from __future__ import annotations

import json

import pytest
import torch

import mobiquant as mq
from mobiquant.calibration import CalibConfig, calibrate_model
from mobiquant.checkpoint import quantized_state
from mobiquant.tiny import tiny_llama


class Interrupt(Exception):
    pass


def _calibrate(state_dir=None, stop_after=None, layers=3):
    model, _ = tiny_llama(num_hidden_layers=layers)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, threshold_windows=2,
                      threshold_step=1.0)

    def on_block_end(i, report):
        if stop_after is not None and i == stop_after:
            raise Interrupt

    calibrate_model(model, ids, mq.MoBiConfig(group_size=32, router_hidden=8), cfg,
                    on_block_end=on_block_end, state_dir=state_dir)
    return model


def test_interrupted_calibration_resumes_bit_identical(tmp_path):
    torch.set_num_threads(1)
    reference = quantized_state(_calibrate())
    state = tmp_path / "state"
    with pytest.raises(Interrupt):
        _calibrate(state, stop_after=1)
    meta = json.loads((state / "state.json").read_text())
    assert sorted(meta["blocks"]) == ["0", "1"]  # two finished blocks saved, the third never started
    resumed = quantized_state(_calibrate(state))
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


def test_state_from_other_settings_is_not_reused(tmp_path, caplog):
    state = tmp_path / "state"
    with pytest.raises(Interrupt):
        _calibrate(state, stop_after=0, layers=2)
    model, _ = tiny_llama(num_hidden_layers=2)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(1))  # other text
    cfg = CalibConfig(epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, threshold_windows=0)
    with caplog.at_level("WARNING"):
        calibrate_model(model, ids, mq.MoBiConfig(group_size=32, router_hidden=8), cfg, state_dir=state)
    assert "other settings" in caplog.text
