"""How good is each static reading of uncalibrated MoBiSlice weights, against RTN at the same bits?

For each slice layout and reading ``k``: perplexity on the first windows of WikiText-2 test, relative
weight MSE and per-linear relative output MSE (``||X (W_q - W)^T||^2 / ||X W^T||^2`` on the activations of
one window), all as ratios to RTN at the same bit-width. No calibration, no clipping: this isolates the
cost of the nested grid from what calibration adds or removes.

    python benchmarks/view_quality.py --eval-text ../shared/data/wikitext-2-raw/wiki.test.raw
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mobiquant.evaluation import perplexity  # noqa: E402
from mobiquant.io.data import eval_windows, load_corpus, tokenize_corpus  # noqa: E402
from mobiquant.io.models import load_model  # noqa: E402
from mobiquant.patching import quantize_model, set_static  # noqa: E402
from mobiquant.quant.config import MoBiConfig  # noqa: E402
from mobiquant.quant.slicer import ResidualSlicer  # noqa: E402


def layer_inputs(model, window: torch.Tensor) -> dict[str, torch.Tensor]:
    acts, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            hooks.append(
                m.register_forward_pre_hook(
                    lambda mod, a, n=name: acts.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1]))
                )
            )
    try:
        with torch.no_grad():
            model(input_ids=window)
    finally:
        for h in hooks:
            h.remove()
    return acts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval-text", required=True)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument(
        "--layouts",
        nargs="+",
        default=["2,2,2,2:2", "2,2,2,2@4:2", "3,1,1,1,1,1:2"],
        help="slice bits[@anchor bits]:k readings to compare with RTN at the same bits",
    )
    p.add_argument("--out", default=None, help="CSV to write")
    args = p.parse_args(argv)
    base, tok = load_model(args.model)
    ids = tokenize_corpus(load_corpus("text_files", split="all", paths=[args.eval_text]), tok, joiner="\n\n")
    windows = eval_windows(ids, args.seqlen, args.windows)
    acts = layer_inputs(base, windows[:1, :512])
    rows = [{"weights": "fp", "bits": 32, "ppl": perplexity(base, windows)["ppl"]}]
    readings = []
    for spec in args.layouts:
        bits_s, _, k_s = spec.partition(":")
        bits_s, _, anchor = bits_s.partition("@")
        readings.append((tuple(int(b) for b in bits_s.split(",")), int(k_s), int(anchor) if anchor else None))
    for bits in sorted({sum(sl[:k]) for sl, k, _ in readings}):
        readings.insert(0, ((bits,), 1, None))  # RTN at each compared bit-width
    mse = {}
    for sl, k, anchor in readings:
        tag = f"{list(sl)}{f' @{anchor}' if anchor else ''} k={k}"
        slicer = ResidualSlicer(sl, args.group_size, anchor)
        w_err, o_err = [], {}
        for name, x in acts.items():
            w = base.get_submodule(name).weight.detach().float()
            v = slicer.views(w, upto=k)[-1]
            y = x @ w.T
            w_err.append(float(((v - w) ** 2).mean() / (w**2).mean()))
            o_err[name] = float(((x @ v.T - y) ** 2).mean() / (y**2).mean())
        mse[tag] = (statistics.mean(w_err), o_err)
        model = copy.deepcopy(base)
        quantize_model(
            model,
            MoBiConfig(slice_bits=sl, group_size=args.group_size, lwc_init=None, routers=False, anchor_bits=anchor),
        )
        set_static(model, k)
        rows.append(
            {
                "weights": tag,
                "bits": sum(sl[:k]),
                "ppl": perplexity(model, windows)["ppl"],
                "weight_rel_mse": mse[tag][0],
            }
        )
        print(rows[-1], flush=True)
        del model
    df = pd.DataFrame(rows)
    for i, r in df.iterrows():
        ref = mse.get(f"[{r['bits']}] k=1")
        if ref is None or r["weights"] == "fp":
            continue
        ratios = {n: mse[r["weights"]][1][n] / ref[1][n] for n in ref[1]}
        worst = max(ratios, key=ratios.get)
        df.loc[i, "weight_mse_vs_rtn"] = r["weight_rel_mse"] / ref[0]
        df.loc[i, "output_mse_vs_rtn_median"] = statistics.median(ratios.values())
        df.loc[i, "output_mse_vs_rtn_worst"] = ratios[worst]
        df.loc[i, "worst_layer"] = worst
    print(
        f"\n{args.model}, {args.windows} x {args.seqlen} tokens of {args.eval_text}, g{args.group_size}, "
        "no calibration\n"
    )
    print(df.to_markdown(index=False, floatfmt=".4g"))
    if args.out:
        df.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
