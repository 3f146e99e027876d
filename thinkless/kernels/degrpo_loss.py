"""The DeGRPO token loss on per-token log-probs: the public function.

It checks its inputs, then runs the Triton kernels (`degrpo_triton.py`, CUDA), the native ops (`_native.py`, CPU)
or the torch reference (`reference.degrpo_loss`, which gives the formulas). The options, normalisers and loss
weights that all three share are in `degrpo_weights.py`.
"""

from __future__ import annotations

from torch import Tensor

from thinkless.kernels import reference
from thinkless.kernels._backend import select_backend
from thinkless.kernels._checks import check_loss_inputs
from thinkless.kernels._native import DeGRPOLossNativeFunction
from thinkless.kernels.degrpo_triton import DeGRPOLossFunction

# Importable from here as in thinkless 0.1, where this module defined them all.
from thinkless.kernels.degrpo_weights import KL_TYPES as KL_TYPES
from thinkless.kernels.degrpo_weights import LOSS_AGGS as LOSS_AGGS
from thinkless.kernels.degrpo_weights import (
    LOSS_DEFAULTS,
    NORMALIZER_NAMES,
    DeGRPOParams,
    Normalizers,
    check_normalizers,
    resolve_token_weights,
)
from thinkless.kernels.degrpo_weights import loss_weights as loss_weights
from thinkless.kernels.degrpo_weights import sequence_token_weights as sequence_token_weights


def degrpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    control_mask: Tensor | None = None,
    alpha: float = LOSS_DEFAULTS.alpha,
    clip_low: float = LOSS_DEFAULTS.clip_low,
    clip_high: float = LOSS_DEFAULTS.clip_high,
    kl_coef: float = LOSS_DEFAULTS.kl_coef,
    kl_type: str = LOSS_DEFAULTS.kl_type,
    kl_clamp: float | None = LOSS_DEFAULTS.kl_clamp,
    decoupled: bool = LOSS_DEFAULTS.decoupled,
    loss_agg: str = LOSS_DEFAULTS.loss_agg,
    loss_agg_norm: float | None = LOSS_DEFAULTS.loss_agg_norm,
    normalizers: Normalizers | dict | None = None,
    token_weights: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DeGRPO policy loss (Thinkless) on the log-probs of the sampled tokens.

    Args:
        logp: float [B, T], log-probs of the sampled tokens under the policy being trained (receives the gradient).
        old_logp: float [B, T], the same under the policy that sampled them.
        advantages: float [B] (one per sequence) or [B, T] (per token).
        response_mask: bool [B, T], True on response tokens (left or right padding both work).
        ref_logp: float [B, T], the same under the frozen reference; needed when kl_coef > 0.
        control_mask: bool [B, T], the control-token positions; default: each row's first response token.
        alpha: weight of the control-token loss (the paper uses 1e-3).
        clip_low, clip_high: PPO clip range [1 - clip_low, 1 + clip_high] of the ratio exp(logp - old_logp).
        kl_coef, kl_type: weight and estimator ("k1", "k2", "k3") of the KL term against the reference.
        kl_clamp: clamp each token's KL estimate to [-kl_clamp, kl_clamp] (the authors' low_var_kl: 10); None: off.
        decoupled: True for DeGRPO; False for vanilla GRPO (the control token is one response token).
        loss_agg: the response term's aggregation: "token_mean", "seq_mean_token_mean" (per-sequence 1/T_i) or
            "seq_mean_token_sum_norm" (Dr. GRPO: sequence sums / (sequences x loss_agg_norm)).
        loss_agg_norm: the constant token count of seq_mean_token_sum_norm.
        normalizers: `Normalizers` (control_tokens, response_tokens, sequences) counted over the whole
            mini-batch, so that micro-batch losses add up to its loss; default: counted from these inputs.
        token_weights: float [B, T], each token's weight in the response term; default 1, and for
            seq_mean_token_mean 1/T_i of its row (pass it for packed rows, where a row holds several sequences).
        backend: "triton", "cpp" or "torch"; default from the device (or THINKLESS_BACKEND).

    Returns:
        (loss, metrics): a scalar, float32 (float64 for float64 log-probs), and a dict of detached scalars:
        control_loss, response_loss, clip_frac, kl, ratio_mean (each divided by the normalisers, so that they too
        add up over micro-batches), control_tokens, response_tokens (the counts of these inputs).
    """
    if old_logp is None:
        raise ValueError(
            "old_logp is None: only fused_linear_degrpo_loss takes the on-policy shortcut (pass logp.detach())"
        )
    logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights = check_loss_inputs(
        logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights
    )
    params = DeGRPOParams.checked(
        has_ref=ref_logp is not None, alpha=alpha, clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
        kl_type=kl_type, kl_clamp=kl_clamp, decoupled=decoupled, loss_agg=loss_agg, loss_agg_norm=loss_agg_norm,
    )  # fmt: skip
    counts = check_normalizers(normalizers, logp.device)
    name = select_backend(logp.device, backend)
    if name in ("triton", "cpp"):
        control = reference.first_response_token_mask(response_mask) if control_mask is None else control_mask
        token_weights = resolve_token_weights(params, token_weights, response_mask, control & response_mask)
        # Only logp is differentiated; the rest are constants of the step, exactly as in the reference.
        old_logp, advantages = old_logp.detach(), advantages.detach()
        ref_logp = ref_logp.detach() if ref_logp is not None else None
        function = DeGRPOLossFunction if name == "triton" else DeGRPOLossNativeFunction
        loss, stats = function.apply(
            logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights, counts, params
        )
        return loss, dict(zip(reference.STAT_NAMES, stats.unbind(), strict=True))
    return reference.degrpo_loss(
        logp,
        old_logp,
        advantages,
        response_mask,
        ref_logp=ref_logp,
        control_mask=control_mask,
        normalizers=None if counts is None else dict(zip(NORMALIZER_NAMES, counts, strict=True)),
        token_weights=token_weights,
        **vars(params),
    )
