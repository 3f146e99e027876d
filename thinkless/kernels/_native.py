"""The compiled extension `thinkless._C`: loading it, checking it suits this CPU, its fake implementations, and the
autograd.Function of the DeGRPO loss over its ops.

The ops live in `torch.ops.thinkless` (see csrc/ops.cpp). Their fake (meta) implementations below give output
shapes and dtypes without running anything, so that torch.compile can trace through them.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from thinkless.kernels._tensors import compute_dtype, contiguous_tokens
from thinkless.kernels.degrpo_weights import function_outputs, loss_from_totals

# What a build for each instruction set needs from the running CPU, as torch reports it.
_RUNS_ON = {"DEFAULT": None, "AVX2": {"AVX2", "AVX512"}, "AVX512": {"AVX512"}}


@functools.cache
def load():
    """The `thinkless._C` module, or None (with one warning per process) when it is missing or cannot run here."""
    try:
        module = importlib.import_module("thinkless._C")
    except ImportError as err:
        warnings.warn(
            f"thinkless: the native extension thinkless._C is not available ({err}); CPU kernels fall back to torch. "
            "To build it: pip install --no-build-isolation . with a C++ compiler (see setup.py).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    built = getattr(module, "cpu_capability", "DEFAULT")
    running = torch.backends.cpu.get_cpu_capability()
    needs = _RUNS_ON.get(built, {built})
    if needs is not None and running not in needs:
        warnings.warn(
            f"thinkless: thinkless._C was built for {built} but this CPU runs {running}; CPU kernels fall back to "
            "torch. Rebuild here, or with THINKLESS_CPU_CAPABILITY=DEFAULT for a portable build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    _register_fakes()
    return module


def _register_fakes() -> None:
    fake = torch.library.register_fake

    @fake("thinkless::group_advantages")
    def _(rewards, group_ids, normalize_std, eps):
        return rewards.new_empty(rewards.shape, dtype=torch.float32)

    @fake("thinkless::degrpo_forward")
    def _(
        logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights, clip_low, clip_high, kl_type,
        kl_clamp,
    ):  # fmt: skip
        return logp.new_empty(9, dtype=torch.float64)

    @fake("thinkless::degrpo_backward")
    def _(
        logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights, weights, clip_low, clip_high,
        kl_type, kl_clamp, has_kl,
    ):  # fmt: skip
        return logp.new_empty(logp.shape)

    @fake("thinkless::row_stats")
    def _(logits, targets, inv_temp, want_entropy):
        n = logits.shape[0]
        return logits.new_empty(n), logits.new_empty(n), logits.new_empty(n if want_entropy else 0)

    @fake("thinkless::row_grad_")
    def _(logits, targets, lse, grad, inv_temp, entropy, entropy_grad):
        return None


class DeGRPOLossNativeFunction(torch.autograd.Function):
    """Autograd wrapper of the native CPU ops (`torch.ops.thinkless.degrpo_*`); only `logp` receives a gradient."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights, counts, params):
        # The ops take float32 or float64, one dtype for all, tokens contiguous within rows.
        compute = compute_dtype(logp.dtype)
        as_rows = lambda x: contiguous_tokens(x.to(compute)) if x is not None else None
        tokens = (
            as_rows(logp),
            as_rows(old_logp),
            advantages.to(compute).contiguous(),
            contiguous_tokens(response_mask),
        )
        tokens += (as_rows(ref_logp), contiguous_tokens(control_mask) if control_mask is not None else None)
        tokens += (as_rows(token_weights),)
        kl_type = params.kl_code
        totals = torch.ops.thinkless.degrpo_forward(
            *tokens, params.clip_low, params.clip_high, kl_type, params.kl_bound
        )
        loss, stats, weights = loss_from_totals(totals, params, counts)
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in tokens), weights)
        ctx.present = tuple(x is not None for x in tokens)
        ctx.params, ctx.kl_type, ctx.logp_dtype = params, kl_type, logp.dtype
        return function_outputs(ctx, loss, stats, logp.dtype)

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
