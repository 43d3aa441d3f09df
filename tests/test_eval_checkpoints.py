"""``benchmarks/eval_checkpoints.py``: two checkpoints of one base model, scored at their budgets on local texts,
equal to the same checkpoint's perplexity computed directly, and resumed from its CSV."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import mobiquant as mq
from mobiquant.evaluation import perplexity
from mobiquant.io.checkpoint import save_quantized
from mobiquant.io.data import corpus_joiner, eval_windows, load_text_files, tokenize_corpus
from mobiquant.tiny import tiny_llama

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import eval_checkpoints  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalck")
    base, tok = tiny_llama(seed=0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(0)
    folders = {}
    for placement in ("site", "sublayer"):
        q = copy.deepcopy(base)
        mq.quantize_model(q, mq.MoBiConfig(group_size=32, router_placement=placement))
        mq.calibrate_thresholds(q, [torch.randint(0, 257, (2, 32), generator=g)])
        mq.freeze(q)
        folders[placement] = save_quantized(q, root / placement)
    text = root / "text.txt"
    text.write_text("\n".join(f"line {i} of a short evaluation text, with words" for i in range(40)))
    return root, folders, text, tok


def test_scores_every_checkpoint_budget_and_text_and_resumes(setup, capsys):
    root, folders, text, tok = setup
    out = root / "eval.csv"
    argv = ["--model", str(root / "base"), "--text", f"t={text}", "--budgets", "4", "5.5"]
    argv += ["--windows", "2", "--seqlen", "64", "--out", str(out)]
    argv += [f"--checkpoint={name}={folder}" for name, folder in folders.items()]
    assert eval_checkpoints.main(argv) == 0
    rows = pd.read_csv(out)
    assert sorted(zip(rows.checkpoint, rows.budget, strict=True)) == [
        ("site", 4.0), ("site", 5.5), ("sublayer", 4.0), ("sublayer", 5.5)
    ]  # fmt: skip
    from mobiquant.io.checkpoint import load_quantized
    from mobiquant.io.models import load_model

    fp, _ = load_model(root / "base")
    q = load_quantized(copy.deepcopy(fp), folders["sublayer"])
    mq.set_budget(q, 5.5)
    windows = eval_windows(tokenize_corpus(load_text_files(text), tok, corpus_joiner("text_files")), 64, 2)
    with torch.no_grad():
        ref = perplexity(q, windows)["ppl"]
    got = rows[(rows.checkpoint == "sublayer") & (rows.budget == 5.5)].ppl.item()
    assert got == pytest.approx(ref, rel=1e-6)
    capsys.readouterr()
    assert eval_checkpoints.main(argv) == 0  # every row there: nothing scored again
    assert "ppl" not in capsys.readouterr().out.split("budget")[0] and len(pd.read_csv(out)) == 4


def test_named_arguments_are_checked():
    with pytest.raises(SystemExit, match="NAME=PATH"):
        eval_checkpoints.named(["just-a-path"], "text")
