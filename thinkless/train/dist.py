"""Several processes (torchrun): PyTorch's own stack, FSDP2 for the models, gloo on CPU and NCCL on CUDA.

    torchrun --nproc_per_node=8 --no-python thinkless-train rl ...

- The process group starts from torchrun's environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`); one process is the
  plain single-process path, with no collective anywhere.
- The policy (and the frozen reference) are sharded with `fully_shard`, decoder layer by decoder layer, then whole.
  FSDP2 runs collectives in every forward and backward, so every rank must run the same number of them:
  `aligned` pads a rank's list of micro-batches with `None` up to the longest one, and a `None` runs a zero-weight
  pass.
- Gradients: FSDP2 averages them over ranks; `loss_scale` (the world size) undoes that, so the sum over ranks of
  the micro-batch losses is exactly the single-process loss.
- State: the model and optimizer states are gathered in full (`torch.distributed.checkpoint.state_dict`), so that a
  checkpoint loads with `from_pretrained` and resumes under any world size.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def loss_scale(self) -> float:
        return float(self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj` (any picklable value), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj):
        """Rank 0's `obj` on every rank (the others' `obj` is ignored). Over a gloo group of its own with no
        timeout to speak of: the other ranks may wait long (rank 0 reading a checkpoint of many gigabytes) where a
        collective of the training group would hit its timeout (NCCL: 10 minutes)."""
        if self.world == 1:
            return obj
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
        try:
            box = [obj]
            dist.broadcast_object_list(box, src=0, group=group)
            return box[0]
        finally:
            dist.destroy_process_group(group)

    def max(self, value: int) -> int:
        return max(self.gather(int(value)))

    def sum(self, value: float) -> float:
        return float(sum(self.gather(float(value))))

    def shard(self, items: list) -> list:
        """This rank's contiguous part of `items` (sizes differ by at most one)."""
        n = len(items)
        return items[self.rank * n // self.world : (self.rank + 1) * n // self.world]

    def aligned(self, batches: list) -> list:
        """`batches`, padded with None to the longest list on any rank (equal collective counts)."""
        return batches + [None] * (self.max(len(batches)) - len(batches))


_CURRENT = Dist()


def current() -> Dist:
    return _CURRENT


def init_distributed(device_name: str = "auto") -> Dist:
    """Join the process group that torchrun describes (once); one process without torchrun gets `Dist()`."""
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _CURRENT.world > 1:
        return _CURRENT
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    _CURRENT = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)
    return _CURRENT


def ended() -> None:
    """The process group was destroyed by someone else (vLLM's shutdown under external_launcher): forget it."""
    global _CURRENT
    _CURRENT = Dist()


def shutdown() -> None:
    """Leave the process group before exit: gloo's threads abort the process ("terminate called without an active
    exception") when the interpreter exits with the group still up."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        # The run's FSDP modules and device mesh sit in reference cycles that hold the process group: collected
        # here, while the interpreter is whole, the group is destroyed now and not during interpreter teardown
        # (where gloo aborted a rank in 1 of 15 two-rank runs; 0 of 90 with this, on the 2-core CPU).
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
    _CURRENT = Dist()


def shard_model(model, d: Dist):
    """FSDP2: each decoder layer, then the whole model (its embeddings, norm and lm_head), over all ranks."""
    if d.world == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_model_state(model, d: Dist) -> dict:
    """The whole model's state dict on every rank (plain tensors): for saving and for the rollout copy."""
    if d.world == 1:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model, optimizer, d: Dist) -> dict:
    """The optimizer state keyed by parameter names, whole (rank 0 has it; others get {}); any world size loads it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=d.world > 1)
    )


def load_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
