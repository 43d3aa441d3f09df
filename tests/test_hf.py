"""Hugging Face folders: `from_pretrained` after `import mobiquant` gives the in-memory quantized model, exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import mobiquant as mq
from mobiquant import hf
from mobiquant.elastic.plan import stack_plan
from mobiquant.patching import budget_plan, mobi_linears, routers
from tiny_models import build_tiny_llama, token_batches

SRC = Path(__file__).resolve().parents[1] / "src"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def quantized_llama(plan: bool = True, view_steps: bool = False):
    """A tiny random LLaMA, thresholds fitted, packed, with a budget plan (random thresholds: any plan will do)."""
    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=64, router_hidden=16, view_steps=view_steps))
    mq.calibrate_thresholds(model, token_batches(2, batch=4, seqlen=32, seed=7))
    mq.freeze(model)
    if plan:
        names = [n for n, m in mobi_linears(model) if m.router is not None]
        g = torch.Generator().manual_seed(1)
        grid = [2.0, 3.0, 4.5, 6.0, 8.0]
        per = [
            ({n: float(torch.randn((), generator=g)) for n in names}, dict.fromkeys(names, b), "allocated")
            for b in grid
        ]
        mq.install_plan(model, stack_plan(grid, per, {"per": "linear"}))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = quantized_llama()
    folder = mq.save_pretrained(model, tmp_path_factory.mktemp("hf") / "tiny", budget=4.3)
    return model, folder


@pytest.fixture
def ids():
    return token_batches(1, batch=2, seqlen=16, seed=1234)[0]


def test_from_pretrained_gives_the_in_memory_model_at_every_budget(saved, ids):
    model, folder = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert len(list(mobi_linears(loaded))) == 14 and len(list(routers(loaded))) == 8
    assert all(m.packed for _, m in mobi_linears(loaded))
    assert loaded.mobiquant_config.to_dict() == model.mobiquant_config.to_dict()
    assert loaded.mobiquant_sites == model.mobiquant_sites
    assert not hasattr(loaded, hf.PLAN_MODULE) and budget_plan(loaded) is not None
    assert torch.equal(budget_plan(loaded).taus, budget_plan(model).taus)
    mq.set_budget(model, 4.3)
    assert torch.equal(logits(loaded, ids), logits(model, ids))  # served on load: the folder's budget
    for budget in (2.9, 6.5):
        mq.set_budget(model, budget)
        mq.set_budget(loaded, budget)
        assert torch.equal(logits(loaded, ids), logits(model, ids))
    mq.set_budget(model, 3.5, uniform=True)  # without the plan: the routers' own tables came back too
    mq.set_budget(loaded, 3.5, uniform=True)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    mq.set_static(model, 2)
    mq.set_static(loaded, 2)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_a_pair_per_view_survives_the_folder(tmp_path, ids):
    model = quantized_llama(view_steps=True)
    assert all(m.scale.dim() == 3 for _, m in mobi_linears(model))
    loaded = AutoModelForCausalLM.from_pretrained(mq.save_pretrained(model, tmp_path / "hf", budget=3.5))
    assert loaded.mobiquant_config.view_steps and all(m.scale.dim() == 3 for _, m in mobi_linears(loaded))
    for budget in (3.5, 6.5):
        mq.set_budget(model, budget)
        mq.set_budget(loaded, budget)
        assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_folder_is_a_transformers_folder(saved):
    model, folder = saved
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    qc = config["quantization_config"]
    assert qc["quant_method"] == "mobiquant" and qc["format_version"] == hf.HF_FORMAT_VERSION
    assert qc["config"] == model.mobiquant_config.to_dict() and qc["budget"] == 4.3
    assert qc["plan"]["linears"] == budget_plan(model).linears and qc["compute_dtype"] == "float32"
    tensors = load_file(str(folder / "model.safetensors"))
    assert {f"{hf.PLAN_MODULE}.{k}" for k in ("budgets", "taus", "local")} <= tensors.keys()
    assert tensors["model.layers.1.mlp.down_proj.plane3"].dtype == torch.int32
    assert not any(k.endswith(".weight") and ".mlp." in k for k in tensors)  # no FP copy of a quantized linear


def test_save_pretrained_of_a_loaded_model_loads_again(saved, ids, tmp_path):
    model, folder = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    first, second = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "again/model.safetensors"))
    assert first.keys() == second.keys()
    for key, t in first.items():  # a router's `tau` is its current threshold: the budget served on load set it
        assert t.dtype == second[key].dtype and (key.endswith(".tau") or torch.equal(t, second[key])), key
    assert json.loads((tmp_path / "again/config.json").read_text())["quantization_config"]["budget"] == 4.3
    for budget in (3.25, 7.0):
        mq.set_budget(model, budget)
        mq.set_budget(again, budget)
        assert torch.equal(logits(again, ids), logits(model, ids))


def test_export_of_a_checkpoint_folder(tmp_path, ids):
    model = quantized_llama()
    ckpt = mq.save_quantized(model, tmp_path / "ckpt")
    out = mq.export_hf(ckpt, tmp_path / "hf", base_model=build_tiny_llama(0), budget=5.0)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    reference = mq.load_quantized(build_tiny_llama(0), ckpt)  # today's folders still read as before
    mq.set_budget(reference, 5.0)
    assert torch.equal(logits(loaded, ids), logits(reference, ids))
    mq.set_budget(reference, 2.5)
    mq.set_budget(loaded, 2.5)
    assert torch.equal(logits(loaded, ids), logits(reference, ids))
    with pytest.raises(mq.CheckpointError, match="different one"):  # the base model is checked
        mq.export_hf(ckpt, tmp_path / "bad", base_model=build_tiny_llama(1))


def test_export_command_with_the_base_model_the_checkpoint_names(tmp_path, capsys):
    from mobiquant.tiny import tiny_llama

    model, _ = tiny_llama()
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, router_hidden=8))
    mq.calibrate_thresholds(model, token_batches(2, batch=2, seqlen=16, seed=3))
    mq.freeze(model)
    ckpt = mq.save_quantized(model, tmp_path / "ckpt", base_model="tiny")  # what `model=tiny-llama` records
    assert hf.main(["export", str(ckpt), str(tmp_path / "hf"), "--budget", "3"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # the base model's tokenizer travels with it
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    mq.set_budget(model, 3.0)
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert torch.equal(logits(loaded, x), logits(model, x))
    capsys.readouterr()
    assert hf.main(["export", str(ckpt), str(tmp_path / "x"), "--base", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load the base model") and "\n" not in err


def test_budget_served_on_load_follows_the_environment(saved, ids, monkeypatch):
    model, folder = saved
    monkeypatch.setenv(hf.BUDGET_ENV, "3.5")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    mq.set_budget(model, 3.5)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    monkeypatch.setenv(hf.BUDGET_ENV, "12")
    with pytest.raises(mq.CheckpointError, match=r"MOBIQUANT_BUDGET=12: budget 12.0 is outside \[2, 8\]"):
        AutoModelForCausalLM.from_pretrained(folder)


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda qc: qc.update(extra=1), r"unknown field\(s\) \['extra'\]"),
        (lambda qc: qc.update(format_version=9), "format_version 9 is not one this mobiquant reads"),
        (lambda qc: qc.update(budget=1.0), r"budget 1.0 is outside \[2, 8\]"),
        (lambda qc: qc["config"].update(word_bits=16), "'config.word_bits' must be one of"),
        (lambda qc: qc["config"].update(group_size=32), r"q_proj.scale does not fit the config: expected shape"),
        (lambda qc: qc.update(sites="q"), "field 'sites' must be an array"),
    ],
)
def test_a_bad_quantization_config_is_named(saved, tmp_path, edit, match):
    import shutil

    folder = Path(shutil.copytree(saved[1], tmp_path / "copy"))
    _edit_config(folder, edit)
    with pytest.raises(mq.CheckpointError, match=match) as e:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(e.value)


def test_a_missing_tensor_is_named(saved, tmp_path):
    import shutil

    folder = Path(shutil.copytree(saved[1], tmp_path / "copy"))
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.mobi_routers.self_attn_q_proj.tau_table"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(mq.CheckpointError, match="no tensor 'model.layers.0.mobi_routers.self_attn_q_proj.tau_table'"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_only_packed_models_are_saved(tmp_path):
    model = mq.quantize_model(build_tiny_llama(0), mq.MoBiConfig(group_size=64))
    with pytest.raises(mq.CheckpointError, match="not packed"):
        mq.save_pretrained(model, tmp_path / "x")
    with pytest.raises(ValueError, match="not quantized by mobiquant"):
        mq.save_pretrained(build_tiny_llama(0), tmp_path / "y")


def test_import_mobiquant_registers_the_quantizer_when_transformers_loads(saved):
    """In a fresh interpreter: `import mobiquant` imports no transformers, and from_pretrained then works."""
    code = (
        "import sys, mobiquant\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(saved[1])!r})\n"
        "print(type(m.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "MoBiLinear"


def test_lm_eval_hf_model_loads_the_folder(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from mobiquant.tiny import tiny_llama

    model, tokenizer = tiny_llama()
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, router_hidden=8))
    mq.calibrate_thresholds(model, token_batches(2, batch=2, seqlen=16, seed=3))
    mq.freeze(model)
    folder = mq.save_pretrained(model, tmp_path / "hf", budget=4.0, tokenizer=tokenizer)
    lm = HFLM(pretrained=str(folder), batch_size=1, device="cpu")  # what `--model hf` builds
    mq.set_budget(model, 4.0)
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert torch.equal(logits(lm.model, x), logits(model, x))

    # `python -m mobiquant.hf lm_eval --budget B ARGS` hands ARGS to lm-eval's own command line
    import lm_eval.__main__

    seen = {}
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.update(argv=list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setenv(hf.BUDGET_ENV, "")  # undone after the test, whatever the command sets
    args = ["--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", "lambada_openai"]
    assert hf.main(["lm_eval", "--budget", "5", *args]) == 0
    assert seen["argv"] == ["lm-eval", *args] and os.environ[hf.BUDGET_ENV] == "5.0"
