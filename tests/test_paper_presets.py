"""The paper presets (experiment=paper_*) compose, validate and follow the paper's protocol; nothing is
downloaded (the hub is switched off for these tests)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from mobiquant.__main__ import CONF_DIR
from mobiquant.tasks.session import instantiate_calib, validate

PRESETS = {
    "paper_llama2_7b": "meta-llama/Llama-2-7b-hf",
    "paper_llama3_8b": "meta-llama/Meta-Llama-3-8B",
    "paper_llama32_1b": "meta-llama/Llama-3.2-1B",
}


@pytest.fixture(autouse=True)
def hub_off(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def preset(name: str, tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path)
    OmegaConf.resolve(cfg)
    return cfg


@pytest.mark.parametrize("name,hub", sorted(PRESETS.items()))
def test_paper_preset_follows_the_protocol(name, hub, tmp_path):
    cfg = preset(name, tmp_path)
    methods, grid = validate(cfg)
    assert cfg.model.path == hub and cfg.model.dtype == "bfloat16" and cfg.model.device == "cuda"
    # 128 x 2048 tokens of WikiText-2 train from the hub; WikiText-2 test in 2048-token windows
    assert (cfg.data.calib.corpus, cfg.data.calib.split) == ("wikitext2", "train")
    assert (cfg.data.calib.nsamples, cfg.data.calib.seqlen) == (128, 2048)
    assert (cfg.data.eval.wikitext2.corpus, cfg.data.eval.wikitext2.split) == ("wikitext2", "test")
    assert cfg.eval.seqlen == 2048
    # 20 epochs, batch 1, g128, slices 2-2-2-2, bf16 training on one GPU
    calib = instantiate_calib(cfg)
    assert calib.epochs_stage1 + calib.epochs_stage2 == 20 and calib.batch_size == 1
    assert (calib.accelerator, calib.precision) == ("gpu", "bf16-mixed")
    main = methods[0]
    assert main.name == "mobiquant" and list(main.mobi.slice_bits) == [2, 2, 2, 2] and main.mobi.group_size == 128
    assert main.budgets(grid) == [2, 2.5, 3, 3.5, 4, 5, 6, 8]
    # baselines: FP, RTN, GPTQ and LWC at every integer bit-width (LWC with the same 20 epochs), any-precision
    by_name = {m.name: m for m in methods}
    assert {"fp", "rtn", "gptq", "lwc", "matryoshka", "mobiquant_static"} <= set(by_name)
    for name_ in ("rtn", "gptq", "lwc"):
        assert by_name[name_].budgets(grid) == [2, 3, 4, 5, 6, 8] and by_name[name_].group_size == 128
    assert by_name["lwc"].calib_overrides == {"epochs_stage1": 20, "epochs_stage2": 0}


def test_paper_preset_lm_eval_tasks_are_known_to_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    from mobiquant.tasks.lm_eval import validate_lm_eval

    plan = validate_lm_eval(preset("paper_llama32_1b", tmp_path, "task=lm_eval"))
    assert plan.tasks == ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"]
    assert plan.budgets == [2, 3, 4] and plan.main == "mobiquant"
