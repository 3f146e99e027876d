"""What each implementation runs, per kernel: thinkless, eager torch, Liger-Kernel, the GEMM floor.

`build(kernel, impl, shape, device)` returns an `Impl`: `forward()` runs the forward (fresh leaves that require
grad, as in a training step) and returns what `backward(state)` needs; `backward` is None for kernels without
autograd (group advantages, token log-probs). The benchmark modes are made from the two (`mode_fns`). Shapes are
plain dicts, so that a subprocess can rebuild the same case from JSON (see `_peak_memory.py`).

The eager baselines are the readable references of `thinkless.kernels.reference` (for token_logprobs a plain
log_softmax + gather: the reference also computes the entropy, which token_logprobs skips unless asked).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _common import DTYPES, linear_inputs, reward_inputs, sync, token_inputs

MODES = ("forward", "backward", "full")
DEGRPO_OPTIONS = {"kl_coef": 1e-3, "kl_type": "k3"}  # a KL term, as the trainer runs with a reference model


@dataclass(frozen=True)
class Impl:
    forward: Callable[[], Any]
    backward: Callable[[Any], Any] | None = None


def _autograd(loss_fn, *leaves) -> Impl:
    """forward: loss_fn on fresh copies of `leaves` that require grad; backward: loss.backward(), the grads."""

    def forward():
        fresh = [x.detach().requires_grad_(True) for x in leaves]
        return loss_fn(*fresh), fresh

    def backward(state):
        loss, fresh = state
        loss.backward()
        return tuple(x.grad for x in fresh)

    return Impl(forward, backward)


def gemm_floor(h: torch.Tensor, w: torch.Tensor) -> Impl:
    """The GEMMs any lm_head loss must do, outputs preallocated: logits = h W^T forward; dH = dz W and
    dW = dz^T h backward (dz is the logits buffer, its values do not matter to the time)."""
    h2 = h.reshape(-1, h.shape[-1])
    z = torch.empty(h2.shape[0], w.shape[0], device=h.device, dtype=h.dtype)
    dH, dW = torch.empty_like(h2), torch.empty_like(w)

    def backward(_):
        torch.mm(z, w, out=dH)
        torch.mm(z.t(), h2, out=dW)
        return dH, dW

    return Impl(lambda: torch.mm(h2, w.t(), out=z), backward)


def group_advantages_impls(shape: dict, device) -> dict[str, Callable[[], Impl]]:
    from thinkless.kernels import group_advantages, reference

    rewards, ids = reward_inputs(shape["N"], shape["G"], shuffled=shape.get("shuffled", False), device=device)
    std = shape.get("std", False)
    return {
        "thinkless": lambda: Impl(lambda: group_advantages(rewards, ids, normalize_std=std)),
        "torch": lambda: Impl(lambda: reference.group_advantages(rewards, ids, normalize_std=std)),
    }


def degrpo_loss_impls(shape: dict, device) -> dict[str, Callable[[], Impl]]:
    from thinkless.kernels import degrpo_loss, reference

    logp, old, ref, adv, mask = token_inputs(shape["B"], shape["T"], device=device, dtype=DTYPES[shape["dtype"]])

    def loss_of(fn):
        return lambda x: fn(x, old, adv, mask, ref_logp=ref, **DEGRPO_OPTIONS)[0]

    return {
        "thinkless": lambda: _autograd(loss_of(degrpo_loss), logp),
        "torch": lambda: _autograd(loss_of(reference.degrpo_loss), logp),
    }


def _linear(shape: dict, device):
    dtype = DTYPES[shape["dtype"]]
    return linear_inputs(shape["N"], shape["H"], shape["V"], shape["seq"], device=device, dtype=dtype)


def token_logprobs_impls(shape: dict, device) -> dict[str, Callable[[], Impl]]:
    from thinkless.kernels import token_logprobs

    h, w, targets, *_ = _linear(shape, device)

    @torch.no_grad()
    def eager():
        logits = (h @ w.t()).float()
        return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)

    def liger():
        # Liger's chunked selective log-prob, the path its GRPO loss takes for reference log-probs.
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

        with torch.no_grad():
            return LigerFusedLinearPPOBase.chunk_forward(h, w, targets)

    return {
        "thinkless": lambda: Impl(lambda: token_logprobs(h, w, targets)),
        "torch": lambda: Impl(eager),
        "liger": lambda: Impl(liger),
        "gemm_floor": lambda: Impl(gemm_floor(h, w).forward),
    }


def fused_linear_impls(shape: dict, device) -> dict[str, Callable[[], Impl]]:
    from thinkless.kernels import fused_linear_degrpo_loss, reference

    h, w, targets, old, adv, mask = _linear(shape, device)

    def ours(backend=None):
        return lambda hh, ww: fused_linear_degrpo_loss(hh, ww, targets, old, adv, mask, backend=backend)[0]

    def liger():
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # Token-mean GRPO without a KL term, PPO clipping from the old log-probs: the work our loss does.
        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")
        return _autograd(lambda hh, ww: loss_fn(hh, ww, targets, mask.long(), adv, old_per_token_logps=old)[0], h, w)

    def liger_triton():
        # Without a fused lm_head, Liger's answer on CUDA is its Triton GRPO loss on the materialised logits. It
        # reads logits [B, T+1, V] (the last position is dropped), so the hidden states get one extra row.
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        h_ext, ids, m = torch.cat((h, h[:, -1:]), 1), targets.contiguous(), mask.int().contiguous()

        def loss(hh, ww):
            logits = hh @ ww.t()
            out = triton_grpo_loss(logits, old.contiguous(), None, ids, adv, m, temperature=1.0, beta=0.0,
                                   eps_low=0.2, eps_high=0.2, loss_type="dapo", reduce=True)  # fmt: skip
            return out[0]

        return _autograd(loss, h_ext, w)

    def ours_big_chunks():
        # An experiment for the next GPU: each chunk re-reads and re-writes the fp32 dW accumulator (8 V H bytes),
        # which at the default 512 MiB of logits (1766 rows at V=151936) moves more bytes than the chunk's logits
        # (~10 C V) once H passes ~2200. 2 H rows per chunk cut the chunks 1.7x (H=1536) to 3.8x (H=3584).
        H = h.shape[-1]
        return _autograd(
            lambda hh, ww: fused_linear_degrpo_loss(hh, ww, targets, old, adv, mask, chunk_size=2 * H)[0], h, w
        )

    return {
        "thinkless": lambda: _autograd(ours(), h, w),
        "thinkless_big_chunks": ours_big_chunks,
        "thinkless_torch": lambda: _autograd(ours("torch"), h, w),  # the chunk loop with its row work in torch ops
        "torch": lambda: _autograd(
            lambda hh, ww: reference.fused_linear_degrpo_loss(hh, ww, targets, old, adv, mask)[0], h, w
        ),
        "liger": liger,
        "liger_triton": liger_triton,
        "gemm_floor": lambda: gemm_floor(h, w),
    }


KERNELS = {
    "group_advantages": group_advantages_impls,
    "degrpo_loss": degrpo_loss_impls,
    "token_logprobs": token_logprobs_impls,
    "fused_linear_degrpo_loss": fused_linear_impls,
}


def build_all(kernel: str, impls, shape: dict, device) -> dict[str, Impl]:
    """The named implementations of a kernel, on one set of inputs."""
    factories = KERNELS[kernel](shape, torch.device(device))
    return {name: factories[name]() for name in impls}


def build(kernel: str, impl: str, shape: dict, device) -> Impl:
    return build_all(kernel, (impl,), shape, device)[impl]


def mode_fns(impl: Impl, mode: str, device) -> tuple[Callable[[], Any] | None, Callable[..., Any]]:
    """(setup, target) for pytest-benchmark's pedantic: setup runs untimed before each round and returns the
    target's arguments. Each target waits for the device, so that its time covers its own work."""
    device = torch.device(device)

    def synced(fn):
        def run(*args):
            out = fn(*args)
            sync(device)
            return out

        return run

    if mode == "forward":
        return None, synced(impl.forward)
    if impl.backward is None:
        raise ValueError(f"mode {mode!r} needs a backward; this kernel has none")
    if mode == "backward":
        return (lambda: ((synced(impl.forward)(),), {})), synced(impl.backward)
    if mode == "full":
        return None, synced(lambda: impl.backward(impl.forward()))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
