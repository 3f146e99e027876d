"""The row work of the fused linear loss on one chunk of logits, per backend: Triton kernels (CUDA), the native
extension (CPU, `csrc/fused_linear_rows.cpp`), and their table `ROW_OPS`, which the chunk loop
(`fused_linear_loop.py`) calls.

Each backend gives two ops: row statistics (online logsumexp, target log-prob, entropy; one read of the logits)
and the row gradient dz = g * (onehot(target) - softmax(z)) plus the entropy's gradient, written over the logits.
The torch row work has another shape (see `fused_linear.py`) and lives in the loop itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from thinkless.kernels._config import ROW_GRAD, ROW_STATS
from thinkless.kernels._tensors import compute_dtype
from thinkless.kernels._triton_utils import split_scalar, tl, triton, triton_dtype


@triton.jit
def _row_stats_kernel(
    logits_ptr,  # [C, V] raw logits (h W^T + b), row stride stride_row
    target_ptr,  # int64 [C]
    lse_ptr,  # COMPUTE [C], out: logsumexp of the row at temperature
    logp_ptr,  # COMPUTE [C], out: log-prob of the target
    entropy_ptr,  # COMPUTE [C], out (when HAS_ENTROPY)
    V,
    stride_row,
    inv_temp_hi,  # 1 / temperature = hi + lo (two fp32 scalars: see split_scalar)
    inv_temp_lo,
    HAS_ENTROPY: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: online logsumexp (running max m, running sum s of exp(z - m)) over the vocabulary.

    The entropy is log s - sum_v e_v (z_v - m) / s; its running sum is kept relative to the running max too, so it
    never adds large terms that cancel.
    """
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row  # int64: C * V passes 2^31 at real sizes
    one = tl.full((), 1.0, COMPUTE)  # the halves go up to COMPUTE before they are added
    inv_temp = inv_temp_hi * one + inv_temp_lo * one
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), COMPUTE)
    s = tl.zeros((), COMPUTE)
    sz = tl.zeros((), COMPUTE)
    for start in range(0, V, BLOCK_V):
        v = start + offs
        x = tl.load(base + v, mask=v < V, other=float("-inf")).to(COMPUTE) * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        if HAS_ENTROPY:
            # s > 0 guards the first block, where m = -inf and s * (m - m_new) would be 0 * inf.
            shift = tl.where(s > 0, s * (m - m_new), 0.0)
            sz = scale * (sz + shift) + tl.sum(tl.where(v < V, e * (x - m_new), 0.0), axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    target = tl.load(target_ptr + row)
    z_target = tl.load(base + target).to(COMPUTE) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_target - lse)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, log_s - sz / s)


@triton.jit
def _row_grad_kernel(
    logits_ptr,  # [C, V] raw logits in, dL/d(raw logits) out, in place
    target_ptr,  # int64 [C]
    lse_ptr,  # COMPUTE [C]
    grad_ptr,  # COMPUTE [C]: dL/dlogp / temperature
    entropy_ptr,  # COMPUTE [C]: the row's entropy (when HAS_ENTROPY_GRAD)
    entropy_grad_ptr,  # COMPUTE [C]: dL/d(entropy) / temperature (when HAS_ENTROPY_GRAD)
    V,
    stride_row,
    inv_temp_hi,
    inv_temp_lo,
    HAS_ENTROPY_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dz = g * (onehot(target) - softmax(x)), x = z / tau, over a [row, vocab block] grid: the logsumexp is known,
    so every block is independent. The entropy bonus adds gamma * dH/dx = -gamma * p * (x - lse + H)."""
    row = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    base = logits_ptr + row * stride_row
    one = tl.full((), 1.0, COMPUTE)  # the halves go up to COMPUTE before they are added
    inv_temp = inv_temp_hi * one + inv_temp_lo * one
    x = tl.load(base + v, mask=v < V, other=0.0).to(COMPUTE) * inv_temp
    lse = tl.load(lse_ptr + row)
    p = tl.exp(x - lse)
    g = tl.load(grad_ptr + row)
    dz = g * (tl.where(v == tl.load(target_ptr + row), 1.0, 0.0) - p)
    if HAS_ENTROPY_GRAD:
        gamma = tl.load(entropy_grad_ptr + row)
        dz -= gamma * p * (x - lse + tl.load(entropy_ptr + row))
    tl.store(base + v, dz.to(logits_ptr.dtype.element_ty), mask=v < V)


def _row_stats_triton(z: Tensor, targets: Tensor, inv_temp: float, want_entropy: bool, compute: torch.dtype):
    n, V = z.shape
    lse, logp, entropy = (torch.empty(n, dtype=compute, device=z.device) for _ in range(3))
    _row_stats_kernel[(n,)](
        z, targets, lse, logp, entropy,
        V, z.stride(0), *split_scalar(inv_temp),
        HAS_ENTROPY=want_entropy,
        COMPUTE=triton_dtype(compute),
        BLOCK_V=ROW_STATS.block,
        num_warps=ROW_STATS.num_warps,
    )  # fmt: skip
    return lse, logp, entropy


def _row_grad_triton(z: Tensor, targets: Tensor, lse: Tensor, g: Tensor, inv_temp: float, entropy, gamma) -> None:
    n, V = z.shape
    has_entropy_grad = gamma is not None
    _row_grad_kernel[(n, triton.cdiv(V, ROW_GRAD.block))](
        z, targets, lse, g, entropy if has_entropy_grad else lse, gamma if has_entropy_grad else lse,
        V, z.stride(0), *split_scalar(inv_temp),
        HAS_ENTROPY_GRAD=has_entropy_grad,
        COMPUTE=triton_dtype(lse.dtype),
        BLOCK_V=ROW_GRAD.block,
        num_warps=ROW_GRAD.num_warps,
    )  # fmt: skip


def _native_stats(z, targets, inv_temp, want_entropy):
    return torch.ops.thinkless.row_stats(z, targets, inv_temp, want_entropy)


def _native_grad_(z, targets, lse, g, inv_temp, entropy, gamma):
    torch.ops.thinkless.row_grad_(z, targets, lse, g.contiguous(), inv_temp, entropy, gamma)


@dataclass(frozen=True)
class RowOps:
    """A backend of the row work that writes dlogits in place (Triton on CUDA, the native extension on CPU)."""

    column_layout: bool  # the chunk is a [n, V] view of a [V, n] buffer (else a contiguous [n, V] one)
    upcast: bool  # bf16 / fp16 inputs go to fp32 for the whole pass (CPU); else GEMMs in the input dtype
    stats: Callable  # (z, targets, inv_temp, want_entropy) -> (lse, logp, entropy)
    grad_: Callable  # (z, targets, lse, g, inv_temp, entropy, entropy_grad) -> None: z becomes dL/d(h W^T + b)


# The row ops of each kernel backend; "torch" needs none (its row work is in the loop, `_run_torch`).
ROW_OPS = {
    "triton": RowOps(
        column_layout=False,
        upcast=False,
        stats=lambda z, t, it, ent: _row_stats_triton(z, t, it, ent, compute_dtype(z.dtype)),
        grad_=_row_grad_triton,
    ),
    "cpp": RowOps(
        column_layout=True,
        upcast=True,
        stats=_native_stats,
        grad_=_native_grad_,
    ),
}
