"""Local lm-evaluation-harness tasks built from text on disk (no dataset hub).

The folder is an lm-eval ``include_path``: every ``*.yaml`` here is a task config, found by
``lm_eval.tasks.TaskManager(include_path=TASKS_DIR)``. Their datasets are built at run time by
``custom_dataset`` functions in :mod:`lastword`, which read the file named by the task metadata (see
:data:`LOCAL_TASKS`); ``task=lm_eval`` passes it from the config, the lm-eval CLI from ``--metadata``.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

#: local task name -> the metadata key naming the text file it is built from
LOCAL_TASKS: dict[str, str] = {
    "wikitext2_lastword": "wikitext2_path",
}
