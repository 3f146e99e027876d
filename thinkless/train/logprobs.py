"""Log-probs of sampled tokens outside the loss: the old policy's and the reference's, and how far the rollout
engine's own log-probs are from the trainer's (the importance-sampling correction and its figure).

The trainer re-scores every sampled token with its own forward (`token_logprobs`, chunked over the vocabulary, no
autograd): the PPO ratio and the KL term are taken against these, not against the engine's numbers, which come
from other kernels (vLLM's, a bf16 KV cache, a nucleus). `importance_weights` re-weights each token by how likely
the trainer finds it against how the engine drew it, and `logp_diff` reports the gap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from thinkless.kernels import token_logprobs
from thinkless.train import packing
from thinkless.train.dist import Dist
from thinkless.train.model import hidden_states, lm_head
from thinkless.train.packing import pack
from thinkless.train.rollout import Rollouts

if TYPE_CHECKING:
    from thinkless.train.config import AlgoConfig


def micro_batches(ro: Rollouts, rows: list[int], algo: AlgoConfig) -> list[list[int]]:
    """The micro-batches of these rollout rows (`thinkless.train.packing.micro_batches`, lengths in tokens)."""
    return packing.micro_batches(rows, ro.attention_mask.sum(1).tolist(), algo)


@torch.no_grad()
def sequence_logprobs(model, ro: Rollouts, temperature: float, algo: AlgoConfig, rows=None, d: Dist | None = None):
    """[S, L-1] log-probs of every next token under `model`, chunked, without autograd (old policy, reference).
    Only `rows` (default: all) are filled; with a sharded model pass `d`, and every rank runs as many passes."""
    was_training = model.training
    if was_training:  # (eval() walks every module: worth skipping for a reference, which never trains)
        model.eval()  # no dropout: the old policy's log-probs are a constant of the step
    S, L = ro.input_ids.shape
    out = torch.zeros(S, L - 1, dtype=torch.float32, device=ro.input_ids.device)
    rows = list(range(S)) if rows is None else rows
    batches = micro_batches(ro, rows, algo)
    for idx in d.aligned(batches) if d is not None else batches:
        if idx is None:  # a pass that only keeps this rank's collectives in step with the others
            hidden_states(model, ro.input_ids[:1, :-1], ro.attention_mask[:1, :-1])
            continue
        if algo.padding_free:
            p = pack(ro.input_ids, ro.attention_mask, None, idx)
            hidden = hidden_states(model, p.input_ids, None, p.position_ids)
            weight, bias = lm_head(model)  # after the forward: gathered there when sharded
            logp = token_logprobs(hidden, weight, p.target_ids, bias=bias, temperature=temperature)
            out[p.rows, p.cols] = logp.reshape(-1).float()
        else:
            ids, attention = ro.input_ids[idx], ro.attention_mask[idx]
            hidden = hidden_states(model, ids[:, :-1], attention[:, :-1])
            weight, bias = lm_head(model)
            out[idx] = token_logprobs(hidden, weight, ids[:, 1:], bias=bias, temperature=temperature).float()
    if was_training:
        model.train()
    return out


def all_logprobs(model, ro: Rollouts, temperature: float, algo: AlgoConfig, d: Dist, sharded: bool) -> torch.Tensor:
    """[S, L-1] log-probs, each rank computing its contiguous share of the rows, then gathered."""
    if d.world == 1:
        return sequence_logprobs(model, ro, temperature, algo)
    rows = d.shard(list(range(ro.input_ids.shape[0])))
    part = sequence_logprobs(model, ro, temperature, algo, rows, d if sharded else None)
    return torch.cat([p.to(ro.input_ids.device) for p in d.gather(part[rows].cpu())])


def importance_weights(old_logp, rollout_logp, response: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict]:
    """Truncated importance sampling (TIS): w = min(exp(old - rollout log-prob), cap) per token, 1 off the responses.

    The rollout engine samples from its own numerics (vLLM's kernels, a bf16 KV cache); the PPO ratio is taken
    against the trainer's old log-probs. w re-weights each token towards the distribution the loss assumes, and the
    cap bounds the variance. As w > 0 multiplies the clipped PPO term of its token, it is folded into a per-token
    advantage: max(-wA r, -wA clip(r)) = w max(-A r, -A clip(r)). The KL term is not weighted.

    With rollout.top_p < 1 the engine's log-probs are those of the renormalised nucleus while the trainer's are the
    full softmax at the temperature: w then also carries the nucleus mass (<= 1), as in verl and TRL."""
    log_ratio = (old_logp - rollout_logp).double()
    ratio = log_ratio.exp()
    weights = torch.where(response, ratio.clamp(max=cap), torch.ones_like(ratio)).to(old_logp.dtype)
    n = response.sum().clamp(min=1)
    stats = {
        "is_weight_mean": float((weights.double() * response).sum() / n),  # the weights applied, truncated
        "is_truncated_frac": float(((ratio > cap) & response).sum() / n),
    }
    return weights, stats


def importance_correction(
    ro: Rollouts, advantages: torch.Tensor, old_logp, algo: AlgoConfig
) -> tuple[torch.Tensor, dict]:
    """The advantages the loss takes ([S], or [S, L-1] importance-weighted with `algo.is_correction`), and the
    rollout_logp_diff figure, when the engine recorded log-probs and the old policy's are known."""
    if ro.rollout_logp is None or old_logp is None:
        return advantages, {}
    stats = logp_diff_metric(*logp_diff(old_logp, ro))
    if not algo.is_correction:
        return advantages, stats
    response = ro.response_mask[:, 1:]
    known = response & ~ro.rollout_logp.isnan()  # an engine may leave a token's log-prob out: weight 1
    rollout_logp = torch.where(known, ro.rollout_logp, old_logp)
    weights, is_stats = importance_weights(old_logp, rollout_logp, response, algo.is_cap)
    return advantages[:, None] * weights, {**stats, **is_stats}


def logp_diff(logp: torch.Tensor, ro: Rollouts) -> tuple[float, int]:
    """The sum of |trainer log-prob - engine log-prob| over the response tokens both know, and their count (sums:
    ranks that each hold some rows add them up)."""
    known = ro.response_mask[:, 1:] & ~ro.rollout_logp.isnan() & ~logp.isnan()
    return float((logp - ro.rollout_logp).abs()[known].double().sum()), int(known.sum())


def logp_diff_metric(total: float, count: int) -> dict:
    """rollout_logp_diff: the mean gap per token; no token known, no figure (0 would read as perfect agreement)."""
    return {"rollout_logp_diff": total / count} if count else {}
