"""Process rank under Lightning's DDP launcher (``trainer=ddp``).

With ``strategy=ddp`` Lightning re-runs the same command once per extra device (its subprocess launcher,
with ``LOCAL_RANK``/``NODE_RANK`` in the environment; on SLURM every task is started by ``srun``). Every
rank then runs the whole experiment so that each block's ``Trainer.fit`` happens on all ranks in the same
order; only rank 0 writes files, logs to W&B and evaluates. Before the first ``fit`` rank 0 has no
environment variables yet and is rank 0 by default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


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


def rank() -> int:
    """This process's rank in the initialised ``torch.distributed`` group (0 when there is none)."""
    import torch.distributed as dist

    return dist.get_rank() if world_size() > 1 else 0


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank of the initialised group (``obj`` itself when there is no group)."""
    import torch.distributed as dist

    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_work(items: Sequence[int], fn: Callable[[int], R]) -> dict[int, R]:
    """``{i: fn(i)}`` for every ``i`` of ``items``, the work split between the ranks of the initialised group.

    Rank ``r`` of ``N`` computes ``fn`` for ``items[r::N]`` and the results are exchanged, so every rank
    returns all of them; without a group one process computes them all. ``fn`` must not depend on the
    order its items are taken in, and every rank must call this with the same ``items``."""
    import torch.distributed as dist

    world = world_size()
    mine = {i: fn(i) for i in list(items)[rank() :: world]}
    if world == 1:
        return mine
    gathered: list[dict[int, R] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    return {i: r for part in gathered for i, r in (part or {}).items()}
