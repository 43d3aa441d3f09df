#!/usr/bin/env python
"""Re-plan a saved MoBiQuant checkpoint with other budget-plan settings, and evaluate the budgets it serves.

A plan (per-linear budgets from cost curves, refitted thresholds; ``mobiquant.elastic.site_budgets.build_plan``)
is a reading of a calibrated checkpoint, but its settings are part of a run's identity, so changing them in a
run means calibrating again. This script reuses one run's calibration instead: it reads the run's composed
config (``RUN/.hydra/config.yaml``), loads the base model, the calibration windows (the same ones, from the
same settings and seed) and ``RUN/checkpoints/METHOD``, builds a plan per ``--variant`` (settings over the
saved plan's own), and evaluates every ``--budgets`` on every evaluation text of the run's config (as many
windows as the run read, by default). One CSV row per variant x budget x text (perplexity, bits read, the plan's
local-budget spread), written atomically after each row; rows already there are not recomputed (an interrupted
run resumes).

    python benchmarks/replan.py RUN --budgets 5 5.5 6 --variant saved --variant refit16:refit_windows=16 \
        --variant sens32:sensitivity_windows=32,refit_windows=32 --out replan.csv

``saved`` is the checkpoint's own plan, unchanged (the reference the variants are read against). Evaluation
text is never used to build a plan.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

PLAN_KEYS = (
    "per",
    "step",
    "sensitivity_windows",
    "refit_thresholds",
    "refit_windows",
    "select_windows",
    "select_at",
    "windows",
    "local_step",
)
log = logging.getLogger("replan")


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:key=value,key=value`` (keys of :data:`PLAN_KEYS`) -> ``(name, settings)``."""
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"variant {text!r} has no name (NAME or NAME:key=value,...)")
    settings: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in PLAN_KEYS:
            raise ValueError(f"variant {text!r}: {item!r} is not key=value with a key of {PLAN_KEYS}")
        settings[key] = _value(value)
    if name == "saved" and settings:
        raise ValueError("variant 'saved' is the checkpoint's own plan and takes no settings")
    return name, settings


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def spread(plan, budget: float) -> str:
    """How many linears the plan gives each local budget at grid budget ``budget`` (``'5.0:74 6.0:71 ...'``)."""
    j = min(range(len(plan.budgets)), key=lambda i: abs(plan.budgets[i] - budget))
    vals, counts = torch.unique(plan.local[:, j], return_counts=True)
    return " ".join(f"{float(v):g}:{int(c)}" for v, c in zip(vals, counts, strict=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder of `python -m mobiquant` (with .hydra/ and checkpoints/)")
    ap.add_argument("--method", default="mobiquant", help="the checkpoint under RUN/checkpoints/ (default mobiquant)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[5.0, 5.5, 6.0])
    ap.add_argument("--variant", action="append", default=None, help="NAME[:key=value,...] (repeatable)")
    ap.add_argument(
        "--max-windows", type=int, default=None, help="evaluation windows per text (0: all; default: the run's)"
    )
    ap.add_argument("--texts", default=None, help="comma-separated evaluation texts of the run (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="CSV file (default RUN/replan.csv)")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or ["saved"])]
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("variant names must be unique")
    config = args.run / ".hydra" / "config.yaml"
    ckpt = args.run / "checkpoints" / args.method
    for p in (config, ckpt):
        if not p.exists():
            raise SystemExit(f"{p} not found: RUN must be a run folder with .hydra/config.yaml and checkpoints/")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import pandas as pd
    from omegaconf import OmegaConf

    from mobiquant.__main__ import register_resolvers
    from mobiquant.elastic.site_budgets import plan_budgets
    from mobiquant.evaluation import perplexity
    from mobiquant.io.checkpoint import load_quantized
    from mobiquant.io.data import eval_windows, held_out_windows
    from mobiquant.io.results import atomic_write_text
    from mobiquant.patching import achieved_bits, budget_plan, install_plan, reset_counts, set_budget
    from mobiquant.tasks.session import calib_tokens, calib_windows, load_base_model, load_token_ids, use_backend

    register_resolvers()
    cfg = OmegaConf.load(config)
    out = args.out or args.run / "replan.csv"
    done = pd.read_csv(out) if out.exists() else pd.DataFrame()
    have = {(r.variant, float(r.budget), r.text) for r in done.itertuples()} if len(done) else set()
    rows = done.to_dict("records") if len(done) else []

    base, tokenizer = load_base_model(cfg)
    texts = list(cfg.data.eval) if args.texts is None else args.texts.split(",")
    unknown = set(texts) - set(cfg.data.eval)
    if unknown:
        raise SystemExit(f"texts {sorted(unknown)} are not evaluation texts of the run: {list(cfg.data.eval)}")
    max_windows = cfg.eval.get("max_windows") if args.max_windows is None else (args.max_windows or None)
    windows = {
        t: eval_windows(load_token_ids(cfg.data.eval[t], tokenizer), cfg.eval.seqlen, max_windows) for t in texts
    }
    tokens = calib_tokens(cfg, tokenizer)
    calib = calib_windows(cfg, tokens)
    device = next(base.parameters()).device
    for name, settings in variants:
        todo = [(b, t) for b in args.budgets for t in texts if (name, float(b), t) not in have]
        if not todo:
            continue
        model = load_quantized(copy.deepcopy(base), ckpt)
        saved = budget_plan(model)
        if saved is None:
            raise SystemExit(f"{ckpt} holds no budget plan: re-plan a checkpoint of a method with a plan")
        t0 = time.perf_counter()
        if name != "saved":
            want = {k: saved.settings.get(k) for k in PLAN_KEYS if k in saved.settings} | settings
            plan_ids = calib
            if want.get("windows") == "held_out":  # every window of the plan from unseen calibration text
                c = cfg.data.calib
                n = (want.get("sensitivity_windows") or c.nsamples) + want.get("select_windows", 0)
                plan_ids = held_out_windows(tokens, c.nsamples, c.seqlen, cfg.seed, int(n))
            plan_budgets(model, plan_ids, batch_size=1, log=log, **want)
        build_s = time.perf_counter() - t0
        plan = budget_plan(model)
        use_backend(model, cfg.eval.get("backend", "auto"))
        model.to(device)
        for b, t in todo:
            set_budget(model, b)
            reset_counts(model)
            r = perplexity(model, windows[t], batch_size=cfg.eval.batch_size)
            rows.append(
                dict(
                    variant=name,
                    budget=float(b),
                    text=t,
                    ppl=float(r["ppl"]),
                    bits=float(achieved_bits(model)),
                    windows=int(r["n_windows"]),
                    plan_s=round(build_s, 1),
                    local_budgets=spread(plan, b),
                    settings=" ".join(f"{k}={v}" for k, v in sorted(plan.settings.items())),
                )
            )
            reset_counts(model, track=False)
            atomic_write_text(out, pd.DataFrame(rows).to_csv(index=False))
            log.info("%s %.2f bits %s: ppl %.4f at %.4f bits", name, b, t, rows[-1]["ppl"], rows[-1]["bits"])
        install_plan(model, None)
        del model
    table = pd.DataFrame(rows).pivot_table(index="variant", columns=["text", "budget"], values="ppl")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
