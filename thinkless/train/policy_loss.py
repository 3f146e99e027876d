"""The DeGRPO loss of sampled rollouts on the policy: one micro-batch (`policy_loss`), one mini-batch's forward and
backward (`mini_batch_backward`), and whether the old policy's log-probs can be the training forward's own
(`on_policy`).

The counts that normalise each term (control tokens, response tokens, sequences) are taken over the whole mini-batch
before it is cut into micro-batches (`mini_batch_normalizers`), so the micro-batches' losses add up to the
mini-batch's loss: `algo.micro_batch_size`, `algo.padding_free` and the number of ranks cannot change the update.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from thinkless.kernels import DeGRPOParams, Normalizers, fused_linear_degrpo_loss, sequence_token_weights
from thinkless.train.dist import Dist
from thinkless.train.logprobs import micro_batches
from thinkless.train.model import hidden_states, lm_head
from thinkless.train.packing import pack
from thinkless.train.rollout import Rollouts

if TYPE_CHECKING:
    from thinkless.train.config import Config


def loss_options(config: Config) -> dict:
    """The options of `fused_linear_degrpo_loss` that come from the settings: every DeGRPO option (`DeGRPOParams`)
    from the `algo.*` setting of its name, with the settings' 0 for "off" as the loss's None, and the fused pass's
    own two (temperature, entropy_coef)."""
    algo = config.algo
    options = {f.name: getattr(algo, f.name) for f in dataclasses.fields(DeGRPOParams)}
    options.update(
        kl_clamp=algo.kl_clamp or None, loss_agg_norm=float(algo.loss_agg_norm or config.rollout.max_new_tokens)
    )
    return dict(temperature=config.rollout.temperature, entropy_coef=algo.entropy_coef, **options)


def mini_batch_normalizers(ro: Rollouts, rows: list[int]) -> Normalizers:
    """The loss's counts over a whole mini-batch, before it is cut into micro-batches (or shared among ranks).
    Every rank holds the gathered rollouts, so each counts the same without a collective."""
    return Normalizers.count(ro.response_mask[rows, 1:])


def policy_loss(
    model, ro: Rollouts, idx: list[int], old_logp, ref_logp, advantages, config: Config, normalizers=None, logp_out=None
):
    """The DeGRPO loss and metrics of one micro-batch of sequences, padded or packed (`algo.padding_free`), with
    the mini-batch's `normalizers` (default: the micro-batch's own counts). `old_logp` None: on-policy (the old
    log-probs are those of this forward, detached). `logp_out` [S, L-1]: receives this forward's log-probs."""
    algo = config.algo
    options = loss_options(config)
    if algo.padding_free:
        p = pack(ro.input_ids, ro.attention_mask, ro.response_mask, idx)
        hidden = hidden_states(model, p.input_ids, None, p.position_ids)
        weight, bias = lm_head(model)  # after the forward: gathered there when sharded
        # A packed row holds several sequences: their 1/T_i come from the padded rows.
        token_weights = None
        if algo.loss_agg == "seq_mean_token_mean":
            token_weights = p.gather(sequence_token_weights(ro.response_mask[:, 1:], decoupled=algo.decoupled))
        packed = lambda x: p.gather(x) if x is not None else None  # noqa: E731
        loss, metrics = fused_linear_degrpo_loss(
            hidden, weight, p.target_ids, packed(old_logp), _packed_advantages(p, advantages, idx), p.loss_mask,
            bias=bias, ref_logp=packed(ref_logp), control_mask=p.control_mask, normalizers=normalizers,
            token_weights=token_weights, **options,
        )  # fmt: skip
        if logp_out is not None:
            logp_out[p.rows, p.cols] = metrics["logp"].detach().reshape(-1).float()
        return loss, metrics
    hidden = hidden_states(model, ro.input_ids[idx, :-1], ro.attention_mask[idx, :-1])
    weight, bias = lm_head(model)
    loss, metrics = fused_linear_degrpo_loss(
        hidden, weight, ro.input_ids[idx, 1:], old_logp[idx] if old_logp is not None else None, advantages[idx],
        ro.response_mask[idx, 1:], bias=bias, ref_logp=ref_logp[idx] if ref_logp is not None else None,
        normalizers=normalizers, **options,
    )  # fmt: skip
    if logp_out is not None:
        logp_out[idx] = metrics["logp"].detach().float()
    return loss, metrics


def on_policy(config: Config, model) -> bool:
    """Whether the step's samples are on-policy when the loss sees them: one update per step (one PPO epoch over one
    mini-batch), no importance correction (it needs the old log-probs first) and no dropout (the training forward
    must be the old policy's). Then the old log-probs are the training forward's own, detached: the ratio is exactly
    1 and no separate pass runs (as TRL and verl do). Otherwise they come from a pass of their own."""
    algo = config.algo
    one_update = algo.ppo_epochs == 1 and (
        algo.mini_batch_size == 0 or algo.mini_batch_size >= config.trainer.batch_size
    )
    return one_update and not algo.is_correction and not has_dropout(model)


def has_dropout(model) -> bool:
    """A dropout layer or a config rate above 0: a training forward that is not the old policy's."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    # Dropout rates that models apply functionally, and MoE routers' training-time jitter.
    rates = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
             "activation_dropout", "layerdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
             "residual_dropout", "embedding_dropout", "router_jitter_noise", "input_jitter_noise")  # fmt: skip
    return any(float(getattr(config, name, 0) or 0) > 0 for name in rates)


def _packed_advantages(p, advantages: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Per-sequence [S] or per-token [S, L-1] advantages (importance-weighted) in the packed layout."""
    return p.gather(advantages) if advantages.dim() == 2 else p.per_sequence(advantages[idx])


LOSS_METRICS = ("loss", "control_loss", "response_loss", "clip_frac", "kl", "entropy")


def mini_batch_backward(
    model, ro: Rollouts, rows: list[int], old_logp, ref_logp, advantages, config: Config, d: Dist, logp_out=None
):
    """Forward and backward of one mini-batch (rollout `rows`): this rank's share of it, cut into micro-batches,
    adds its gradient to `model`'s .grad. Returns this rank's sums of the LOSS_METRICS; over ranks they add up to
    the mini-batch's values. `old_logp` None: on-policy; `logp_out`: as in `policy_loss`.

    Every micro-batch is normalised by the mini-batch's counts, so its loss is its exact share of the mini-batch
    loss, and the sum does not depend on how the rows were cut (micro_batch_size, token budget, padding_free,
    ranks)."""
    normalizers = mini_batch_normalizers(ro, rows)
    sums = dict.fromkeys(LOSS_METRICS, 0.0)
    for idx in d.aligned(micro_batches(ro, d.shard(rows), config.algo)):
        dummy = idx is None  # a pass that keeps FSDP's collectives in step: zero weight
        loss, metrics = policy_loss(
            model, ro, idx or rows[:1], old_logp, ref_logp, advantages, config, normalizers, None if dummy else logp_out
        )
        share = 0.0 if dummy else 1.0
        # FSDP averages the ranks' gradients; loss_scale (= world) makes that average the sum.
        (loss * share * d.loss_scale).backward()
        metrics["loss"] = loss.detach()
        for key in LOSS_METRICS:
            sums[key] += metrics[key].item() * share
    return sums
