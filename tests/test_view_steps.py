"""A step and zero point per view (``MoBiConfig.view_steps``): fitted at packing, stored, served, reloaded."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import mobiquant as mq
from mobiquant.io.checkpoint import CONFIG_NAME, FORMAT_VERSION
from mobiquant.nn.linear import MoBiLinear
from mobiquant.patching import mobi_linears
from mobiquant.quant.primitives import to_groups
from mobiquant.tiny import tiny_llama
from tiny_models import build_tiny_llama

LAYOUT = (3, 1, 1, 1, 1, 1)


def _layer(view_steps: bool, seed: int = 0, in_f: int = 200, gs: int = 64) -> MoBiLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, in_f, generator=g) * torch.linspace(0.2, 3, in_f))  # uneven columns
    m = MoBiLinear.from_linear(lin, slice_bits=LAYOUT, group_size=gs, view_steps=view_steps)
    with torch.no_grad():  # some clipping, as calibration learns: the shared grid then fits low views badly
        m.gamma.fill_(1.0)
        m.beta.fill_(1.0)
    return m


def _weighted_err(m: MoBiLinear, w: torch.Tensor, d: torch.Tensor, k: int) -> float:
    return float((((m.dequantized(k).double() - w) ** 2) * d).sum())


def test_each_view_fits_at_least_as_well_as_the_shared_pair():
    w = _layer(False).weight.double().clone()
    d = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)).double() + 0.1
    shared, per_view = _layer(False), _layer(True)
    shared.freeze()
    per_view.freeze(col_weight=d)
    assert shared.scale.shape == (24, 4) and per_view.scale.shape == (len(LAYOUT), 24, 4)
    assert per_view.scale.dtype == per_view.zero.dtype == torch.float16
    for a, b in zip(shared.codes(), per_view.codes(), strict=True):
        assert torch.equal(a, b)  # the codes do not change, only how each view reads them
    errs = [(_weighted_err(shared, w, d, k), _weighted_err(per_view, w, d, k)) for k in range(1, len(LAYOUT) + 1)]
    for k, (e_shared, e_view) in enumerate(errs, start=1):
        assert e_view <= e_shared * 1.001, (k, e_shared, e_view)
    assert errs[0][1] < 0.9 * errs[0][0], errs  # the base view of a clipped grid gains most


def test_the_fit_weights_columns_by_their_activations():
    w = _layer(True).weight.double().clone()
    heavy = torch.ones(w.shape[1], dtype=torch.float64)
    heavy[:32] = 100.0  # the first columns matter most
    plain, weighted = _layer(True), _layer(True)
    plain.freeze()
    weighted.freeze(col_weight=heavy)
    for k in (1, 2):
        assert _weighted_err(weighted, w, heavy, k) < _weighted_err(plain, w, heavy, k)


def test_a_constant_group_keeps_the_shared_pair_and_bad_weights_are_refused():
    m = _layer(True)
    with torch.no_grad():
        m.weight[:, :64] = 0.5  # first group of every row constant: no slope to fit
    w = m.weight.double().clone()
    m.freeze()
    for k in range(1, len(LAYOUT) + 1):
        assert torch.isfinite(m.scale[k - 1]).all() and torch.isfinite(m.zero[k - 1]).all()
        torch.testing.assert_close(m.dequantized(k)[:, :64].double(), w[:, :64], atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="col_weight must be"):
        _layer(True).freeze(col_weight=torch.ones(7))
    with pytest.raises(ValueError, match="view_steps=False"):
        _layer(False).freeze(col_weight=torch.ones(200))
    with pytest.raises(ValueError, match="view_steps must be true or false"):
        mq.MoBiConfig(view_steps="yes")


@pytest.mark.parametrize("view_fit", ["diag", "block"])
def test_calibrated_model_with_view_steps_saves_reloads_and_serves(tmp_path, view_fit):
    model = build_tiny_llama(0)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    cfg = mq.MoBiConfig(slice_bits=LAYOUT, group_size=32, router_hidden=8, router_policy="adjacent", view_steps=True)
    mq.calibrate(model, ids, cfg, epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, view_fit=view_fit)
    for _, m in mobi_linears(model):
        assert m.packed and m.scale.shape == (
            len(LAYOUT),
            m.out_features,
            to_groups(torch.zeros(1, m.in_features), 32).shape[1],
        )
    mq.save_quantized(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())
    assert meta["format_version"] == FORMAT_VERSION == 3 and meta["config"]["view_steps"] is True
    back = mq.load_quantized(build_tiny_llama(0), tmp_path / "ck")
    for budget in (3.0, 4.5, 6.0):
        mq.set_budget(model, budget)
        mq.set_budget(back, budget)
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)
    bits_shared = 8 + 32 / 32  # code planes + one fp16 pair per group of 32
    assert mq.storage_bits(back) == pytest.approx(bits_shared + 32 / 32 * (len(LAYOUT) - 1), rel=0.05)


def _block_err(m: MoBiLinear, w: torch.Tensor, H: torch.Tensor, k: int) -> float:
    e = to_groups(m.dequantized(k).double() - w, 64)  # [out, groups, 64], ragged group zero-padded below
    pad = H.shape[0] * 64 - w.shape[1]
    if pad:
        e[:, -1, -pad:] = 0
    return float(torch.einsum("rgi,gij,rgj->", e, H, e))


def test_the_block_fit_minimises_each_groups_output_error():
    """With a group's block of the input second moments (``[groups, gs, gs]``) the fit minimises that group's
    output error; with a diagonal block it is the per-column fit."""
    g = torch.Generator().manual_seed(5)
    w = _layer(True).weight.double().clone()
    x = torch.randn(512, 200, generator=g, dtype=torch.float64) @ torch.randn(
        200, 200, generator=g, dtype=torch.float64
    )
    xg = torch.nn.functional.pad(x, (0, 56)).reshape(512, 4, 64)
    H = torch.einsum("ngi,ngj->gij", xg, xg) / 512  # correlated inputs
    d = torch.diagonal(H, dim1=-2, dim2=-1).reshape(-1)[:200].contiguous()
    diag, block = _layer(True), _layer(True)
    diag.freeze(col_weight=d)
    block.freeze(col_weight=H)
    for k in range(1, len(LAYOUT) + 1):
        assert _block_err(block, w, H, k) <= _block_err(diag, w, H, k) * 1.001, k
    as_block, as_diag = _layer(True), _layer(True)
    as_block.freeze(col_weight=torch.diag_embed(torch.nn.functional.pad(d, (0, 56)).reshape(4, 64)))
    as_diag.freeze(col_weight=d)
    torch.testing.assert_close(as_block.scale.float(), as_diag.scale.float(), rtol=2e-3, atol=0)
    torch.testing.assert_close(as_block.zero.float(), as_diag.zero.float(), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="col_weight must be"):
        _layer(True).freeze(col_weight=torch.ones(4, 64, 32))


def test_blend_view_pair_moves_one_view_between_the_two_readings_and_back():
    m = _layer(True)
    m.freeze(keep_shared=True)
    fitted = m.scale.clone(), m.zero.clone()
    shared_scale, shared_zero = m.shared_pair
    before = m.dequantized(2).clone()
    m.blend_view_pair(2, 0.0)
    assert torch.equal(m.scale[1], shared_scale) and torch.equal(m.zero[1], shared_zero)
    assert torch.equal(m.scale[0], fitted[0][0]) and torch.equal(m.scale[2:], fitted[0][2:])
    learned = m.dequantized(2).clone()
    assert not torch.equal(learned, before)  # the cached view follows the pair
    m.blend_view_pair(2, 0.25)  # the weights move on the line between the two readings (up to fp16 rounding)
    off_line = (m.dequantized(2) - (0.75 * learned + 0.25 * before)).abs().max()
    assert off_line < 0.02 * (learned - before).abs().max()
    m.blend_view_pair(2, 1.0)
    assert torch.equal(m.scale, fitted[0]) and torch.equal(m.zero, fitted[1])
    assert torch.equal(m.dequantized(2), before)
    with pytest.raises(ValueError, match="k must be between 1 and 6"):
        m.blend_view_pair(7, 1.0)
    with pytest.raises(ValueError, match="t must be in \\[0, 1\\]"):
        m.blend_view_pair(1, 1.5)
    m.drop_shared_pair()
    with pytest.raises(RuntimeError, match="freeze\\(keep_shared=True\\)"):
        m.blend_view_pair(1, 0.0)
    plain = _layer(True)
    plain.freeze()
    assert plain.shared_pair is None


def _packed_block0(seed: int = 0):
    from mobiquant.calibration import capture_block_inputs, run_block_batched
    from mobiquant.patching import discover_sites, find_blocks, quantize_block

    model = build_tiny_llama(seed)
    cfg = mq.MoBiConfig(slice_bits=LAYOUT, group_size=32, router_hidden=8, view_steps=True)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    sites = discover_sites(model, cfg)
    x, kwargs = capture_block_inputs(model, ids)
    block = find_blocks(model)[1][0]
    with torch.no_grad():
        y = run_block_batched(block, x, kwargs, 4)
    quantize_block(block, sites[0], cfg)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, MoBiLinear):
                m.gamma.fill_(1.5)  # a clipping, as calibration learns
                m.beta.fill_(1.5)
                m.freeze(keep_shared=True)
    return block, x, y, kwargs


def test_each_view_keeps_the_blend_with_the_lowest_block_error():
    from mobiquant.calibration import CalibConfig, _choose_view_pairs, run_block_batched

    block, x, y, kwargs = _packed_block0()
    linears = [m for m in block.modules() if isinstance(m, MoBiLinear)]
    with torch.no_grad():  # spoil the fitted pair of view 4: another blend must win there
        for m in linears:
            m.scale[3] *= 3
    fitted = {id(m): (m.scale.clone(), m.zero.clone()) for m in linears}
    mix = (0.0, 0.5, 1.0)

    def err(k: int, t: float) -> float:
        for m in linears:
            m.blend_view_pair(k, t)
            m.set_static(k)
        with torch.no_grad():
            e = float(torch.nn.functional.mse_loss(run_block_batched(block, x, kwargs, 4), y))
        for m in linears:
            m.blend_view_pair(k, 1.0)
        return e

    expected = {}
    for k in range(1, len(LAYOUT) + 1):
        errs = {t: err(k, t) for t in mix}
        best = min(errs, key=errs.get)
        if errs[best] < errs[1.0]:
            expected[k] = (best,)
    # what each chosen blend must hold, computed before the choice drops the kept pairs
    want = {}
    for m in linears:
        for k, (t,) in expected.items():
            m.blend_view_pair(k, t)
        want[id(m)] = (m.scale.clone(), m.zero.clone())
        for k in expected:
            m.blend_view_pair(k, 1.0)
    chosen = _choose_view_pairs(block, x, y, kwargs, CalibConfig(batch_size=4, view_select_mix=list(mix)))
    assert chosen == expected and 4 in chosen and len(chosen) < len(LAYOUT)
    for m in linears:
        assert m.shared_pair is None and m.static_k == len(LAYOUT)
        assert torch.equal(m.scale, want[id(m)][0]) and torch.equal(m.zero, want[id(m)][1])
        for k in range(1, len(LAYOUT) + 1):
            if k not in chosen:
                assert torch.equal(m.scale[k - 1], fitted[id(m)][0][k - 1])
    with pytest.raises(ValueError, match="view_select_mix must be a non-empty list"):
        CalibConfig(view_select_mix=[0.0, 2.0])


def test_calibration_chooses_view_pairs_and_zero_windows_keeps_the_fitted_ones(caplog, monkeypatch):
    import mobiquant.calibration as calibration

    chosen: dict[int, dict[int, tuple[float, ...]]] = {}
    choose = calibration._choose_view_pairs

    def recording(block, *args):
        views = choose(block, *args)
        chosen.update({id(m): views for m in block.modules() if isinstance(m, MoBiLinear)})
        return views

    monkeypatch.setattr(calibration, "_choose_view_pairs", recording)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    cfg = mq.MoBiConfig(slice_bits=LAYOUT, group_size=32, router_hidden=8, view_steps=True)
    scales, views, reports = {}, {}, {}
    for n in (0, 2):
        model = build_tiny_llama(0)
        with caplog.at_level("INFO", logger="mobiquant.calibration"):
            result = mq.calibrate(
                model,
                ids,
                cfg,
                epochs_stage1=1,
                epochs_stage2=1,
                batch_size=2,
                progress_bar=False,
                view_select_windows=n,
                threshold_windows=0,
            )
        scales[n] = {name: m.scale.clone() for name, m in mobi_linears(model)}
        views[n] = {name: chosen.get(id(m)) for name, m in mobi_linears(model)}
        reports[n] = [b.view_blends for b in result.blocks]
        assert all(m.shared_pair is None for _, m in mobi_linears(model))
    assert all(v is None for v in views[0].values())  # 0 windows: no choice made, the fitted pairs stay
    assert "views not on their fitted pair" in caplog.text
    # calibration.csv's view_blends column: each block's choice, "" where none was made or every view kept its pair
    blends = {int(name.split(".layers.")[1].split(".")[0]): v for name, v in views[2].items()}
    want = [" ".join(f"{k}:{t:g}" for k, (t,) in sorted(blends[b].items())) for b in range(len(reports[2]))]
    assert reports[0] == ["", ""] and reports[2] == want and any(want)
    for name, fitted in scales[0].items():  # the same training: the pairs differ exactly at the chosen views
        for k in range(1, len(LAYOUT) + 1):
            same = torch.equal(scales[2][name][k - 1], fitted[k - 1])
            assert same == (k not in views[2][name]), (name, k, views[2][name])
    with pytest.raises(ValueError, match="view_select_windows must be >= 0"):
        mq.calibrate(build_tiny_llama(0), ids, cfg, view_select_windows=-1)


def test_choice_per_site_never_raises_the_block_error():
    from mobiquant.calibration import CalibConfig, _choose_view_pairs, run_block_batched

    block, x, y, kwargs = _packed_block0()
    sites: dict[int, list[MoBiLinear]] = {}
    for m in block.modules():
        if isinstance(m, MoBiLinear):
            sites.setdefault(id(m.router), []).append(m)
    groups = list(sites.values())
    assert len(groups) > 1
    with torch.no_grad():  # spoil one site's fitted pair at view 3: that site must leave it
        for m in groups[0]:
            m.scale[2] *= 3

    def err(k: int) -> float:
        for g in groups:
            for m in g:
                m.set_static(k)
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(run_block_batched(block, x, kwargs, 4), y))

    fitted = [err(k) for k in range(1, len(LAYOUT) + 1)]
    chosen = _choose_view_pairs(block, x, y, kwargs, CalibConfig(batch_size=4), groups)
    assert chosen[3][0] != 1.0 and all(len(ts) == len(groups) for ts in chosen.values())
    for k in range(1, len(LAYOUT) + 1):
        assert err(k) <= fitted[k - 1] * (1 + 1e-6)
        assert (k in chosen) == (err(k) < fitted[k - 1])
    with pytest.raises(ValueError, match="view_select_by must be 'block' or 'site'"):
        CalibConfig(view_select_by="linear")


def test_view_pair_tuning_lowers_each_tuned_views_block_error(calib_device):
    """``calib.view_tune_epochs``: each tuned view's pairs move and its packed block's output error on the
    calibration inputs falls; untuned views keep their pairs; the codes stay; the model stays on its device
    (a Trainer's teardown moves its module to the CPU)."""
    from mobiquant.calibration import CalibConfig, calibrate_model

    torch.set_num_threads(1)
    ids = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(0))
    mobi = mq.MoBiConfig(slice_bits=(3, 1, 1), group_size=32, router_hidden=8, view_steps=True)
    base = dict(epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, threshold_windows=0)
    device = calib_device
    base["accelerator"] = "gpu" if device == "cuda" else "cpu"

    def run(**kw):
        model, _ = tiny_llama(num_hidden_layers=2)
        model.to(device)
        calibrate_model(model, ids, mobi, CalibConfig(**base, **kw))
        assert all(p.device.type == device for p in model.parameters())
        return {n: (m.scale.cpu(), m.zero.cpu(), [c.cpu() for c in m.codes()]) for n, m in mobi_linears(model)}

    plain = run()
    logs = []
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(record.getMessage())
    logger = logging.getLogger("mobiquant.calibration")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        tuned = run(view_tune_epochs=3, view_tune_views=[1, 3], lr_view_tune=1e-2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    for n, (s, z, codes) in tuned.items():
        s0, z0, codes0 = plain[n]
        assert all(torch.equal(a, b) for a, b in zip(codes, codes0, strict=True))  # codes fixed
        assert torch.equal(s[1], s0[1]) and torch.equal(z[1], z0[1])  # view 2 not tuned
        assert not torch.equal(s[0], s0[0]) and not torch.equal(s[2], s0[2])  # views 1 and 3 tuned
    reports = [m for m in logs if "view pairs tuned" in m]
    assert len(reports) == 2  # one per block
    for msg in reports:
        pairs = re.findall(r"(\d): '([\d.e+-]+) -> ([\d.e+-]+)'", msg)
        assert [k for k, _, _ in pairs] == ["1", "3"] and "not kept" not in msg
        assert all(float(after) < float(before) for _, before, after in pairs), msg  # on all the windows


def test_view_weight_is_the_stored_view_and_differentiable():
    """``view_weight`` with a view's stored pair reproduces the packed view; it is differentiable in the pair."""
    torch.manual_seed(0)
    lin = MoBiLinear.from_linear(torch.nn.Linear(80, 12), slice_bits=(3, 1, 2), group_size=32, view_steps=True)
    lin.freeze()
    for k in (1, 2, 3):
        w = lin.view_weight(k, lin.scale[k - 1], lin.zero[k - 1], lin.view_codes(k))
        torch.testing.assert_close(w, lin.dequantized(k).float(), rtol=1e-6, atol=1e-7)
    s = lin.scale[1].float().requires_grad_()
    z = lin.zero[1].float().requires_grad_()
    lin.view_weight(2, s, z, lin.view_codes(2)).square().sum().backward()
    assert s.grad is not None and z.grad is not None and s.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_view_pair_tuning_that_raises_the_block_error_is_undone():
    """A tuning that leaves the block's error on the calibration windows higher (here an absurd learning rate)
    is not kept: the view reads the pairs it had before."""
    from mobiquant.calibration import CalibConfig, calibrate_model

    torch.set_num_threads(1)
    ids = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    mobi = mq.MoBiConfig(slice_bits=(3, 1), group_size=32, router_hidden=8, view_steps=True)
    base = dict(epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, threshold_windows=0)
    pairs = []
    for kw in ({}, dict(view_tune_epochs=1, view_tune_views=[1], lr_view_tune=50.0)):
        model, _ = tiny_llama(num_hidden_layers=1)
        calibrate_model(model, ids, mobi, CalibConfig(**base, **kw))
        pairs.append({n: (m.scale.clone(), m.zero.clone()) for n, m in mobi_linears(model)})
    for n, (s, z) in pairs[1].items():
        assert torch.equal(s, pairs[0][n][0]) and torch.equal(z, pairs[0][n][1])


def test_view_pair_tuning_needs_real_views_and_skips_shared_pairs():
    from mobiquant.calibration import CalibConfig, calibrate_model

    ids = torch.randint(0, 100, (2, 16))
    cfg = dict(epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, threshold_windows=0)
    runs = []
    for tune in (0, 1):  # one pair per group for every view: nothing to tune, the same calibration
        model, _ = tiny_llama(num_hidden_layers=1)
        calibrate_model(
            model, ids, mq.MoBiConfig(slice_bits=(3, 1), group_size=32), CalibConfig(**cfg, view_tune_epochs=tune)
        )
        runs.append({n: (m.scale.clone(), m.zero.clone()) for n, m in mobi_linears(model)})
    assert all(torch.equal(runs[0][n][0], runs[1][n][0]) for n in runs[0])
    model, _ = tiny_llama(num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"view_tune_views=\[4\]: slices \[3, 1\] have views 1..2"):
        calibrate_model(
            model,
            ids,
            mq.MoBiConfig(slice_bits=(3, 1), group_size=32, view_steps=True),
            CalibConfig(view_tune_epochs=1, view_tune_views=[4]),
        )
    with pytest.raises(ValueError, match="view_tune_views must be None"):
        CalibConfig(view_tune_views=[0])
    with pytest.raises(ValueError, match="view_tune_epochs must be an integer >= 0"):
        CalibConfig(view_tune_epochs=-1)
    with pytest.raises(ValueError, match=r"needs view_tune_views of the same length .* got \[1\]"):
        CalibConfig(view_tune_epochs=[1, 2], view_tune_views=[1])
    with pytest.raises(ValueError, match="or a list of them"):
        CalibConfig(view_tune_epochs=[1, -2], view_tune_views=[1, 3])


def test_view_pair_tuning_epochs_per_view():
    """``view_tune_epochs`` as a list gives each view of ``view_tune_views`` its own epochs (0 skips it): each
    view's pairs are those of tuning that view alone for its epochs."""
    from mobiquant.calibration import CalibConfig, calibrate_model

    torch.set_num_threads(1)
    ids = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    mobi = mq.MoBiConfig(slice_bits=(3, 1, 1), group_size=32, router_hidden=8, view_steps=True)
    base = dict(epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, threshold_windows=0)

    def run(**kw):
        model, _ = tiny_llama(num_hidden_layers=1)  # one block: no view's tuning reaches another's inputs
        calibrate_model(model, ids, mobi, CalibConfig(**base, lr_view_tune=1e-2, **kw))
        return {n: (m.scale.clone(), m.zero.clone()) for n, m in mobi_linears(model)}

    plain = run()
    only3 = run(view_tune_epochs=2, view_tune_views=[3])
    only1 = run(view_tune_epochs=1, view_tune_views=[1])
    skip1 = run(view_tune_epochs=[0, 2], view_tune_views=[1, 3])
    both = run(view_tune_epochs=[1, 2], view_tune_views=[1, 3])
    for n in plain:
        assert torch.equal(skip1[n][0], only3[n][0]) and torch.equal(skip1[n][1], only3[n][1])
        for k, ref in ((1, only1), (3, only3)):
            assert torch.equal(both[n][0][k - 1], ref[n][0][k - 1]) and torch.equal(both[n][1][k - 1], ref[n][1][k - 1])
        assert torch.equal(both[n][0][1], plain[n][0][1])  # view 2 not tuned
    assert any(not torch.equal(both[n][0][2], plain[n][0][2]) for n in plain)  # view 3 moved
