"""Block-wise calibration: a run interrupted after a block resumes and ends bit-identical."""

from __future__ import annotations

import json

import pytest
import torch

import mobiquant as mq
from mobiquant.calibration import CalibConfig, calibrate_model
from mobiquant.io.checkpoint import quantized_state
from mobiquant.tiny import tiny_llama


class Interrupt(Exception):
    pass


def _calibrate(state_dir=None, stop_after=None, layers=3, sync_every=1, seed=0, reports=None):
    model, _ = tiny_llama(num_hidden_layers=layers, seed=seed)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(
        epochs_stage1=1,
        epochs_stage2=1,
        batch_size=2,
        progress_bar=False,
        threshold_windows=2,
        threshold_step=1.0,
        sync_every=sync_every,
    )

    def on_block_end(i, report):
        if reports is not None:
            reports.append(report)
        if stop_after is not None and i == stop_after:
            raise Interrupt

    result = calibrate_model(
        model, ids, mq.MoBiConfig(group_size=32, router_hidden=8), cfg, on_block_end=on_block_end, state_dir=state_dir
    )
    model.calibration_result = result
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


def test_sync_interval_does_not_change_the_result():
    """sync_every only changes when the host checks the loss and logs, not what is learned."""
    torch.set_num_threads(1)
    reference = quantized_state(_calibrate(layers=2))
    other = quantized_state(_calibrate(layers=2, sync_every=3))
    assert reference.keys() == other.keys()
    for key in reference:
        assert torch.equal(reference[key], other[key]), key


def test_state_from_other_settings_is_not_reused(tmp_path, caplog):
    state = tmp_path / "state"
    with pytest.raises(Interrupt):
        _calibrate(state, stop_after=0, layers=2)
    model, _ = tiny_llama(num_hidden_layers=2)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(1))  # other text
    cfg = _small_cfg("cpu")
    with caplog.at_level("WARNING"):
        calibrate_model(model, ids, mq.MoBiConfig(group_size=32, router_hidden=8), cfg, state_dir=state)
    assert "other settings" in caplog.text


def test_state_of_another_base_model_is_not_reused(tmp_path, caplog):
    """Killed after a block, re-run on the same folder with another base model (``model.tiny.seed=1``): the
    finished blocks belong to the first model and are calibrated anew, not resumed."""
    torch.set_num_threads(1)
    state = tmp_path / "state"
    with pytest.raises(Interrupt):
        _calibrate(state, stop_after=0, layers=2, seed=0)
    assert json.loads((state / "state.json").read_text())["key"]["base_model"]  # keyed by the fingerprint
    with caplog.at_level("INFO"):
        other = _calibrate(state, layers=2, seed=1)
    assert "other settings (base model)" in caplog.text and "resumed" not in caplog.text
    clean = quantized_state(_calibrate(layers=2, seed=1))
    resumed = quantized_state(other)
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key


def test_resumed_blocks_keep_their_time_and_steps(tmp_path):
    """A resumed block reports the seconds and steps of the process that calibrated it, and the
    calibration's time counts every process (``earlier_seconds``: the killed one's, up to its last block)."""
    torch.set_num_threads(1)
    state = tmp_path / "state"
    first: list = []
    with pytest.raises(Interrupt):
        _calibrate(state, stop_after=1, reports=first)
    saved = json.loads((state / "state.json").read_text())
    assert saved["seconds"] >= first[0].seconds + first[1].seconds > 0
    again: list = []
    model = _calibrate(state, reports=again)
    for a, b in zip(first, again[:2], strict=True):  # the two resumed blocks
        assert (b.seconds, b.steps, b.final_mse) == (a.seconds, a.steps, a.final_mse) and b.steps > 0
    assert again[2].steps == first[0].steps and again[2].seconds > 0
    result = model.calibration_result
    assert result.earlier_seconds == pytest.approx(saved["seconds"])
    assert result.seconds > 0 and result.earlier_seconds > 0


@pytest.mark.parametrize("sync_every", [1, 3])
def test_non_finite_loss_stops_the_block_and_names_it(tmp_path, monkeypatch, sync_every):
    """A NaN in a block's output stops calibration with the block and its first bad step named, at the next
    host-device check (every ``sync_every`` steps); earlier blocks stay saved."""
    from mobiquant import calibration

    real_run_block = calibration.run_block
    calls = {"n": 0}

    def poisoned(block, x, kwargs):
        out = real_run_block(block, x, kwargs)
        if torch.is_grad_enabled() and block is poisoned.target:
            calls["n"] += 1
            return out * float("nan")
        return out

    model, _ = tiny_llama(num_hidden_layers=2)
    poisoned.target = model.model.layers[1]
    monkeypatch.setattr(calibration, "run_block", poisoned)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(
        epochs_stage1=2, epochs_stage2=2, batch_size=2, progress_bar=False, threshold_windows=0, sync_every=sync_every
    )
    with pytest.raises(FloatingPointError, match=r"block 1 at step 0 \(stage 1\)"):
        calibrate_model(model, ids, mq.MoBiConfig(group_size=32, router_hidden=8), cfg, state_dir=tmp_path / "s")
    assert calls["n"] == sync_every  # stopped at the first check after the bad step
    meta = json.loads((tmp_path / "s" / "state.json").read_text())
    assert sorted(meta["blocks"]) == ["0"]  # block 0's work is kept


def test_inputs_kept_on_cpu_give_the_same_calibration(calib_device):
    """inputs_on=cpu (pinned host memory, streamed batch by batch) changes where tensors live, not the result."""
    device = calib_device
    import dataclasses

    from mobiquant.calibration import calibrate_model, inputs_device
    from mobiquant.io.checkpoint import quantized_state
    from mobiquant.quant.config import MoBiConfig
    from mobiquant.tiny import tiny_llama

    cfg = _small_cfg(device)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    states = []
    for where in ("device", "cpu"):
        model, _ = tiny_llama(num_hidden_layers=2, hidden_size=64, intermediate_size=160, seed=0)
        model.to(device)
        calibrate_model(
            model, ids, MoBiConfig(group_size=32, router_hidden=8), dataclasses.replace(cfg, inputs_on=where)
        )
        states.append({k: v.cpu() for k, v in quantized_state(model).items()})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-6, msg=k)
    model, _ = tiny_llama(num_hidden_layers=1, seed=0)
    assert inputs_device(model, 10**6, 64, torch.float32, "auto").type == "cpu"  # CPU models: host memory
    with pytest.raises(ValueError, match="inputs_on must be"):
        CalibConfig(inputs_on="gpu")


@pytest.mark.parametrize(
    "stage1_bits,anchor,expected_k",
    [
        (None, None, 1),
        ("base", 4, 1),
        (4, None, 2),
        (8.0, None, 4),
        ("anchor", None, 1),
        ("anchor", 4, 2),
        ("anchor", 6, 3),
        ("anchor", 2, 1),
    ],
)
def test_stage1_trains_the_chosen_view(stage1_bits, anchor, expected_k, monkeypatch):
    """Stage 1 trains the clipping on the base slice (paper) or on the view of ``stage1_bits`` bits; stage 2
    routes. Recorded from the linears' state in every forward that builds a graph (the training steps)."""
    model, _ = tiny_llama(num_hidden_layers=2)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    seen = set()
    orig = mq.MoBiLinear.forward

    def forward(self, x):
        out = orig(self, x)
        if torch.is_grad_enabled() and out.requires_grad:
            seen.add((self.mode, self.static_k if self.mode == "static" else None))
        return out

    monkeypatch.setattr(mq.MoBiLinear, "forward", forward)
    cfg = CalibConfig(
        epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, threshold_windows=0, stage1_bits=stage1_bits
    )
    calibrate_model(model, ids, mq.MoBiConfig(group_size=32, router_hidden=8, anchor_bits=anchor), cfg)
    assert {s for s in seen if s[0] == "static"} == {("static", expected_k)}
    assert any(mode != "static" for mode, _ in seen)  # stage 2 routed


def test_stage1_bits_must_be_a_view():
    model, _ = tiny_llama(num_hidden_layers=1)
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(epochs_stage1=1, epochs_stage2=1, progress_bar=False, stage1_bits=3)
    msg = r"stage1_bits=3 is not a view of slices \[2, 2, 2, 2\]: allowed \[2, 4, 6, 8\] \(or 'base', 'anchor'\)"
    with pytest.raises(ValueError, match=msg):
        calibrate_model(model, ids, mq.MoBiConfig(group_size=32, router_hidden=8), cfg)
    with pytest.raises(ValueError, match="stage1_bits must be a positive"):
        CalibConfig(stage1_bits=0)
    with pytest.raises(ValueError, match="'base', 'anchor' or None, got 'top'"):
        CalibConfig(stage1_bits="top")


def _clipping_after(**settings) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model, _ = tiny_llama(num_hidden_layers=1)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(batch_size=2, progress_bar=False, threshold_windows=0, **settings)
    calibrate_model(model, ids, mq.MoBiConfig(group_size=32, router_hidden=8), cfg)
    state = quantized_state(model)  # frozen: the clipping lives on as each group's step and zero point
    return [t for key, t in sorted(state.items()) if key.endswith((".scale", ".zero"))]


def test_stage2_clipping_rate_zero_keeps_stage1_clipping():
    """lr_lwc_stage2=0: stage 2 trains the routers only; the clipping is what stage 1 left."""
    torch.set_num_threads(1)
    stage1 = _clipping_after(epochs_stage1=2, epochs_stage2=1, lr_lwc_stage2=0.0)
    frozen = _clipping_after(epochs_stage1=2, epochs_stage2=2, lr_lwc_stage2=0.0)
    joint = _clipping_after(epochs_stage1=2, epochs_stage2=2)
    assert stage1 and all(torch.equal(a, b) for a, b in zip(stage1, frozen, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(stage1, joint, strict=True))


def test_stage2_clipping_rate_must_not_be_negative():
    with pytest.raises(ValueError, match="lr_lwc_stage2 must be >= 0"):
        CalibConfig(lr_lwc_stage2=-1.0)


def test_block_reports_carry_accelerator_memory(calib_device):
    """Each block's report has its peak accelerator memory and what stays allocated after it (the next
    block's starting point, where growth from block to block shows); NaN off CUDA."""
    device = calib_device
    import math

    torch.set_num_threads(1)
    model, _ = tiny_llama(num_hidden_layers=2)
    model.to(device)
    mobi = mq.MoBiConfig(slice_bits=(2, 2), group_size=32, router_hidden=8)
    cfg = _small_cfg(device)
    reports = calibrate_model(model, torch.randint(0, 100, (4, 32)), mobi, cfg).blocks
    assert len(reports) == 2
    for r in reports:
        if device == "cpu":
            assert math.isnan(r.peak_mem_mb) and math.isnan(r.end_mem_mb)
        else:
            assert 0 < r.end_mem_mb <= r.peak_mem_mb


def test_accelerator_must_be_where_the_model_is():
    """A block's Trainer moves the block to its accelerator, not its inputs: a mismatch is refused before any
    work, naming the fix."""
    model, _ = tiny_llama(num_hidden_layers=1)
    cfg = CalibConfig(epochs_stage1=1, epochs_stage2=0, progress_bar=False, accelerator="gpu")
    with pytest.raises(ValueError, match=r"calib.accelerator='gpu' calibrates on cuda, but the model is on cpu: set "):
        calibrate_model(model, torch.randint(0, 100, (2, 16)), mq.MoBiConfig(group_size=32, router_hidden=8), cfg)


def _small_cfg(device: str, **kw) -> CalibConfig:
    """One epoch per stage in batches of 2, no threshold fit, on ``device``'s accelerator."""
    base = dict(epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, threshold_windows=0)
    return CalibConfig(**{**base, "accelerator": "gpu" if device == "cuda" else "cpu", **kw})
