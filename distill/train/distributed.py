"""The collectives the cell's run shares between its ranks: one rank's work handed to all, sums over ranks.

Every rank calls these at the same point (they are collective); with one process they are plain calls.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distill.cell import lock as locks


def on_rank0(fn: Callable[[], Any], rank: int, world: int) -> Any:
    """Run `fn` on rank 0 and hand its result, or its exception, to every rank."""
    box: list[Any] = [None]
    if rank == 0:
        try:
            box = [("ok", fn())]
        except Exception as exc:  # every rank raises it, so none waits in a collective for ever
            box = [("error", exc)]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """`values` summed over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """`values` maximised over all ranks (float64): a flag raised on any rank is raised on all."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def ensure_lock_held(lock: locks.CellLock | None, run_dir: Path, device: torch.device, doing: str) -> None:
    """Every rank raises LockLost together unless rank 0 still holds the cell's lock (`CellLock.holds`: a fresh
    read of the lock file), before `doing` (a collective write: a checkpoint, an export). Only rank 0 holds the
    lock; the others follow its verdict, so none waits in a collective that rank 0 left."""
    lost = lock is not None and not lock.holds()
    if all_reduce_max([float(lost)], device)[0]:
        raise locks.lost_error(run_dir, doing, lock.lost_why if lock is not None else None)
