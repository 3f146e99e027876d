"""Group-relative advantages: each sample's reward minus the mean reward of its prompt's group.

Samples arrive in any order with arbitrary group ids, so the launcher sorts them into contiguous groups once
(`torch.unique` + a stable argsort), and the kernel runs one program per group over that permutation. There are no
atomics, so the result is deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from thinkless.kernels import _checks, reference
from thinkless.kernels._backend import select_backend
from thinkless.kernels._config import GROUP_ADVANTAGES
from thinkless.kernels._triton_utils import tl, triton


@triton.jit
def _group_advantages_kernel(
    # pointers
    rewards_ptr,  # fp32 or fp64 [N]
    order_ptr,  # int64 [N], sample indices sorted by group
    starts_ptr,  # int64 [G], offset of each group in `order`
    counts_ptr,  # int64 [G]
    out_ptr,  # fp32 [N]
    # options
    eps,
    # meta-parameters
    NORMALIZE_STD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # With n = group size and S = sum of its rewards, r - mean = (n*r - S) / n. The scaled deviation n*r - S is
    # formed in fp64 with multiplies and adds only: it is exactly 0 for a group of equal rewards and keeps every
    # digit of fp64 rewards such as 1e8 + 1, and the divisions, taken at the end in fp32, never meet the fp64
    # division subroutine (whose call costs a stack frame and a spill on sm_90a).
    group = tl.program_id(0).to(tl.int64)
    start = tl.load(starts_ptr + group)
    count = tl.load(counts_ptr + group)
    n = count.to(tl.float64)
    offs = tl.arange(0, BLOCK)

    total = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, count, BLOCK):
        in_group = i + offs < count
        idx = tl.load(order_ptr + start + i + offs, mask=in_group, other=0)
        total += tl.load(rewards_ptr + idx, mask=in_group, other=0.0).to(tl.float64)
    S = tl.sum(total)

    scale = tl.where(count > 1, 1.0, 0.0) / count.to(tl.float32)  # a group of one has no baseline: advantage 0
    if NORMALIZE_STD:
        # Two passes (sum, then squared deviations) rather than E[r^2] - E[r]^2, which cancels when the rewards of
        # a group are nearly equal. std = sqrt(sum (n*r - S)^2 / (n - 1)) / n.
        sq = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(0, count, BLOCK):
            in_group = i + offs < count
            idx = tl.load(order_ptr + start + i + offs, mask=in_group, other=0)
            r = tl.load(rewards_ptr + idx, mask=in_group, other=0.0).to(tl.float64)
            d = tl.where(in_group, n * r - S, 0.0)
            sq += d * d
        var = tl.sum(sq).to(tl.float32) / tl.maximum(count - 1, 1).to(tl.float32)
        std = tl.sqrt(var) / count.to(tl.float32)
        scale = scale / (std + eps)

    for i in range(0, count, BLOCK):
        in_group = i + offs < count
        idx = tl.load(order_ptr + start + i + offs, mask=in_group, other=0)
        r = tl.load(rewards_ptr + idx, mask=in_group, other=0.0).to(tl.float64)
        tl.store(out_ptr + idx, (n * r - S).to(tl.float32) * scale, mask=in_group)


def _group_advantages_triton(rewards: Tensor, group_ids: Tensor, normalize_std: bool, eps: float) -> Tensor:
    out = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    if rewards.numel() == 0:
        return out
    _, counts = torch.unique(group_ids, return_counts=True)
    order = torch.argsort(group_ids, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    if rewards.dtype not in (torch.float32, torch.float64):
        rewards = rewards.float()
    _group_advantages_kernel[(counts.numel(),)](
        rewards.contiguous(),
        order,
        starts,
        counts,
        out,
        eps,
        NORMALIZE_STD=normalize_std,
        BLOCK=GROUP_ADVANTAGES.block,
        num_warps=GROUP_ADVANTAGES.num_warps,
    )
    return out


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    normalize_std: bool = False,
    eps: float = 1e-6,
    backend: str | None = None,
) -> Tensor:
    """Group-relative advantages for outcome rewards.

    Args:
        rewards: float [N], one scalar reward per sample (a tensor, or a list / numpy array of floats).
        group_ids: int [N], the prompt each sample answers; any values, any order (tensor, list or numpy).
        normalize_std: divide by the group's unbiased std + eps (GRPO). Off by default: Dr. GRPO, as Thinkless.
        eps: added to the std before dividing.
        backend: "triton", "cpp" or "torch"; default from the device (or THINKLESS_BACKEND).

    Returns:
        float32 [N]: r - mean(r over its group) (divided by std + eps with `normalize_std`); 0 for a group of one.
    """
    rewards = _checks.floating("rewards", _checks.as_tensor("rewards", rewards))
    group_ids = _checks.integer("group_ids", _checks.as_tensor("group_ids", group_ids, rewards.device))
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    _checks.same_shape("group_ids", group_ids, rewards.shape, "rewards")
    _checks.same_device("group_ids", group_ids, rewards.device, "rewards")
    _checks.finite("rewards", rewards)
    eps = _checks.number("eps", eps, low=0.0)
    if normalize_std and eps <= 0:
        raise ValueError(
            f"eps must be > 0 with normalize_std: a group whose rewards are all equal has std 0 (got {eps})"
        )
    name = select_backend(rewards.device, backend)
    if name == "triton":
        return _group_advantages_triton(rewards, group_ids, bool(normalize_std), eps)
    if name == "cpp":
        rewards = rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.float()
        return torch.ops.thinkless.group_advantages(rewards, group_ids.long(), bool(normalize_std), eps)
    return reference.group_advantages(rewards, group_ids, normalize_std=bool(normalize_std), eps=eps)
