"""Quantized checkpoints: exact round trips and clear errors for damaged or mismatched folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mobiquant as mq
from mobiquant.io.checkpoint import CONFIG_NAME, FORMAT_VERSION, TENSORS_NAME, meta_digest, read_meta, sha256_file
from mobiquant.patching import mobi_linears, routers


def canonical_sha256(meta: dict) -> str:
    """sha256 of the canonical JSON of ``meta`` without ``meta_sha256``, computed as the format defines it."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def rewrite_meta(folder, edit, checksum: bool = True) -> dict:
    """Apply ``edit(meta)`` to ``folder``'s JSON and write it back, with a recomputed ``meta_sha256`` (an edit
    made on purpose, to reach the checks after the checksum) unless ``checksum`` is False."""
    path = folder / CONFIG_NAME
    meta = json.loads(path.read_text())
    edit(meta)
    if checksum:
        meta["meta_sha256"] = canonical_sha256(meta)
    path.write_text(json.dumps(meta, indent=2))
    return meta


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
    for m in (model, loaded):  # freeze and load both leave one launch per router site (q/k/v, gate/up)
        groups = {
            id(g): [n.rsplit(".", 1)[-1] for n, x in mobi_linears(m) if x._site_group is g]
            for _, lin in mobi_linears(m)
            if (g := lin._site_group) is not None
        }
        assert (
            sorted(map(tuple, groups.values())) == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
        )
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
    rewrite_meta(folder, lambda meta: meta.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(mq.CheckpointError, match=f"format version {FORMAT_VERSION + 1}"):
        mq.load_quantized(make_llama(0), folder)


@pytest.mark.parametrize("checksum", [True, False], ids=["rechecksummed", "no-checksum"])
def test_format_version_given_as_a_string_is_named(saved, make_llama, checksum):
    """``"format_version": "1"`` (a string) names the field and says to write the integer."""
    _, folder = saved

    def edit(meta):
        meta["format_version"] = str(meta["format_version"])
        if not checksum:
            meta.pop("meta_sha256")

    rewrite_meta(folder, edit, checksum=checksum)
    with pytest.raises(mq.CheckpointError) as e:
        mq.load_quantized(make_llama(0), folder)
    text = str(e.value)
    assert f"field 'format_version' is the string '{FORMAT_VERSION}'" in text and "without quotes" in text
    assert "\n" not in text


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_base_model_in_another_dtype_loads(saved, make_llama, input_ids, dtype):
    """A checkpoint saved from the fp32 model loads into the same model built in fp16 or bf16 (the decode task's
    ``model.dtype``): the record's embedding sample matches up to that dtype's rounding, and the logits are the
    fp32 reload's to that dtype's precision; another model in that dtype is still refused. A record from before
    the sample (fingerprint only) is refused with how to load it."""
    model, folder = saved
    loaded = mq.load_quantized(make_llama(0).to(dtype), folder)
    reference = mq.load_quantized(make_llama(0), folder)
    for m in (loaded, reference):
        mq.set_budget(m, 4.3)
    got, want = logits(loaded, input_ids).float(), logits(reference, input_ids)
    tol = 2e-3 if dtype == torch.float16 else 2e-2  # measured 5e-4 and 4.4e-3 on logits up to 0.6
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    with pytest.raises(mq.CheckpointError, match="different one$"):
        mq.load_quantized(make_llama(1).to(dtype), folder)
    meta = rewrite_meta(folder, lambda m: [m["base_model"].pop(k) for k in ("embedding_sample", "architecture_sha256")])
    assert "embedding_sample" not in meta["base_model"]
    with pytest.raises(mq.CheckpointError, match="calibrated in, float32, then cast it"):
        mq.load_quantized(make_llama(0).to(dtype), folder)
    mq.load_quantized(make_llama(0), folder)  # the exact fingerprint still serves the model as it was saved


def test_a_malformed_embedding_sample_is_named(saved, make_llama):
    _, folder = saved
    rewrite_meta(folder, lambda m: m["base_model"].update(embedding_sample=["a"]))
    with pytest.raises(mq.CheckpointError, match="'base_model.embedding_sample' must be a list of numbers"):
        mq.load_quantized(make_llama(0), folder)


def test_saving_an_unfrozen_model_is_refused(make_llama, tmp_path):
    model = make_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=64))
    with pytest.raises(mq.CheckpointError, match="not packed"):
        mq.save_quantized(model, tmp_path / "x")
    assert not (tmp_path / "x" / CONFIG_NAME).exists()


# ---------------------------------------------------------------------------- a checkpoint's JSON is checked
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One saved checkpoint (paper grid, g=64) per module; tests edit copies of it (:func:`ckpt`)."""
    from tiny_models import build_tiny_llama, token_batches

    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=64))
    mq.calibrate_thresholds(model, token_batches(2, batch=4, seqlen=32, seed=7))
    mq.freeze(model)
    mq.set_budget(model, 4.3)
    folder = mq.save_quantized(model, tmp_path_factory.mktemp("pristine") / "ckpt", base_model="tiny-random-llama")
    return model, folder


@pytest.fixture
def ckpt(pristine, tmp_path):
    model, folder = pristine
    return model, shutil.copytree(folder, tmp_path / "ckpt")


def refused(make_llama, folder, match):
    """Loading ``folder`` fails with one CheckpointError line matching ``match``, before anything is patched."""
    model = make_llama(0)
    with pytest.raises(mq.CheckpointError, match=match) as info:
        mq.load_quantized(model, folder)
    assert "\n" not in str(info.value)
    return model, str(info.value)


def test_json_carries_its_own_checksum(ckpt, make_llama, input_ids):
    model, folder = ckpt
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["meta_sha256"] == canonical_sha256(meta) == meta_digest(meta)
    assert read_meta(folder) == meta
    # Checkpoints written before the checksum existed (no key) still load, and give the same logits.
    rewrite_meta(folder, lambda m: m.pop("meta_sha256"), checksum=False)
    loaded = mq.load_quantized(make_llama(0), folder)
    mq.set_budget(loaded, 4.3)
    assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["config"].update(group_size=33),
        lambda m: m["base_model"].update(name_or_path="other"),
        lambda m: m.update(meta_sha256="0" * 64),
        lambda m: m.update(meta_sha256=7),
    ],
    ids=["config", "base-model", "other-digest", "digest-not-a-string"],
)
def test_edited_json_without_a_new_checksum_is_refused(ckpt, make_llama, edit):
    _, folder = ckpt
    rewrite_meta(folder, edit, checksum=False)
    model, _ = refused(make_llama, folder, f"{CONFIG_NAME} was modified after it was written")
    assert not list(mobi_linears(model))


@pytest.mark.parametrize(
    "name",
    ["../outside/" + TENSORS_NAME, "ABSOLUTE", "sub/" + TENSORS_NAME, "sub\\" + TENSORS_NAME, "..", ".", ""],
    ids=["dotdot", "absolute", "subfolder", "backslash", "parent", "self", "empty"],
)
def test_tensor_file_must_be_a_plain_name_in_the_folder(ckpt, make_llama, name, tmp_path):
    _, folder = ckpt
    # A complete, valid tensor file outside the folder: before the check, "../outside/..." loaded it.
    (tmp_path / "outside").mkdir()
    shutil.copy(folder / TENSORS_NAME, tmp_path / "outside" / TENSORS_NAME)
    name = str(tmp_path / "outside" / TENSORS_NAME) if name == "ABSOLUTE" else name
    rewrite_meta(folder, lambda m: m["tensors"].update(file=name))
    model, msg = refused(make_llama, folder, "field 'tensors.file' must be a plain file name inside the checkpoint")
    assert repr(name) in msg and not list(mobi_linears(model))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.pop("tensors"), r"required field 'tensors' is missing \(required: \['format', "),
        (lambda m: m.pop("sites"), r"required field 'sites' is missing"),
        (lambda m: m["tensors"].pop("sha256"), r"required field 'tensors.sha256' is missing"),
        (
            lambda m: m.update(comment="hi"),
            r"unknown top-level field\(s\) \['comment'\]; allowed: \['format', .*'plan'",
        ),
        (lambda m: m.update(config=[2, 2]), r"field 'config' must be object, got list"),
        (lambda m: m.update(plan="none"), r"field 'plan' must be object, got str"),
        (lambda m: m["tensors"].update(bytes="123"), r"field 'tensors.bytes' must be integer, got str"),
        (lambda m: m["tensors"].update(count=True), r"field 'tensors.count' must be integer, got bool"),
        (lambda m: m["tensors"].update(count=-1), r"field 'tensors.count' must be >= 0"),
        (lambda m: m["base_model"].update(fingerprint=None), r"field 'base_model.fingerprint' must be string"),
        (lambda m: m.update(sites=[["q_proj"]]), r"field 'sites' must be an array \(per block\) of arrays"),
        (
            lambda m: m.update(compute_dtype="Tensor"),
            r"field 'compute_dtype' must be one of \['float32', 'float16', 'bfloat16'\], got 'Tensor'",
        ),
        (lambda m: m.update(compute_dtype=16), r"field 'compute_dtype' must be string, got int"),
        (
            lambda m: m["config"].update(group_sise=32),
            r"unknown field\(s\) \['group_sise'\] in 'config'; allowed: \['slice_bits', 'group_size', ",
        ),
        (lambda m: m["config"].update(word_bits=16), r"field 'config.word_bits' must be one of \[8, 32\], got 16"),
        (lambda m: m["config"].update(group_size=0), r"field 'config' is invalid: group_size must be a positive"),
    ],
    ids=[
        "no-tensors",
        "no-sites",
        "no-tensors-sha256",
        "unknown-key",
        "config-type",
        "plan-type",
        "bytes-type",
        "count-bool",
        "count-negative",
        "fingerprint-type",
        "sites-shape",
        "compute-dtype-name",
        "compute-dtype-type",
        "config-unknown-key",
        "config-word-bits",
        "config-value",
    ],
)
def test_json_schema_is_checked(ckpt, make_llama, edit, match):
    _, folder = ckpt
    rewrite_meta(folder, edit)
    with pytest.raises(mq.CheckpointError, match=match):
        read_meta(folder)
    model, _ = refused(make_llama, folder, match)
    assert not list(mobi_linears(model))


@pytest.mark.parametrize(
    "config,match",
    [
        (  # today: loads and runs with wrong logits
            {"group_size": 33},
            r"checkpoint tensor model\.layers\.0\.self_attn\.q_proj\.scale does not fit the config: expected shape "
            r"\(64, 2\) float16 \(config group_size=33, in_features=64, out_features=64\), stored \(64, 1\) float16",
        ),
        (  # today: a shape traceback at the first forward
            {"slice_bits": [3, 3, 1, 1]},
            r"checkpoint tensor model\.layers\.0\.self_attn\.q_proj\.plane0 does not fit the config: expected shape "
            r"\(64, 7\) int32 \(config slice_bits\[0\]=3, word_bits=32, in_features=64, out_features=64\), "
            r"stored \(64, 4\) int32",
        ),
        (
            {"word_bits": 8},
            r"q_proj\.plane0 does not fit the config: expected shape \(64, 16\) uint8 \(config slice_bits\[0\]=2, "
            r"word_bits=8, .*stored \(64, 4\) int32",
        ),
    ],
    ids=["group-size", "slice-bits", "word-bits"],
)
def test_config_is_checked_against_the_stored_tensors(ckpt, make_llama, config, match):
    _, folder = ckpt
    rewrite_meta(folder, lambda m: m["config"].update(config))
    refused(make_llama, folder, match)


def test_the_embedding_sample_reaches_the_last_value_of_a_large_table():
    """``base_sample`` strides over the whole embedding with integer arithmetic: at more than 2^24 values (a float
    index would round past the end) it takes 512 values, the first and the last included."""
    from mobiquant.io.checkpoint import base_sample

    class Embedded(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.emb = torch.nn.Embedding(n, 1, _weight=torch.arange(n, dtype=torch.float32)[:, None])

        def get_input_embeddings(self):
            return self.emb

    n = (1 << 24) + 3
    sample = base_sample(Embedded(n))["embedding_sample"]
    assert len(sample) == 512 and sample[0] == 0.0 and sample[-1] == float(n - 1)
    assert base_sample(Embedded(3))["embedding_sample"] == [0.0, 1.0, 2.0]
