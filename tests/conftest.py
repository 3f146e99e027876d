"""Shared fixtures. On a machine without CUDA the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before thinkless (and so `triton.jit`) is imported: the decorator decides then
whether it builds a GPU kernel or an interpreted one.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HAS_NATIVE = importlib.util.find_spec("thinkless._C") is not None
# On a GPU machine the kernels are compiled, not interpreted, so Triton cannot take CPU tensors there.
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


def backend_params():
    """Every backend as a pytest param; `None` is the default dispatch for the device."""
    return [
        pytest.param(None, id="default"),
        pytest.param("torch", id="torch"),
        pytest.param("triton", id="triton"),
        pytest.param(
            "cpp",
            id="cpp",
            marks=pytest.mark.skipif(not HAS_NATIVE, reason="thinkless._C not built (THINKLESS_SKIP_BUILD=1?)"),
        ),
    ]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # A THINKLESS_BACKEND left in the caller's shell would silently turn every parametrized backend into one.
    monkeypatch.delenv("THINKLESS_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _skip_triton_on_cpu_without_interpreter(request):
    params = getattr(request.node, "callspec", None)
    params = params.params if params else {}
    if params.get("backend") == "triton" and params.get("device", "cpu") == "cpu" and not TRITON_ON_CPU:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1; this run compiles the kernels for CUDA")
