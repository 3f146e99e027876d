"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: the loss and gradient of one fixed
mini-batch, with the policy sharded by FSDP2 over the ranks, against the whole mini-batch's by the reference
formulas (every rank computes that one too), for every `algo.loss_agg` and for DeGRPO and vanilla GRPO."""

import copy
import itertools
import json
import sys

from test_loss_invariance import AGGS, COMMON, expected, mini_batch, rel

from thinkless.train.config import load_config
from thinkless.train.dist import init_distributed, shard_model, shutdown
from thinkless.train.policy_loss import mini_batch_backward


def main(out_path: str, padding_free: str) -> None:
    d = init_distributed("cpu")
    assert d.world == 2
    ro, model, advantages, old, ref = mini_batch()
    S = ro.input_ids.shape[0]
    results = []
    for loss_agg, decoupled in itertools.product(AGGS, (True, False)):
        options = [*COMMON, f"algo.loss_agg={loss_agg}", f"algo.decoupled={decoupled}"]
        config = load_config(None, [*options, "algo.micro_batch_size=2", f"algo.padding_free={padding_free}"])
        want_loss, want_grads, _ = expected(model, ro, advantages, old, ref, config)
        # Two ranks: each its share of the rows, sharded; FSDP2 averages the gradients and loss_scale undoes it.
        sharded = shard_model(copy.deepcopy(model), d)
        sums = mini_batch_backward(sharded, ro, list(range(S)), old, ref, advantages, config, d)
        loss = sum(part["loss"] for part in d.gather(sums))
        errors = {name: rel(p.grad.full_tensor(), want_grads[name]) for name, p in sharded.named_parameters()}
        # What one rank's share alone gives: the comparison above can fail.
        control = sums["loss"] - want_loss
        results.append({"loss_agg": loss_agg, "decoupled": decoupled, "loss": loss, "want_loss": want_loss,
                        "errors": errors, "params": len(want_grads), "rank0_share_gap": control})  # fmt: skip
    if d.is_main:
        with open(out_path, "w") as f:
            json.dump(results, f)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
