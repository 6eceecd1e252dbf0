"""Processes and devices: one code path from a laptop to several nodes, through ``torchrun``.

``torchrun`` (or SLURM's ``srun`` with the same variables exported) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init_distributed` reads them, picks the device
(the GPU ``LOCAL_RANK`` or the CPU) and joins the process group (NCCL on GPU, gloo on CPU). Without
them it is a single process and nothing is initialised.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "shutdown_distributed", "barrier", "all_reduce_sum",
           "all_reduce_max", "broadcast_object"]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from err


def init_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's variables, choose the device and join the process group when WORLD_SIZE > 1.

    Args:
        device: "auto" (the GPU LOCAL_RANK when CUDA is available, else the CPU), "cuda" or "cpu".
    """
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no GPU is available")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        # a long timeout: rank 0 may validate or write a checkpoint while the others wait
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=60),
                                **({"device_id": chosen} if use_cuda else {}))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def shutdown_distributed() -> None:
    """Leave the process group, and free it while the interpreter is alive.

    ``destroy_process_group`` only drops torch's registry entry: DDP's reducer and FSDP's device mesh
    hold the group too, often inside reference cycles (the trainer and its model) that the cycle
    collector would otherwise free only during interpreter finalization. Gloo's worker threads
    destroyed there abort the process ("terminate called without an active exception", SIGABRT after a
    run that had finished and written its files); collecting here joins them normally."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place (identity in a single process)."""
    if _active():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over processes, in place (identity in a single process)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable object on every rank (used for small values such as paths)."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
