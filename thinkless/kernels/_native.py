"""The compiled extension `thinkless._C`: loading it, checking it suits this CPU, and its fake implementations.

The ops live in `torch.ops.thinkless` (see csrc/ops.cpp). Their fake (meta) implementations below give output
shapes and dtypes without running anything, so that torch.compile can trace through them.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

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
