"""The DeGRPO token loss on per-token log-probs: forward and backward kernels.

The loss is a handful of weighted sums over [B, T] tokens, so both passes are memory-bound. The forward grid is
(row, token block); each program reduces its block to nine partial sums, and torch adds those up (deterministic,
no atomics). The weights of those sums are the normalisers (control tokens, response tokens, sequences of the
mini-batch, `Normalizers`), given or counted here, so the backward recomputes the per-token terms from the inputs
instead of storing them: one more read of four [B, T] tensors, against two writes and two reads had they been
stored. `reference.degrpo_loss` gives the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from thinkless.kernels import _checks, reference
from thinkless.kernels._backend import select_backend
from thinkless.kernels._config import DEGRPO_LOSS, FIRST_RESPONSE
from thinkless.kernels._triton_utils import split_scalar, tl, triton

KL_TYPES = ("k1", "k2", "k3")
LOSS_AGGS = reference.LOSS_AGGS
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
    clip_low,
    clip_high,
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
    ratio_clipped = tl.maximum(ratio, 1.0 - clip_low, propagate_nan=tl.PropagateNan.ALL)
    ratio_clipped = tl.minimum(ratio_clipped, 1.0 + clip_high, propagate_nan=tl.PropagateNan.ALL)
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
    clip_low,
    clip_high,
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
        stride_adv_b, stride_adv_t, stride_resp, stride_ctrl, clip_low, clip_high, HAS_CONTROL_MASK, COMPUTE,
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
    clip_low,
    clip_high,
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
        stride_adv_b, stride_adv_t, stride_resp, stride_ctrl, clip_low, clip_high, HAS_CONTROL_MASK, COMPUTE,
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


@dataclass(frozen=True)
class DeGRPOParams:
    """The options of the loss that are not tensors, handed to the autograd.Function as one object."""

    alpha: float = 1e-3
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_type: str = "k3"
    kl_clamp: float | None = None
    decoupled: bool = True
    loss_agg: str = "token_mean"
    loss_agg_norm: float | None = None

    @property
    def kl_bound(self) -> float:
        """kl_clamp as the kernels take it: inf when off."""
        return math.inf if self.kl_clamp is None else self.kl_clamp


@dataclass(frozen=True)
class Normalizers:
    """The counts that divide the loss's terms, taken over a whole mini-batch (on every rank) before it is cut into
    micro-batches: then the micro-batches' losses add up to the mini-batch's, whatever the cut.

    control_tokens: the control tokens (one per sequence with a response);
    response_tokens: all response tokens, control tokens included;
    sequences: the sequences with a response.
    """

    control_tokens: float
    response_tokens: float
    sequences: float

    @classmethod
    def count(cls, response_mask: Tensor, control_mask: Tensor | None = None) -> Normalizers:
        """The counts of a padded [B, T] batch (or a packed one with its control_mask)."""
        response_mask = response_mask.bool()
        control = reference.first_response_token_mask(response_mask) if control_mask is None else control_mask.bool()
        n_control = int((control & response_mask).sum())
        return cls(n_control, int(response_mask.sum()), n_control)

    def __add__(self, other: Normalizers) -> Normalizers:
        return Normalizers(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.control_tokens, self.response_tokens, self.sequences)


NORMALIZER_NAMES = ("control_tokens", "response_tokens", "sequences")


def _rows(x: Tensor) -> Tensor:
    """x itself when its tokens are contiguous (any row stride, e.g. a [:, 1:] slice of the logits' log-probs)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _as_u8(mask: Tensor) -> Tensor:
    return _rows(mask).view(torch.uint8)  # same item size, so a view at any stride


def _token_args(logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights):
    """Views whose tokens are contiguous, and their row strides, in the order the kernels take them."""
    logp, old_logp = _rows(logp), _rows(old_logp)
    adv = advantages.contiguous() if advantages.dim() == 1 else _rows(advantages)
    adv_strides = (1, 0) if adv.dim() == 1 else adv.stride()
    resp = _as_u8(response_mask)
    ref = _rows(ref_logp) if ref_logp is not None else logp  # placeholder pointer when HAS_REF is off
    ctrl = _as_u8(control_mask) if control_mask is not None else resp
    # Token weights in the compute dtype (fp32, or fp64 for fp64 log-probs): one variant per log-prob dtype.
    compute = torch.float64 if logp.dtype == torch.float64 else torch.float32
    tw = _rows(token_weights.to(compute)) if token_weights is not None else logp  # placeholder when off
    pointers = (logp, old_logp, adv, resp, ref, ctrl)
    strides = (logp.stride(0), old_logp.stride(0), *adv_strides, resp.stride(0), ref.stride(0), ctrl.stride(0))
    return pointers, strides, tw


def _compute_dtype(logp: Tensor):
    """fp32 arithmetic for fp32 and narrower log-probs; fp64 for fp64, so that float64 checks stay exact."""
    return tl.float64 if logp.dtype == torch.float64 else tl.float32


def _first_response_triton(resp: Tensor) -> Tensor:
    """int32 [B]: index of each row's first response token (T for an empty row), from the u8 mask."""
    B, T = resp.shape
    first = torch.empty(B, dtype=torch.int32, device=resp.device)
    _first_response_kernel[(B,)](
        resp, first, T, resp.stride(0), BLOCK=FIRST_RESPONSE.block, num_warps=FIRST_RESPONSE.num_warps
    )
    return first


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
            p.clip_low, p.clip_high, *split_scalar(p.kl_bound),
            HAS_REF=has_ref,
            NUM_STATS=NUM_STATS,
            BLOCK=DEGRPO_LOSS.block,
            num_warps=DEGRPO_LOSS.num_warps,
            **flags,
        )  # fmt: skip
    return stats.sum(0)


def _backward_triton(tokens, strides, first, tw, weights, p: DeGRPOParams, flags: dict, has_kl: bool) -> Tensor:
    B, T = tokens[0].shape
    dlogp = torch.empty_like(tokens[0], memory_format=torch.contiguous_format)
    if B * T == 0:
        return dlogp
    _degrpo_bwd_kernel[(B, triton.cdiv(T, DEGRPO_LOSS.block))](
        dlogp, *tokens, first, tw, weights,
        T,
        dlogp.stride(0), *strides, tw.stride(0),
        p.clip_low, p.clip_high, *split_scalar(p.kl_bound),
        HAS_KL=has_kl,
        BLOCK=DEGRPO_LOSS.block,
        num_warps=DEGRPO_LOSS.num_warps,
        **flags,
    )  # fmt: skip
    return dlogp


def _loss_from_totals(totals: Tensor, p: DeGRPOParams, counts: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Loss, the statistics in `reference.STAT_NAMES` order, and the backward weights, from the batch totals and
    the normalisers `counts` ([3]: control tokens, response tokens, sequences; None: this batch's own)."""
    control_sum, response_sum, n_control, n_rest, n_clipped, kl_sum, ratio_sum, w_control_sum, w_response_sum = (
        totals.unbind()
    )
    n_all = n_control + n_rest
    if counts is None:
        counts = torch.stack((n_control, n_all, n_control))  # one control token per sequence
    weights = loss_weights(*counts.to(totals.dtype).unbind(), p)
    w_control, w_control_weighted, w_response, w_kl = weights.unbind()
    loss = w_control * control_sum + w_control_weighted * w_control_sum + w_response * w_response_sum
    if p.kl_coef != 0.0:  # skipped when off, so an infinite estimate on a stray token cannot turn 0 * inf to NaN
        loss = loss + w_kl * kl_sum
    N_control, N_response, _ = (n.clamp(min=1) for n in counts.to(totals.dtype).unbind())
    N_rest = (counts[1] - counts[0]).to(totals.dtype).clamp(min=1)
    stats = torch.stack(
        (
            control_sum / N_control,
            response_sum / N_rest,
            n_clipped / N_response,
            kl_sum / N_response,
            ratio_sum / N_response,
            n_control,
            n_all,
        )
    )
    return loss, stats, weights


def loss_weights(n_control: Tensor, n_response: Tensor, n_sequences: Tensor, p: DeGRPOParams) -> Tensor:
    """[4]: dL/d(token loss) of a control token (plain, and times its token weight), of another response token
    (times its token weight), and dL/d(token KL), from the normalisers.

    The loss is a weighted sum of per-token terms whose weights depend only on counts, which the masks give before
    any log-prob is known; that is what lets the fused linear loss finish each chunk's gradient at once.
    Without token weights a token's weight is 1 (seq_mean_token_mean passes 1/T_i).
    """
    per_control, per_response = 1 / n_control.clamp(min=1), 1 / n_response.clamp(min=1)
    n_sequences = n_sequences.clamp(min=1)
    if p.loss_agg == "token_mean":
        divisor = (n_response - n_control).clamp(min=1) if p.decoupled else n_response.clamp(min=1)
    elif p.loss_agg == "seq_mean_token_mean":
        divisor = n_sequences
    else:  # seq_mean_token_sum_norm
        divisor = n_sequences * p.loss_agg_norm
    zero = torch.zeros_like(per_control)
    if p.decoupled:
        w_control, w_control_weighted = p.alpha * per_control, zero
    else:  # the control token is one response token among the others
        w_control, w_control_weighted = zero, 1 / divisor
    return torch.stack((w_control, w_control_weighted, 1 / divisor, p.kl_coef * per_response))


def sequence_token_weights(response_mask: Tensor, *, decoupled: bool = True, control_mask: Tensor | None = None):
    """seq_mean_token_mean's token weights of a padded [B, T] batch (one sequence per row): 1/T_i on the tokens of
    the response term of row i (decoupled: its response tokens after the control token), 0 elsewhere. Computed on
    the padded rows, then packed alongside the other per-token tensors, they carry each sequence's 1/T_i into a
    packed row."""
    response_mask = response_mask.bool()
    control = reference.first_response_token_mask(response_mask) if control_mask is None else control_mask.bool()
    term = response_mask & ~control if decoupled else response_mask
    return term.double() / term.sum(dim=1, keepdim=True).clamp(min=1)


def _token_weights(p: DeGRPOParams, token_weights, response_mask, control) -> Tensor | None:
    """The given token weights (0 off the response term: a decoupled control token or padding may hold anything,
    NaN included, and must not reach a product), or seq_mean_token_mean's 1/T_i from the rows (one sequence per
    row); None: 1."""
    if token_weights is not None:
        term = response_mask & ~control if p.decoupled else response_mask
        return torch.where(term, token_weights, torch.zeros((), dtype=token_weights.dtype, device=term.device))
    if p.loss_agg != "seq_mean_token_mean":
        return None
    return sequence_token_weights(response_mask, decoupled=p.decoupled, control_mask=control)


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
            KL_TYPE=KL_TYPES.index(params.kl_type) + 1,
            COMPUTE=_compute_dtype(logp),
        )
        resp = tokens[3]
        first = _first_response_triton(resp) if control_mask is None else resp  # placeholder with a control mask
        totals = _forward_triton(tokens, strides, first, tw, params, flags, has_ref=ref_logp is not None)
        loss, stats, weights = _loss_from_totals(totals, params, counts)
        ctx.save_for_backward(*tokens, first, tw, weights)
        ctx.strides, ctx.flags, ctx.params = strides, flags, params
        ctx.has_kl = ref_logp is not None and params.kl_coef != 0.0
        out_dtype = torch.promote_types(logp.dtype, torch.float32)
        stats = stats.to(out_dtype)
        ctx.mark_non_differentiable(stats)
        return loss.to(out_dtype), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        *tokens, first, tw, weights = ctx.saved_tensors
        weights = (weights * grad_loss).to(torch.promote_types(tokens[0].dtype, torch.float32)).contiguous()
        dlogp = _backward_triton(tokens, ctx.strides, first, tw, weights, ctx.params, ctx.flags, ctx.has_kl)
        return dlogp, None, None, None, None, None, None, None, None


class DeGRPOLossNativeFunction(torch.autograd.Function):
    """Autograd wrapper of the native CPU ops (`torch.ops.thinkless.degrpo_*`); only `logp` receives a gradient."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights, counts, params):
        # The ops take float32 or float64, one dtype for all, tokens contiguous within rows.
        compute = torch.float64 if logp.dtype == torch.float64 else torch.float32
        as_rows = lambda x: _rows(x.to(compute)) if x is not None else None
        tokens = (as_rows(logp), as_rows(old_logp), advantages.to(compute).contiguous(), _rows(response_mask))
        tokens += (as_rows(ref_logp), _rows(control_mask) if control_mask is not None else None)
        tokens += (as_rows(token_weights),)
        kl_type = KL_TYPES.index(params.kl_type) + 1
        totals = torch.ops.thinkless.degrpo_forward(
            *tokens, params.clip_low, params.clip_high, kl_type, params.kl_bound
        )
        loss, stats, weights = _loss_from_totals(totals, params, counts)
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in tokens), weights)
        ctx.present = tuple(x is not None for x in tokens)
        ctx.params, ctx.kl_type, ctx.logp_dtype = params, kl_type, logp.dtype
        out_dtype = torch.promote_types(logp.dtype, torch.float32)
        stats = stats.to(out_dtype)
        ctx.mark_non_differentiable(stats)
        return loss.to(out_dtype), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        *tokens, weights = ctx.saved_tensors
        tokens = [x if present else None for x, present in zip(tokens, ctx.present, strict=True)]
        p = ctx.params
        has_kl = tokens[4] is not None and p.kl_coef != 0.0
        dlogp = torch.ops.thinkless.degrpo_backward(
            *tokens, weights * grad_loss.to(weights.dtype), p.clip_low, p.clip_high, ctx.kl_type, p.kl_bound, has_kl
        )
        return dlogp.to(ctx.logp_dtype), None, None, None, None, None, None, None, None


def _check_inputs(logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights):
    logp = _checks.floating("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must be 2-D [B, T], got shape {tuple(logp.shape)}")
    return (
        logp,
        *check_token_inputs(
            logp.shape, logp.device, "logp", old_logp, advantages, response_mask, ref_logp, control_mask,
            token_weights,
        ),
    )  # fmt: skip


def check_token_inputs(
    shape, device, like: str, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights=None
):
    """The per-token constants of the loss, checked against the [B, T] shape and the device of `like`."""
    if old_logp is not None:  # None (the fused loss only): on-policy
        old_logp = _checks.floating("old_logp", old_logp)
        _checks.same_shape("old_logp", old_logp, shape, like)
    advantages = _checks.floating("advantages", advantages)
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected [B]={tuple(shape[:1])} or [B, T]={tuple(shape)}"
        )
    response_mask = _checks.mask("response_mask", response_mask)
    _checks.same_shape("response_mask", response_mask, shape, like)
    named = {"advantages": advantages, "response_mask": response_mask}
    if old_logp is not None:
        named["old_logp"] = old_logp
    if ref_logp is not None:
        ref_logp = named["ref_logp"] = _checks.floating("ref_logp", ref_logp)
        _checks.same_shape("ref_logp", ref_logp, shape, like)
    if control_mask is not None:
        control_mask = named["control_mask"] = _checks.mask("control_mask", control_mask)
        _checks.same_shape("control_mask", control_mask, shape, like)
    if token_weights is not None:
        token_weights = named["token_weights"] = _checks.floating("token_weights", token_weights).detach()
        _checks.same_shape("token_weights", token_weights, shape, like)
    for name, value in named.items():
        _checks.same_device(name, value, device, like)
    return old_logp, advantages, response_mask, ref_logp, control_mask, token_weights


def make_params(
    alpha, clip_low, clip_high, kl_coef, kl_type, decoupled, has_ref: bool, *, kl_clamp=None, loss_agg="token_mean",
    loss_agg_norm=None,
) -> DeGRPOParams:  # fmt: skip
    """The checked options of the loss; kl_coef > 0 needs reference log-probs, seq_mean_token_sum_norm a norm."""
    params = DeGRPOParams(
        alpha=_checks.number("alpha", alpha, low=0.0),
        clip_low=_checks.number("clip_low", clip_low, low=0.0),
        clip_high=_checks.number("clip_high", clip_high, low=0.0),
        kl_coef=_checks.number("kl_coef", kl_coef, low=0.0),
        kl_type=_checks.choice("kl_type", kl_type, KL_TYPES),
        kl_clamp=None if kl_clamp is None else _checks.number("kl_clamp", kl_clamp, low=0.0),
        decoupled=bool(decoupled),
        loss_agg=_checks.choice("loss_agg", loss_agg, LOSS_AGGS),
        loss_agg_norm=None if loss_agg_norm is None else _checks.number("loss_agg_norm", loss_agg_norm),
    )
    if params.kl_coef > 0 and not has_ref:
        raise ValueError("ref_logp is required when kl_coef > 0 (the KL term compares against the reference)")
    if params.loss_agg == "seq_mean_token_sum_norm" and not (params.loss_agg_norm or 0) > 0:
        raise ValueError(f"loss_agg='seq_mean_token_sum_norm' needs loss_agg_norm > 0 (tokens), got {loss_agg_norm!r}")
    return params


def check_normalizers(normalizers, device: torch.device) -> Tensor | None:
    """float64 [3] (control tokens, response tokens, sequences) from a `Normalizers`, a mapping or None."""
    if normalizers is None:
        return None
    names = NORMALIZER_NAMES
    try:
        values = [reference._normalizer(normalizers, name) for name in names]
    except (KeyError, AttributeError):
        raise ValueError(
            f"normalizers must be a Normalizers or a mapping with {', '.join(names)}; got {normalizers!r}"
        ) from None
    values = [float(v) if isinstance(v, Tensor) else v for v in values]
    counts = [_checks.number(f"normalizers.{name}", v, low=0.0) for name, v in zip(names, values, strict=True)]
    if counts[0] > counts[1]:
        raise ValueError(f"normalizers: control_tokens ({counts[0]:g}) cannot exceed response_tokens ({counts[1]:g})")
    return torch.tensor(counts, dtype=torch.float64, device=device)


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
    logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights = _check_inputs(
        logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights
    )
    params = make_params(
        alpha, clip_low, clip_high, kl_coef, kl_type, decoupled, ref_logp is not None, kl_clamp=kl_clamp,
        loss_agg=loss_agg, loss_agg_norm=loss_agg_norm,
    )  # fmt: skip
    counts = check_normalizers(normalizers, logp.device)
    name = select_backend(logp.device, backend)
    if name in ("triton", "cpp"):
        control = reference.first_response_token_mask(response_mask) if control_mask is None else control_mask
        token_weights = _token_weights(params, token_weights, response_mask, control & response_mask)
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
