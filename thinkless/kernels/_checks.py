"""Input checks at the public API boundary: of one argument, and of the loss's per-token inputs, which `degrpo_loss`
and the fused linear losses share (the options' checks are declared with them, `degrpo_weights.DeGRPOParams`).

Every backend sees the same inputs, so a user mistake gives the same `ValueError`, naming the argument, whichever
implementation would have run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def as_tensor(name: str, value, device: torch.device | None = None) -> Tensor:
    """A tensor from a tensor, a numpy array or a list of numbers (as rewards and prompt ids often arrive)."""
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a tensor or a list of numbers, got {type(value).__name__}: {err}") from None


def floating(name: str, value) -> Tensor:
    value = tensor(name, value)
    if not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def integer(name: str, value) -> Tensor:
    value = tensor(name, value)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (one id per sample), got dtype {value.dtype}")
    return value


def mask(name: str, value) -> Tensor:
    """A bool mask; integer or float 0/1 masks (as TRL and verl pass them) are accepted and converted."""
    value = tensor(name, value)
    return value if value.dtype == torch.bool else value != 0


def same_shape(name: str, value: Tensor, shape: torch.Size, like: str) -> None:
    if value.shape != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)} (the shape of {like})")


def same_device(name: str, value: Tensor, device: torch.device, like: str) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, but {like} is on {device}; move them to one device")


def finite(name: str, value: Tensor) -> None:
    if value.numel() and not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value)).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite; found {value[tuple(bad)].item()} at index {tuple(bad)}")


def number(name: str, value, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return float(value)


def choice(name: str, value, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def check_loss_inputs(logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights):
    """`degrpo_loss`'s log-probs, floating [B, T], and its per-token constants checked against them."""
    logp = floating("logp", logp)
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
        old_logp = floating("old_logp", old_logp)
        same_shape("old_logp", old_logp, shape, like)
    advantages = floating("advantages", advantages)
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected [B]={tuple(shape[:1])} or [B, T]={tuple(shape)}"
        )
    response_mask = mask("response_mask", response_mask)
    same_shape("response_mask", response_mask, shape, like)
    named = {"advantages": advantages, "response_mask": response_mask}
    if old_logp is not None:
        named["old_logp"] = old_logp
    if ref_logp is not None:
        ref_logp = named["ref_logp"] = floating("ref_logp", ref_logp)
        same_shape("ref_logp", ref_logp, shape, like)
    if control_mask is not None:
        control_mask = named["control_mask"] = mask("control_mask", control_mask)
        same_shape("control_mask", control_mask, shape, like)
    if token_weights is not None:
        token_weights = named["token_weights"] = floating("token_weights", token_weights).detach()
        same_shape("token_weights", token_weights, shape, like)
    for name, value in named.items():
        same_device(name, value, device, like)
    return old_logp, advantages, response_mask, ref_logp, control_mask, token_weights
