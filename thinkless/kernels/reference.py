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


def kl_penalty(logp: Tensor, ref_logp: Tensor, kl_type: str) -> Tensor:
    """Per-token KL estimator between the policy and the reference (Schulman, "Approximating KL divergence").

    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1 (verl's `low_var_kl`,
    without its clamp). k3 is evaluated in float64: at the small log-ratios of real training (|d| ~ 1e-2) its
    three O(1) terms cancel to ~d^2/2, and float32 would keep only a few correct digits.
    """
    log_ratio = logp - ref_logp
    if kl_type == "k1":
        return log_ratio
    if kl_type == "k2":
        return 0.5 * log_ratio**2
    if kl_type == "k3":
        d = log_ratio.double()
        return (torch.exp(-d) + d - 1).to(log_ratio.dtype)
    raise ValueError(f"kl_type must be one of 'k1', 'k2', 'k3', got {kl_type!r}")


# The order of the statistics that every backend returns next to the loss.
STAT_NAMES = ("control_loss", "response_loss", "clip_frac", "kl", "ratio_mean", "control_tokens", "response_tokens")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    # verl's masked_mean divides by (count + 1e-8); max(count, 1) is exact for non-empty masks and gives 0 for an
    # empty one while keeping the graph, so a rank with no response tokens still joins the backward.
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


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
    decoupled: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DeGRPO objective on per-token log-probs [B,T]; `compute_policy_loss` in the original code.

    Only `logp` receives a gradient; old, reference log-probs and advantages are constants of the step.
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

    control_loss = _masked_mean(token_loss, control)
    response_loss = _masked_mean(token_loss, rest)
    if decoupled:
        # DeGRPO, the paper's decoupled objective (`pg_loss = thinkless_alpha * cond_loss + resp_loss`): the control
        # token is normalised on its own, so a 10k-token answer no longer outweighs the token that picks the mode.
        loss = alpha * control_loss + response_loss
    else:
        # Vanilla GRPO: one token-mean over the whole response, control token included.
        loss = _masked_mean(token_loss, response_mask)

    kl = torch.zeros((), dtype=dtype, device=logp.device)
    if ref_logp is not None:
        kl = _masked_mean(kl_penalty(logp, response_only(ref_logp.detach()), kl_type), response_mask)
    if kl_coef != 0.0:
        loss = loss + kl_coef * kl

    metrics = {
        "control_loss": control_loss,
        "response_loss": response_loss,
        "clip_frac": _masked_mean((clipped > unclipped).to(dtype), response_mask),
        "kl": kl,
        "ratio_mean": _masked_mean(ratio, response_mask),
        "control_tokens": control.sum().to(dtype),
        "response_tokens": response_mask.sum().to(dtype),
    }
    return loss, {name: value.detach() for name, value in metrics.items()}


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
    **options,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`degrpo_loss` on logp = log_softmax(hidden @ weight^T / temperature)[target], through the full logits.

    The metrics add the mean entropy over response tokens and the detached log-probs [B, T].
    """
    logp, entropy = token_logprobs(hidden, weight, target_ids, bias=bias, temperature=temperature)
    loss, metrics = degrpo_loss(logp, old_logp, advantages, response_mask, **options)
    metrics["entropy"] = _masked_mean(entropy, response_mask.bool()).detach()
    metrics["logp"] = logp.detach()
    return loss, metrics
