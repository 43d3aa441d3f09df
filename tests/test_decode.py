"""``mobiquant.decode``: cached generation equals the eager model, budgets switch per token, bad input fails.

The model is the tiny random LLaMA of ``mobiquant.tiny``, quantized (slices 2-2-2-2, g32), its router thresholds
calibrated on random tokens and packed: every routed forward runs the package's inference dispatch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import mobiquant as mq
from mobiquant import decode
from mobiquant.decode import BudgetControl, generate
from mobiquant.tiny import tiny_llama


def build_tiny_llama(seed: int = 0):
    """The tiny random LLaMA of ``task=decode``'s smoke runs (vocabulary: 257 byte tokens)."""
    return tiny_llama(seed=seed)[0]


def token_batches(n: int, batch: int = 4, seqlen: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (batch, seqlen), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def qmodel():
    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=32))
    mq.calibrate_thresholds(model, token_batches(4, batch=4, seqlen=32, seed=100))
    mq.freeze(model)
    return model


@pytest.fixture
def prompt():
    return token_batches(1, batch=1, seqlen=12, seed=7)[0][0]


def eager_greedy(model, prompt, n, budget=None):
    """The reference: one full forward of the whole sequence per new token, no cache."""
    if budget is not None:
        mq.set_budget(model, budget)
    ids = prompt.reshape(1, -1).clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            out.append(int(nxt))
            ids = torch.cat([ids, nxt[:, None]], 1)
    return out


@pytest.mark.parametrize("budget", [2.0, 3.3, 5.0, 8.0])
def test_greedy_equals_the_eager_model_at_a_budget(qmodel, prompt, budget):
    g = generate(qmodel, prompt, 12, budget=budget)
    assert g.tokens.shape == (1, 12) and g.prompt_tokens == 12 and g.graph == "off"
    assert g.tokens[0].tolist() == eager_greedy(qmodel, prompt, 12, budget)
    assert g.budgets == [budget] * 12
    assert g.timed_tokens == 11 and g.tokens_per_s > 0 and g.us_per_token > 0


def test_unquantized_model_and_budget_none(prompt):
    fp = build_tiny_llama(0)
    g = generate(fp, prompt.tolist(), 10)
    assert g.tokens[0].tolist() == eager_greedy(fp, prompt, 10)
    with pytest.raises(ValueError, match="no MoBiQuant linears"):
        generate(fp, prompt, 4, budget=4.0)


def test_prefill_is_one_forward_of_the_whole_prompt(qmodel, prompt):
    lengths = []
    hook = qmodel.model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        generate(qmodel, prompt, 6, budget=4.0)
    finally:
        hook.remove()
    assert lengths == [12, 1, 1, 1, 1, 1]


def test_budget_switch_between_tokens_is_honoured(qmodel, prompt):
    """Per-step list and callable: the achieved bits of each new token follow the budget in force (one token
    per step: budget 2 puts every linear at k=1, 8 at k=4, so the achieved bits are exact)."""
    g = generate(qmodel, prompt, 6, budget=[2.0, 2.0, 2.0, 8.0, 8.0, 2.0], track_bits=True)
    assert g.achieved_bits == pytest.approx([2.0, 2.0, 2.0, 8.0, 8.0, 2.0])
    g = generate(qmodel, prompt, 5, budget=lambda i: 8.0 if i % 2 else (2.0 if i == 0 else None), track_bits=True)
    assert g.budgets == [2.0, 8.0, 8.0, 8.0, 8.0]
    assert g.achieved_bits == pytest.approx([2.0, 8.0, 8.0, 8.0, 8.0])
    mid = generate(qmodel, prompt, 4, budget=[5.0, 3.0, 5.0, 3.0], track_bits=True)
    assert len(set(round(b, 6) for b in mid.achieved_bits)) > 1


def test_per_linear_thresholds_become_device_tensors(qmodel, prompt, monkeypatch):
    """A budget setter that gives some linears their own thresholds (a per-linear plan): generation honours
    them through 0-dim tensors written per budget, and still equals the eager model at a fixed budget."""
    from mobiquant.router import interp_tau

    real = mq.set_budget
    own = [m for _, m in mq.patching.mobi_linears(qmodel)][:5]

    def plan(model, b):
        real(model, b)
        for m in own:  # these linears run one bit above the global budget
            m.route_tau = interp_tau(m.router.bits_table, m.router.tau_table, min(b + 1.0, 8.0))

    monkeypatch.setattr(decode, "set_budget", plan)
    g = generate(qmodel, prompt, 8, budget=3.5)
    plan(qmodel, 3.5)
    ref = eager_greedy(qmodel, prompt, 8)
    assert g.tokens[0].tolist() == ref
    ctl = BudgetControl(qmodel)
    ctl.apply(3.5)
    holders = [m.route_tau for m in own]
    assert all(torch.is_tensor(t) and t.dim() == 0 for t in holders)
    ctl.apply(6.0)
    assert [m.route_tau for m in own] == holders  # the same tensors, new values
    expect = interp_tau(own[0].router.bits_table, own[0].router.tau_table, 7.0)
    assert float(own[0].route_tau) == pytest.approx(expect)
    others = [m for _, m in mq.patching.mobi_linears(qmodel) if m not in own]
    assert all(m.route_tau is None for m in others)
    mq.set_budget(qmodel, 4.0)  # leave the shared model as the library sets it


def test_sampling_is_seeded_and_top_k_one_is_greedy(qmodel, prompt):
    a = generate(qmodel, prompt, 10, budget=4.0, temperature=1.0, top_k=20, seed=3)
    b = generate(qmodel, prompt, 10, budget=4.0, temperature=1.0, top_k=20, seed=3)
    c = generate(qmodel, prompt, 10, budget=4.0, temperature=1.0, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    greedy = generate(qmodel, prompt, 10, budget=4.0)
    assert torch.equal(generate(qmodel, prompt, 10, budget=4.0, temperature=0.7, top_k=1, seed=0).tokens,
                       greedy.tokens)


def test_batch_rows_and_eos_stop(qmodel, prompt):
    two = torch.stack([prompt, prompt.flip(0)])
    g = generate(qmodel, two, 6, budget=4.0)
    assert g.tokens.shape == (2, 6)
    assert g.tokens[1].tolist() == eager_greedy(qmodel, prompt.flip(0), 6, 4.0)
    first = int(g.tokens[0, 2])
    stop = generate(qmodel, prompt, 6, budget=4.0, eos_token_id=first)
    assert stop.tokens[0].tolist() == g.tokens[0, :3].tolist()


def test_text_prompt_with_a_tokenizer():
    from mobiquant.tiny import tiny_llama

    model, tok = tiny_llama()
    g = generate(model, "hello", 5, tokenizer=tok)
    assert g.prompt_tokens == len(tok("hello").input_ids)
    assert isinstance(g.text, list) and len(g.text) == 1 and isinstance(g.text[0], str)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(budget=9.0), r"budget 9 is outside this model's range \[2, 8\]"),
        (dict(budget=1.0), r"outside this model's range"),
        (dict(budget=[4.0] * 3), "one entry per new token: 3 for max_new_tokens=6"),
        (dict(budget=[4.0] * 5 + [12.0]), "budget 12 is outside"),
        (dict(budget=lambda i: 9.5), "budget 9.5 is outside"),
        (dict(budget="4"), "budget must be"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(cache_len=10), "needs 17 cache positions, the cache holds 10"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(top_k=0), "top_k must be"),
        (dict(cuda_graph="graph"), "needs the model on a CUDA device"),
        (dict(cuda_graph="fast"), "cuda_graph must be one of"),
    ],
)
def test_bad_input_gives_one_clear_error(qmodel, prompt, kw, match):
    args = dict(max_new_tokens=6)
    args.update(kw)
    n = args.pop("max_new_tokens")
    with pytest.raises(ValueError, match=match):
        generate(qmodel, prompt, n, **args)


def test_bad_prompts(qmodel):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate(qmodel, "text", 3)
    with pytest.raises(ValueError, match="non-empty"):
        generate(qmodel, torch.zeros(1, 0, dtype=torch.long), 3)


def test_static_only_model_decodes_static_views(prompt):
    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, routers=False))
    mq.freeze(model)
    g = generate(model, prompt, 6, budget=4.0)
    mq.set_static(model, 2)
    assert g.tokens[0].tolist() == eager_greedy(model, prompt, 6)
    with pytest.raises(ValueError, match="not a static view"):
        generate(model, prompt, 3, budget=5.0)


# ------------------------------------------------------------------------------------------ task=decode
from mobiquant.__main__ import CONF_DIR  # noqa: E402  (also registers the config resolvers)


def decode_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=decode_smoke", "torch_threads=1", "logger=none", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def test_task_decode_writes_tokens_per_second_per_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = decode_cfg(tmp_path)
    metric = decode.run(cfg)
    df = pd.read_csv(tmp_path / "run" / "decode.csv")
    assert df["method"].tolist() == ["fp", "mobiquant", "mobiquant"]
    assert df["budget"].iloc[1:].tolist() == [3.0, 4.5]
    assert (df["new_tokens"] == 8).all() and (df["tokens_per_s"] > 0).all()
    assert df["avg_bits"].iloc[1] == pytest.approx(3.0) and 3.0 < df["avg_bits"].iloc[2] < 8.0
    assert df["x_fp"].iloc[0] == pytest.approx(1.0) and df["text"].map(lambda t: isinstance(t, str)).all()
    assert math.isclose(metric, df["tokens_per_s"].iloc[1:].mean(), rel_tol=1e-9)


def test_task_decode_from_a_saved_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from mobiquant.tiny import tiny_llama

    base, _ = tiny_llama()
    mq.quantize_model(base, mq.MoBiConfig(group_size=32, router_hidden=8))
    mq.calibrate_thresholds(base, [torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))])
    mq.freeze(base)
    mq.save_quantized(base, tmp_path / "ckpt", base_model="tiny")
    cfg = decode_cfg(tmp_path, f"decode.checkpoint={tmp_path / 'ckpt'}", "decode.fp=false", "decode.budgets=[3]")
    decode.run(cfg)
    df = pd.read_csv(tmp_path / "run" / "decode.csv")
    assert df["method"].tolist() == ["ckpt"] and df["budget"].tolist() == [3.0]
    cfg = decode_cfg(tmp_path, f"decode.checkpoint={tmp_path / 'ckpt'}", "decode.budgets=[9]")
    with pytest.raises(ValueError, match=r"outside what checkpoint .* serves"):
        decode.run(cfg)


def test_task_decode_rejects_bad_settings(tmp_path):
    for override, match in [("decode.max_new_tokens=0", "decode.max_new_tokens"),
                            ("decode.temperature=-1", "decode.temperature"),
                            ("decode.cuda_graph=always", "decode.cuda_graph"),
                            ("decode.budgets=[]", "decode.budgets"),
                            ("decode.prompt=''", "decode.prompt")]:
        with pytest.raises(ValueError, match=match):
            decode.run(decode_cfg(tmp_path, override))


# ------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_gpu_graph_decode_equals_eager_and_switches_without_recapture(dtype, prompt):
    """On CUDA: the captured decode step gives the eager path's greedy tokens at a budget, and one graph
    serves a per-token budget list (thresholds written on the device)."""
    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=32))
    mq.calibrate_thresholds(model, token_batches(4, batch=4, seqlen=32, seed=100))
    mq.freeze(model)
    model = model.to("cuda", dtype)
    for b in (2.0, 4.0, 8.0):
        eager = generate(model, prompt, 12, budget=b, cuda_graph="off")
        graph = generate(model, prompt, 12, budget=b, cuda_graph="graph")
        assert graph.graph == "graph" and graph.captures == 1
        assert torch.equal(graph.tokens, eager.tokens), b
    sched = [2.0, 8.0, 3.0, 6.0, 4.0, 2.0, 8.0, 5.0]
    g = generate(model, prompt, 8, budget=sched, cuda_graph="graph")
    assert g.graph == "graph" and g.captures == 1
    assert torch.equal(g.tokens, generate(model, prompt, 8, budget=sched, cuda_graph="off").tokens)
