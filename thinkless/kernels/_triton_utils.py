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

__all__ = ["HAS_TRITON", "triton", "tl"]
