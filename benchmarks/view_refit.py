"""Perplexity of a saved MoBiQuant checkpoint when each view gets a step and zero point of its own.

The checkpoint's codes stay as they are; per linear, view ``k`` and group, ``W ~ a C_k + b`` is fitted by least
squares to the FP weight (``C_k``: the view's concatenated integer code), plainly or with each input column
weighted by its mean squared activation on calibration windows (never the evaluation text), and the model is
evaluated with those views instead of the shared-step ones, beside the checkpoint as stored, at every static
view and at the given routed budgets (the checkpoint's own plan and thresholds). This measures what the format change of
docs/RESULTS.md "Why 3 bits misses" (a per-view step and zero point per group) would give on a real
checkpoint before building it; the evaluation runs the PyTorch path (dense views), CPU or GPU.

    PYTHONPATH=src python benchmarks/view_refit.py outputs/demo/runs/<time>/checkpoints/mobiquant
    PYTHONPATH=src python benchmarks/view_refit.py CKPT --windows 2 --budgets 3.5 4.5

Evaluation text: the held-out articles of the offline Wikipedia extract (``data=offline``'s evaluation split,
the first ``--windows`` windows of 2048 tokens, as ``make run`` evaluates); ``--eval-text FILE`` for another, and
``--calib-text FILE`` for the activations' calibration text (never the evaluation text). On a GPU machine:

    python3 benchmarks/view_refit.py /root/bench/lr1e2cyc_1gpu/checkpoints/mobiquant --base /root/model/smol.gguf \
        --eval-text /root/data/wiki.test.raw --windows 40 --calib-text /root/data/wiki_extract_calib.txt
"""

from __future__ import annotations

import argparse
import copy
import math

import pandas as pd
import torch


def ls_coeffs(w: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (last dim): ``(a, b)`` of the ``d``-weighted least-squares fit ``w ~ a t + b``."""
    from mobiquant.quant.primitives import weighted_affine_fit

    a, mt, mw = weighted_affine_fit(w, t, d.double() + 1e-12)
    return a, mw - a * mt


def ls_fit(w: torch.Tensor, code: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per group (last dim): ``a code + b`` closest to ``w`` in the ``d``-weighted least-squares sense."""
    a, b = ls_coeffs(w, code, d)
    return a * code.double() + b


def _col_weight(fp_weight: torch.Tensor, col_weight: torch.Tensor | None, gs: int) -> torch.Tensor:
    from mobiquant.quant.primitives import to_groups

    if col_weight is None:
        return torch.ones_like(to_groups(fp_weight.double(), gs))
    return to_groups(col_weight.double().expand_as(fp_weight), gs)


def _grouped(m, fp_weight: torch.Tensor, col_weight: torch.Tensor | None):
    """``(w, d, C)``: the FP weight, the column weights and every view's concatenated code ``C_k`` (1-based
    dict), grouped as the layer's groups."""
    from mobiquant.quant.primitives import to_groups

    gs = m.slicer.group_size
    codes = [to_groups(c, gs) for c in m.codes()]
    views = {k: m.slicer.concat_codes(codes, k) for k in range(1, m.num_slices + 1)}
    return to_groups(fp_weight.double(), gs), _col_weight(fp_weight, col_weight, gs), views


def refit_views(m, fp_weight: torch.Tensor, col_weight: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """``{k: W_k}`` of a packed :class:`MoBiLinear` with a least-squares step and zero point per group and view;
    ``col_weight`` ``[in]`` weights each input column's error (e.g. its mean squared activation)."""
    from mobiquant.quant.primitives import from_groups

    w, d, codes = _grouped(m, fp_weight, col_weight)
    return {k: from_groups(ls_fit(w, c, d), m.in_features).to(m.weight_dtype) for k, c in codes.items()}


def refit_shared(
    m, fp_weight: torch.Tensor, col_weight: torch.Tensor | None, fit_views: list[int]
) -> dict[int, torch.Tensor]:
    """``{k: W_k}`` with ONE step ``h`` and zero point ``z`` per group, as the checkpoint format stores them, fitted
    by weighted least squares jointly over the views ``fit_views`` (1-based): every view is the affine map
    ``h t_k - h z`` of its known ``t_k = C_k / 2^B_k - (1 - 2^-B_k) / 2``, so one fit serves them all."""
    from mobiquant.quant.primitives import from_groups

    w, d, codes = _grouped(m, fp_weight, col_weight)
    ts = {}
    for k, c in codes.items():
        shift = m.slicer.residual_shift(k)
        ts[k] = c.double() / 2**shift - (1 - 2.0**-shift) / 2
    n = len(fit_views)
    a, bias = ls_coeffs(torch.cat([w] * n, -1), torch.cat([ts[k] for k in fit_views], -1), torch.cat([d] * n, -1))
    return {k: from_groups(a * tk + bias, m.in_features).to(m.weight_dtype) for k, tk in ts.items()}


def direct_weight(fp_weight: torch.Tensor, bits: int, gs: int, col_weight: torch.Tensor | None) -> torch.Tensor:
    """A ``bits``-bit min-max grid of ``fp_weight`` (RTN), read with its own min-max step, or with the
    ``col_weight``-weighted least-squares step and zero point when given."""
    from mobiquant.quant.primitives import dequantize, from_groups, lwc_params, quantize, to_groups

    g = to_groups(fp_weight.double(), gs)
    params = lwc_params(g, bits)
    codes = quantize(g, params, bits)
    fit = dequantize(codes, params) if col_weight is None else ls_fit(g, codes, _col_weight(fp_weight, col_weight, gs))
    return from_groups(fit, fp_weight.shape[1]).to(fp_weight.dtype)


def input_moments(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean squared input activation per column of every ``nn.Linear`` of the FP ``model`` on ``windows``."""
    from mobiquant.calibration import InputMoments

    moments = InputMoments([n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)])
    with moments.attached(model):
        for row in windows:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    return moments.mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--base", default="smollm2-135m", help="the FP base model (name or folder)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--budgets", type=float, nargs="*", default=[3.5, 4.5, 5.5], help="routed budgets as well")
    ap.add_argument("--eval-text", default=None, help="evaluation text file (default: the extract's held-out articles)")
    ap.add_argument("--calib-text", default=None, help="calibration text file (default: extract's calibration split)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shared-views", type=int, nargs="+", default=[3, 4, 5, 6], help="views the shared fit balances")
    ap.add_argument("--direct-max", type=int, default=6, help="RTN rows (plain and refitted) up to these bits")
    ap.add_argument(
        "--act-windows",
        type=int,
        default=8,
        help="calibration windows (512 tokens, the extract's calibration split) for the activation-weighted fit",
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    import mobiquant as mq
    from mobiquant.evaluation import perplexity
    from mobiquant.io.data import eval_windows, load_wiki_extract, tokenize_corpus
    from mobiquant.io.models import load_model
    from mobiquant.patching import mobi_linears

    base, tok = load_model(args.base)
    docs = open(args.eval_text).read() if args.eval_text else load_wiki_extract("eval")
    windows = eval_windows(tokenize_corpus(docs, tok), args.seqlen, args.windows)
    fp = {n: mod.weight.detach().clone() for n, mod in base.named_modules() if isinstance(mod, torch.nn.Linear)}
    calib_docs = open(args.calib_text).read() if args.calib_text else load_wiki_extract("calib")
    calib = eval_windows(tokenize_corpus(calib_docs, tok), 512, args.act_windows)
    moments = input_moments(base, calib)
    fp_model = copy.deepcopy(base)
    stored = mq.load_quantized(copy.deepcopy(base), args.checkpoint).to(args.device)
    plain = mq.load_quantized(copy.deepcopy(base), args.checkpoint).to(args.device)
    shared = mq.load_quantized(copy.deepcopy(base), args.checkpoint).to(args.device)
    weighted = mq.load_quantized(base, args.checkpoint).to(args.device)
    fit_views = [list(stored.mobiquant_config.view_bits).index(b) + 1 for b in args.shared_views]
    for name, m in mobi_linears(shared):
        m._view_cache.update(refit_shared(m, fp[name].to(args.device), moments[name].to(args.device), fit_views))
    for name, m in mobi_linears(plain):
        m._view_cache.update(refit_views(m, fp[name].to(args.device)))
    for name, m in mobi_linears(weighted):
        m._view_cache.update(refit_views(m, fp[name].to(args.device), moments[name].to(args.device)))
    for model in (stored, plain, weighted, shared):
        for _, m in mobi_linears(model):
            m.backend = "torch"
    cfg = stored.mobiquant_config
    rows = []
    readings = (
        ("stored (one step per group)", stored),
        ("per view, weight least squares", plain),
        ("per view, activation-weighted", weighted),
        ("one step and zero (format unchanged), activation-weighted", shared),
    )
    for label, model in readings:
        points = [(f"static {b} bits", b, None) for b in cfg.view_bits]
        points += [(f"routed {b:g}", b, b) for b in args.budgets]
        for what, bits, budget in points:
            if budget is None:
                mq.set_static(model, list(cfg.view_bits).index(bits) + 1)
            else:
                mq.set_budget(model, budget)
            ppl = perplexity(model, windows, device=args.device)["ppl"]
            rows.append({"reading": label, "point": what, "ppl": ppl})
            print(f"{label:30s} {what:16s} {ppl:10.3f}", flush=True)
    gs = stored.mobiquant_config.group_size
    names = [n for n, _ in mobi_linears(stored)]
    for bits in [b for b in cfg.view_bits if b <= args.direct_max]:
        for label, cw in ((f"RTN {bits}-bit", False), (f"RTN {bits}-bit, activation-weighted step and zero", True)):
            model = copy.deepcopy(fp_model)
            mods = dict(model.named_modules())
            for n in names:
                lin = mods[n]
                lin.weight.copy_(direct_weight(fp[n], bits, gs, moments[n] if cw else None))
            ppl = perplexity(model.to(args.device), windows, device=args.device)["ppl"]
            rows.append(
                {"reading": label.replace(f" {bits}-bit", " b-bit"), "point": f"static {bits} bits", "ppl": ppl}
            )
            print(f"{label:30s} {ppl:10.3f}", flush=True)
            del model
    df = pd.DataFrame(rows).pivot(index="reading", columns="point", values="ppl")
    print(f"\n{args.checkpoint}: perplexity, {windows.shape[0]} windows of {args.seqlen} tokens")
    print(df.to_markdown(floatfmt=".2f"))
    assert all(math.isfinite(v) for v in df.to_numpy().ravel() if v == v)


if __name__ == "__main__":
    main()
