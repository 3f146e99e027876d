"""Backend dispatch: the default per device, THINKLESS_BACKEND, and the errors when a backend cannot run."""

import pytest
import torch
from conftest import TRITON_ON_CPU

from thinkless.kernels import degrpo_loss, select_backend
from thinkless.kernels._backend import native_extension


def test_default_backend_per_device():
    assert select_backend(torch.device("cpu")) == ("cpp" if native_extension() is not None else "torch")
    if torch.cuda.is_available():
        assert select_backend(torch.device("cuda")) == "triton"


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv("THINKLESS_BACKEND", "torch")
    assert select_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("THINKLESS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(torch.device("cpu")) == "triton"
    # The argument wins over the environment.
    assert select_backend(torch.device("cpu"), "torch") == "torch"


def test_unknown_backend_is_named(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of triton, cpp, torch; got 'cuda'"):
        select_backend(torch.device("cpu"), "cuda")
    monkeypatch.setenv("THINKLESS_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="THINKLESS_BACKEND must be one of"):
        degrpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1, dtype=torch.bool))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend(torch.device("cpu"), "triton")


@pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_backends_agree_through_the_env_var(monkeypatch):
    """THINKLESS_BACKEND reaches the kernels: the triton and torch paths give the same loss."""
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 9, generator=gen)
    args = (logp, logp + 0.1 * torch.randn(4, 9, generator=gen), torch.randn(4, generator=gen))
    mask = torch.rand(4, 9, generator=gen) > 0.2
    losses = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("THINKLESS_BACKEND", name)
        losses[name], _ = degrpo_loss(*args, mask)
    torch.testing.assert_close(losses["torch"], losses["triton"])
