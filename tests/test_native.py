"""The compiled extension thinkless._C: its custom ops (schema, fake impls, boundary checks) and the fallback.

The kernels' numbers are checked with every other backend in the other test files (the `cpp` parameter).
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import HAS_NATIVE

needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="thinkless._C not built (THINKLESS_SKIP_BUILD=1?)")


def test_extension_builds_unless_skipped():
    """After a normal install `import thinkless._C` works; THINKLESS_SKIP_BUILD=1 is the only way to go without."""
    if os.environ.get("THINKLESS_SKIP_BUILD") == "1":
        pytest.skip("installed with THINKLESS_SKIP_BUILD=1")
    import thinkless._C as native

    assert native.cpu_capability in ("DEFAULT", "AVX2", "AVX512")
    from thinkless.kernels._backend import native_extension

    assert native_extension() is native


def _sample_args():
    gen = torch.Generator().manual_seed(0)
    B, T, n, V = 3, 7, 5, 40
    logp = -torch.rand(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    tokens = (logp, logp + 0.1, torch.randn(B, generator=gen), mask)
    logits = torch.randn(V, n, generator=gen).t()  # [n, V] view of a [V, n] buffer
    targets = torch.randint(0, V, (n,), generator=gen)
    weights = torch.tensor([0.5, 0.0, 0.25, 0.1], dtype=torch.float64)
    token_weights = torch.rand(B, T, generator=gen)
    return {
        "group_advantages": (torch.randn(8, generator=gen), torch.tensor([3, 1, 3, 3, 1, 7, 7, 1]), True, 1e-6),
        "degrpo_forward": (*tokens, logp - 0.2, None, token_weights, 0.2, 0.28, 3, 10.0),
        "degrpo_backward": (*tokens, logp - 0.2, mask, token_weights, weights, 0.2, 0.28, 3, 0.05, True),
        "row_stats": (logits, targets, 1.5, True),
        "row_grad_": (
            logits.clone(memory_format=torch.preserve_format),
            targets,
            torch.rand(n) + 3,
            torch.randn(n),
            1.5,
            torch.rand(n),  # entropy
            torch.randn(n),  # its gradient
        ),
    }


@needs_native
@pytest.mark.parametrize("op", ["group_advantages", "degrpo_forward", "degrpo_backward", "row_stats", "row_grad_"])
def test_custom_op_passes_opcheck(op):
    """torch.library.opcheck: schema, fake (meta) implementation and dispatcher registration agree with the op."""
    import thinkless.kernels._backend as backend

    backend.native_extension()  # registers the fakes
    args = _sample_args()[op]
    if op == "row_grad_":
        args = (args[0].t().contiguous().t(), *args[1:])
    torch.library.opcheck(getattr(torch.ops.thinkless, op).default, args)


@needs_native
def test_custom_ops_trace_under_torch_compile_fake_mode():
    """The fakes give shapes and dtypes without running the kernels (what torch.compile's tracing needs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import thinkless.kernels._backend as backend

    backend.native_extension()
    args = _sample_args()
    with FakeTensorMode() as mode:
        fake = lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
        lse, logp, entropy = torch.ops.thinkless.row_stats(*map(fake, args["row_stats"]))
        assert lse.shape == logp.shape == entropy.shape == (5,)
        totals = torch.ops.thinkless.degrpo_forward(*map(fake, args["degrpo_forward"]))
        assert totals.shape == (9,) and totals.dtype == torch.float64
        dlogp = torch.ops.thinkless.degrpo_backward(*map(fake, args["degrpo_backward"]))
        assert dlogp.shape == (3, 7)


@needs_native
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: (a[0].int(), *a[1:]), r"logits must be Float or Double, got Int"),
        (lambda a: (a[0].contiguous(), *a[1:]), r"logits must be a \[n, V\] view of a contiguous \[V, n\] buffer"),
        (lambda a: (a[0], a[1].int(), *a[2:]), r"targets must be Long, got Int"),
        (lambda a: (a[0], a[1][:4], *a[2:]), r"targets has shape \[4\], expected \[5\]"),
        (lambda a: (a[0], a[1] + 40, *a[2:]), r"targets must lie in \[0, 40\)"),
    ],
)
def test_row_stats_checks_its_inputs(change, message):
    args = change(_sample_args()["row_stats"])
    with pytest.raises(ValueError, match=message):
        torch.ops.thinkless.row_stats(*args)


@needs_native
def test_degrpo_ops_check_their_inputs():
    args = list(_sample_args()["degrpo_forward"])
    with pytest.raises(ValueError, match=r"old_logp must be float32 \(the dtype of logp\), got Double"):
        torch.ops.thinkless.degrpo_forward(args[0], args[1].double(), *args[2:])
    with pytest.raises(ValueError, match=r"response_mask has shape \[3, 6\], expected \[3, 7\]"):
        torch.ops.thinkless.degrpo_forward(*args[:3], args[3][:, :6], *args[4:])
    with pytest.raises(ValueError, match=r"logp must have contiguous tokens"):
        torch.ops.thinkless.degrpo_forward(args[0].t().contiguous().t(), *args[1:])
    with pytest.raises(ValueError, match=r"kl_type must be 1, 2 or 3"):
        torch.ops.thinkless.degrpo_forward(*args[:-2], 4, args[-1])
    with pytest.raises(ValueError, match=r"token_weights has shape \[3, 6\], expected \[3, 7\]"):
        torch.ops.thinkless.degrpo_forward(*args[:6], args[6][:, :6], *args[7:])
    with pytest.raises(ValueError, match=r"entropy and entropy_grad go together"):
        grad_args = _sample_args()["row_grad_"]
        torch.ops.thinkless.row_grad_(grad_args[0].t().contiguous().t(), *grad_args[1:6], None)
    g = list(_sample_args()["group_advantages"])
    with pytest.raises(ValueError, match=r"group_ids must be Long"):
        torch.ops.thinkless.group_advantages(g[0], g[1].int(), *g[2:])


def test_missing_extension_warns_once_and_falls_back():
    """Without thinkless._C, CPU kernels run on torch after one warning, and give the same numbers."""
    code = """
import sys, warnings
sys.modules["thinkless._C"] = None  # as if never built: importing it raises ImportError
import torch
from thinkless.kernels import degrpo_loss, group_advantages, select_backend, token_logprobs
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert select_backend(torch.device("cpu")) == "torch"
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.5]), torch.tensor([0, 0, 1, 1]))
    loss, _ = degrpo_loss(-torch.rand(2, 3), -torch.rand(2, 3), adv[:2], torch.ones(2, 3, dtype=torch.bool))
    token_logprobs(torch.randn(2, 4), torch.randn(10, 4), torch.tensor([1, 2]))
    assert select_backend(torch.device("cpu"), "cpp") == "torch"
warned = [w for w in caught if "thinkless._C is not available" in str(w.message)]
assert len(warned) == 1, [str(w.message) for w in caught]
assert torch.allclose(adv, torch.tensor([0.5, -0.5, 0.25, -0.25]))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "THINKLESS_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
