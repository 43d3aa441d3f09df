"""Tests of mobiquant.evaluation: perplexity under the GPTQ/OmniQuant protocol."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from mobiquant.evaluation import perplexity, window_nll
from tiny_models import build_tiny_llama

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = 96


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    return build_tiny_llama(seed, vocab_size=VOCAB, intermediate_size=128, max_position_embeddings=128)


def random_windows(n: int = 3, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def hand_ppl(model: nn.Module, windows: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy, computed directly with one forward per window."""
    losses = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1].double(), w[1:], reduction="none"))
    return math.exp(torch.cat(losses).mean().item())


def test_perplexity_matches_hand_computed_cross_entropy():
    model = tiny_model()
    windows = random_windows()
    result = perplexity(model, windows)
    assert result["ppl"] == pytest.approx(hand_ppl(model, windows), rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(result["ppl"]))
    assert result["n_windows"] == 3 and result["seqlen"] == 32
    assert result["n_tokens"] == 3 * 31
    assert result["dtype"] == "float32"


def test_window_nll_gives_the_perplexity_of_any_first_windows():
    """``window_nll``: each window's summed NLL in window order, whatever the batch size; the perplexity over
    the first ``n`` of them is that of evaluating only those ``n`` windows."""
    import pandas as pd

    from mobiquant.io.results import first_windows_ppl, window_rows

    model = tiny_model()
    windows = random_windows(n=5)
    full = perplexity(model, windows, batch_size=2)
    assert len(full["window_nll"]) == 5
    assert sum(full["window_nll"]) / full["n_tokens"] == pytest.approx(full["nll"], rel=1e-12)
    assert perplexity(model, windows, batch_size=5)["window_nll"] == pytest.approx(full["window_nll"], rel=1e-6)
    rows = pd.DataFrame(window_rows("m", 4.0, "text", full["window_nll"], full["seqlen"]))
    rows = pd.concat([rows, pd.DataFrame(window_rows("fp", float("nan"), "text", full["window_nll"], 32))])
    first2 = first_windows_ppl(rows, 2)
    assert list(first2["n_windows"]) == [2, 2] and first2["budget"].isna().tolist() == [False, True]
    assert first2["ppl"].iloc[0] == pytest.approx(perplexity(model, windows[:2])["ppl"], rel=1e-6)
    assert first_windows_ppl(rows)["ppl"].iloc[0] == pytest.approx(full["ppl"], rel=1e-12)
    with pytest.raises(ValueError, match="n must be None or an integer >= 1"):
        first_windows_ppl(rows, 0)
    with pytest.raises(ValueError, match=r"columns \['nll_sum'\] are missing"):
        first_windows_ppl(rows.drop(columns="nll_sum"), 2)


def test_perplexity_small_case_by_hand():
    """Two windows of three tokens with a model whose logits are fixed: the NLL is known in closed form."""

    class FixedLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.log(torch.tensor([0.5, 0.25, 0.25])))

        def forward(self, input_ids, use_cache=False):
            return (self.bias.expand(*input_ids.shape, 3),)  # a tuple output also works

    windows = torch.tensor([[0, 1, 2], [2, 0, 0]])
    # Scored tokens: 1, 2, 0, 0 with probabilities 1/4, 1/4, 1/2, 1/2.
    expected_nll = (2 * math.log(4) + 2 * math.log(2)) / 4
    result = perplexity(FixedLogits(), windows, batch_size=2)
    assert result["nll"] == pytest.approx(expected_nll, rel=1e-7)
    assert result["ppl"] == pytest.approx(math.exp(expected_nll), rel=1e-7)
    assert result["n_tokens"] == 4


def test_uniform_model_has_vocab_size_perplexity():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the embedding: all logits are 0
    assert perplexity(model, random_windows())["ppl"] == pytest.approx(VOCAB, rel=1e-6)


def test_batch_size_does_not_change_result():
    model = tiny_model()
    windows = random_windows(n=5)
    one = perplexity(model, windows, batch_size=1)
    three = perplexity(model, windows, batch_size=3)
    assert three["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
    assert three["n_tokens"] == one["n_tokens"]


def test_window_nll_sums_per_window():
    model = tiny_model()
    windows = random_windows(n=2)
    with torch.no_grad():
        sums = window_nll(model, windows)
        logits = model(windows).logits
    assert sums.dtype == torch.float64 and sums.shape == (2,)
    expected = F.cross_entropy(logits[1, :-1], windows[1, 1:], reduction="sum")
    assert sums[1].item() == pytest.approx(expected.item(), rel=1e-5)


class CustomLinear(nn.Module):
    """A stand-in for a quantized layer: not an nn.Linear, same maths."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_model_with_custom_linear_modules():
    model = tiny_model()
    windows = random_windows()
    reference = perplexity(model, windows)["ppl"]
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, CustomLinear(child))
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    assert perplexity(model, windows)["ppl"] == pytest.approx(reference, rel=1e-6)


def test_training_mode_is_restored_and_no_grad_kept():
    model = tiny_model().train()
    perplexity(model, random_windows(n=1), progress="eval")
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_bfloat16_model_is_scored_in_float32():
    model = tiny_model().to(torch.bfloat16)
    result = perplexity(model, random_windows())
    assert result["dtype"] == "bfloat16" and math.isfinite(result["ppl"])


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        (torch.zeros(8, dtype=torch.long), "2-D"),
        (torch.zeros(2, 1, dtype=torch.long), "seqlen=1"),
        (torch.zeros(0, 8, dtype=torch.long), "No windows"),
    ],
)
def test_bad_windows(windows, message):
    with pytest.raises(ValueError, match=message):
        perplexity(tiny_model(), windows)


# ------------------------------------------------------------------------------------------------
# The real model on WikiText-2
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_fp_perplexity_on_wikitext2():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} does not exist (the shared evaluation text sits beside the repository)")
    from mobiquant.io.data import corpus_joiner, eval_windows, load_corpus, tokenize_corpus
    from mobiquant.io.models import ModelNotAvailableError, load_model

    try:
        model, tok = load_model()
    except ModelNotAvailableError as err:
        pytest.skip(str(err))
    docs = load_corpus("text_files", paths=[SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"])
    ids = tokenize_corpus(docs, tok, joiner=corpus_joiner("wikitext2"))
    assert ids.shape[1] == 301_948
    result = perplexity(model, eval_windows(ids, 2048, max_windows=2))
    assert result["n_windows"] == 2 and result["n_tokens"] == 2 * 2047
    # The first 16 windows give 21.03 (REFERENCE_NUMBERS.md); two windows land near it.
    assert math.isfinite(result["ppl"]) and 10.0 < result["ppl"] < 40.0
