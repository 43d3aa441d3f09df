"""benchmarks/view_refit.py's least-squares readings of a packed layer (no model download, no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import view_refit  # noqa: E402
from mobiquant.nn.linear import MoBiLinear  # noqa: E402


def _packed(slices=(3, 1, 1, 1, 1, 1), n_in=256, n_out=16, group=64):
    torch.manual_seed(0)
    lin = torch.nn.Linear(n_in, n_out)
    m = MoBiLinear.from_linear(lin, group_size=group, slice_bits=slices)
    m.freeze()
    return m


def test_a_view_that_is_already_affine_in_its_codes_is_fitted_exactly():
    m = _packed()
    cols = torch.rand(m.in_features) + 0.1
    for k in (1, 3, 6):
        target = m.dequantized(k).float()
        views = view_refit.refit_views(m, target, cols)
        torch.testing.assert_close(views[k].float(), target, rtol=1e-4, atol=1e-5)
        shared = view_refit.refit_shared(m, target, cols, [k])  # one pair fitted on that view alone
        torch.testing.assert_close(shared[k].float(), target, rtol=1e-4, atol=1e-5)


def test_per_view_fit_is_no_worse_than_the_stored_step_in_its_weighted_error():
    m = _packed()
    torch.manual_seed(1)
    fp = m.dequantized(6).float() + 0.01 * torch.randn(m.out_features, m.in_features)
    cols = torch.rand(m.in_features) + 0.1
    views = view_refit.refit_views(m, fp, cols)
    for k in range(1, 7):
        stored = ((fp - m.dequantized(k).float()) ** 2 * cols).sum()
        fitted = ((fp - views[k].float()) ** 2 * cols).sum()
        assert fitted <= stored * (1 + 1e-6), k


def test_direct_weight_fit_lowers_the_weighted_error_of_rtn():
    torch.manual_seed(2)
    w = torch.randn(8, 128)
    cols = torch.rand(128) + 0.1
    plain = view_refit.direct_weight(w, 3, 64, None)
    fitted = view_refit.direct_weight(w, 3, 64, cols)
    assert ((w - fitted) ** 2 * cols).sum() <= ((w - plain) ** 2 * cols).sum()
