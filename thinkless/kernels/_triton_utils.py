"""The Triton import, in one place.

Triton ships for Linux only. Elsewhere the kernel modules must still import (the torch and cpp backends work on
any platform), so `triton.jit` becomes a no-op decorator and launching a Triton kernel is never selected.
"""

from __future__ import annotations

import types

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on platforms without Triton
    HAS_TRITON = False

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=object)


def split_scalar(x: float) -> tuple[float, float]:
    """x as hi + lo, two floats exact in fp32. Triton passes a Python float to a compiled kernel as fp32, which
    would cost a float64 pass 8 digits (1/0.6 to 3e-8: a log-prob off by 2e-7 on an H200); hi + lo formed in fp64
    inside the kernel carries x to 2^-48 (4e-15), and in fp32 it rounds back to fp32(x) (or, when x sits within
    2^-48 of a midpoint, to its neighbour: one ulp, in practice never). inf stays (inf, 0)."""
    import math

    import torch

    hi = float(torch.tensor(x, dtype=torch.float32))
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def triton_dtype(dtype):
    """The Triton type of a compute dtype (`_tensors.compute_dtype`: torch.float32 or torch.float64), for a kernel's
    COMPUTE argument."""
    import torch

    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


__all__ = ["HAS_TRITON", "triton", "tl", "split_scalar", "triton_dtype"]
