"""Another process that holds a run folder's lock, importable by name (``from lock_holder import lock_holder``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
HOLD = """
import sys, time
from mobiquant.io.runfolder import RunLock
from pathlib import Path
lock = RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def lock_holder(folder: Path) -> Iterator[subprocess.Popen]:
    """A process holding the lock of run folder ``folder`` for the ``with`` block (yielded once it holds it),
    killed on leaving: the kernel drops its lock, and the lock file's entry names a process that is gone."""
    env = {**os.environ, "PYTHONPATH": SRC}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()
