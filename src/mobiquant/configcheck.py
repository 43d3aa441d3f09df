"""Configuration checks that run before any work: one line naming the key and what it allows.

``preflight(argv)`` composes the command line's config the way Hydra will (before Hydra creates a run
folder and before any W&B run exists) and returns the first problem as one line, or None:

* an unknown key (``calib.epoch=3``): "did you mean `epochs_stage1`", from the keys that exist there;
* an unknown group option (``quant=nope``): the options of the group;
* a required value left open (``model=local`` without ``model.path``);
* a value of the wrong type for the class the node builds (``calib.epochs_stage1=abc``): the class's own
  field types (``CalibConfig``, the methods' constructors) are the schema;
* a model folder or data file that does not exist, naming the override that sets it.

``check_config(cfg)`` runs the last three on a composed config; ``pipeline.validate`` calls it, so every
job of a sweep checks its own values too.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid; raised before any work starts."""


# Nodes built from `_target_` whose keys and types are checked against the class (loggers are Lightning's).
SCHEMA_NODES = ("calib", "quant", "baselines")
#: Keys of the `trainer` group that are mobiquant's own settings, not `lightning.Trainer` arguments.
TRAINER_OWN_KEYS = ("float32_matmul_precision",)


# ---------------------------------------------------------------------------- helpers
def did_you_mean(word: str, choices) -> str:
    """`` did you mean `a` or `b`?`` for the choices close to ``word`` (or that start with it), else ``""``."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)  # the closest first
    close += sorted(c for c in choices if word and (c.startswith(word) or word.startswith(c)))
    close = list(dict.fromkeys(close))[:3]
    return f"; did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else ""


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple) or (origin is not None and getattr(origin, "__name__", "") == "Sequence"):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = _type_name(args[0]) if args else ""
        plural = {"an integer": "integers", "a number": "numbers", "a string": "strings"}.get(item, item)
        return f"a list of {plural}" if args else "a list"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _fits(value: Any, tp) -> bool:
    """Whether a plain config value can be given for annotation ``tp`` (unknown annotations accept all)."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return any(_fits(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is dict or origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if origin in (list, tuple) or (origin is not None and getattr(origin, "__name__", "") in ("Sequence",)):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return not args or all(_fits(v, args[0]) for v in value)
    if tp is list or tp is tuple:
        return isinstance(value, (list, tuple))
    return True  # a class we do not model (torch.dtype, ...): left to the constructor


def _fields(target) -> tuple[dict[str, Any], bool]:
    """``{name: annotation}`` of what ``target`` accepts, and whether it also takes ``**kwargs``."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: names only
        hints = {}
    params = inspect.signature(target).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        n: hints.get(n, p.annotation if isinstance(p.annotation, type) else Any)
        for n, p in params.items()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    return named, var_kw


def _dataclass_in(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def check_node(key: str, node: dict, target, sources: dict[str, str] | None = None) -> None:
    """``node``'s keys and value types against ``target``'s signature (a dataclass: its fields).
    ``sources``: for values copied by interpolation, the key they come from (named in the error)."""
    fields, var_kw = _fields(target)
    name = getattr(target, "__name__", str(target))
    for k, v in node.items():
        if str(k).startswith("_"):
            continue
        if k not in fields:
            if var_kw:
                continue
            raise ConfigError(f"{key}.{k} is not a setting of {key} ({name}){did_you_mean(str(k), fields)}")
        tp = fields[k]
        sub = _dataclass_in(tp)
        if sub is not None and isinstance(v, dict):
            check_node(f"{key}.{k}", v, sub)
            continue
        if not _fits(v, tp):
            src = (sources or {}).get(str(k))
            name = f"{src}={v!r} (as {key}.{k})" if src else f"{key}.{k}={v!r}"
            raise ConfigError(f"{name} is invalid: expected {_type_name(tp)}")


def _target_of(node) -> Any:
    from hydra.utils import get_class, get_method

    path = str(node["_target_"])
    try:
        return get_class(path)
    except Exception:  # noqa: BLE001 - a function target
        try:
            return get_method(path)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"_target_ {path} cannot be imported: {e}") from e


def check_schema(cfg: DictConfig) -> None:
    """Keys and types of the nodes built from ``_target_`` (``calib``, ``quant``, ``baselines.*``)."""
    nodes = []
    for key in SCHEMA_NODES:
        node = cfg.get(key)
        if node is None:
            continue
        if "_target_" in node:
            nodes.append((key, node))
        else:  # baselines: a mapping of quant nodes
            nodes += [(f"{key}.{k}", v) for k, v in node.items() if isinstance(v, DictConfig) and "_target_" in v]
    for key, node in nodes:
        try:
            plain = OmegaConf.to_container(node, resolve=True)
        except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
            raise ConfigError(f"{key}: {e}".splitlines()[0]) from e
        sources = {}
        for k in node.keys():  # `budgets: ${budget.budgets}`: an error names budget.budgets
            raw = node._get_node(k)
            if raw is not None and raw._is_interpolation():
                m = re.fullmatch(r"\$\{([A-Za-z0-9_.]+)\}", str(raw._value()))
                if m:
                    sources[str(k)] = m.group(1)
        check_node(key, plain, _target_of(node), sources)


def _resolved(key: str, node) -> dict:
    try:
        plain = OmegaConf.to_container(node, resolve=True)
    except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
        raise ConfigError(f"{key}: {e}".splitlines()[0]) from e
    if not isinstance(plain, dict):
        raise ConfigError(f"{key} must be a mapping, got {plain!r}")
    return plain


def check_trainer(cfg: DictConfig) -> None:
    """The `trainer` group: a `lightning.Trainer` (or subclass) whose arguments exist and have the right types,
    none that calibration owns, and the ones `calib` carries alike in both."""
    node = cfg.get("trainer")
    if node is None:
        return
    import lightning as L

    from .calibration import check_trainer_args

    plain = _resolved("trainer", node)
    target = _target_of(node) if "_target_" in node else L.Trainer
    if not (inspect.isclass(target) and issubclass(target, L.Trainer)):
        raise ConfigError(f"trainer._target_={node['_target_']} is not lightning.Trainer or a subclass of it")
    args = {k: v for k, v in plain.items() if k not in TRAINER_OWN_KEYS and not str(k).startswith("_")}
    calib = _resolved("calib", cfg.calib) if cfg.get("calib") is not None else {}
    try:
        check_trainer_args(args, {k: calib[k] for k in calib if not str(k).startswith("_")})
    except ValueError as e:
        raise ConfigError(str(e)) from e
    check_node("trainer", args, target)


def check_callbacks(cfg: DictConfig) -> None:
    """The `callbacks` group: name -> a `_target_` node building a Lightning callback, with its own arguments."""
    node = cfg.get("callbacks")
    if node is None:
        return
    if not isinstance(node, DictConfig):
        raise ConfigError(f"callbacks must be a mapping of name -> {{_target_: ...}}, got {node!r}")
    from lightning.pytorch.callbacks import Callback, LearningRateMonitor

    for name, cb in node.items():
        key = f"callbacks.{name}"
        if cb is None:
            continue
        if not isinstance(cb, DictConfig) or "_target_" not in cb:
            raise ConfigError(f"{key} must be a node with a `_target_` (a Lightning callback class), got {cb!r}")
        try:
            target = _target_of(cb)
        except ConfigError as e:
            raise ConfigError(f"{key}.{e}") from e
        if not (inspect.isclass(target) and issubclass(target, Callback)):
            raise ConfigError(f"{key}._target_={cb._target_} is not a Lightning callback (lightning.pytorch.Callback)")
        check_node(key, _resolved(key, cb), target)
        if issubclass(target, LearningRateMonitor) and not cfg.get("logger"):
            raise ConfigError(
                f"{key} (LearningRateMonitor) logs to the Trainer's logger, and logger=none has none: "
                "choose logger=wandb or logger=csv"
            )


# ---------------------------------------------------------------------------- values left open, paths
def missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys still ``???`` (mandatory values nobody set), outside the ``hydra`` node."""
    out = []
    for k in cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg)):
        key = f"{prefix}.{k}" if prefix else str(k)
        if key == "hydra":
            continue
        if OmegaConf.is_missing(cfg, k):
            out.append(key)
            continue
        try:
            child = cfg._get_node(k)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_missing() and not child._is_none():
            out += missing_keys(child, key)
    return out


REQUIRED_HINT = {
    "model.path": "model=local needs model.path=<a local Hugging Face folder, a .gguf file or a hub id> "
    "(e.g. model.path=/models/Llama-3.2-1B)",
}


def check_required(cfg: DictConfig) -> None:
    for key in missing_keys(cfg):
        raise ConfigError(f"{key} is not set: {REQUIRED_HINT.get(key, f'set {key}=<value> on the command line')}")


def _looks_local(path: str) -> bool:
    return (
        path.startswith(("/", "./", "../", "~"))
        or os.sep in path.rstrip(os.sep)
        and Path(path).exists()
        or path.endswith(".gguf")
    )


#: The ``model.dtype`` names a model loads in (the keys of ``mobiquant.io.models.DTYPES``).
DTYPE_NAMES = ("float32", "fp32", "float", "float16", "fp16", "half", "bfloat16", "bf16")
#: ``model.device``: a torch device a model is moved to.
DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")
#: No model here reads windows longer than this (tokens): a larger ``seqlen`` is a typo.
MAX_SEQLEN = 1 << 20
#: Tokens a tokenizer may add to a text beside its bytes (BOS, EOS, a prefix space): every tokenizer in
#: use gives at most one token per UTF-8 byte of the text plus these.
TOKEN_SLACK = 8


def check_model(cfg: DictConfig) -> None:
    """``model.path``: a local folder must exist and hold a Hugging Face config; a hub id is left to loading.
    ``model.dtype`` and ``model.device``: names a model can be loaded in and moved to."""
    model = cfg.get("model")
    if model is None:
        return
    dtype = model.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype.lower().removeprefix("torch.") not in DTYPE_NAMES:
        raise ConfigError(f"model.dtype={dtype!r} is invalid; allowed: {', '.join(DTYPE_NAMES)}")
    device = model.get("device", "cpu")
    if not isinstance(device, str) or not DEVICE_RE.match(device):
        raise ConfigError(f"model.device={device!r} is invalid; allowed: cpu, cuda, cuda:<n>, mps")
    if OmegaConf.is_missing(model, "path"):
        return
    path = str(model.path)
    if path == "tiny" or not _looks_local(path):
        return  # the tiny test model, a built-in name (smollm2-135m) or a hub id (org/name)
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            f"model.path={path} does not exist: set model.path to a local Hugging Face folder, "
            "a .gguf file or a hub id (org/name)"
        )
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"model.path={path} is a folder without config.json: not a Hugging Face model folder")
    if p.is_file() and p.suffix != ".gguf":
        raise ConfigError(f"model.path={path} is a file but not a .gguf: give its Hugging Face folder instead")


def path_hint(cfg: DictConfig, path: str) -> str:
    """The override that moves ``path``: ``paths.shared_data_dir`` for files under it, else the file's key."""
    shared = OmegaConf.select(cfg, "paths.shared_data_dir", default=None, throw_on_resolution_failure=False)
    if shared and os.path.abspath(str(path)).startswith(os.path.abspath(str(shared)) + os.sep):
        return (
            f"; paths.shared_data_dir={shared} holds no such file: set paths.shared_data_dir=<the folder "
            "holding wikitext-2-raw/ and ptb/> (or MOBIQUANT_SHARED_DATA)"
        )
    if not os.path.isabs(str(path)):
        return f" (relative to {os.getcwd()}: give an absolute path)"
    return ""


def scan_text_file(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(bytes, lines)`` of the non-empty lines of a UTF-8 text file (line ends left out). A file that is
    not UTF-8 text (a binary or Latin-1 file) raises ``ValueError`` naming the file and the first bad byte."""
    n_bytes = n_lines = offset = 0
    with open(path, "rb") as fh:
        for raw in fh:
            bad = raw.find(b"\0")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = e.start if bad < 0 else min(bad, e.start)
            if bad >= 0:
                raise ValueError(
                    f"file {path} is not UTF-8 text: byte 0x{raw[bad]:02x} at offset {offset + bad} (a binary or "
                    "Latin-1 file?); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                )
            offset += len(raw)
            if line.strip():
                n_lines += 1
                n_bytes += len(line.rstrip("\r\n").encode("utf-8"))
    return n_bytes, n_lines


#: Corpora read from local files (``paths``); the others take no paths.
FILE_CORPORA = ("text_files",)
#: Corpora that accept only the splits calib, eval, all (the hub corpora also take their own split names).
LOCAL_SPLITS = {"wiki_extract": ("calib", "eval", "all"), "text_files": ("calib", "eval", "all")}


def _spec_text_bytes(cfg: DictConfig, key: str, spec) -> int | None:
    """Check a corpus spec's ``paths`` (set exactly for text files, existing, UTF-8, not empty); returns
    the bytes of text its files hold (None: not a local file corpus)."""
    corpus = spec.get("corpus")
    paths = spec.get("paths")
    split = spec.get("split")
    if isinstance(corpus, str) and corpus in LOCAL_SPLITS and split is not None and split not in LOCAL_SPLITS[corpus]:
        raise ConfigError(
            f"{key}.split={split!r} is invalid for corpus {corpus}; allowed: {', '.join(LOCAL_SPLITS[corpus])}"
        )
    if paths is not None and not isinstance(paths, (list, ListConfig)):
        paths = [paths]
    if corpus in FILE_CORPORA and not paths:
        raise ConfigError(
            f"{key}.paths is not set: corpus {corpus} reads local UTF-8 files ({key}.paths=[<file>, ...])"
        )
    if paths and corpus not in FILE_CORPORA:
        raise ConfigError(
            f"{key}.paths={list(paths)} is set, but corpus {corpus} takes no paths: use {key}.corpus=text_files "
            f"for local files, or {key}.paths=null"
        )
    total = 0
    for i, p in enumerate(paths or []):
        path = Path(str(p)).expanduser()
        if not path.exists():
            raise ConfigError(f"{key}.paths[{i}]: file {p} does not exist{path_hint(cfg, str(p))}")
        if not path.is_file():
            raise ConfigError(f"{key}.paths[{i}]: {p} is not a file")
        try:
            n_bytes, n_lines = scan_text_file(path)
        except ValueError as e:
            raise ConfigError(f"{key}.paths[{i}]: {e}") from None
        except OSError as e:
            raise ConfigError(f"{key}.paths[{i}]: cannot read {p}: {e.strerror or e}") from None
        if n_lines == 0:
            raise ConfigError(f"{key}.paths[{i}]: file {p} holds no text (it is empty or whitespace only)")
        total += n_bytes + 2 * (n_lines - 1) + (2 if i else 0)  # the documents are joined by a blank line
    return total if paths else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_data(cfg: DictConfig) -> None:
    """Every text file a corpus reads (``data.calib.paths``, ``data.eval.<name>.paths``) exists, is UTF-8
    text and holds enough of it for one window (at most one token per byte); ``paths`` is given exactly
    for the corpus that reads files."""
    data = cfg.get("data")
    if data is None:
        return
    specs = [("data.calib", data.get("calib"))] + [(f"data.eval.{k}", v) for k, v in (data.get("eval") or {}).items()]
    for key, spec in specs:
        if spec is None:
            continue
        n_bytes = _spec_text_bytes(cfg, key, spec)
        if n_bytes is None:
            continue
        if key == "data.calib":
            seqlen, seqlen_key, need = _int_or_none(spec.get("seqlen")), "data.calib.seqlen", 1
        else:
            seqlen, seqlen_key, need = _int_or_none((cfg.get("eval") or {}).get("seqlen")), "eval.seqlen", 0
        if seqlen is not None and n_bytes + TOKEN_SLACK < seqlen + need:
            what = "one calibration window needs seqlen + 1" if need else "one evaluation window needs"
            raise ConfigError(
                f"{key}.paths: the text of {', '.join(str(p) for p in spec.paths)} has {n_bytes} bytes, so at most "
                f"about {n_bytes + TOKEN_SLACK} tokens, but {what} = {seqlen + need} tokens ({seqlen_key}={seqlen}): "
                f"give more text or a shorter {seqlen_key}"
            )
    if str(cfg.get("task", "")) == "lm_eval" and cfg.get("lm_eval") is not None:
        from .lm_eval_tasks import LOCAL_TASKS  # the local tasks built from a text file

        for task in cfg.lm_eval.get("tasks") or []:
            key = LOCAL_TASKS.get(str(task))
            path = (cfg.lm_eval.get("data") or {}).get(key) if key else None
            if path and not Path(str(path)).is_file():
                raise ConfigError(
                    f"lm_eval.data.{key}: file {path} does not exist (task {task!r} is built from it)"
                    f"{path_hint(cfg, str(path))}"
                )


def _config_context(config: dict) -> int | None:
    for node in (config.get("text_config") or {}, config):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = node.get(key) if isinstance(node, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def model_context(cfg: DictConfig) -> tuple[int, str] | None:
    """The longest window ``model.path`` reads and where that number comes from, when it can be told
    before loading: the tiny model, a local Hugging Face folder, a built-in model already converted."""
    model = cfg.get("model")
    if model is None or OmegaConf.is_missing(model, "path"):
        return None
    path = str(model.path)
    if path == "tiny":
        from .tiny import MAX_POSITIONS

        return MAX_POSITIONS, "the tiny model's max_position_embeddings"
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        try:
            from .io.models import KNOWN_MODELS, cache_root

            known = KNOWN_MODELS.get(path)
            cache = OmegaConf.select(cfg, "paths.cache_dir", default=None, throw_on_resolution_failure=False)
            folder = cache_root(cache) / "models" / known.folder if known is not None else folder
        except Exception:  # noqa: BLE001 - no registry here: unknown
            return None
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        n = _config_context(json.loads(config_file.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
    return (n, f"max_position_embeddings in {config_file}") if n else None


def check_lengths(cfg: DictConfig) -> None:
    """``data.calib.seqlen`` and ``eval.seqlen`` within the model's context (where it is known before
    loading) and under :data:`MAX_SEQLEN`."""
    context = None
    for key in ("data.calib.seqlen", "eval.seqlen"):
        seqlen = _int_or_none(OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False))
        if seqlen is None:
            continue
        if seqlen > MAX_SEQLEN:
            raise ConfigError(f"{key}={seqlen} is too long: at most {MAX_SEQLEN} tokens (and the model's context)")
        context = context or model_context(cfg)
        if context is not None and seqlen > context[0]:
            raise ConfigError(
                f"{key}={seqlen} is longer than the model reads: at most {context[0]} tokens ({context[1]})"
            )


def check_config(cfg: DictConfig, schema: bool = True) -> None:
    """Required values, the model path, dtype and device, the data files and window lengths, and
    (``schema``) the ``_target_`` nodes' keys and types of ``cfg``."""
    check_required(cfg)
    check_model(cfg)
    check_data(cfg)
    check_lengths(cfg)
    if schema:
        check_schema(cfg)
        check_trainer(cfg)
        check_callbacks(cfg)


def explicit_overrides() -> list[str]:
    """The keys this job's command line (or sweeper) set, outside Hydra: ``[]``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        return [str(o).lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task]
    except Exception:  # noqa: BLE001 - a partial Hydra config
        return []


# ---------------------------------------------------------------------------- the command line
def _composition_message(e: Exception) -> str:
    """Hydra's composition errors as one line, with "did you mean" for unknown keys and group options."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    text = str(e)
    cause = e.__cause__
    while cause is not None and not isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        cause = cause.__cause__
    m = re.search(r"Could not override '([^']+)'", text)
    if m and cause is not None:
        full = m.group(1)
        parent_key, _, leaf = full.rpartition(".")
        if parent_key == "trainer":
            from .calibration import OWNED_TRAINER_ARGS

            if leaf in OWNED_TRAINER_ARGS:
                return f"{full} is set by calibration for every block: {OWNED_TRAINER_ARGS[leaf]}"
        keys = _keys_at(parent_key)
        where = f"`{parent_key}`" if parent_key else "the config"
        value = re.search(r"use \+\S+?=(.*)$", text, flags=re.M)
        plus = f" (to add a new key: +{full}={value.group(1)})" if value else ""
        return f"{full} is not a key of {where}{did_you_mean(leaf, keys)}{plus}"
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        allowed = f"; allowed: {', '.join(options)}" if options else ""
        return f"{group}={option} is unknown{did_you_mean(option, options) if options else ''}{allowed}"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first


_BASE: DictConfig | None = None


def _keys_at(key: str) -> list[str]:
    node = (
        _BASE
        if not key
        else OmegaConf.select(_BASE, key, default=None, throw_on_resolution_failure=False)
        if _BASE is not None
        else None
    )
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


class PlainMessage(str):
    """A :func:`preflight` answer that is not a configuration error (a run folder in use, or made by
    another configuration): printed without "invalid configuration"."""


def _check_run_folder(cfg: DictConfig, extra_overrides: list[str] | None) -> None:
    """The run folder Hydra is about to write (``hydra.run.dir``): not in use by another process, and made
    by this configuration (or, with ``run.on_mismatch=new_subrun``, the sub-run it moves to, added to
    ``extra_overrides`` as ``hydra.run.dir``), before Hydra writes its own files (``.hydra/``, the log) there."""
    from .dist import is_rank_zero
    from .io.runfolder import probe_lock, resolve_folder

    if not is_rank_zero():  # a DDP rank started by rank 0, which holds the folder: it follows rank 0 there
        return
    run_dir = OmegaConf.select(cfg, "hydra.run.dir", default=None, throw_on_resolution_failure=False)
    if not run_dir or not Path(str(run_dir)).is_dir():
        return
    folder = Path(str(run_dir))
    probe_lock(folder)
    target = resolve_folder(folder, cfg, str(OmegaConf.select(cfg, "run.on_mismatch", default="refuse")))
    if target != folder:
        probe_lock(target)
        if extra_overrides is not None:
            extra_overrides.append(f"hydra.run.dir={json.dumps(str(target))}")


def preflight(argv: list[str], conf_dir: str, tasks=None, extra_overrides: list[str] | None = None) -> str | None:
    """The first configuration problem of the command line ``argv`` as one line, or None (see the module
    docstring). Help, ``--cfg`` and other informational flags are left to Hydra. In a multirun, the keys
    that are swept are left to each job's own checks, so one bad value fails its job and not the sweep.
    A single run (of any task) also checks its run folder (:func:`_check_run_folder`); overrides that
    Hydra must be given in addition are appended to ``extra_overrides``."""
    global _BASE
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return None  # Hydra prints its own usage error
    if (
        args.help
        or args.hydra_help
        or args.cfg
        or args.info
        or args.shell_completion
        or args.config_dir
        or getattr(args, "experimental_rerun", None)
        or getattr(args, "version", False)
    ):
        return None
    config_name = args.config_name or "config"
    try:
        parsed = OverridesParser.create().parse_overrides(list(args.overrides))
    except HydraException as e:
        return str(e).strip().splitlines()[0]
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="mobiquant"):
        _BASE = compose(config_name)
        try:
            cfg = compose(config_name, overrides=plain, return_hydra_config=True)
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors: one line
            return _composition_message(e)
    HydraConfig.instance().set_config(cfg)
    try:
        task = str(cfg.get("task", "quantize"))
        if tasks is not None and task not in tasks:
            raise ConfigError(f"task={task} is unknown; allowed: {', '.join(sorted(tasks))}{did_you_mean(task, tasks)}")
        if not args.multirun and task == "quantize":  # the pipeline's own checks (budgets, methods, corpora)
            from .tasks.session import validate

            validate(cfg)  # check_config included
        else:
            check_config(cfg)
        if not args.multirun:  # every task takes its run folder (identity and lock) through the session
            from .io.runfolder import RunFolderError

            try:
                _check_run_folder(cfg, extra_overrides)
            except RunFolderError as e:
                return PlainMessage(str(e))
    except ConfigError as e:
        key = re.split(r"[=\s\[:(]", str(e), maxsplit=1)[0]
        if any(key == s or key.startswith(f"{s}.") or key.startswith(f"{s.split('/')[-1]}.") for s in swept):
            return None  # a swept key: each job checks its own value
        return str(e)
    return None
