"""The RL update of one fixed mini-batch does not depend on how it is cut: micro-batch size, padding-free packing
(and, in test_distributed.py, the number of ranks) give the loss and gradients of the whole mini-batch, for every
`algo.loss_agg` and for DeGRPO and vanilla GRPO.

The expected values come from `reference.fused_linear_degrpo_loss` on the whole padded mini-batch (materialised
logits, autograd), not from the trainer's own code path.
"""

import copy
import itertools

import pytest
import torch
from test_packing import rollouts, tiny_model

from thinkless.kernels import reference
from thinkless.train.config import load_config
from thinkless.train.dist import Dist
from thinkless.train.logprobs import sequence_logprobs
from thinkless.train.model import hidden_states, lm_head
from thinkless.train.policy_loss import LOSS_METRICS, loss_options, mini_batch_backward

# Short and long answers in one mini-batch: per-micro-batch normalisation would weight their tokens differently.
PROMPTS = [3, 5, 1, 4, 2, 6, 2]
RESPONSES = [9, 2, 7, 1, 8, 3, 2]
AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
COMMON = ["algo.kl_coef=0.05", "algo.kl_clamp=0.02", "algo.entropy_coef=0.01", "algo.alpha=0.5",
          "rollout.temperature=0.8", "algo.loss_agg_norm=16"]  # fmt: skip


def mini_batch():
    """A fixed mini-batch: rollouts, advantages, old and reference log-probs, and the float64 model."""
    ro = rollouts(PROMPTS, RESPONSES, seed=1)
    model = tiny_model("sdpa")
    S = ro.input_ids.shape[0]
    g = torch.Generator().manual_seed(2)
    advantages = torch.randn(S, generator=g, dtype=torch.float64)
    config = load_config(None, COMMON)
    old = sequence_logprobs(model, ro, 0.8, config.algo).double()
    old = old + 0.05 * torch.randn(old.shape, generator=g, dtype=torch.float64)  # some ratios clip
    ref = old - 0.1 * torch.rand(old.shape, generator=g, dtype=torch.float64)
    return ro, model, advantages, old, ref


def expected(model, ro, advantages, old, ref, config):
    """Loss and gradients of the whole mini-batch by the reference formulas (one padded pass, full logits)."""
    model = copy.deepcopy(model)
    hidden = hidden_states(model, ro.input_ids[:, :-1], ro.attention_mask[:, :-1])
    weight, bias = lm_head(model)
    options = loss_options(config)
    temperature = options.pop("temperature")
    loss, metrics = reference.fused_linear_degrpo_loss(
        hidden, weight, ro.input_ids[:, 1:], old, advantages, ro.response_mask[:, 1:], bias=bias, ref_logp=ref,
        temperature=temperature, **options,
    )  # fmt: skip
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, metrics


def trainer_pass(model, ro, advantages, old, ref, config):
    model = copy.deepcopy(model)
    sums = mini_batch_backward(model, ro, list(range(ro.input_ids.shape[0])), old, ref, advantages, config, Dist())
    return sums, {n: p.grad.clone() for n, p in model.named_parameters()}


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def batch():
    return mini_batch()


@pytest.mark.parametrize(("loss_agg", "decoupled"), list(itertools.product(AGGS, (True, False))))
def test_loss_and_gradients_do_not_depend_on_the_cut(batch, loss_agg, decoupled):
    ro, model, advantages, old, ref = batch
    S = ro.input_ids.shape[0]
    options = [*COMMON, f"algo.loss_agg={loss_agg}", f"algo.decoupled={decoupled}"]
    want_loss, want_grads, want_metrics = expected(model, ro, advantages, old, ref, load_config(None, options))
    for size, padding_free in itertools.product((1, 2, 3, S), (False, True)):
        config = load_config(None, [*options, f"algo.micro_batch_size={size}", f"algo.padding_free={padding_free}"])
        sums, grads = trainer_pass(model, ro, advantages, old, ref, config)
        where = f"micro_batch_size={size} padding_free={padding_free}"
        assert sums["loss"] == pytest.approx(want_loss, rel=1e-6, abs=1e-12), where
        for name, want in want_grads.items():
            assert rel(grads[name], want) < 1e-6, (where, name)
        # The metrics add up over micro-batches too.
        for key in set(LOSS_METRICS) - {"loss"}:
            assert sums[key] == pytest.approx(float(want_metrics[key]), rel=1e-6, abs=1e-12), (where, key)


def test_the_check_can_fail_per_micro_batch_normalisation_differs(batch):
    """The authors' per-micro-batch token-means (today's verl and the old trainer) change with the cut: what the
    test above rules out."""
    ro, model, advantages, old, ref = batch
    config = load_config(None, [*COMMON, "algo.micro_batch_size=1"])
    _, want_grads, _ = expected(model, ro, advantages, old, ref, config)
    from thinkless.train.policy_loss import policy_loss

    model = copy.deepcopy(model)
    S = ro.input_ids.shape[0]
    for i in range(S):  # each micro-batch normalised on its own, weighted by its share of the sequences
        loss, _ = policy_loss(model, ro, [i], old, ref, advantages, config)
        (loss / S).backward()
    worst = max(rel(p.grad, want_grads[n]) for n, p in model.named_parameters())
    assert worst > 1e-2
