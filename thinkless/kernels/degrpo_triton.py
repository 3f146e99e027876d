"""The DeGRPO token loss on per-token log-probs in Triton: forward and backward kernels, and their autograd.Function.

The loss is a handful of weighted sums over [B, T] tokens, so both passes are memory-bound. The forward grid is
(row, token block); each program reduces its block to nine partial sums, and torch adds those up (deterministic,
no atomics). The weights of those sums are the normalisers (control tokens, response tokens, sequences of the
mini-batch, `Normalizers`), given or counted here, so the backward recomputes the per-token terms from the inputs
instead of storing them: one more read of four [B, T] tensors, against two writes and two reads had they been
stored. `reference.degrpo_loss` gives the formulas; `degrpo_weights.py` the weights of the sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

from thinkless.kernels._config import DEGRPO_LOSS, FIRST_RESPONSE
from thinkless.kernels._tensors import compute_dtype, contiguous_tokens
from thinkless.kernels._triton_utils import split_scalar, tl, triton, triton_dtype
from thinkless.kernels.degrpo_weights import DeGRPOParams, function_outputs, loss_from_totals

# control loss sum, response loss sum, control count, response count, clipped, kl sum, ratio sum, and the two loss
# sums again with each token's weight (token_weights; equal to the first two without them)
NUM_STATS = 9


@triton.jit
def _first_response_kernel(
    mask_ptr,  # u8 [B, T]
    first_ptr,  # int32 [B], out: index of the row's first response token, T if none
    T,
    stride_mask,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    first = T
    for start in range(0, T, BLOCK):
        t = start + offs
        is_response = tl.load(mask_ptr + row * stride_mask + t, mask=t < T, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(is_response, t, T)))
    tl.store(first_ptr + row, first)


@triton.jit
def _token_terms(
    row,
    t,
    T,
    logp_ptr,
    old_ptr,
    adv_ptr,
    resp_ptr,
    ctrl_ptr,
    first_ptr,
    stride_logp,
    stride_old,
    stride_adv_b,
    stride_adv_t,
    stride_resp,
    stride_ctrl,
    lower_hi,
    lower_lo,
    upper_hi,
    upper_lo,
    HAS_CONTROL_MASK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Masks and PPO terms of one block of tokens, shared by the forward and the backward.

    max/min propagate NaN, as torch.maximum and clamp do: a NaN log-prob on a response token must show in the
    loss, not only in the gradient.
    """
    in_row = t < T
    resp = tl.load(resp_ptr + row * stride_resp + t, mask=in_row, other=0) != 0
    if HAS_CONTROL_MASK:
        ctrl = resp & (tl.load(ctrl_ptr + row * stride_ctrl + t, mask=in_row, other=0) != 0)
    else:
        ctrl = resp & (t == tl.load(first_ptr + row))
    logp = tl.load(logp_ptr + row * stride_logp + t, mask=in_row, other=0.0).to(COMPUTE)
    old = tl.load(old_ptr + row * stride_old + t, mask=in_row, other=0.0).to(COMPUTE)
    adv = tl.load(adv_ptr + row * stride_adv_b + t * stride_adv_t, mask=in_row, other=0.0).to(COMPUTE)
    ratio = tl.exp(logp - old)
    unclipped = -adv * ratio
    # The clip range [1 - clip_low, 1 + clip_high] arrives as fp32 halves (`split_scalar`): fp32(0.2) alone would
    # clip a float64 pass at 0.79999999702.
    one = tl.full((), 1.0, COMPUTE)
    ratio_clipped = tl.maximum(ratio, lower_hi * one + lower_lo * one, propagate_nan=tl.PropagateNan.ALL)
    ratio_clipped = tl.minimum(ratio_clipped, upper_hi * one + upper_lo * one, propagate_nan=tl.PropagateNan.ALL)
    clipped = -adv * ratio_clipped
    return resp, ctrl, logp, adv, ratio, unclipped, clipped


@triton.jit
def _kl_terms(logp, ref, kl_clamp_hi, kl_clamp_lo, KL_TYPE: tl.constexpr):
    """(k, dk/dlogp) for the estimators k1, k2, k3 of KL(policy || reference), d = logp - ref, k clamped to
    [-c, c] with a zero gradient outside (as torch.clamp; c = inf when off). c = hi + lo arrives as two fp32
    halves (`split_scalar`), so that a float64 pass clamps at the float64 value.

    k3 = exp(-d) + d - 1 and its derivative 1 - exp(-d) cancel to ~d^2/2 and ~d at the small |d| of real
    training, where fp32 keeps only a few digits. There their Taylor series (k3 = sum_{n>=2} (-d)^n/n!) is used
    instead, to eight terms: below |d| = 1/2 in fp32 and 1/20 in fp64 the truncation is under the rounding of
    either side.
    """
    d = logp - ref
    if KL_TYPE == 1:
        k, dk = d, tl.full(d.shape, 1.0, d.dtype)
    elif KL_TYPE == 2:
        k, dk = 0.5 * d * d, d
    else:
        e = tl.exp(-d)
        # With x = -d: e^x - 1 - x = x^2 * s2, s2 = 1/2 + x/6 + x^2/24 + ... (Horner, highest term first), so
        # k3 = d^2 * s2 and dk3 = 1 - e^x = d * (1 + x * s2).
        x = -d
        s2 = 1.0 / 40320 * x + 1.0 / 5040
        s2 = s2 * x + 1.0 / 720
        s2 = s2 * x + 1.0 / 120
        s2 = s2 * x + 1.0 / 24
        s2 = s2 * x + 1.0 / 6
        s2 = s2 * x + 0.5
        if d.dtype == tl.float64:
            small = tl.abs(d) < 0.05
        else:
            small = tl.abs(d) < 0.5
        k = tl.where(small, d * d * s2, e + d - 1.0)
        dk = tl.where(small, d * (1.0 + x * s2), 1.0 - e)
    one = tl.full((), 1.0, d.dtype)
    kl_clamp = kl_clamp_hi * one + kl_clamp_lo * one
    # A NaN estimate is kept (k != k), so that it shows in the loss.
    keep = (tl.abs(k) <= kl_clamp) | (k != k)
    return tl.where(keep, k, tl.where(k > 0, kl_clamp, -kl_clamp)), tl.where(keep, dk, 0.0)


@triton.jit
def _degrpo_fwd_kernel(
    # pointers
    logp_ptr,
    old_ptr,
    adv_ptr,
    resp_ptr,
    ref_ptr,
    ctrl_ptr,
    first_ptr,
    tw_ptr,  # [B, T] token weights (when HAS_TOKEN_WEIGHTS)
    stats_ptr,  # fp64 [B * n_blocks, NUM_STATS], out
    # shapes
    T,
    n_blocks,
    # row strides (tokens are contiguous)
    stride_logp,
    stride_old,
    stride_adv_b,
    stride_adv_t,
    stride_resp,
    stride_ref,
    stride_ctrl,
    stride_tw,
    # options
    lower_hi,
    lower_lo,
    upper_hi,
    upper_lo,
    kl_clamp_hi,
    kl_clamp_lo,
    # meta-parameters
    HAS_REF: tl.constexpr,
    HAS_CONTROL_MASK: tl.constexpr,
    HAS_TOKEN_WEIGHTS: tl.constexpr,
    KL_TYPE: tl.constexpr,
    NUM_STATS: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    t = block * BLOCK + tl.arange(0, BLOCK)
    resp, ctrl, logp, adv, ratio, unclipped, clipped = _token_terms(
        row, t, T, logp_ptr, old_ptr, adv_ptr, resp_ptr, ctrl_ptr, first_ptr, stride_logp, stride_old,
        stride_adv_b, stride_adv_t, stride_resp, stride_ctrl, lower_hi, lower_lo, upper_hi, upper_lo,
        HAS_CONTROL_MASK, COMPUTE,
    )  # fmt: skip
    rest = resp & ~ctrl
    token_loss = tl.maximum(unclipped, clipped, propagate_nan=tl.PropagateNan.ALL)
    # Every sum selects with tl.where rather than multiplying by the mask: padding may hold -inf log-probs, and
    # 0 * inf is NaN.
    kl_sum = 0.0
    if HAS_REF:
        ref = tl.load(ref_ptr + row * stride_ref + t, mask=t < T, other=0.0).to(COMPUTE)
        kl, _ = _kl_terms(logp, ref, kl_clamp_hi, kl_clamp_lo, KL_TYPE)
        kl_sum = tl.sum(tl.where(resp, kl, 0.0))

    out = stats_ptr + (row * n_blocks + block) * NUM_STATS
    control_sum = tl.sum(tl.where(ctrl, token_loss, 0.0))
    response_sum = tl.sum(tl.where(rest, token_loss, 0.0))
    tl.store(out + 0, control_sum)
    tl.store(out + 1, response_sum)
    tl.store(out + 2, tl.sum(ctrl.to(tl.float32)))  # counts are exact in fp32 up to 2^24 per block
    tl.store(out + 3, tl.sum(rest.to(tl.float32)))
    tl.store(out + 4, tl.sum((resp & (clipped > unclipped)).to(tl.float32)))
    tl.store(out + 5, kl_sum)
    tl.store(out + 6, tl.sum(tl.where(resp, ratio, 0.0)))
    if HAS_TOKEN_WEIGHTS:
        tw = tl.load(tw_ptr + row * stride_tw + t, mask=t < T, other=0.0).to(COMPUTE)
        control_sum = tl.sum(tl.where(ctrl, tw * token_loss, 0.0))
        response_sum = tl.sum(tl.where(rest, tw * token_loss, 0.0))
    tl.store(out + 7, control_sum)
    tl.store(out + 8, response_sum)


@triton.jit
def _degrpo_bwd_kernel(
    # pointers
    dlogp_ptr,  # [B, T], out, the dtype of logp
    logp_ptr,
    old_ptr,
    adv_ptr,
    resp_ptr,
    ref_ptr,
    ctrl_ptr,
    first_ptr,
    tw_ptr,  # [B, T] token weights (when HAS_TOKEN_WEIGHTS)
    weights_ptr,  # [4] in COMPUTE: see loss_weights
    # shapes
    T,
    # row strides (tokens are contiguous)
    stride_dlogp,
    stride_logp,
    stride_old,
    stride_adv_b,
    stride_adv_t,
    stride_resp,
    stride_ref,
    stride_ctrl,
    stride_tw,
    # options
    lower_hi,
    lower_lo,
    upper_hi,
    upper_lo,
    kl_clamp_hi,
    kl_clamp_lo,
    # meta-parameters
    HAS_KL: tl.constexpr,
    HAS_CONTROL_MASK: tl.constexpr,
    HAS_TOKEN_WEIGHTS: tl.constexpr,
    KL_TYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    resp, ctrl, logp, adv, ratio, unclipped, clipped = _token_terms(
        row, t, T, logp_ptr, old_ptr, adv_ptr, resp_ptr, ctrl_ptr, first_ptr, stride_logp, stride_old,
        stride_adv_b, stride_adv_t, stride_resp, stride_ctrl, lower_hi, lower_lo, upper_hi, upper_lo,
        HAS_CONTROL_MASK, COMPUTE,
    )  # fmt: skip
    # d max(-A*r, -A*clip(r)) / d logp: the unclipped branch carries -A*r (dr/dlogp = r); a strictly larger
    # clipped branch is constant in logp. Ties go to the unclipped side, as torch.maximum + clamp give in sum.
    dtoken = tl.where(clipped > unclipped, 0.0, -adv * ratio)
    w_control = tl.load(weights_ptr + 0)
    w_control_weighted = tl.load(weights_ptr + 1)
    w_response = tl.load(weights_ptr + 2)
    w = tl.where(ctrl, w_control_weighted, w_response)
    if HAS_TOKEN_WEIGHTS:
        w *= tl.load(tw_ptr + row * stride_tw + t, mask=t < T, other=0.0).to(COMPUTE)
    w += tl.where(ctrl, w_control, 0.0)
    grad = tl.where(resp, w * dtoken, 0.0)
    if HAS_KL:
        ref = tl.load(ref_ptr + row * stride_ref + t, mask=t < T, other=0.0).to(COMPUTE)
        _, dkl = _kl_terms(logp, ref, kl_clamp_hi, kl_clamp_lo, KL_TYPE)
        grad += tl.where(resp, tl.load(weights_ptr + 3) * dkl, 0.0)
    tl.store(dlogp_ptr + row * stride_dlogp + t, grad.to(dlogp_ptr.dtype.element_ty), mask=t < T)


def _as_u8(mask: Tensor) -> Tensor:
    return contiguous_tokens(mask).view(torch.uint8)  # same item size, so a view at any stride


def _token_args(logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights):
    """Views whose tokens are contiguous, and their row strides, in the order the kernels take them."""
    logp, old_logp = contiguous_tokens(logp), contiguous_tokens(old_logp)
    adv = advantages.contiguous() if advantages.dim() == 1 else contiguous_tokens(advantages)
    adv_strides = (1, 0) if adv.dim() == 1 else adv.stride()
    resp = _as_u8(response_mask)
    ref = contiguous_tokens(ref_logp) if ref_logp is not None else logp  # placeholder pointer when HAS_REF is off
    ctrl = _as_u8(control_mask) if control_mask is not None else resp
    # Token weights in the compute dtype (fp32, or fp64 for fp64 log-probs): one variant per log-prob dtype.
    compute = compute_dtype(logp.dtype)
    tw = contiguous_tokens(token_weights.to(compute)) if token_weights is not None else logp  # placeholder when off
    pointers = (logp, old_logp, adv, resp, ref, ctrl)
    strides = (logp.stride(0), old_logp.stride(0), *adv_strides, resp.stride(0), ref.stride(0), ctrl.stride(0))
    return pointers, strides, tw


def _first_response_triton(resp: Tensor) -> Tensor:
    """int32 [B]: index of each row's first response token (T for an empty row), from the u8 mask."""
    B, T = resp.shape
    first = torch.empty(B, dtype=torch.int32, device=resp.device)
    _first_response_kernel[(B,)](
        resp, first, T, resp.stride(0), BLOCK=FIRST_RESPONSE.block, num_warps=FIRST_RESPONSE.num_warps
    )
    return first


def _clip_range(p: DeGRPOParams) -> tuple[float, float, float, float]:
    """1 - clip_low and 1 + clip_high, each as two fp32 halves (see `split_scalar`)."""
    return (*split_scalar(1.0 - p.clip_low), *split_scalar(1.0 + p.clip_high))


def _forward_triton(tokens, strides, first, tw, p: DeGRPOParams, flags: dict, has_ref: bool) -> Tensor:
    """Nine batch totals, float64 [NUM_STATS] (see NUM_STATS for the order)."""
    B, T = tokens[0].shape
    n_blocks = triton.cdiv(T, DEGRPO_LOSS.block)
    stats = torch.zeros(B * n_blocks, NUM_STATS, dtype=torch.float64, device=tokens[0].device)
    if B * T:
        _degrpo_fwd_kernel[(B, n_blocks)](
            *tokens, first, tw, stats,
            T, n_blocks,
            *strides, tw.stride(0),
            *_clip_range(p), *split_scalar(p.kl_bound),
            HAS_REF=has_ref,
            NUM_STATS=NUM_STATS,
            BLOCK=DEGRPO_LOSS.block,
            num_warps=DEGRPO_LOSS.num_warps,
            **flags,
        )  # fmt: skip
    return stats.sum(0)


def backward_triton(tokens, strides, first, tw, weights, p: DeGRPOParams, flags: dict, has_kl: bool) -> Tensor:
    """dL/dlogp [B, T] by the backward kernel, from the views of `_token_args` and the [4] `weights` in COMPUTE
    (`loss_weights` times the incoming gradient); the fused linear loss calls it on each chunk's tokens."""
    B, T = tokens[0].shape
    dlogp = torch.empty_like(tokens[0], memory_format=torch.contiguous_format)
    if B * T == 0:
        return dlogp
    _degrpo_bwd_kernel[(B, triton.cdiv(T, DEGRPO_LOSS.block))](
        dlogp, *tokens, first, tw, weights,
        T,
        dlogp.stride(0), *strides, tw.stride(0),
        *_clip_range(p), *split_scalar(p.kl_bound),
        HAS_KL=has_kl,
        BLOCK=DEGRPO_LOSS.block,
        num_warps=DEGRPO_LOSS.num_warps,
        **flags,
    )  # fmt: skip
    return dlogp


class DeGRPOLossFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; only `logp` receives a gradient."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights, counts, params):
        # The kernel views are made once here and saved, so the backward neither copies nor converts again.
        tokens, strides, tw = _token_args(
            logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights
        )
        flags = dict(
            HAS_CONTROL_MASK=control_mask is not None,
            HAS_TOKEN_WEIGHTS=token_weights is not None,
            KL_TYPE=params.kl_code,
            COMPUTE=triton_dtype(compute_dtype(logp.dtype)),
        )
        resp = tokens[3]
        first = _first_response_triton(resp) if control_mask is None else resp  # placeholder with a control mask
        totals = _forward_triton(tokens, strides, first, tw, params, flags, has_ref=ref_logp is not None)
        loss, stats, weights = loss_from_totals(totals, params, counts)
        ctx.save_for_backward(*tokens, first, tw, weights)
        ctx.strides, ctx.flags, ctx.params = strides, flags, params
        ctx.has_kl = ref_logp is not None and params.kl_coef != 0.0
        return function_outputs(ctx, loss, stats, logp.dtype)

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        *tokens, first, tw, weights = ctx.saved_tensors
        weights = (weights * grad_loss).to(torch.promote_types(tokens[0].dtype, torch.float32)).contiguous()
        dlogp = backward_triton(tokens, ctx.strides, first, tw, weights, ctx.params, ctx.flags, ctx.has_kl)
        return dlogp, None, None, None, None, None, None, None, None
