"""Budget-matched propagation (``calib.propagate_budget=matched``): one input stream per trained budget."""

from __future__ import annotations

import pytest
import torch

import mobiquant as mq
from mobiquant.calibration import (
    CalibConfig,
    _propagate,
    calibrate_model,
    capture_block_inputs,
    find_blocks,
    nearest_stream,
    propagation_budgets,
)
from mobiquant.io.checkpoint import quantized_state
from mobiquant.nn.router import TokenRouter
from mobiquant.tiny import tiny_llama

MOBI = dict(group_size=32, router_hidden=8)


def test_propagation_budgets():
    mobi = mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), **MOBI)
    assert propagation_budgets(mobi, CalibConfig()) == [5.5]  # the middle of 3..8
    assert propagation_budgets(mobi, CalibConfig(propagate_budget=3)) == [3.0]
    cycle = CalibConfig(propagate_budget="matched", budget_sampling="cycle", budgets=[4, 3.5, 6, 9, 4])
    assert propagation_budgets(mobi, cycle) == [3.0, 3.5, 4.0, 6.0, 8.0]  # + stage 1's base, 9 clamped to 8
    uniform = CalibConfig(propagate_budget="matched", stage1_bits=5)
    assert propagation_budgets(mobi, uniform) == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # every view's bits
    assert propagation_budgets(mobi, CalibConfig(propagate_budget="matched", epochs_stage2=0)) == [8.0]
    assert nearest_stream({3.0: 0, 4.0: 0}, 3.5) == 3.0 and nearest_stream({3.0: 0, 4.0: 0}, 3.6) == 4.0


@pytest.mark.parametrize("bad", ["middle", 0, -1.0])
def test_propagate_budget_must_be_a_budget_or_matched(bad):
    with pytest.raises(ValueError, match=f"propagate_budget must be a positive budget, 'matched' or None.*{bad!r}"):
        CalibConfig(propagate_budget=bad)


def _matched_cfg(**kw):
    base = dict(
        epochs_stage1=1,
        epochs_stage2=1,
        batch_size=2,
        progress_bar=False,
        threshold_windows=0,
        propagate_budget="matched",
        budget_sampling="cycle",
        budgets=[3.0],
    )
    return CalibConfig(**{**base, **kw})


def test_each_step_reads_the_stream_of_its_budget():
    """Slices [2, 2], stage 1 on the base, stage 2 cycling over 3 bits: block 1 trains stage 1 on block 0's
    outputs at 2 bits and stage 2 on those at 3 bits (recomputed after calibration, rows matched exactly)."""
    torch.set_num_threads(1)
    model, _ = tiny_llama(num_hidden_layers=2)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    mobi = mq.MoBiConfig(slice_bits=(2, 2), **MOBI)
    cfg = _matched_cfg()
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(block, args, kwargs):
        if torch.is_grad_enabled():
            lin = next(m for m in block.modules() if isinstance(m, mq.MoBiLinear))
            seen.append((lin.mode, (args[0] if args else kwargs["hidden_states"]).detach().clone()))

    _, blocks = find_blocks(model)
    handle = blocks[1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        calibrate_model(model, ids, mobi, cfg)
    finally:
        handle.remove()
    fp_x, kwargs = capture_block_inputs(model, ids)
    want = {b: _propagate(blocks[0], fp_x, kwargs, cfg, mobi, b) for b in (2.0, 3.0)}
    assert not torch.allclose(want[2.0], want[3.0])

    def stream_of(x):
        hits = [b for b, s in want.items() if all(any(torch.equal(row, r) for r in s) for row in x)]
        assert len(hits) == 1, hits
        return hits[0]

    assert [m for m, _ in seen] == ["static"] * 2 + ["routed"] * 2  # 2 steps per epoch
    assert [stream_of(x) for _, x in seen] == [2.0, 2.0, 3.0, 3.0]


class _Stop(Exception):
    pass


def _calibrated(mobi, cfg, state=None, stop_after: int | None = None):
    """The quantized state of a 3-block tiny model calibrated with ``cfg``; ``stop_after``: interrupted after
    that block (``state``: where finished blocks are saved and resumed from)."""
    model, _ = tiny_llama(num_hidden_layers=3)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))

    def on_block_end(i, report):
        if i == stop_after:
            raise _Stop

    calibrate_model(model, ids, mobi, cfg, on_block_end=on_block_end, state_dir=state)
    return quantized_state(model)


def _assert_resumes_bit_identical(tmp_path, mobi, cfg):
    """An uninterrupted calibration, then one interrupted after block 1 and resumed: the same checkpoint.
    Returns the uninterrupted one."""
    torch.set_num_threads(1)
    reference = _calibrated(mobi, cfg)
    with pytest.raises(_Stop):
        _calibrated(mobi, cfg, tmp_path / "state", stop_after=1)
    resumed = _calibrated(mobi, cfg, tmp_path / "state")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    return reference


def test_matched_propagation_resumes_bit_identical(tmp_path):
    mobi = mq.MoBiConfig(**MOBI)
    reference = _assert_resumes_bit_identical(tmp_path, mobi, _matched_cfg(budgets=[3.0, 5.0, 6.5]))
    # the default (one stream at the middle of the range) is another calibration
    default = _calibrated(mobi, _matched_cfg(budgets=[3.0, 5.0, 6.5], propagate_budget=None))
    assert not all(torch.equal(reference[k], default[k]) for k in reference)


def test_tuned_view_pairs_resume_bit_identical(tmp_path):
    """With a low and a high view's pairs tuned (as quant=mobiquant tunes views 1, 3 and 4), an interrupted
    calibration resumes to the same checkpoint: tuned pairs are saved with their block, later blocks tune on
    the same inputs."""
    mobi = mq.MoBiConfig(slice_bits=(3, 1, 1), view_steps=True, **MOBI)
    cfg = _matched_cfg(budgets=[3.0, 4.0], view_tune_epochs=1, view_tune_views=[1, 3])
    reference = _assert_resumes_bit_identical(tmp_path, mobi, cfg)
    untuned = _calibrated(mobi, _matched_cfg(budgets=[3.0, 4.0]))  # without the tuning: other view-1 pairs
    scales = [k for k in reference if k.endswith(".scale")]
    assert scales and not all(torch.equal(reference[k][0], untuned[k][0]) for k in scales)


@pytest.mark.parametrize("propagate", [None, "matched"])
def test_finished_blocks_release_their_inputs(monkeypatch, propagate):
    """Only the current block's streams and FP targets stay alive between blocks, even with Python's
    automatic collection off (a finished block's trainer must not hold its loader's tensors), and no finished
    block's router keeps the activations of its last batch."""
    import gc
    import weakref

    import mobiquant.calibration as calib

    torch.set_num_threads(1)
    model, _ = tiny_llama(num_hidden_layers=4)
    outputs: list[weakref.ref] = []
    run = calib.run_block_batched

    def tracked(*args, **kwargs):
        out = run(*args, **kwargs)
        outputs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(calib, "run_block_batched", tracked)
    alive: list[int] = []
    kept: list[int] = []

    def held() -> int:  # tensors the (finished blocks') routers keep from their last forward
        routers = [m for m in model.modules() if isinstance(m, TokenRouter)]
        assert routers
        state = [x for r in routers for x in (r._cache, r._values, r._tail, r.last_soft) if x is not None]
        return sum(isinstance(t, torch.Tensor) for x in state for t in (x if isinstance(x, tuple) else (x,)))

    mobi = mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), **MOBI)
    cfg = _matched_cfg(propagate_budget=propagate, budget_sampling="uniform", budgets=None)
    gc.disable()
    try:
        calibrate_model(
            model,
            torch.randint(0, 100, (8, 32)),
            mobi,
            cfg,
            on_block_end=lambda i, rep: (alive.append(sum(r() is not None for r in outputs)), kept.append(held())),
        )
    finally:
        gc.enable()
    streams = len(propagation_budgets(mobi, cfg))
    assert alive == [streams + 1] * 4  # every stream, and the FP targets that are the next block's FP inputs
    assert kept == [0] * 4
