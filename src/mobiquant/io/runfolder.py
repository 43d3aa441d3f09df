"""The run folder knows what made it, lets one process write it at a time, and loses its leftovers.

* **Identity.** ``identity.json`` records what a run computes: the resolved settings its task's numbers
  depend on (:data:`TASK_IDENTITY_KEYS`; for ``task=quantize`` the ``model``, ``data``, ``calib``, ``eval``,
  ``budget``, ``plan``, ``quant`` and ``baselines`` settings, ``seed``, ``group_size`` and ``task``; not where
  outputs go, loggers, progress bars or other settings that change no number: :data:`RUNTIME_KEYS`), and,
  once the model is loaded, the base model's fingerprint
  (:func:`mobiquant.io.checkpoint.base_fingerprint`, the one checkpoints carry). A run in a folder made by
  another identity is refused before any work, naming the settings that differ; with
  ``run.on_mismatch=new_subrun`` it runs in ``<folder>/subruns/<id>`` instead, a folder of its own. Every
  row of ``results.csv`` and ``calibration.csv`` carries the run id (:attr:`RunFolder.run_id`).
* **Lock.** ``.mobiquant.lock`` is held (``flock``) while a run writes the folder; a second process gets one
  line naming the holder's pid and host. The kernel drops the lock when its process ends, however it ends;
  a lock file still naming a process that is gone is reported as a stale lock and taken over.
* **Leftovers.** Temporary files of our own naming (:func:`mobiquant.io.fileio.stray_temporaries`) are removed
  once the lock is held.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..configcheck import ConfigError
from .fileio import atomic_write_text, ensure_dir, host_tag, pid_alive, remove_stray_temporaries, writing

log = logging.getLogger("mobiquant")

IDENTITY_NAME = "identity.json"
IDENTITY_FORMAT = "mobiquant-run"
LOCK_NAME = ".mobiquant.lock"
SUBRUNS = "subruns"
ON_MISMATCH = ("refuse", "new_subrun")
#: The top-level config keys that decide what a ``task=quantize`` run computes.
IDENTITY_KEYS = ("task", "seed", "group_size", "model", "data", "calib", "eval", "budget", "plan", "quant", "baselines")
#: What every task that may calibrate ``quant`` depends on: the model, the calibration text and settings.
_CALIBRATION_KEYS = ("task", "seed", "group_size", "model", "data.calib", "calib", "budget", "plan", "quant")
#: Per task, the (dotted) config keys that decide its numbers; a task not named here: :data:`IDENTITY_KEYS`.
TASK_IDENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "quantize": IDENTITY_KEYS,
    "lm_eval": (*_CALIBRATION_KEYS, "baselines", "lm_eval"),
    "decode": (*_CALIBRATION_KEYS, "decode"),
    "outliers": (*_CALIBRATION_KEYS, "data", "eval", "analysis.dataset", "analysis.outliers"),
    "routers": (*_CALIBRATION_KEYS, "data", "eval", "analysis.dataset", "analysis.routers"),
}
#: Keys under :data:`IDENTITY_KEYS` that change no number of a run: display names, progress output, where
#: tensors are kept or computed, the host-device sync interval, the evaluation batch and kernel backend.
RUNTIME_KEYS = (
    "model.name",
    "model.device",
    "calib.progress_bar",
    "calib.inputs_on",
    "calib.sync_every",
    "calib.accelerator",
    "eval.batch_size",
    "eval.backend",
)
#: Files whose rows belong to one identity (those of every task): a folder holding one but no ``identity.json``
#: was made by an earlier mobiquant, and what made those rows is unknown.
ROW_FILES = (
    "results.csv",
    "calibration.csv",
    "lm_eval.csv",
    "decode.csv",
    "token_errors.csv",
    "ppl_matrix.csv",
    "router_budgets.csv",
)
#: Folders of a run folder that are not searched for stray temporaries (their own owners clean them).
NOT_OURS = ("wandb", SUBRUNS)
#: Folders of a run's work that another identity must not mix with (beside :data:`ROW_FILES`).
WORK_DIRS = ("checkpoints", "calib_state")


class RunFolderError(ConfigError):
    """The run folder cannot be used by this run: made by another identity, or in use by another process."""


# ---------------------------------------------------------------------------- identity
def identity_keys(task: str) -> tuple[str, ...]:
    """The (dotted) config keys that decide the numbers of ``task`` (:data:`TASK_IDENTITY_KEYS`)."""
    return TASK_IDENTITY_KEYS.get(task, IDENTITY_KEYS)


def config_identity(cfg: DictConfig, task: str | None = None) -> dict[str, Any]:
    """The resolved settings that decide what a run of ``task`` (default ``cfg.task``) computes
    (:func:`identity_keys` less :data:`RUNTIME_KEYS`), as plain JSON values."""
    out: dict[str, Any] = {}
    for key in identity_keys(task or str(cfg.get("task", "quantize"))):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node:
            continue
        child = node._get_node(leaf)
        value = OmegaConf.to_container(child, resolve=True) if OmegaConf.is_config(child) else node.get(leaf)
        into = out
        for part in parent.split(".") if parent else ():
            into = into.setdefault(part, {})
        into[leaf] = value
    for dotted in RUNTIME_KEYS:
        parent, _, leaf = dotted.rpartition(".")
        node = out.get(parent)
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def digest(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_UNSET = object()


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, value there, value now)`` for every dotted key whose value differs (a key one side lacks:
    :data:`_UNSET`, named once for its whole subtree); model, data and eval settings first."""
    out: list[tuple[str, Any, Any]] = []
    for k in sorted(set(old) | set(new), key=lambda k: (not prefix and k not in ("model", "data", "eval"), k)):
        key = f"{prefix}.{k}" if prefix else str(k)
        a, b = old.get(k, _UNSET), new.get(k, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, key)
        elif a != b:
            out.append((key, a, b))
    return out


def _short(v: Any) -> str:
    text = "unset" if v is _UNSET else json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_diff(diff: list[tuple[str, Any, Any]], limit: int = 4) -> str:
    parts = [f"{k}: {_short(a)} there, {_short(b)} now" for k, a, b in diff[:limit]]
    more = f"; and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(parts) + more


def run_id(config_sha256: str, fingerprint: str | None) -> str:
    """The id every row of a run carries: its configuration and its base model, 16 hex digits."""
    return digest({"config_sha256": config_sha256, "base_model": fingerprint})[:16]


def read_identity(folder: Path) -> dict | None:
    """``identity.json`` of ``folder``; None when there is none. An unreadable one raises
    :class:`RunFolderError`."""
    path = folder / IDENTITY_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunFolderError(f"run folder {folder}: cannot read {IDENTITY_NAME}: {e.strerror or e}") from e
    try:
        record = json.loads(text)
    except ValueError as e:
        record = None
        reason = f"not JSON ({e})"
    else:
        reason = "not a mobiquant run identity"
    if (
        not isinstance(record, dict)
        or record.get("format") != IDENTITY_FORMAT
        or not isinstance(record.get("config"), dict)
    ):
        raise RunFolderError(
            f"run folder {folder}: {IDENTITY_NAME} is {reason}: restore it, or choose another folder "
            "(hydra.run.dir=<folder>)"
        )
    return record


def _write_identity(folder: Path, config: dict, sha: str, base: dict | None) -> dict:
    record = {
        "format": IDENTITY_FORMAT,
        "version": 1,
        "config_sha256": sha,
        "base_model": base,
        "run_id": run_id(sha, base["fingerprint"]) if base else None,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
    }
    atomic_write_text(folder / IDENTITY_NAME, json.dumps(record, indent=1, sort_keys=False) + "\n")
    return record


def subrun_dir(root: Path, name: str) -> Path:
    return root / SUBRUNS / name


def _switch_hint(target: Path) -> str:
    return (
        "choose another folder (hydra.run.dir=<folder>), or add run.on_mismatch=new_subrun to start a fresh "
        f"sub-run in {target}"
    )


def holds_work(folder: Path) -> bool:
    """Whether ``folder`` holds results, calibration rows, checkpoints or calibration state."""
    if any((folder / name).is_file() for name in ROW_FILES):
        return True
    return any(p.is_file() for name in WORK_DIRS for p in (folder / name).rglob("*"))


def _mismatch(folder: Path, config: dict, sha: str) -> str | None:
    """Why ``folder`` does not belong to identity ``config``: a one-line reason, or None when it does, is
    new, or holds no work yet (a run that stopped before any: its identity is recorded anew)."""
    record = read_identity(folder)
    if record is None:
        legacy = [name for name in ROW_FILES if (folder / name).is_file()]
        if legacy:
            return (
                f"holds {' and '.join(legacy)} of a run that recorded no identity (an earlier mobiquant), whose "
                "rows cannot be told apart from this run's"
            )
        return None
    if record.get("config_sha256") == sha and record["config"] == config or not holds_work(folder):
        return None
    return f"was made by another configuration ({describe_diff(identity_diff(record['config'], config))})"


def resolve_folder(folder: str | os.PathLike[str], cfg: DictConfig, on_mismatch: str = "refuse") -> Path:
    """The folder a run of ``cfg`` given ``folder`` writes: ``folder`` itself, or (``new_subrun``, on a
    mismatch) its sub-run. Reads only; a refused mismatch raises :class:`RunFolderError`. (The check the
    command line makes before Hydra writes its own files into the folder.)"""
    folder = Path(folder)
    config = config_identity(cfg)
    sha = digest(config)
    why = _mismatch(folder, config, sha)
    if why is None:
        return folder
    target = subrun_dir(folder, sha[:12])
    if on_mismatch == "new_subrun":
        why_sub = _mismatch(target, config, sha)
        if why_sub is None:
            return target
        raise RunFolderError(f"run folder {target} {why_sub}: choose another folder (hydra.run.dir=<folder>)")
    raise RunFolderError(f"run folder {folder} {why}: run with its settings, or {_switch_hint(target)}")


# ---------------------------------------------------------------------------- lock
@dataclass
class RunLock:
    """``flock`` on ``<folder>/.mobiquant.lock``, which names its holder (pid, host, start time, command)."""

    folder: Path
    fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> RunLock:
        import fcntl

        with writing(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(_read_holder(fd)) from None
            except OSError as e:  # a file system without flock (some network mounts): the pid decides
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                holder = _read_holder(fd)
                if holder and _holder_alive(holder) and holder.get("pid") != os.getpid():
                    raise self._busy(holder) from None
                log.warning(
                    "run folder %s: its file system has no file locks; the lock file alone guards it", self.folder
                )
            previous = _read_holder(fd)
            if previous and previous.get("pid") != os.getpid():
                log.warning(
                    "run folder %s: stale lock of %s, which ended without releasing it: taken over",
                    self.folder,
                    _describe_holder(previous),
                )
            text = json.dumps(
                {
                    "pid": os.getpid(),
                    "host": host_tag(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "command": " ".join(sys.argv)[:300],
                }
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _busy(self, holder: dict | None) -> RunFolderError:
        who = _describe_holder(holder) if holder else "another process"
        return RunFolderError(
            f"run folder {self.folder} is in use by {who}: wait until it ends, or choose another folder "
            "(hydra.run.dir=<folder>)"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # released cleanly: the next holder finds no stale entry
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(fd)


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _holder_alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    return pid_alive(pid) if holder.get("host") == host_tag() else True


def _describe_holder(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"


def probe_lock(folder: str | os.PathLike[str]) -> None:
    """Raise :class:`RunFolderError` if another process holds ``folder``'s lock; takes nothing."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLock(Path(folder))._busy(_read_holder(fd)) from None
        except OSError:
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- the folder of one run
@dataclass
class RunFolder:
    """The folder a run writes (``path``: the given ``root`` or one of its sub-runs), held under its lock."""

    root: Path
    path: Path
    config: dict
    config_sha256: str
    on_mismatch: str = "refuse"
    writer: bool = True
    lock: RunLock | None = None
    run_id: str | None = None
    removed: list[Path] = field(default_factory=list)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def bind_base_model(self, fingerprint: str, name: str | None = None) -> None:
        """Record (or check) the base model's fingerprint and set :attr:`run_id`. Another base model than
        the folder was made with is refused, or (``new_subrun``) moves this run, lock included, into a
        sub-run: :attr:`path` changes."""
        record = read_identity(self.path)
        recorded = ((record or {}).get("base_model") or {}).get("fingerprint")
        if recorded is not None and recorded != fingerprint and not holds_work(self.path):
            recorded = None  # a run that stopped before any work: recorded anew
        if recorded is None or recorded == fingerprint:
            if recorded is None and self.writer:
                _write_identity(self.path, self.config, self.config_sha256, {"fingerprint": fingerprint, "name": name})
            self.run_id = run_id(self.config_sha256, fingerprint)
            return
        target = subrun_dir(self.root, f"{self.config_sha256[:12]}-{fingerprint[:8]}")
        why = (
            f"run folder {self.path} was made with another base model (fingerprint {recorded[:12]} there, "
            f"{fingerprint[:12]} now: the model of model.path={name} is not the one it was made with)"
        )
        if self.on_mismatch != "new_subrun" or self.path == target:
            hint = _switch_hint(target) if self.path != target else "choose another folder (hydra.run.dir=<folder>)"
            raise RunFolderError(f"{why}: {hint}")
        log.warning("%s: running in the sub-run %s", why, target)
        moved = open_run_folder(target, self.config, self.on_mismatch, writer=self.writer, root=self.root)
        self.release()
        self.path, self.lock, self.removed = moved.path, moved.lock, self.removed + moved.removed
        moved.lock = None
        self.bind_base_model(fingerprint, name)


def open_run_folder(
    folder: str | os.PathLike[str],
    config: dict | DictConfig,
    on_mismatch: str = "refuse",
    writer: bool = True,
    root: Path | None = None,
) -> RunFolder:
    """Take ``folder`` for a run of identity ``config`` (a config, or :func:`config_identity`'s dict):
    lock it, check or record its identity, remove stray temporaries. ``writer``: False in the DDP ranks
    that write nothing (they only follow rank 0 into the same folder). ``root``: the folder the run was
    given, when ``folder`` is one of its sub-runs. See the module docstring."""
    if on_mismatch not in ON_MISMATCH:
        raise ConfigError(f"run.on_mismatch={on_mismatch!r} is invalid; allowed: {', '.join(ON_MISMATCH)}")
    folder = Path(folder)
    nested = root is not None
    root = root or folder
    identity = config_identity(config) if isinstance(config, DictConfig) else config
    sha = digest(identity)
    lock = None
    if writer:
        ensure_dir(folder)
        lock = RunLock(folder).acquire()
    try:
        why = _mismatch(folder, identity, sha)
        if why is not None:
            target = subrun_dir(root, sha[:12])
            if on_mismatch != "new_subrun" or nested:
                hint = "choose another folder (hydra.run.dir=<folder>)" if nested else _switch_hint(target)
                raise RunFolderError(f"run folder {folder} {why}: run with its settings, or {hint}")
            log.warning("run folder %s %s: running in the sub-run %s", folder, why, target)
            if lock is not None:
                lock.release()
                lock = None
            return open_run_folder(target, identity, on_mismatch, writer, root)
        record = read_identity(folder)
        if writer and (record is None or record.get("config_sha256") != sha or record["config"] != identity):
            _write_identity(folder, identity, sha, None)  # new, or made by a run that did no work
        removed = remove_stray_temporaries(folder, locked=True, skip=NOT_OURS) if writer else []
        for p in removed:
            log.info("removed stray temporary %s", p)
        rf = RunFolder(root, folder, identity, sha, on_mismatch, writer, lock, removed=removed)
        lock = None
        return rf
    finally:
        if lock is not None:
            lock.release()
