"""Crash-safe file writing shared by checkpoints, results, caches and converted models.

Every artifact is written to a temporary sibling, flushed to disk and renamed into place, so an
interrupted write never leaves a file that looks complete. Every byte goes through :func:`_write_all`,
and a write that fails (full disk, read-only folder) removes its temporary file and raises
:class:`WriteError`, which names the file, the reason and what to do; the earlier version of the file,
if there was one, is untouched.

Temporary names carry their owner: ``.<name>.<pid>@<host>.<random>.tmp`` for files and
``.<name>.tmp-<pid>@<host>-<random>`` for folders (converted models). A process killed while writing
leaves one behind; :func:`remove_stray_temporaries` finds them by that pattern and removes those whose
owner is no longer running (or, where that cannot be told, that are old enough).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO


class WriteError(OSError):
    """An output file or folder could not be written; ``errno`` is the operating system's code."""


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_error(path: str | os.PathLike[str], err: OSError, folder: bool = False) -> WriteError:
    """A :class:`WriteError` for ``err`` raised while writing ``path`` (a file, or a folder with ``folder``)."""
    path = Path(path)
    where = path if folder else path.parent
    reason = err.strerror or str(err)
    if err.errno in _FULL:
        hint = f"the file system holding {where} is full: free some space there, or write elsewhere, and run again"
    elif err.errno in _DENIED:
        hint = f"{where} is not writable: make it writable or choose another output folder"
    else:
        hint = ""
    kept = "" if folder else f"; any earlier {path.name} is unchanged"
    return WriteError(err.errno, f"cannot write {path}: {reason}" + (f"; {hint}" if hint else "") + kept)


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], folder: bool = False) -> Iterator[None]:
    """Turn an :class:`OSError` raised inside the block into a :class:`WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise write_error(path, e, folder) from e


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(path: str | os.PathLike[str]) -> None:
    """Give a file or folder made by :mod:`tempfile` (private, 0600/0700) the usual umask-based mode."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (the rename of a file into it) to disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Flush every file below ``root`` and the directories themselves to disk."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _write_all(fh: BinaryIO, data: bytes) -> None:
    """The one place where artifact bytes are handed to the file system (tests inject disk faults here)."""
    fh.write(data)


def discard(path: str | os.PathLike[str]) -> None:
    """Remove a temporary file if it is there; never raises (it runs while another error propagates)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create folder ``path`` (and parents) if needed; a failure names the folder."""
    path = Path(path)
    with writing(path, folder=True):
        path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and check that a file can be created in it, before any work is done."""
    path = ensure_dir(path)
    with writing(path, folder=True):
        fd, probe = tempfile.mkstemp(dir=path, prefix=f".mobiquant-write-check.{owner_tag()}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    return path


def stage_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a new temporary sibling of ``path``, flushed to disk; returns the temporary path.

    The caller renames it into place (``os.replace``) or removes it with :func:`discard`. On failure
    nothing is left behind and a :class:`WriteError` naming ``path`` is raised.
    """
    path = Path(path)
    ensure_dir(path.parent)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                _write_all(fh, data)
                fh.flush()
                os.fsync(fh.fileno())
            shared_mode(tmp)
        except BaseException:
            discard(tmp)
            raise
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a flushed temporary sibling and an atomic rename."""
    path = Path(path)
    tmp = stage_bytes(path, data)
    with writing(path):
        try:
            os.replace(tmp, path)
        except BaseException:
            discard(tmp)
            raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------- stray temporaries
#: Age (seconds) after which a temporary whose owner cannot be checked (another host, or a name from an
#: earlier mobiquant without an owner) counts as left behind.
STALE_AGE_S = 24 * 3600
_RANDOM = r"[a-z0-9_]{8}"  # tempfile's random part
_OWNER = r"(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)"
TEMP_FILE_RE = re.compile(rf"^\.(?P<base>.+?)\.(?:{_OWNER}\.)?{_RANDOM}\.tmp$")
TEMP_DIR_RE = re.compile(rf"^\.(?P<base>.+?)\.(?:tmp|old)-(?:{_OWNER}-)?{_RANDOM}$")


def host_tag() -> str:
    """This machine's name as it appears in temporary names and locks (letters, digits and ``-``)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:48] or "host"


def owner_tag() -> str:
    """``<pid>@<host>``: the owner part of this process's temporary names."""
    return f"{os.getpid()}@{host_tag()}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a process of another user counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is one of the temporary names the atomic writers of mobiquant make."""
    return bool(TEMP_FILE_RE.match(name) or TEMP_DIR_RE.match(name))


def _stale(path: Path, m: re.Match, locked: bool, max_age_s: float) -> bool:
    pid, host = m.group("pid"), m.group("host")
    if pid is not None and host == host_tag():
        return int(pid) != os.getpid() and not pid_alive(int(pid))
    if locked:  # the folder is ours alone (its run lock is held): nobody else writes there
        return True
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    return age > max_age_s


def stray_temporaries(
    root: str | os.PathLike[str],
    *,
    locked: bool = False,
    max_age_s: float = STALE_AGE_S,
    skip: Iterable[str] = (),
    base: str | None = None,
    recursive: bool = True,
) -> list[Path]:
    """Temporaries of our naming below ``root`` that no running process owns.

    The owner named in the temporary's name decides: a process of this machine that has ended leaves
    strays; a running one (or this one) does not. Where the owner cannot be checked (another machine, or
    an older name without an owner), ``locked`` (the caller holds ``root``'s run lock, so nobody else
    writes there) makes it stray, else its age over ``max_age_s`` does. Folders named in ``skip`` (at any
    depth) are not searched, nor any subfolder without ``recursive``; ``base``: only the temporaries of that
    final name.
    """
    root = Path(root)
    skip = set(skip)
    found: list[Path] = []
    if not root.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        keep_dirs = []
        for d in dirnames:
            m = TEMP_DIR_RE.match(d)
            if m:
                if (base is None or m.group("base") == base) and _stale(Path(dirpath, d), m, locked, max_age_s):
                    found.append(Path(dirpath, d))
            elif d not in skip:
                keep_dirs.append(d)
        dirnames[:] = keep_dirs if recursive else []
        for f in filenames:
            m = TEMP_FILE_RE.match(f)
            if m and (base is None or m.group("base") == base) and _stale(Path(dirpath, f), m, locked, max_age_s):
                found.append(Path(dirpath, f))
    return sorted(found)


def remove_stray_temporaries(root: str | os.PathLike[str], **kwargs) -> list[Path]:
    """Remove :func:`stray_temporaries` below ``root`` (see there for ``kwargs``); returns what was removed.
    A temporary that cannot be removed is left (and not returned)."""
    removed = []
    for p in stray_temporaries(root, **kwargs):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        removed.append(p)
    return removed
