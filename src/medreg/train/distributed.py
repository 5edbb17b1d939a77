"""Distributed data-parallel training under ``torchrun`` (one process per device).

``torchrun --nproc_per_node=N -m medreg train CONFIG.yaml`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them
(``env://``) and joins the process group: ``gloo`` on the CPU, ``nccl`` on CUDA (one GPU per
local rank). Without those variables everything here is a no-op and the same config runs in
one process. Only rank 0 writes files and progress; validation metrics are summed across ranks
(:func:`all_reduce_sums`), so every rank takes the same early-stopping decision.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from medreg.core.errors import InputError

__all__ = ["DistInfo", "ResumableSampler", "all_reduce_sums", "barrier", "cleanup",
           "init_distributed", "launched_by_torchrun", "per_rank_batch"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun/``torch.distributed.run`` variables are set with a world > 1."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (``env://``), else a single process.

    Args:
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (nccl; the process uses ``cuda:LOCAL_RANK``).
    """
    if not launched_by_torchrun():
        return DistInfo()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, True)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local, True)


def cleanup(info: DistInfo) -> None:
    """Leave the process group (if this module joined one)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``batch_size / world_size``; the global batch must split evenly across the ranks."""
    if batch_size % world_size:
        raise InputError(f"train: batch_size {batch_size} is not divisible by the {world_size} "
                         "distributed processes; the global batch is split evenly across them")
    return batch_size // world_size


def all_reduce_sums(values: Mapping[str, float], info: DistInfo,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Sum each value over the ranks (identity in a single process); float64 for accuracy.

    NaN values are treated as 0 and the keys are sorted, so every rank must pass the same keys.
    """
    keys = sorted(values)
    if not info.enabled or not keys:
        return {k: float(values[k]) for k in keys}
    vec = torch.tensor([float(values[k]) if math.isfinite(float(values[k])) else 0.0
                        for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return dict(zip(keys, vec.tolist()))


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """Rank 0's ``flag`` on every rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (one shard of a seeded per-epoch permutation per rank) that can
    start part-way into an epoch, so a resumed run sees the same batches as an uninterrupted
    one. ``drop_last`` keeps every rank's shard the same length.

    With ``world_size`` ranks and a per-rank batch ``b``, the global batch ``k`` of an epoch is
    the items ``k·b·W … (k+1)·b·W − 1`` of the permutation whatever ``W`` is, so a single
    process with batch ``b·W`` and ``W`` processes with batch ``b`` see the same pairs.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, batch_per_rank: int = 1) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=True)
        self.batch_per_rank = int(batch_per_rank)
        self.skip_batches = 0

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Start epoch ``epoch`` after its first ``skip_batches`` per-rank batches."""
        self.set_epoch(epoch)
        self.skip_batches = int(skip_batches)

    def _global_order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g).tolist()  # type: ignore[arg-type]
        else:
            order = list(range(len(self.dataset)))  # type: ignore[arg-type]
        return order[:self.total_size]

    def __iter__(self) -> Iterator[int]:
        order = self._global_order()
        # rank r takes, within each global batch, its own contiguous block of the per-rank size
        b, w = self.batch_per_rank, self.num_replicas
        mine = [order[k + self.rank * b + j]
                for k in range(0, len(order) - b * w + 1, b * w) for j in range(b)]
        return iter(mine[self.skip_batches * b:])

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.skip_batches, 0) * self.batch_per_rank

    def batches_per_epoch(self) -> int:
        """Full per-rank batches in one epoch."""
        return self.total_size // (self.batch_per_rank * self.num_replicas)
