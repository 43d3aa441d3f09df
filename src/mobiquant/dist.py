"""Process rank under Lightning's DDP launcher (``trainer=ddp``).

With ``strategy=ddp`` Lightning re-runs the same command once per extra device (its subprocess launcher,
with ``LOCAL_RANK``/``NODE_RANK`` in the environment; on SLURM every task is started by ``srun``). Every
rank then runs the whole experiment so that each block's ``Trainer.fit`` happens on all ranks in the same
order; only rank 0 writes files, logs to W&B and evaluates. Before the first ``fit`` rank 0 has no
environment variables yet and is rank 0 by default.
"""

from __future__ import annotations

import os


def is_rank_zero() -> bool:
    """True in the process that writes results (rank 0 of the job, or a job that is not distributed)."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def local_device(device: str) -> str:
    """``cuda`` becomes this process's own card (``cuda:<LOCAL_RANK>``); anything else is unchanged."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def world_size() -> int:
    """Processes in the initialised ``torch.distributed`` group (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
