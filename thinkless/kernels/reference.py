"""Readable PyTorch ground truth for every thinkless kernel.

The tests run these in float64 and compare every backend against them; on CPU, until the native extension is
built, they are also the `torch` backend. Each formula names the line of the paper (Fang et al., "Thinkless:
LLM Learns When to Think", arXiv 2505.13379) or of the original code (VainF/Thinkless,
`verl/trainer/ppo/core_algos.py`) that it follows. Inputs are assumed valid: the public functions in
`thinkless.kernels` check them first.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "group_advantages",
    "degrpo_loss",
    "first_response_token_mask",
    "kl_penalty",
    "STAT_NAMES",
    "token_logprobs",
    "fused_linear_degrpo_loss",
]


def group_advantages(rewards: Tensor, group_ids: Tensor, *, normalize_std: bool = False, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages, float32 [N].

    `compute_grpo_outcome_advantage` in the original code: A_i = r_i - mean(r_group) (Dr. GRPO, the Thinkless
    default, `std_normalizer=False`), or (r_i - mean) / (std + eps) with the unbiased std (GRPO). A group of a
    single sample has no baseline to compare against and gets 0.
    """
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = rewards.to(dtype)
    _, group, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    size = counts.to(dtype)[group]
    mean = torch.zeros(len(counts), dtype=dtype, device=r.device).index_add_(0, group, r)[group] / size
    advantages = r - mean
    if normalize_std:
        sq = torch.zeros(len(counts), dtype=dtype, device=r.device).index_add_(0, group, advantages**2)[group]
        std = (sq / (size - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std in the original
        advantages = advantages / (std + eps)
    advantages = torch.where(size > 1, advantages, torch.zeros_like(advantages))
    return advantages.float()


def first_response_token_mask(response_mask: Tensor) -> Tensor:
    """bool [B,T]: True at the first response token of each row, the control token `<short>` / `<think>`.

    The original code puts it at column 0 (`cond_mask[:, 1:] = 0`) because its responses are right-padded and
    start at 0; taking the first True of the mask gives the same position and also works for left padding.
    """
    return response_mask & (response_mask.long().cumsum(dim=1) == 1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kl_type: str, clamp: float | None = None) -> Tensor:
    """Per-token KL estimator between the policy and the reference (Schulman, "Approximating KL divergence").

    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1 (verl's `low_var_kl`).
    k3 is evaluated in float64: at the small log-ratios of real training (|d| ~ 1e-2) its three O(1) terms cancel
    to ~d^2/2, and float32 would keep only a few correct digits. `clamp` bounds the estimate to [-clamp, clamp]
    (gradient 0 outside), as the authors' `kl_penalty` does for low_var_kl with 10
    (VainF/Thinkless `verl/verl/trainer/ppo/core_algos.py`, `torch.clamp(kld, min=-10, max=10)`).
    """
    log_ratio = logp - ref_logp
    if kl_type == "k1":
        k = log_ratio
    elif kl_type == "k2":
        k = 0.5 * log_ratio**2
    elif kl_type == "k3":
        d = log_ratio.double()
        k = (torch.exp(-d) + d - 1).to(log_ratio.dtype)
    else:
        raise ValueError(f"kl_type must be one of 'k1', 'k2', 'k3', got {kl_type!r}")
    return k if clamp is None else torch.clamp(k, -clamp, clamp)


# The order of the statistics that every backend returns next to the loss.
STAT_NAMES = ("control_loss", "response_loss", "clip_frac", "kl", "ratio_mean", "control_tokens", "response_tokens")

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def _masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    # A select, not a product: padding may hold -inf, and 0 * inf is NaN. Means divide by max(count, 1), not
    # verl's (count + 1e-8): exact for non-empty masks, 0 for an empty one, and the graph is kept, so a rank with
    # no response tokens still joins the backward.
    return torch.where(mask, x, torch.zeros_like(x)).sum()


def _per_row_weights(tokens: Tensor) -> Tensor:
    """1 / T_i on the tokens of row i (T_i = the row's count), 0 elsewhere: seq_mean_token_mean's inner mean."""
    count = tokens.sum(dim=1, keepdim=True).to(torch.float64)
    return torch.where(tokens, 1.0 / count.clamp(min=1), torch.zeros((), dtype=torch.float64, device=tokens.device))


def degrpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    control_mask: Tensor | None = None,
    alpha: float = 1e-3,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    kl_clamp: float | None = None,
    decoupled: bool = True,
    loss_agg: str = "token_mean",
    loss_agg_norm: float | None = None,
    normalizers=None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DeGRPO objective on per-token log-probs [B,T]; `compute_policy_loss` in the original code.

    Only `logp` receives a gradient; old, reference log-probs and advantages are constants of the step.

    The counts that divide each term come from `normalizers` (control_tokens, response_tokens, sequences), counted
    over the whole mini-batch before it was cut into micro-batches, so that the sum of the micro-batches' losses is
    the mini-batch's loss whatever the cut; without them, from these inputs. With C the control tokens (each
    sequence's first response token), R the response tokens after them, L_t the clipped PPO token loss:

        decoupled (DeGRPO)    alpha * sum_C L / N_C  +  response term over R
        not decoupled (GRPO)                            response term over C and R

        loss_agg                 response term                       the authors' code
        token_mean               sum L / N                           `verl_F.masked_mean(token_loss, resp_mask)`
        seq_mean_token_mean      1/S sum_i 1/T_i sum_{t in i} L      the paper's objective (1/G sum_i 1/|o_i|)
        seq_mean_token_sum_norm  sum L / (S * loss_agg_norm)         Dr. GRPO's constant (not in their code)

    N is the count of the term's tokens (N_R = response_tokens - control_tokens decoupled, response_tokens
    otherwise), S the sequences and T_i the term's tokens in sequence i. `token_weights` [B, T] replaces 1/T_i
    (packed rows, where a row holds several sequences) and multiplies L in the other modes. KL is the token-mean
    over all response tokens (`masked_mean(kld, response_mask)`), as the authors' actor adds it.

    Where the authors differ: they normalise each micro-batch on its own (`compute_policy_loss` per micro-batch,
    then `loss / self.gradient_accumulation` in `verl/verl/workers/actor/dp_actor.py`, update_policy). With fixed
    micro-batches that is a sequence-weighted mean of per-micro-batch means; in their run (`use_dynamic_bsz`,
    token-budget micro-batches, and gradient_accumulation = ppo_mini_batch_size // ppo_micro_batch_size = 1 after
    fsdp_workers.py scales both by rollout.n / world) it is the *sum* of the micro-batch means, so the step grows
    with the number of micro-batches. With normalizers the same formulas are taken over the mini-batch instead,
    so that neither `algo.micro_batch_size`, the token budget nor the number of ranks can change the update.
    """
    dtype = torch.promote_types(logp.dtype, torch.float32)
    response_mask = response_mask.bool()

    def response_only(x: Tensor) -> Tensor:
        # Padding may hold anything (-inf log-probs are common); zero it before any arithmetic, so that neither
        # the loss nor the gradient of a masked token can turn into NaN.
        return torch.where(response_mask, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))

    logp = response_only(logp)
    old_logp = response_only(old_logp.detach())
    advantages = advantages.detach()
    advantages = response_only(advantages[:, None] if advantages.dim() == 1 else advantages)
    control = first_response_token_mask(response_mask) if control_mask is None else control_mask.bool()
    control = control & response_mask  # a control token is a response token
    rest = response_mask & ~control  # `resp_mask[:, 0] = 0`: every response token after the control token

    # The paper's token-level surrogate L_{i,t}: PPO clipping (original `pg_losses`, `pg_losses2`, `torch.max`).
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped)

    def count(name: str, local: Tensor) -> Tensor:
        value = local if normalizers is None else normalizer(normalizers, name)
        return torch.as_tensor(value, dtype=dtype, device=logp.device)

    # Every divisor is at least 1: an empty term contributes 0, never NaN.
    n_control_raw = count("control_tokens", control.sum())
    n_response_raw = count("response_tokens", response_mask.sum())
    n_rest = (n_response_raw - n_control_raw).clamp(min=1)
    n_control, n_response = n_control_raw.clamp(min=1), n_response_raw.clamp(min=1)
    n_sequences = count("sequences", control.sum()).clamp(min=1)  # default: one control token per sequence
    term = rest if decoupled else response_mask
    if loss_agg == "token_mean":
        divisor = n_rest if decoupled else n_response
        weights = torch.ones_like(token_loss)
    elif loss_agg == "seq_mean_token_mean":
        divisor = n_sequences
        weights = _per_row_weights(term).to(dtype)
    elif loss_agg == "seq_mean_token_sum_norm":
        divisor = n_sequences * float(loss_agg_norm)
        weights = torch.ones_like(token_loss)
    else:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if token_weights is not None:  # only the term's tokens are read: others may hold anything
        weights = torch.where(term, token_weights.detach().to(dtype), torch.zeros((), dtype=dtype, device=term.device))
    response_term = _masked_sum(weights * token_loss, term) / divisor
    control_loss = _masked_sum(token_loss, control) / n_control
    if decoupled:
        # DeGRPO, the paper's decoupled objective (`pg_loss = thinkless_alpha * cond_loss + resp_loss`): the control
        # token is normalised on its own, so a 10k-token answer no longer outweighs the token that picks the mode.
        loss = alpha * control_loss + response_term
    else:
        loss = response_term  # vanilla GRPO: the control token is one response token among the others

    kl = torch.zeros((), dtype=dtype, device=logp.device)
    if ref_logp is not None:
        estimate = kl_penalty(logp, response_only(ref_logp.detach()), kl_type, kl_clamp)
        kl = _masked_sum(estimate, response_mask) / n_response
    if kl_coef != 0.0:
        loss = loss + kl_coef * kl

    metrics = {
        "control_loss": control_loss,
        "response_loss": _masked_sum(token_loss, rest) / n_rest,
        "clip_frac": _masked_sum((clipped > unclipped).to(dtype), response_mask) / n_response,
        "kl": kl,
        "ratio_mean": _masked_sum(ratio, response_mask) / n_response,
        "control_tokens": control.sum().to(dtype),
        "response_tokens": response_mask.sum().to(dtype),
    }
    return loss, {name: value.detach() for name, value in metrics.items()}


def normalizer(normalizers, name: str):
    """A count from a `Normalizers`, a mapping or any object with the three attributes."""
    return normalizers[name] if isinstance(normalizers, dict) else getattr(normalizers, name)


def token_logprobs(
    hidden: Tensor, weight: Tensor, target_ids: Tensor, *, bias: Tensor | None = None, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(log-prob of each target token, entropy of each token's distribution), from the materialised logits.

    logits = (hidden @ weight^T + bias) / temperature, formed in the inputs' dtype as a model's lm_head would, then
    taken to at least float32 for the softmax. This is the [tokens x vocab] tensor the fused kernels never build.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def fused_linear_degrpo_loss(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    **options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`degrpo_loss` on logp = log_softmax(hidden @ weight^T / temperature)[target], through the full logits.

    The entropy bonus subtracts entropy_coef x the token-mean entropy of the response tokens (the authors'
    `policy_loss = pg_loss - entropy_loss * entropy_coeff`, dp_actor.update_policy), over the normalizers'
    response_tokens when given. The metrics add that mean entropy and the detached log-probs [B, T].
    """
    logp, entropy = token_logprobs(hidden, weight, target_ids, bias=bias, temperature=temperature)
    loss, metrics = degrpo_loss(logp, old_logp, advantages, response_mask, **options)
    response_mask = response_mask.bool()
    normalizers = options.get("normalizers")
    n = response_mask.sum() if normalizers is None else normalizer(normalizers, "response_tokens")
    mean_entropy = _masked_sum(entropy, response_mask) / torch.as_tensor(n, dtype=entropy.dtype).clamp(min=1)
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * mean_entropy
    metrics["entropy"] = mean_entropy.detach()
    metrics["logp"] = logp.detach()
    return loss, metrics
