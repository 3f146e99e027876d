"""Input checks at the public API boundary.

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
