"""Data parallelism for the trainer: which process am I, and averaging gradients across processes.

    accelerate launch --multi_gpu --num_processes 2 -m kl_lib.rl.train --config ...   (GPUs, or CPUs with gloo)
    torchrun --nproc_per_node 2 -m kl_lib.rl.train --config ...                        (the same, without accelerate)

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init` reads them and joins the process
group (``nccl`` on CUDA, ``gloo`` on CPU). Every rank holds the whole model and samples the same prompts; rank r
takes its contiguous share of the prompt groups (``split``), so RLOO/GRPO groups never straddle ranks. Each
rank's loss is the mean over its own sequences, and :meth:`Dist.average_gradients` all-reduces the gradients
to their mean before clipping — with equal shares this is the gradient of the mean over the global batch,
which is exactly what DistributedDataParallel computes (without overlapping communication with the backward
pass, which matters little for LoRA-sized gradients and keeps LoRA's ``disable_adapter`` reference,
``generate`` and the shared prompt pass free of DDP wrappers).

Only rank 0 writes the run directory; scalar metrics are averaged over ranks before it writes them.

Departure from the paper's infrastructure: no FSDP/ZeRO sharding; every rank keeps a full copy of the model,
the optimizer state and (for full fine-tuning) the reference, which is enough for one-GPU-sized models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "init", "split"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise mean of ``values`` over ranks (a copy; the identity on one process)."""
        if not self.enabled:
            return values.clone()
        out = values.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (so that all ranks stop together)."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each ``p.grad`` by its mean over ranks (one flat all-reduce)."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset: offset + n].view_as(p).clone()
            offset += n

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def init() -> Dist:
    """The process's place in a launch (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``); joins the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank)


def split(n_items: int, dist_: Dist, shards: int = 0) -> list[tuple[int, int]]:
    """This rank's ``[start, stop)`` ranges of ``n_items`` items cut into ``shards`` equal chunks (0 = one per rank).

    Rank r gets the consecutive chunks ``r·S/W … (r+1)·S/W − 1``; every range is a rollout shard with its own
    sampling seed, so the samples do not depend on how many processes draw them.
    """
    shards = shards or dist_.world_size
    if n_items % shards or shards % dist_.world_size:
        raise ValueError(f"cannot split {n_items} prompts into {shards} rollout shards over {dist_.world_size} "
                         f"processes: rollout_shards must divide prompts_per_step and be a multiple of the number "
                         f"of processes")
    size, per_rank = n_items // shards, shards // dist_.world_size
    first = dist_.rank * per_rank
    return [((first + k) * size, (first + k + 1) * size) for k in range(per_rank)]
