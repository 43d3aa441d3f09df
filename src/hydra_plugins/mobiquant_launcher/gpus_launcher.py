"""``hydra/launcher=gpus``: a sweep's jobs spread over the GPUs of one host, one job per GPU, G at a time.

Every job runs in a fresh process (``multiprocessing`` spawn: a new interpreter, with none of the
launcher's modules or CUDA state). Before the job's config is even unpickled there, the process claims a GPU
with :func:`mobiquant.gpus.claim` (a file lock per device, held until the process ends) and sets
``CUDA_VISIBLE_DEVICES`` to it; then it runs the job exactly as Hydra's own launchers do (``run_job`` in
``<sweep dir>/<job number>``). The launcher keeps G processes going; a job that ends frees its GPU for the
next one whatever the lengths of the others, and a job that fails or dies (killed, out of memory) is
recorded as failed while the others run on.

Each job's ``.hydra/hydra.yaml`` records its device (``hydra.job.env_set.CUDA_VISIBLE_DEVICES``), and
``<sweep dir>/.gpus/jobs.csv`` has one row per job: device, process, start and end (after the claim, before
the release), status.

The job's config, Hydra's state and the task function travel by plain pickle (the task must be a
module-level function; ``python -m pkg`` apps included). OmegaConf resolvers do not travel: the job has
OmegaConf's and Hydra's own and those its app's modules register when they are imported, as mobiquant's do.
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
import math
import multiprocessing
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict
from omegaconf.basecontainer import BaseContainer

log = logging.getLogger(__name__)


def _ms(t: float, rounding) -> str:
    """``t`` in seconds to the millisecond, rounded outward (start down, end up) so that the recorded interval
    holds every time the job itself records; ``nan`` stays ``nan``."""
    return f"{rounding(t * 1000) / 1000:.3f}" if t == t else "nan"


LEDGER_FIELDS = ["job", "device", "pid", "start", "end", "seconds", "status", "overrides"]


def _importable(fn: Any) -> Any:
    """The task function as a spawned process can import it. ``python -m pkg`` runs ``pkg/__main__.py`` as
    ``__main__``, which a spawned process does not re-import: take the same function from the module by its
    real name. (A script run by its path is re-imported by spawn: its functions resolve as they are.)"""
    if getattr(fn, "__module__", None) != "__main__":
        return fn
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    name = getattr(spec, "name", None)
    if not name or name == "__main__":
        return fn
    same = getattr(importlib.import_module(name), getattr(fn, "__qualname__", ""), None)
    return same if callable(same) else fn


def _class_by_name(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _Pickler(pickle.Pickler):
    """Plain pickle, except for a class whose module now holds another class of the same name: by module and
    name. Hydra's plugin scan executes the plugin modules again in every process, so a config's dataclass
    (``BasicSweeperConf``...) is no longer the object its module holds, and plain pickle refuses it."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type):
            try:
                found = _class_by_name(obj.__module__, obj.__qualname__)
            except (ImportError, AttributeError):
                return NotImplemented
            if found is not obj and isinstance(found, type) and found.__qualname__ == obj.__qualname__:
                return _class_by_name, (obj.__module__, obj.__qualname__)
        return NotImplemented


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf).dump(obj)
    return buf.getvalue()


def _job(
    payload: bytes,
    idx: int,
    overrides: list[str],
    devices: list[str],
    lock_dir: str,
    poll_s: float,
    per_device: int,
    conn: Connection,
) -> None:
    """One job, in its own spawned process: claim a GPU, then run the job as Hydra's launchers do."""
    from mobiquant.gpus import CUDA_ENV, claim

    held = claim(devices, lock_dir, note=f"job {idx}", poll_s=poll_s, per_device=per_device)  # before any CUDA
    conn.send(("claimed", held.device, os.getpid(), time.time()))
    hydra_context, config, task_function, singleton_state = pickle.loads(payload)
    setup_globals()
    # OmegaConf's resolvers are closures that pickle cannot carry: the job uses those of this process,
    # OmegaConf's and Hydra's own and those the app's modules registered when the task was unpickled.
    singleton_state["omegaconf_resolvers"] = dict(BaseContainer._resolvers)
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
        sweep_config.hydra.job.env_set[CUDA_ENV] = held.device  # recorded in the job's .hydra/hydra.yaml
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(
        hydra_context=hydra_context,
        config=sweep_config,
        task_function=task_function,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    end = time.time()
    trace = None
    if ret.status == JobStatus.FAILED and isinstance(ret._return_value, BaseException):
        trace = "".join(traceback.format_exception(ret._return_value))
    try:
        blob = _dumps(ret)
        pickle.loads(blob)  # an exception that pickles but cannot be rebuilt would break the launcher
    except Exception:
        ret._return_value = RuntimeError(trace or repr(ret._return_value))
        blob = _dumps(ret)
    conn.send(("done", blob, trace, end))
    conn.close()


class GpusLauncher(Launcher):
    """Runs a sweep's jobs on this host's GPUs: one fresh process per job, one job per GPU at a time."""

    def __init__(
        self, gpus: Any = None, lock_dir: str | None = None, poll_s: float = 0.5, jobs_per_gpu: int = 1
    ) -> None:
        from mobiquant.gpus import check_jobs_per_gpu

        self.jobs_per_gpu = check_jobs_per_gpu(jobs_per_gpu)
        self.gpus = gpus
        self.lock_dir = lock_dir
        self.poll_s = float(poll_s)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self._ledger_lock = threading.Lock()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from omegaconf import OmegaConf

        from mobiquant.gpus import resolve_devices

        setup_globals()
        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        gpus = OmegaConf.to_container(self.gpus) if OmegaConf.is_config(self.gpus) else self.gpus
        devices = resolve_devices(gpus)
        lock_dir = Path(self.lock_dir) if self.lock_dir else sweep_dir / ".gpus"
        ledger = sweep_dir / ".gpus" / "jobs.csv"
        ledger.parent.mkdir(parents=True, exist_ok=True)
        if not ledger.exists():
            with open(ledger, "w", newline="") as f:
                csv.writer(f).writerow(LEDGER_FIELDS)
        log.info(
            f"GpusLauncher: {len(job_overrides)} jobs on GPU(s) [{', '.join(devices)}], "
            f"{min(len(devices) * self.jobs_per_gpu, len(job_overrides))} at a time (locks in {lock_dir})"
        )
        log.info(f"Launching jobs, sweep output dir : {sweep_dir}")
        for i, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        del state["omegaconf_resolvers"]  # see _job
        payload = _dumps((self.hydra_context, self.config, _importable(self.task_function), state))
        if not job_overrides:
            return []
        with ThreadPoolExecutor(max_workers=min(len(devices) * self.jobs_per_gpu, len(job_overrides))) as pool:
            futures = [
                pool.submit(self._run, payload, initial_job_idx + i, list(ov), devices, str(lock_dir), ledger)
                for i, ov in enumerate(job_overrides)
            ]
            return [f.result() for f in futures]

    def _run(
        self, payload: bytes, idx: int, overrides: list[str], devices: list[str], lock_dir: str, ledger: Path
    ) -> JobReturn:
        """Start job ``idx`` in a fresh process and wait for its result (in one of G launcher threads)."""
        ctx = multiprocessing.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        # not a daemon: the job may start processes of its own (data loaders, DDP ranks)
        proc = ctx.Process(
            target=_job,
            args=(payload, idx, overrides, devices, lock_dir, self.poll_s, self.jobs_per_gpu, send),
            name=f"job-{idx}",
        )
        proc.start()
        send.close()
        device, pid, start, end = "", proc.pid, float("nan"), float("nan")
        ret: JobReturn | None = None
        trace = None
        while ret is None:
            # the pipe, or the process's end (a job killed by the kernel never sends its result)
            ready = wait([recv, proc.sentinel])
            if recv not in ready and not recv.poll():
                break
            try:
                msg = recv.recv()
            except EOFError:
                break
            if msg[0] == "claimed":
                _, device, pid, start = msg
                log.info(f"#{idx} started on GPU {device} (pid {pid})")
            else:
                _, blob, trace, end = msg
                ret = pickle.loads(blob)
        proc.join()
        recv.close()
        if ret is None:
            end = time.time()
            why = f"signal {-proc.exitcode}" if proc.exitcode and proc.exitcode < 0 else f"exit code {proc.exitcode}"
            err = RuntimeError(f"job #{idx} ended without a result ({why}) on GPU {device or '?'}")
            ret = JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=err)
        status = "ok" if ret.status == JobStatus.COMPLETED else "failed"
        took = f"{end - start:.1f} s" if start == start else "? s"  # nan: it died before its claim
        log.info(f"#{idx} {'done' if status == 'ok' else 'FAILED'} on GPU {device or '?'} in {took}")
        if trace:
            log.error(f"#{idx} failed:\n{trace}")
        with self._ledger_lock, open(ledger, "a", newline="") as f:
            csv.writer(f).writerow(
                [idx, device, pid, _ms(start, math.floor), _ms(end, math.ceil), f"{end - start:.3f}", status]
                + [" ".join(overrides)]
            )
        return ret
