"""Scale-out with plain PyTorch DDP under `torchrun`, and the bookkeeping that makes N processes equal one.

Each rank draws the *same* global batch of indices and noise from a generator seeded identically
everywhere, then keeps its own contiguous slice (`shard`). DDP averages the gradients, so N processes
with global batch B take exactly the steps one process with batch B would (up to float summation
order). Rank 0 alone logs and saves; the others wait at a `barrier` wherever they must read what it wrote.

A loss that couples the samples of a batch (CLIP's contrastive loss compares every image with every
caption) needs the other ranks' features: `gather_with_local_grad` builds the global batch on every rank,
with the gradient flowing through this rank's own slice.
"""
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minimedi.errors import UserError
from minimedi.grad import ScaleGrad

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
# Rank 0 may make a prerequisite on its own (the subgroup classifier) while the others wait at a barrier:
# allow that wait to last as long as such a job does, not the 10-30 minute default of the collectives.
BARRIER_TIMEOUT = datetime.timedelta(hours=6)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def resolve_device(device="auto"):
    """`--device` as a torch device name: auto -> cuda when available, else cpu."""
    if not DEVICE.fullmatch(device):
        raise UserError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for, but this machine has no MPS device")
    return device


def setup(device="auto"):
    """Pick the device and join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device)
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=BARRIER_TIMEOUT)
    return Dist(rank=rank, world=world, device=torch.device(device))


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d):
    """Wait until every rank gets here (a no-op for a single process)."""
    if d.world > 1:
        dist.barrier()


def any_rank(flag, d):
    """True on every rank when `flag` is True on any of them (e.g. a Ctrl-C that reached only one)."""
    if d.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap_ddp(model, d):
    """DDP across ranks (a no-op for a single process)."""
    if d.world == 1:
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard(batch, d):
    """This rank's contiguous slice of a global batch (tensors, or lists of strings)."""
    if d.world == 1:
        return batch
    n = len(batch)
    if n % d.world:
        raise UserError(f"global batch {n} is not divisible by the {d.world} processes")
    per = n // d.world
    return batch[d.rank * per:(d.rank + 1) * per]


def gather_with_local_grad(x, d):
    """The global batch [world * n, ...] from every rank's local x [n, ...], in rank order, identical on
    every rank; only this rank's own slice carries gradient.

    Every rank then computes the same global loss L. Its backward reaches this rank's parameters through
    its own slice only, giving sum-over-ranks contributions that DDP *averages*; the own slice's gradient is
    therefore multiplied by `world`, so the average is the full dL/dtheta of one process on the global batch.
    Parameters that act on the gathered batch directly (CLIP's logit scale) see the whole of L on every rank
    and need no correction.
    """
    if d.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[d.rank] = ScaleGrad.apply(x, float(d.world))
    return torch.cat(parts)
