"""The README's "Library in five lines" runs as written, on the tiny random LLaMA of conftest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mobiquant as mq
from tiny_models import build_tiny_llama, token_batches

README = Path(__file__).resolve().parents[1] / "README.md"


def library_block() -> str:
    text = README.read_text()
    section = text.split("## Library in five lines", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold one python block"
    return blocks[0]


def test_readme_library_block_runs_as_written(tmp_path, monkeypatch):
    code = library_block()
    assert "mq.calibrate(" in code and "..." not in code  # no elided step
    monkeypatch.chdir(tmp_path)
    model = build_tiny_llama(0)
    calib_ids = token_batches(1, batch=4, seqlen=32, seed=0)[0]
    ns = {"model": model, "calib_ids": calib_ids}  # the two names the README says to bring
    exec(compile(code, str(README), "exec"), ns)

    assert all(m.packed for _, m in mq.patching.mobi_linears(model))
    assert (tmp_path / "ckpt").is_dir() and any((tmp_path / "ckpt").glob("*.safetensors"))
    ids = token_batches(1, batch=2, seqlen=32, seed=7)[0]
    mq.reset_counts(model)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert abs(mq.achieved_bits(model) - 3.25) < 0.5  # the budget it set
    # the saved checkpoint reads back into a fresh FP copy of the base model, at the same budget
    loaded = mq.load_quantized(build_tiny_llama(0), tmp_path / "ckpt")
    mq.set_budget(loaded, 3.25)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits)
    # and the Hugging Face folder loads the ecosystem's way, serving the budget it was saved with
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, logits)


def test_calibrating_a_patched_model_equals_calibrating_the_fp_model():
    """quantize_model then calibrate (the README's order) gives the checkpoint calibrate gives on FP."""
    ids = token_batches(1, batch=4, seqlen=32, seed=0)[0]
    mobi = mq.MoBiConfig(slice_bits=(2, 2, 2, 2), group_size=32, router_hidden=8)
    settings = dict(epochs_stage1=1, epochs_stage2=1, progress_bar=False, threshold_windows=2, threshold_step=1.0)
    fp = build_tiny_llama(0)
    mq.calibrate(fp, ids, mobi, **settings)
    patched = mq.quantize_model(build_tiny_llama(0), mobi)
    mq.calibrate(patched, ids, **settings)  # the config it was patched with
    a, b = fp.state_dict(), patched.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_calibrate_errors():
    ids = token_batches(1, batch=2, seqlen=16, seed=0)[0]
    model = mq.freeze(mq.quantize_model(build_tiny_llama(0), mq.MoBiConfig(group_size=32)))
    with pytest.raises(ValueError, match="already packed"):
        mq.calibrate(model, ids, epochs_stage1=1)
    with pytest.raises(TypeError, match=r"unknown settings \['epoch'\]"):
        mq.calibrate(build_tiny_llama(0), ids, epoch=3)
