#!/usr/bin/env python
"""Perplexity of saved MoBiQuant checkpoints of one base model at several budgets, on local text files.

A run evaluates its checkpoint on the texts its config names; comparing two runs' checkpoints on other texts (e.g.
WikiText-2 and PTB test for runs that read the offline extract) needs neither run again:

    python benchmarks/eval_checkpoints.py --checkpoint site=outputs/demo/runs/A/checkpoints/mobiquant \
        --checkpoint sublayer=/tmp/demo_sublayer/checkpoints/mobiquant \
        --text wikitext2=../shared/data/wikitext-2-raw/wiki.test.raw --text ptb=../shared/data/ptb/ptb.test.txt \
        --budgets 3 3.5 4 4.5 5 6 --windows 2 --out eval.csv

Each checkpoint is loaded onto a fresh copy of the base model (``mobiquant.io.checkpoint.load_quantized``), read
at each budget through its own plan (``mobiquant.set_budget``) and scored on the first ``--windows`` windows of
``--seqlen`` tokens of each text (``mobiquant.evaluation.perplexity``). One row per checkpoint x budget x text,
written atomically after each row; rows already in ``--out`` are kept, not recomputed (an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def named(items: list[str], what: str) -> dict[str, str]:
    """``NAME=PATH`` arguments as a dict (a clear error for anything else)."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--{what} takes NAME=PATH, got {item!r}")
        out[name] = path
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="the base model (mobiquant.io.models.load_model)")
    ap.add_argument("--checkpoint", action="append", required=True, help="NAME=FOLDER (repeatable)")
    ap.add_argument("--text", action="append", required=True, help="NAME=FILE, a UTF-8 evaluation text (repeatable)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.0, 4.0, 5.0, 6.0])
    ap.add_argument("--windows", type=int, default=2, help="windows of each text (default 2)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--out", type=Path, required=True, help="CSV file (rows already there are kept)")
    args = ap.parse_args(argv)
    checkpoints, texts = named(args.checkpoint, "checkpoint"), named(args.text, "text")

    import mobiquant as mq
    from mobiquant.evaluation import perplexity
    from mobiquant.io.checkpoint import load_quantized
    from mobiquant.io.data import corpus_joiner, eval_windows, load_text_files, tokenize_corpus
    from mobiquant.io.fileio import atomic_write_text
    from mobiquant.io.models import load_model

    fp, tok = load_model(args.model, dtype="float32")
    windows = {
        name: eval_windows(tokenize_corpus(load_text_files(path), tok, corpus_joiner("text_files")), args.seqlen,
                           args.windows)
        for name, path in texts.items()
    }  # fmt: skip
    rows = pd.read_csv(args.out).to_dict("records") if args.out.exists() else []
    done = {(r["checkpoint"], float(r["budget"]), r["text"]) for r in rows}
    for label, folder in checkpoints.items():
        todo = [(b, t) for b in args.budgets for t in texts if (label, float(b), t) not in done]
        if not todo:
            continue
        q = copy.deepcopy(fp)
        load_quantized(q, folder)
        for budget, text in todo:
            mq.set_budget(q, budget)
            with torch.no_grad():
                r = perplexity(q, windows[text])
            rows.append(dict(checkpoint=label, budget=float(budget), text=text, ppl=r["ppl"], nll=r["nll"],
                             n_windows=r["n_windows"], folder=folder))  # fmt: skip
            atomic_write_text(args.out, pd.DataFrame(rows).to_csv(index=False))
            print(f"{label:12s} {budget:4.1f} {text:12s} ppl {r['ppl']:.3f}", flush=True)
    table = pd.DataFrame(rows).pivot_table(index=["text", "checkpoint"], columns="budget", values="ppl")
    print(table.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
