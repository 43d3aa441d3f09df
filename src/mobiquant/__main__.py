"""``mobiquant`` / ``python -m mobiquant``: the Hydra app.

mobiquant                                   # defaults: SmolLM2-135M, MoBiQuant, offline corpus
mobiquant experiment=demo                   # what `make run` runs
mobiquant -m quant=mobiquant,lwc seed=0,1   # a multirun sweep
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONF_DIR = os.environ.get("MOBIQUANT_CONF", str(Path(__file__).resolve().parents[2] / "conf"))


# `task=<name>` picks what the app does; every task takes the composed config and returns a float
# (the value an Optuna sweep optimises). Modules are imported lazily so a typo costs no import time.
TASKS = {
    "quantize": "mobiquant.tasks.quantize:run",  # calibrate, evaluate every budget, report (the default)
    "outliers": "mobiquant.tasks.analysis.outliers:run",  # outlier migration: cross-precision ppl, top-p% overlap
    "routers": "mobiquant.tasks.analysis.routers:run",  # slices used per layer and router site, at each budget
    "lm_eval": "mobiquant.tasks.lm_eval:run",  # lm-evaluation-harness tasks on the quantized model, per budget
    "decode": "mobiquant.tasks.decode:run",  # generation speed (static KV cache, CUDA graph) per budget
}


# One line per task for `mobiquant --help`.
TASK_HELP = {
    "quantize": "calibrate `quant` (and the baselines), evaluate every budget, write the tables (default)",
    "outliers": "outlier migration: cross-precision perplexity and top-p% token overlap (analysis.outliers)",
    "routers": "how the routers spend the bits, per layer and site, at each budget (analysis.routers)",
    "lm_eval": "lm-evaluation-harness tasks on the quantized model at each budget (lm_eval.*)",
    "decode": "generate text with a static KV cache at each budget; tokens/s per budget (decode.*)",
}


def tasks_help() -> str:
    """The ``task=`` values with one line each (the ``${mobiquant_tasks:}`` of the help header)."""
    width = max(map(len, TASKS))
    return "\n".join(f"  task={name:<{width}}  {TASK_HELP.get(name, '')}".rstrip() for name in TASKS)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("mobiquant_tasks", tasks_help, replace=True)
    # the project: the folder holding conf/ (paths.root_dir), not the working directory
    OmegaConf.register_new_resolver("mobiquant_root", lambda: str(Path(CONF_DIR).resolve().parent), replace=True)


def resolve_task(name: str):
    """The callable behind ``task=<name>``; a clear error naming the allowed tasks otherwise."""
    import importlib

    from .tasks.quantize import ConfigError

    if name not in TASKS:
        raise ConfigError(f"task={name!r} is unknown; allowed: {', '.join(sorted(TASKS))}")
    module, attr = TASKS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _task(cfg) -> float:
    from .io.runfolder import RunFolderError
    from .tasks.quantize import ConfigError

    try:
        return resolve_task(str(cfg.get("task", "quantize")))(cfg)
    except ConfigError as e:  # a clear one-line message instead of a traceback
        what = "" if isinstance(e, RunFolderError) else "invalid configuration: "
        print(f"mobiquant: {what}{e}", file=sys.stderr)
        if _multirun():
            # An exception (not SystemExit) lets Hydra record this job as failed and run the others;
            # the sweep then ends with this error once every job of the batch is done.
            raise
        raise SystemExit(2) from None


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    if not Path(CONF_DIR, "config.yaml").is_file():
        sys.exit(f"mobiquant: config folder {CONF_DIR} not found (set MOBIQUANT_CONF to the repository's conf/)")
    import hydra

    register_resolvers()
    from .configcheck import PlainMessage, preflight

    extra: list[str] = []
    error = preflight(sys.argv[1:], CONF_DIR, tasks=TASKS, extra_overrides=extra)  # before Hydra makes a run folder
    if error:
        sys.exit(
            f"mobiquant: {error}" if isinstance(error, PlainMessage) else f"mobiquant: invalid configuration: {error}"
        )
    if extra:  # run.on_mismatch=new_subrun: Hydra's own files go into the sub-run too
        keys = {o.split("=", 1)[0] for o in extra}
        sys.argv = [a for a in sys.argv if a.split("=", 1)[0] not in keys] + extra
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_task)()


register_resolvers()  # the configs may be composed without main() (tests, notebooks)


if __name__ == "__main__":
    main()
