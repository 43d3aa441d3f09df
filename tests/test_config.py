"""Compose the real configs with ``hydra.compose`` over every group option; validate; no work done."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from mobiquant.__main__ import CONF_DIR
from mobiquant.methods.core import QuantMethod
from mobiquant.tasks.session import ConfigError, instantiate_calib, validate

GROUPS = [
    "model",
    "quant",
    "router",
    "budget",
    "data",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "baselines",
    "experiment",
    "debug",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in Path(CONF_DIR, group).glob("*.yaml"))


def _compose(overrides, tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    # Resolve ${hydra:...} interpolations as they would be inside a run.
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.shared_data_dir = str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    return cfg


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), f"config group {g}/ is empty"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g) if g not in ("hydra",)])
def test_compose_each_option(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "model" and option == "local":
        (tmp_path / "config.json").write_text("{}")  # a Hugging Face folder, as far as the checks go
        overrides.append(f"model.path={tmp_path}")
    # options that evaluate on WikiText-2 from ../shared/data (the local data folder), which the checks
    # before work require to exist
    needs_shared = (
        group == "data"
        and "local" in option
        or option == "offline_wikitext2"
        or group == "experiment"
        and option in ("compare", "lm_eval_demo", "lm_eval_smoke", "outliers", "routers")
    )
    if needs_shared and not (Path(__file__).resolve().parents[1].parent / "shared" / "data").exists():
        pytest.skip("../shared/data is not beside the repository")
    cfg = _compose(overrides, tmp_path)
    OmegaConf.resolve(cfg)
    if group in ("paths", "hydra", "logger"):
        return
    if group == "data" and option == "hub_wikitext2":
        return  # hub corpora: composition only (no network here)
    methods, grid = validate(cfg)
    assert all(isinstance(m, QuantMethod) for m in methods)
    assert methods[0].budgets(grid)
    calib = instantiate_calib(cfg)
    assert calib.accelerator == cfg.trainer.accelerator


def test_quant_options_build_their_method(tmp_path):
    for opt in options("quant"):
        cfg = _compose([f"quant={opt}", "baselines=none"], tmp_path)
        methods, _ = validate(cfg)
        assert len(methods) == 1 and methods[0].name == cfg.quant.name
    cfg = _compose(["quant=mobiquant_a4", "baselines=none"], tmp_path)
    (method,), _ = validate(cfg)
    assert (method.mobi.anchor_bits, method.mobi.router_policy, method.mobi.slice_bits) == (4, "adjacent", (2, 2, 2, 2))


def test_default_places_one_router_a_block_and_the_paper_one_a_site(tmp_path):
    """The default configuration reads one router a block (``router: block``, measured level with ``site`` at the
    paper protocol and faster to decode); ``quant=mobiquant_paper`` keeps the paper's one router per input site
    whatever the router group says; ``router=site`` gives the default method the paper's placement."""
    placements = {}
    for overrides in ([], ["quant=mobiquant_paper"], ["quant=mobiquant_paper", "router=block"], ["router=site"]):
        (method,), _ = validate(_compose([*overrides, "baselines=none"], tmp_path))
        placements[" ".join(overrides)] = method.mobi.router_placement
    assert placements == {
        "": "block",
        "quant=mobiquant_paper": "site",
        "quant=mobiquant_paper router=block": "site",
        "router=site": "site",
    }


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("budget.budgets=[2,9]", "budget.budgets[1]=9"),
        ("budget.budgets=[]", "budget.budgets"),
        ("budget.budgets=[two]", "is not a number"),
        ("quant.mobi.slice_bits=[4,4,2]", "sum to 10"),
        ("quant.mobi.slice_bits=[2,0]", "slice_bits[1]"),
        ("group_size=0", "group_size=0"),
        ("data.calib.nsamples=-1", "data.calib.nsamples"),
        ("data.calib.corpus=nope", "unknown; allowed"),
        ("router.placement=everywhere", "router_placement"),
        ("calib.budget_sampling=random", "budget_sampling"),
    ],
)
def test_invalid_values_fail_before_work(override, fragment, tmp_path):
    cfg = _compose([override], tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert fragment in str(e.value)


def test_budget_outside_method_range(tmp_path):
    cfg = _compose(["quant.mobi.slice_bits=[3,1]", "budget.budgets=[2]"], tmp_path)
    with pytest.raises(ConfigError, match="none of budget.budgets"):
        validate(cfg)


def test_unknown_group_option_names_allowed(tmp_path):
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["quant=nonexistent"], tmp_path)
    assert "mobiquant" in str(e.value)  # Hydra lists the available options


def test_missing_text_file(tmp_path):
    extra = f"+data.eval.extra={{corpus: text_files, split: all, paths: [{tmp_path}/none.txt]}}"
    cfg = _compose(["data=offline", extra], tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        validate(cfg)


# ---------------------------------------------------------------------------- inputs checked before loading
def _text_corpus(tmp_path, name: str, data: bytes, where: str = "calib") -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    if where == "calib":
        return [
            "experiment=smoke",
            "data.calib.corpus=text_files",
            "data.calib.split=all",
            f"data.calib.paths=[{path}]",
        ]
    return ["experiment=smoke", f"+data.eval.extra={{corpus: text_files, split: all, paths: [{path}]}}"]


TEXT = ("Plenty of calibration text, one sentence after another. " * 20 + "\n").encode() * 4


@pytest.mark.parametrize(
    "name,data,where,fragments",
    [
        ("empty.txt", b"", "calib", ["data.calib.paths[0]", "empty.txt", "holds no text"]),
        ("blank.txt", b"  \n\t\n   \n", "eval", ["data.eval.extra.paths[0]", "blank.txt", "holds no text"]),
        ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1") * 50, "calib", ["latin1.txt", "not UTF-8", "0xe9"]),
        ("binary.bin", bytes(range(256)) * 8, "eval", ["binary.bin", "not UTF-8", "offset 0"]),
        ("short.txt", b"a few words\n", "calib", ["short.txt", "has 11 bytes", "data.calib.seqlen=64"]),
        ("short_eval.txt", b"a few words\n", "eval", ["short_eval.txt", "has 11 bytes", "eval.seqlen=64"]),
    ],
)
def test_text_files_checked_before_loading(tmp_path, name, data, where, fragments):
    """Empty, whitespace-only, binary or Latin-1 text files and text too short for one window: one line
    naming the key and the file, before the model or any text is loaded."""
    cfg = _compose(_text_corpus(tmp_path, name, data, where), tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text


def test_enough_text_passes_the_checks(tmp_path):
    cfg = _compose(_text_corpus(tmp_path, "ok.txt", TEXT) + ["data.calib.seqlen=512"], tmp_path)
    validate(cfg)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["data.calib.seqlen=10000000"], "data.calib.seqlen=10000000 is too long"),
        (["eval.seqlen=8192"], "eval.seqlen=8192 is longer than the model reads: at most 4096 tokens"),
        (["model.dtype=foo"], "model.dtype='foo' is invalid; allowed: float32"),
        (["model.device=gpu"], "model.device='gpu' is invalid"),
        (["quant.mobi.slice_bits=[2,2,2,2]", "calib.stage1_bits=5"], "calib.stage1_bits=5 is not a view"),
        (["calib.stage1_bits=3", "baselines=all"], "calib.stage1_bits=3 is not a view"),
        (["budget.budgets=[1.5,4]"], "budget.budgets[0]=1.5 is served by no method of this run"),
        (["data.calib.paths=[x.txt]"], "corpus wiki_extract takes no paths"),
        (["data.calib.split=test"], "data.calib.split='test' is invalid for corpus wiki_extract"),
        (["data.calib.corpus=text_files"], "data.calib.paths is not set"),
        (["eval.batch_size=0"], "eval.batch_size=0"),
        (["run.on_mismatch=overwrite"], "run.on_mismatch='overwrite' is invalid; allowed: refuse, new_subrun"),
    ],
)
def test_inputs_fail_before_the_model_loads(overrides, fragment, tmp_path, monkeypatch):
    """Lengths, dtypes, devices, stage-1 views, unreachable budgets and corpus settings: one line naming the
    key and what is allowed, from the checks that run before any model is loaded."""
    from mobiquant.tasks import session

    monkeypatch.setattr(session, "load_base_model", lambda cfg: pytest.fail("the model was loaded"))
    cfg = _compose(["experiment=smoke", *overrides], tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_preset_grid_keeps_budgets_other_layouts_serve(tmp_path):
    """A budget grid from a preset is shared by layouts (each method evaluates what it covers): budgets no
    method of this run serves are skipped with a warning, not refused; a list given on the command line is
    taken literally (above)."""
    from mobiquant.tasks.session import unserved_budgets

    cfg = _compose(["experiment=smoke", "baselines=none"], tmp_path)  # [2, 3, 4, 8]; slices [3, 1, ...]
    methods, grid = validate(cfg)
    assert unserved_budgets(methods, grid) == [(0, 2.0)]


def test_dtype_names_are_the_loaders():
    from mobiquant.configcheck import DTYPE_NAMES
    from mobiquant.io.models import DTYPES

    assert set(DTYPE_NAMES) == set(DTYPES)
