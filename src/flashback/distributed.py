"""Training across processes: what each rank does when `flashback train` runs under torchrun or accelerate launch.

The launcher starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT. Every rank
loads the model, walks the same data order, and computes the gradient of its share of each step's segments; the
adapter's gradients (LoRA matrices and the marker rows: megabytes even for a 7B model) are then summed across ranks
in one all-reduce per optimizer step. Each rank's loss is normalised by the whole step's target count, so the sum is
the gradient one process would compute on the whole step, whatever the number of ranks, and every rank applies the
same update. DDP's bucketed overlap buys nothing at that size, and its hooks expect one forward per backward, where a
packed segment takes two (the shared prefix's cache, then the rows). Rank 0 validates, logs and writes.

A process started without a launcher is a world of one, and every method here is then a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flashback.errors import FlashbackError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, units: Sequence) -> list:
        """This rank's contiguous part of one step's units (a step holds the same number for every rank)."""
        n = len(units) // self.size
        return list(units[self.rank * n : (self.rank + 1) * n])

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """The values summed over the ranks (fp64, so that token counts stay exact)."""
        if self.size == 1:
            return list(values)
        total = torch.tensor(list(values), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Every trainable parameter's gradient summed over the ranks, in one flat all-reduce."""
        if self.size == 1:
            return
        grads = []
        for p in params:
            if p.grad is None:  # unused on this rank's share: it still takes part in the sum
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


ALONE = World()  # a process started without a launcher


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str) -> tuple[World, str]:
    """The world this process belongs to (joined on first call) and the device its rank trains on.

    Under a launcher, a CUDA device becomes cuda:LOCAL_RANK (one GPU per process, as the launchers assign them) and
    the ranks talk over NCCL; on CPUs over gloo.
    """
    if not launched():
        return ALONE, device
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise FlashbackError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: "
                "start at most one process per GPU"
            )
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size()), device


def peak_memory(device: str) -> dict:
    """This process's peak resident memory, and on CUDA the peak memory its tensors took on the device, in MiB."""
    import resource

    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if device.startswith("cuda"):
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def leave() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
