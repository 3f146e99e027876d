"""Which implementation runs a kernel: Triton on CUDA, the native extension on CPU, torch otherwise.

`THINKLESS_BACKEND=triton|cpp|torch` forces one (read on every call, so tests and users can switch it at run
time). Triton on CPU tensors works only under the interpreter (`TRITON_INTERPRET=1`), which is how the tests check
the kernels on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

from thinkless.kernels._native import load as native_extension
from thinkless.kernels._triton_utils import HAS_TRITON

BACKENDS = ("triton", "cpp", "torch")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """Resolve the backend for tensors on `device`: the `backend` argument, then THINKLESS_BACKEND, then default."""
    name = backend or os.environ.get("THINKLESS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        source = "backend" if backend else "THINKLESS_BACKEND"
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name is None:
        if device.type == "cuda" and HAS_TRITON:
            return "triton"
        if device.type == "cpu" and native_extension() is not None:
            return "cpp"
        return "torch"
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("the triton backend needs the `triton` package: pip install triton")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"the triton backend runs on CUDA tensors; these are on {device.type}. "
                "Set TRITON_INTERPRET=1 (before importing thinkless) to run the kernels in the interpreter."
            )
    if name == "cpp" and (device.type != "cpu" or native_extension() is None):
        return "torch"  # the native kernels are CPU-only; native_extension() warned once if it is missing
    return name
