"""One GPU per job when a sweep's jobs share the GPUs of one host (``hydra/launcher=gpus``).

A job claims a GPU at its start, before anything in its process initialises CUDA: an exclusive
``fcntl.flock`` on ``<lock dir>/<device>.lock``, kept until the process ends (the kernel drops the lock
when the process exits, killed or not), then ``CUDA_VISIBLE_DEVICES`` set to that one device, so that the
job's ``cuda:0`` is its own card. Jobs of unequal length therefore never share a GPU, and sweeps that
point at the same lock folder share the host's GPUs between them. Nothing here imports torch.

The launcher (``hydra_plugins.mobiquant_launcher``) starts G job processes at a time; each calls
:func:`claim` with the launcher's device list. Without a GPU the devices are plain slot names: the claim
works the same (the tests run two "GPUs" on the CPU).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

CUDA_ENV = "CUDA_VISIBLE_DEVICES"

# The claims of this process: referenced here so that a claim nobody keeps is not closed (and its lock
# dropped) by the garbage collector; a claim ends with release() or the process.
_HELD: list[Claim] = []


def visible_devices() -> list[str]:
    """The GPUs this process may use, found without initialising CUDA.

    ``CUDA_VISIBLE_DEVICES`` when it is set (its entries as written: indices, ``GPU-<uuid>`` or ``MIG-<uuid>``;
    CUDA ignores everything from the first empty or negative entry on, and so does this), else one index
    per GPU that ``nvidia-smi -L`` lists, else none.
    """
    value = os.environ.get(CUDA_ENV)
    if value is not None:
        out = []
        for entry in (e.strip() for e in value.split(",")):
            if not entry or entry.startswith("-"):
                break
            out.append(entry)
        return out
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    # "GPU 0: NVIDIA H200 (UUID: GPU-...)"; MIG instances are indented lines under their GPU
    return [str(i) for i in range(sum(1 for line in listing.splitlines() if line.startswith("GPU ")))]


def resolve_devices(gpus: Any = None) -> list[str]:
    """The devices a sweep's jobs spread over, one job per device at a time.

    ``gpus``: ``None``, every visible GPU (:func:`visible_devices`); an int N, the first N of them (on a host
    with no visible GPU, N slots named ``0`` ... ``N-1``: N jobs at a time, CUDA or not); a list, exactly
    these devices, as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs).
    """
    visible = visible_devices()
    if gpus is None:
        if not visible:
            raise ValueError(
                f"no GPU found ({CUDA_ENV} unset or empty and `nvidia-smi -L` lists none); "
                "set hydra.launcher.gpus to a number of slots or a list of devices"
            )
        return visible
    if isinstance(gpus, bool):
        raise ValueError(f"hydra.launcher.gpus={gpus!r}: give null, a number of GPUs or a list of devices")
    if isinstance(gpus, int):
        if gpus < 1:
            raise ValueError(f"hydra.launcher.gpus={gpus}: at least one GPU")
        if not visible:
            return [str(i) for i in range(gpus)]
        if gpus > len(visible):
            raise ValueError(f"hydra.launcher.gpus={gpus}, but only {len(visible)} GPU(s) are visible: {visible}")
        return visible[:gpus]
    if isinstance(gpus, str) or not isinstance(gpus, Sequence):
        raise ValueError(f"hydra.launcher.gpus={gpus!r}: give null, a number of GPUs or a list of devices")
    devices = [str(d).strip() for d in gpus]
    if not devices or "" in devices:
        raise ValueError(f"hydra.launcher.gpus={list(gpus)!r}: name at least one device, none empty")
    if len(set(devices)) != len(devices):
        raise ValueError(f"hydra.launcher.gpus={devices}: a device is listed twice")
    return devices


def lock_path(lock_dir: str | os.PathLike, device: str) -> Path:
    """The lock file of one device (a UUID or MIG name becomes a safe file name)."""
    return Path(lock_dir) / (re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock")


@dataclass(eq=False)  # one claim is one held lock: compared by identity
class Claim:
    """A device held by this process: its lock file stays open (and locked) until :meth:`release`."""

    device: str
    slot: int
    path: Path
    _file: IO[str] | None = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the only descriptor drops the flock
            self._file = None
        if self in _HELD:
            _HELD.remove(self)


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    return bool(cuda is not None and cuda.is_initialized())


def _try_lock(path: Path, note: str) -> IO[str] | None:
    f = open(path, "a+")  # created if missing, never truncated before the lock is ours
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    except BaseException:
        f.close()
        raise
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} {note}".rstrip() + "\n")  # who holds it, for a person looking at the folder
    f.flush()
    return f


def check_jobs_per_gpu(n: Any) -> int:
    """``hydra.launcher.jobs_per_gpu``: how many jobs may share one GPU, an integer >= 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"hydra.launcher.jobs_per_gpu={n!r}: must be an integer >= 1")
    return n


def claim(
    devices: Sequence[str],
    lock_dir: str | os.PathLike,
    *,
    note: str = "",
    poll_s: float = 0.2,
    timeout_s: float | None = None,
    per_device: int = 1,
) -> Claim:
    """Take the first free device of ``devices`` (waiting while every one is held) and make it the only one
    this process sees: ``CUDA_VISIBLE_DEVICES`` is set to it. Call it before anything initialises CUDA in
    this process; the lock is held until the returned claim is released or the process ends.

    ``note`` is written into the lock file (e.g. the job number). A ``TimeoutError`` after ``timeout_s``
    seconds of waiting (``None``: wait as long as it takes). ``per_device``: how many processes may hold one
    device at a time (one lock file per share; free devices are taken before second shares).
    """
    if not devices:
        raise ValueError("no device to claim")
    check_jobs_per_gpu(per_device)
    if _cuda_initialised():
        raise RuntimeError(
            f"CUDA is already initialised in this process: setting {CUDA_ENV} now would not take effect; "
            "claim the GPU before any CUDA call"
        )
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waiting = False
    while True:
        for share, (slot, device) in ((j, d) for j in range(per_device) for d in enumerate(devices)):
            path = lock_path(lock_dir, device if share == 0 else f"{device}.{share}")
            f = _try_lock(path, note)
            if f is not None:
                os.environ[CUDA_ENV] = device
                if waiting:
                    log.info("GPU %s is free now", device)
                held = Claim(device=device, slot=slot, path=path, _file=f)
                _HELD.append(held)
                return held
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no free GPU among {list(devices)} after {timeout_s} s (locks in {lock_dir})")
        if not waiting:
            log.info("every GPU of %s is busy (locks in %s): waiting for one", list(devices), lock_dir)
            waiting = True
        time.sleep(poll_s)
