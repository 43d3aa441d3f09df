"""Quantized checkpoints: exact round trips and clear errors for damaged or mismatched folders."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import mobiquant as mq
from mobiquant.checkpoint import CONFIG_NAME, FORMAT_VERSION, TENSORS_NAME, sha256_file
from mobiquant.patching import mobi_linears, routers


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(params=[None, 4], ids=["paper-grid", "anchor4"])
def saved(request, tmp_path, make_llama, make_batches):
    """A calibrated, frozen tiny LLaMA at a fractional budget, saved to ``tmp_path / 'ckpt'``.

    Once with the paper's grid (integer zero points) and once anchored at 4 bits (fractional zero points).
    """
    model = make_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=64, anchor_bits=request.param))
    mq.calibrate_thresholds(model, make_batches(4, batch=4, seqlen=32, seed=7))
    mq.freeze(model)
    mq.set_budget(model, 4.3)
    folder = mq.save_quantized(model, tmp_path / "ckpt", base_model="tiny-random-llama")
    return model, folder


def test_round_trip_gives_identical_logits_routed_and_static(saved, make_llama, input_ids):
    model, folder = saved
    loaded = mq.load_quantized(make_llama(0), folder)
    assert all(m.packed for _, m in mobi_linears(loaded))
    assert len(list(mobi_linears(loaded))) == 14 and len(list(routers(loaded))) == 8
    assert loaded.mobiquant_sites == model.mobiquant_sites
    assert loaded.mobiquant_config.to_dict() == model.mobiquant_config.to_dict()
    # Routed at a fractional budget: the thresholds come back from the checkpoint's tables.
    for budget in (4.3, 2.9):
        mq.set_budget(model, budget)
        mq.set_budget(loaded, budget)
        assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))
    for (_, a), (_, b) in zip(routers(model), routers(loaded), strict=True):
        assert torch.equal(a.tau, b.tau) and torch.equal(a.bits_table, b.bits_table)
    # Static any-precision views.
    for k in (1, 2, 4):
        mq.set_static(model, k)
        mq.set_static(loaded, k)
        assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


def test_folder_contents_and_resave_holds_the_same_tensors(saved, make_llama, tmp_path):
    _, folder = saved
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, TENSORS_NAME])  # no temp files left behind
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["format"] == "mobiquant" and meta["format_version"] == FORMAT_VERSION
    assert meta["config"]["slice_bits"] == [2, 2, 2, 2] and meta["config"]["group_size"] == 64
    assert meta["base_model"]["name_or_path"] == "tiny-random-llama"
    assert meta["tensors"]["sha256"] == sha256_file(folder / TENSORS_NAME)
    assert meta["tensors"]["bytes"] == os.path.getsize(folder / TENSORS_NAME)
    loaded = mq.load_quantized(make_llama(0), folder)
    again = mq.save_quantized(loaded, tmp_path / "again", base_model="tiny-random-llama")
    # Byte-identical, though safetensors writes its metadata map in hash order (save_quantized sorts it).
    assert (again / TENSORS_NAME).read_bytes() == (folder / TENSORS_NAME).read_bytes()
    first, second = load_file(str(folder / TENSORS_NAME)), load_file(str(again / TENSORS_NAME))
    assert first.keys() == second.keys() and len(first) == meta["tensors"]["count"]
    for key, t in first.items():
        assert t.dtype == second[key].dtype and torch.equal(t, second[key]), key
    assert any(k.endswith(".plane3") for k in first) and any(k.endswith(".tau_table") for k in first)


def test_round_trip_of_another_architecture(tmp_path, make_opt, make_batches, input_ids):
    model = make_opt(0)
    mq.quantize_model(model, mq.MoBiConfig(slice_bits=(3, 1, 2, 2), group_size=32, word_bits=8))
    mq.calibrate_thresholds(model, make_batches(2, batch=4, seqlen=32, seed=8))
    mq.freeze(model)
    folder = mq.save_quantized(model, tmp_path / "opt")
    loaded = mq.load_quantized(make_opt(0), folder)
    mq.set_budget(model, 5.5)
    mq.set_budget(loaded, 5.5)
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))
    mq.set_static(model, 2)
    mq.set_static(loaded, 2)
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


def test_corrupted_byte_is_detected(saved, make_llama):
    _, folder = saved
    path = folder / TENSORS_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the tensor data, same size
    path.write_bytes(bytes(data))
    with pytest.raises(mq.CheckpointError, match="corrupted.*sha256"):
        mq.load_quantized(make_llama(0), folder)


def test_truncated_file_is_detected(saved, make_llama):
    _, folder = saved
    path = folder / TENSORS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(mq.CheckpointError, match="truncated"):
        mq.load_quantized(make_llama(0), folder)


def test_missing_tensor_file_is_detected(saved, make_llama):
    _, folder = saved
    (folder / TENSORS_NAME).unlink()
    with pytest.raises(mq.CheckpointError, match="missing"):
        mq.load_quantized(make_llama(0), folder)


def test_wrong_format_version_is_named(saved, make_llama):
    _, folder = saved
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(mq.CheckpointError, match=f"format version {FORMAT_VERSION + 1}"):
        mq.load_quantized(make_llama(0), folder)


def test_missing_or_invalid_json_is_detected(saved, make_llama, tmp_path):
    _, folder = saved
    cfg = folder / CONFIG_NAME
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])
    with pytest.raises(mq.CheckpointError, match="not valid JSON"):
        mq.load_quantized(make_llama(0), folder)
    cfg.unlink()
    with pytest.raises(mq.CheckpointError, match=f"no {CONFIG_NAME}"):
        mq.load_quantized(make_llama(0), folder)
    with pytest.raises(mq.CheckpointError, match="does not exist"):
        mq.load_quantized(make_llama(0), tmp_path / "nowhere")


def test_different_base_model_is_refused(saved, make_llama):
    _, folder = saved
    other = make_llama(1)  # same architecture, different random init
    with pytest.raises(mq.CheckpointError, match="base model"):
        mq.load_quantized(other, folder)
    # The refusal happens before anything is patched.
    assert not list(mobi_linears(other))


def test_saving_an_unfrozen_model_is_refused(make_llama, tmp_path):
    model = make_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=64))
    with pytest.raises(mq.CheckpointError, match="not packed"):
        mq.save_quantized(model, tmp_path / "x")
    assert not (tmp_path / "x" / CONFIG_NAME).exists()
