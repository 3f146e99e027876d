"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: the gradient of one fixed batch, with the
policy sharded by FSDP2 over the ranks, against the single-process gradient (every rank computes that one too)."""

import copy
import json
import sys

import torch
from test_packing import rollouts, tiny_model

from thinkless.train.config import load_config
from thinkless.train.dist import init_distributed, shard_model, shutdown
from thinkless.train.rl import micro_batches, policy_loss, sequence_logprobs


def main(out_path: str, padding_free: str) -> None:
    d = init_distributed("cpu")
    assert d.world == 2
    torch.manual_seed(0)
    ro = rollouts([3, 5, 1, 4, 2, 6, 2], [6, 2, 4, 1, 7, 3, 5], seed=1)
    model = tiny_model("sdpa")
    S = ro.input_ids.shape[0]
    advantages = torch.randn(S, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = list(range(S))
    half = len(d.shard(rows)) if d.rank == 0 else S - len(d.shard(rows))
    options = [f"algo.padding_free={padding_free}", "algo.kl_coef=0.05", "rollout.temperature=0.8"]
    config = load_config(None, [f"algo.micro_batch_size={max(half, S - half)}", *options])
    old = sequence_logprobs(model, ro, 0.8, config.algo).double() + 0.01
    ref = old - 0.2

    # Single process: the same micro-batches (the two contiguous halves), each weighted by its share of sequences.
    single = copy.deepcopy(model)
    first = S // 2  # the split `Dist.shard` makes for 2 ranks
    grads = []
    for idx in ([*range(first)], [*range(first, S)]):
        loss, _ = policy_loss(single, ro, idx, old, ref, advantages, config)
        (loss * len(idx) / S).backward()
        grads.append({n: p.grad.clone() for n, p in single.named_parameters()})
    expect, first_half_only = grads[1], grads[0]

    # Two ranks: each its share, sharded; FSDP2 averages the gradients and loss_scale undoes it.
    sharded = shard_model(model, d)
    for idx in d.aligned(micro_batches(ro, d.shard(rows), config.algo)):
        loss, _ = policy_loss(sharded, ro, idx or rows[:1], old, ref, advantages, config)
        share = 0.0 if idx is None else len(idx) / S
        (loss * share * d.loss_scale).backward()
    errors, control = {}, {}
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
    for name, p in sharded.named_parameters():
        grad = p.grad.full_tensor()
        errors[name] = rel(grad, expect[name])
        control[name] = rel(first_half_only[name], expect[name])  # what a rank's share alone would give
    if d.is_main:
        with open(out_path, "w") as f:
            json.dump({"errors": errors, "control": control, "params": len(expect)}, f)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
