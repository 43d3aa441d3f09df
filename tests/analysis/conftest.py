"""Compose the analysis presets (tiny random LLaMA) into runnable configs; one corpus cache per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from mobiquant.__main__ import CONF_DIR

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> Path:
    """Cleaned corpora are cached once for every analysis test (cleaning takes seconds)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def compose_cfg(corpus_cache):
    """``compose_cfg(out_dir, *overrides)``: the composed config with its run directory at ``out_dir``."""

    def make(out_dir: Path, *overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=list(overrides) + ["torch_threads=1"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
            cfg.paths.output_dir = str(out_dir)
            cfg.paths.cache_dir = str(corpus_cache)
            cfg.paths.shared_data_dir = str(SHARED)
        return cfg

    return make


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()


@pytest.fixture
def no_calibration(monkeypatch) -> None:
    """Make every calibration entry point fail: a resumed run must not reach one."""

    def fail(*args, **kwargs):
        raise AssertionError("calibrate_model was called")

    import mobiquant.methods.core as methods
    import mobiquant.tasks.analysis.outliers as outliers

    monkeypatch.setattr(methods, "calibrate_model", fail)
    monkeypatch.setattr(outliers, "calibrate_model", fail)
