"""lm_head + log-softmax + DeGRPO loss in one pass over vocabulary chunks, never the [tokens x vocab] logits.

At 16k tokens and a 152k vocabulary the logits alone are 10 GB in fp32. The loss needs them only through
logp = log_softmax(z)[target], and the loss is a sum of per-token terms whose weights come from token counts, which
the masks give before any logit exists. So once a chunk of rows has its logsumexp, dL/dlogp of those rows is
known, and so is dL/dz = g * (onehot(target) - softmax(z)). Each chunk of C rows then costs:

    1. z = h_c W^T (+ b)                 one GEMM into a [C, V] buffer reused by every chunk
    2. row statistics                    online logsumexp, target logit, entropy (one read of z)
    3. g = dL/dlogp                      per token, from the DeGRPO backward formula
    4. row gradient                      dz = g * (onehot - softmax(z)), written over z
    5. dH_c = dz W,  dW += dz^T h_c      two GEMMs; dW accumulates in fp32

6·N·H·V FLOPs in total, the same as the three GEMMs of the unfused loss, and C·V extra memory. The gradients are
formed in forward and kept for backward (as Liger's chunked losses do); backward only scales them.

On CUDA steps 2 and 4 are Triton kernels, on CPU the native extension's (both in `fused_linear_rows.py`; the chunk
loop is in `fused_linear_loop.py`). The torch row work takes a different shape, because torch cannot fuse it: the
chunk becomes E = exp(z - max) in place, and both GEMMs read E with the softmax normaliser and g folded into their
small [C, H] operands (dH = g (W[t] - E W / s), dW += -E^T (g h / s) plus the scattered target rows), so nothing
of size C x V is written twice.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from thinkless.kernels import _checks, reference
from thinkless.kernels._backend import select_backend
from thinkless.kernels._checks import check_token_inputs
from thinkless.kernels._tensors import compute_dtype
from thinkless.kernels.degrpo_loss import degrpo_loss
from thinkless.kernels.degrpo_weights import (
    LOSS_DEFAULTS,
    DeGRPOParams,
    Normalizers,
    check_normalizers,
    loss_weights,
    resolve_token_weights,
)
from thinkless.kernels.fused_linear_loop import CrossEntropyTokens, Pass, Tokens, chunk_rows, run
from thinkless.kernels.fused_linear_rows import ROW_OPS


class FusedLinearDeGRPOFunction(torch.autograd.Function):
    """Forward computes the loss pieces and every gradient; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, ps_fields: dict):
        ps = Pass(
            hidden=hidden2d.detach(),
            weight=weight.detach(),
            bias=bias.detach() if bias is not None else None,
            **ps_fields,
        )
        logp, entropy, dH, dW, db = run(ps)
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in (dH, dW, db)))
        ctx.has = (dH is not None, dW is not None, db is not None)
        ctx.dtypes = (hidden2d.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(logp)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        # The loss value comes from degrpo_loss on logp (outside); this output only carries the gradient.
        return torch.zeros((), dtype=logp.dtype, device=logp.device), logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        saved = ctx.saved_tensors
        grads = []
        for has, g, dtype in zip(ctx.has, saved, ctx.dtypes, strict=True):
            if not has:
                grads.append(None)
                continue
            grads.append(_scaled(g, grad_loss, dtype))
        return grads[0], grads[1], grads[2], None


# Rows of a stored gradient scaled per call of `_scaled`: at most this many elements (64 MiB of fp32).
SCALE_SLICE = 1 << 24


def _scaled(g: Tensor, grad_loss: Tensor, dtype: torch.dtype) -> Tensor:
    """The stored gradient `g` times the loss's incoming gradient, as the input's `dtype`, rounded once.

    Written into the output slice by slice: `(g * grad_loss).to(dtype)` would first make a second fp32 dW, V x H x 4
    bytes (2 GiB at H=3584, V=151936: most of this loss's peak memory on CUDA, where grad_loss is a device tensor
    that the shortcut for 1 cannot read without a sync). CUDA's mul casts into `out` in the kernel; the CPU's
    through a temporary of one slice, as does a bf16 `g` (dH) widened to fp32 on either."""
    if _is_one(grad_loss):
        return g.to(dtype)
    out = torch.empty(g.shape, dtype=dtype, device=g.device)
    # The product in fp32 at least: a bf16 g (the Triton path's dH) times a bf16-rounded scale would be off by the
    # scale's rounding (0.2 % for 1/3).
    wide = torch.promote_types(g.dtype, torch.float32)
    scale = grad_loss.to(wide)
    rows = max(1, SCALE_SLICE // max(1, g[0].numel())) if len(g) else 1
    for i in range(0, len(g), rows):
        torch.mul(g[i : i + rows].to(wide), scale, out=out[i : i + rows])
    return out


def _is_one(x: Tensor) -> bool:
    return x.numel() == 1 and x.device.type == "cpu" and float(x) == 1.0


def _check_linear(hidden, weight, bias, target_ids, temperature, chunk_size):
    hidden = _checks.floating("hidden", hidden)
    weight = _checks.floating("weight", weight)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be the lm_head weight, 2-D [V, H] with V >= 1; got shape {tuple(weight.shape)}")
    if hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} but weight is [V={weight.shape[0]}, H={weight.shape[1]}]: "
            "the last dimension of hidden must be H"
        )
    _checks.same_device("weight", weight, hidden.device, "hidden")
    if bias is not None:
        bias = _checks.floating("bias", bias)
        _checks.same_shape("bias", bias, weight.shape[:1], "weight's first dimension")
        _checks.same_device("bias", bias, hidden.device, "hidden")
        bias = bias.to(weight.dtype)
    target_ids = _checks.integer("target_ids", target_ids)
    _checks.same_shape("target_ids", target_ids, hidden.shape[:-1], "hidden without its last dimension")
    _checks.same_device("target_ids", target_ids, hidden.device, "hidden")
    temperature = _checks.number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    # The lm_head's dtype decides the arithmetic (bf16 hidden states from an autocast model meet an fp32 head, or
    # the reverse); hidden is cast, with its gradient cast back by autograd.
    return hidden.to(weight.dtype), weight, bias, target_ids, temperature


def _check_targets(target_ids: Tensor, vocab: int, where: Tensor | None = None) -> None:
    """Every target id that is used must index the vocabulary; name the first one that does not."""
    bad = (target_ids < 0) | (target_ids >= vocab)
    if where is not None:
        bad &= where
    if bool(bad.any()):
        index = tuple(bad.nonzero()[0].tolist())
        used = " on a response token" if where is not None else ""
        raise ValueError(
            f"target_ids{list(index)} = {target_ids[index].item()}{used} is outside the vocabulary [0, {vocab})"
        )


def _row_backend(device: torch.device, backend: str | None) -> str:
    return select_backend(device, backend)


def _buffer_itemsize(weight: Tensor, row_backend: str) -> int:
    upcast = row_backend == "torch" or ROW_OPS[row_backend].upcast
    return compute_dtype(weight.dtype).itemsize if upcast else weight.element_size()


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log_softmax((hidden @ weight^T + bias) / temperature)[target_ids], chunk by chunk, without autograd.

    For the old-policy and reference log-probs of an RL step: memory is one [chunk_size, V] buffer, not the logits.

    Args:
        hidden: [..., H] last hidden states; weight: [V, H] lm_head weight; bias: optional [V].
        target_ids: integer [...] (the shape of hidden without H), ids in [0, V).
        temperature: the sampling temperature; logits are divided by it.
        chunk_size: rows per chunk; default from a memory budget (48 MiB of logits on CPU, 512 MiB on CUDA).
        return_entropy: also return the entropy of each token's distribution.

    Returns:
        logp, float32 (float64 for float64 inputs), the shape of target_ids; with return_entropy, (logp, entropy).
    """
    hidden, weight, bias, target_ids, temperature = _check_linear(
        hidden, weight, bias, target_ids, temperature, chunk_size
    )
    _check_targets(target_ids, weight.shape[0])
    rows = _row_backend(hidden.device, backend)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_rows(chunk_size, h2.shape[0], weight.shape[0], _buffer_itemsize(weight, rows), hidden.device)
    with torch.no_grad():
        ps = Pass(h2.detach(), weight.detach(), None if bias is None else bias.detach(), target_ids.reshape(-1).long(),
                   temperature, chunk, rows, bool(return_entropy))  # fmt: skip
        logp, entropy, *_ = run(ps)
    logp = logp.view(target_ids.shape)
    return (logp, entropy.view(target_ids.shape)) if return_entropy else logp


def fused_linear_degrpo_loss(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    bias: Tensor | None = None,
    ref_logp: Tensor | None = None,
    temperature: float = 1.0,
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
    entropy_coef: float = 0.0,
    normalizers: Normalizers | dict | None = None,
    token_weights: Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DeGRPO loss on logp = log_softmax((hidden @ weight^T + bias) / temperature)[target_ids], fused.

    Exactly `degrpo_loss` (same options, same metrics) on those log-probs, minus entropy_coef x the token-mean
    entropy of the response tokens, with gradients for hidden, weight and bias, in one pass of 6·N·H·V FLOPs and
    one [chunk_size, V] buffer instead of the [B·T, V] logits.

    Args:
        hidden: [B, T, H] last hidden states at the positions that predict target_ids.
        weight: [V, H] lm_head weight; its dtype decides the arithmetic (hidden and bias are cast to it).
        bias: optional [V].
        target_ids: integer [B, T], the sampled tokens; ids outside [0, V) are allowed only off the response mask.
        old_logp: as in `degrpo_loss`, or None when the samples are on-policy (one update on fresh samples): the
            old log-probs are then these log-probs, detached, so the ratio is exactly 1, and no separate pass has
            to compute them (TRL and verl do the same). The gradient is that of old_logp = these log-probs.
        advantages, response_mask, ref_logp, control_mask, alpha, clip_low, clip_high, kl_coef, kl_type,
            kl_clamp, decoupled, loss_agg, loss_agg_norm, normalizers, token_weights: as in `degrpo_loss`.
        entropy_coef: the entropy bonus (the authors' entropy_coeff, 1e-3): the loss subtracts entropy_coef x the
            entropy summed over response tokens / the normalizers' response_tokens.
        temperature: the sampling temperature; logits are divided by it.
        chunk_size: rows per chunk; default from a memory budget (48 MiB of logits on CPU, 512 MiB on CUDA).
        backend: "triton", "cpp" or "torch" for the row work; default from the device (or THINKLESS_BACKEND).

    Returns:
        (loss, metrics): the `degrpo_loss` metrics plus "entropy", the response tokens' entropy over the same
        normaliser, and "logp", the detached log-probs [B, T] (float32; float64 for float64 inputs; 0 where a
        target is outside the vocabulary off the response mask).
    """
    hidden, weight, bias, target_ids, temperature = _check_linear(
        hidden, weight, bias, target_ids, temperature, chunk_size
    )
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D [B, T, H], got shape {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    V = weight.shape[0]
    old_logp, advantages, response_mask, ref_logp, control_mask, token_weights = check_token_inputs(
        (B, T), hidden.device, "target_ids", old_logp, advantages, response_mask, ref_logp, control_mask,
        token_weights,
    )  # fmt: skip
    params = DeGRPOParams.checked(
        has_ref=ref_logp is not None, alpha=alpha, clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
        kl_type=kl_type, kl_clamp=kl_clamp, decoupled=decoupled, loss_agg=loss_agg, loss_agg_norm=loss_agg_norm,
    )  # fmt: skip
    entropy_coef = _checks.number("entropy_coef", entropy_coef)
    counts = check_normalizers(normalizers, hidden.device)
    _check_targets(target_ids, V, response_mask)
    rows = _row_backend(hidden.device, backend)
    compute = compute_dtype(hidden.dtype)

    # Per-token constants, flat, and the loss weights from the normalisers.
    first = reference.first_response_token_mask(response_mask)
    control = first if control_mask is None else control_mask & response_mask
    tw = resolve_token_weights(params, token_weights, response_mask, control)
    resp, ctrl = response_mask.reshape(-1), control.reshape(-1)
    n_control, n_response = ctrl.sum().to(compute), resp.sum().to(compute)
    if counts is None:
        counts = torch.stack((n_control, n_response, n_control))
    counts = counts.to(compute)
    weights = loss_weights(*counts.unbind(), params)
    adv = advantages[:, None].expand(B, T) if advantages.dim() == 1 else advantages

    flat = lambda pick, x: pick(x.reshape(-1)).to(compute).contiguous()
    make_tokens = lambda pick: Tokens(  # noqa: E731
        old=flat(pick, old_logp) if old_logp is not None else None,
        adv=flat(pick, adv),
        resp=pick(resp).contiguous(),
        ctrl=pick(ctrl).contiguous(),
        ref=flat(pick, ref_logp) if ref_logp is not None else None,
        tw=flat(pick, tw) if tw is not None else None,
        weights=weights,
        params=params,
        entropy_weight=-entropy_coef / float(counts[1].clamp(min=1)),
    )
    carrier, logp, entropy = _fused_pass(
        hidden, weight, bias, target_ids, response_mask, make_tokens, temperature, chunk_size, rows
    )
    with torch.no_grad():
        loss, metrics = degrpo_loss(
            logp, logp if old_logp is None else old_logp, advantages, response_mask, ref_logp=ref_logp,
            control_mask=control_mask, normalizers=normalizers, token_weights=token_weights, backend=backend,
            **vars(params),
        )  # fmt: skip
        mean_entropy = torch.where(response_mask, entropy, 0.0).sum() / counts[1].clamp(min=1)
        metrics["entropy"] = mean_entropy.to(entropy.dtype)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * metrics["entropy"]
    metrics["logp"] = logp
    return (loss if carrier is None else loss + carrier), metrics


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def _fused_pass(hidden, weight, bias, target_ids, response_mask, make_tokens, temperature, chunk_size, rows):
    """Run the chunk loop for [B, T] tokens. Returns (gradient carrier or None, logp [B, T], entropy [B, T]).

    Response rows go first: they need the backward GEMMs, the others only their log-probs. A full mask keeps the
    natural order and copies nothing. `make_tokens(pick)` builds the per-token loss constants in that order.
    Targets off the response mask may be anything; their log-probs are reported as 0.
    """
    B, T, H = hidden.shape
    V = weight.shape[0]
    resp = response_mask.reshape(-1)
    targets = target_ids.reshape(-1).long()
    valid = (targets >= 0) & (targets < V)
    targets = torch.where(valid, targets, torch.zeros_like(targets))
    n_resp = int(resp.sum())
    order = None if n_resp == resp.numel() else torch.cat((resp.nonzero()[:, 0], (~resp).nonzero()[:, 0]))
    pick = (lambda x: x) if order is None else (lambda x: x[order])
    grad_on = torch.is_grad_enabled()
    need = [grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    fields = dict(
        targets=pick(targets),
        temperature=temperature,
        chunk=chunk_rows(chunk_size, B * T, V, _buffer_itemsize(weight, rows), hidden.device),
        backend=rows,
        want_entropy=True,
        tokens=make_tokens(pick) if any(need) else None,
        grad_rows=n_resp,
        need_dh=need[0],
        need_dw=need[1],
        need_db=need[2],
    )
    carrier, logp, entropy = FusedLinearDeGRPOFunction.apply(pick(hidden.reshape(B * T, H)), weight, bias, fields)
    if order is not None:
        logp = torch.empty_like(logp).index_copy_(0, order, logp)
        entropy = torch.empty_like(entropy).index_copy_(0, order, entropy)
    logp = torch.where(valid, logp, torch.zeros_like(logp)).view(B, T)
    return (carrier if any(need) else None), logp, entropy.view(B, T)


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    loss_mask: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean cross-entropy -mean(logp[loss_mask]) through the same chunk loop: the SFT loss without logits.

    Args:
        hidden [B, T, H], weight [V, H], bias, target_ids [B, T], temperature, chunk_size, backend: as in
            `fused_linear_degrpo_loss`.
        loss_mask: bool [B, T], the tokens that count (the response tokens of SFT); others may hold any target.

    Returns:
        (loss, metrics): metrics "entropy" (mean over loss_mask tokens), "logp" [B, T] detached, "tokens".
    """
    hidden, weight, bias, target_ids, temperature = _check_linear(
        hidden, weight, bias, target_ids, temperature, chunk_size
    )
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D [B, T, H], got shape {tuple(hidden.shape)}")
    loss_mask = _checks.mask("loss_mask", loss_mask)
    _checks.same_shape("loss_mask", loss_mask, hidden.shape[:2], "target_ids")
    _checks.same_device("loss_mask", loss_mask, hidden.device, "hidden")
    _check_targets(target_ids, weight.shape[0], loss_mask)
    n = int(loss_mask.sum())
    rows = _row_backend(hidden.device, backend)
    carrier, logp, entropy = _fused_pass(
        hidden, weight, bias, target_ids, loss_mask, lambda pick: CrossEntropyTokens(1.0 / max(n, 1)),
        temperature, chunk_size, rows,
    )  # fmt: skip
    with torch.no_grad():
        loss = -_masked_mean(logp, loss_mask)
        metrics = {"entropy": _masked_mean(entropy, loss_mask), "logp": logp, "tokens": loss_mask.sum().to(logp.dtype)}
    return (loss if carrier is None else loss + carrier), metrics
