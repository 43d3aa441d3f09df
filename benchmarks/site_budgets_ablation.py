#!/usr/bin/env python
"""Readings of ONE calibrated MoBiQuant checkpoint at fractional budgets: where should the bits go?

Loads a checkpoint written by the pipeline (``<run>/checkpoints/<tag>``) onto SmolLM2-135M and measures,
at each budget, the perplexity of:

* ``uniform``      every router at the global budget (plain ``set_budget``);
* ``sites``        per-site local budgets from measured cost curves, routed within, thresholds from the
  routers' budget tables (``quant=mobiquant_sites refit_thresholds=false``);
* ``sites_int``    the same knapsack restricted to the static views (local budgets 2/4/6/8: no routing);
* ``sites_refit``  ``sites`` with each router's threshold refitted on the calibration windows while every
  router runs at its own local budget (``quant=mobiquant_sites``, the default);
* ``linears_refit`` one local budget per linear (its own threshold on its router's gate values), refitted
  (``quant=mobiquant_sites per=linear``);
* ``mixed_layer``  static per-linear slice counts from the Fisher sensitivity.

Calibration windows come from the Wikipedia extract's calibration articles, evaluation windows from its
held-out articles (or ``--eval-text``). Prints one table (pandas) and writes it to ``--out`` as CSV.

    python benchmarks/site_budgets_ablation.py --checkpoint RUN/checkpoints/mobiquant_a4 --budgets 3 3.5 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mobiquant.elastic.site_budgets import (  # noqa: E402
    allocate_site_budgets,
    apply_linear_budgets,
    apply_site_budgets,
    default_grid,
    site_cost_curves,
)
from mobiquant.evaluation import perplexity  # noqa: E402
from mobiquant.io.checkpoint import load_quantized  # noqa: E402
from mobiquant.io.data import calibration_windows, eval_windows, load_text_files, load_wiki_extract, tokenize_corpus  # noqa: E402
from mobiquant.io.models import load_model  # noqa: E402
from mobiquant.methods.baselines import allocate_bits, apply_allocation, layer_sensitivity  # noqa: E402
from mobiquant.patching import achieved_bits, reset_counts, routers, set_budget  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.0, 3.5, 4.0])
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-text", default=None, help="evaluation text file (default: held-out extract articles)")
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    load_quantized(model, args.checkpoint)
    model.eval()
    calib = calibration_windows(
        tokenize_corpus(load_wiki_extract("calib"), tok), args.calib_windows, args.calib_seqlen, seed=1
    )
    docs = load_text_files([args.eval_text]) if args.eval_text else load_wiki_extract("eval")
    ev = eval_windows(tokenize_corpus(docs, tok), args.seqlen, args.eval_windows)
    slice_bits = next(iter(routers(model)))[1].slice_bits
    curves = site_cost_curves(model, calib, default_grid(slice_bits, 0.25), max_windows=None)
    curves_int = site_cost_curves(model, calib, default_grid(slice_bits, 2.0), max_windows=None)
    curves_lin = site_cost_curves(model, calib, default_grid(slice_bits, 0.25), max_windows=None, per="linear")
    sens = layer_sensitivity(model, calib, metrics=("fisher",))

    def ppl():
        reset_counts(model)
        p = perplexity(model, ev)["ppl"]
        return p, achieved_bits(model)

    rows = []
    for b in args.budgets:
        res = {}
        set_budget(model, b)
        res["uniform"] = ppl()
        alloc = allocate_site_budgets(curves, b)
        apply_site_budgets(model, alloc)
        res["sites"] = ppl()
        apply_site_budgets(model, alloc, calib_ids=calib)
        res["sites_refit"] = ppl()
        apply_site_budgets(model, allocate_site_budgets(curves_int, b))
        res["sites_int"] = ppl()
        apply_linear_budgets(model, allocate_site_budgets(curves_lin, b), calib_ids=calib)
        res["linears_refit"] = ppl()
        set_budget(model, b)  # clears the per-linear thresholds
        apply_allocation(model, allocate_bits(sens, b))
        res["mixed_layer"] = ppl()
        for name, (p, bits) in res.items():
            rows.append({"budget": b, "reading": name, "ppl": p, "avg_bits": bits})
            print(f"budget {b}: {name:12s} ppl {p:10.2f}  avg bits {bits:.3f}", flush=True)
    df = pd.DataFrame(rows)
    print(df.pivot(index="reading", columns="budget", values="ppl").round(2).to_string())
    if args.out:
        df.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
