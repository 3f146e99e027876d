"""Random inputs for the kernel tests: awkward shapes, every padding layout, fresh values on every run."""

import torch

# (B, T): B never a power of two; T = 1, 17, 130 as the issue asks, plus one longer than a kernel block.
SHAPES = [(3, 1), (5, 17), (7, 130), (6, 1500)]


def response_mask(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Rows cycle through: right-padded, left-padded, empty, full, and right-padded with holes (masked tool
    output inside a response)."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(1, T + 1, (1,), generator=gen))
        kind = b % 5
        if kind == 0:
            mask[b, :n] = True
        elif kind == 1:
            mask[b, T - n :] = True
        elif kind == 3:
            mask[b] = True
        elif kind == 4:
            mask[b, :n] = torch.rand(n, generator=gen) > 0.3
    return mask


def loss_inputs(B: int, T: int, *, per_token_adv: bool = False, clip: float = 0.2, seed: int | None = None):
    """float32 logp, old_logp, ref_logp, advantages and a response mask.

    The ratio exp(logp - old_logp) is kept 1e-3 away from the clip edges 1 +- clip: there the loss has a kink,
    and float32 and float64 may fall on its two sides, which is not an error of either.
    """
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
    logp = -torch.rand(B, T, generator=gen) * 4 - 0.01
    old_logp = logp + torch.randn(B, T, generator=gen) * 0.25
    for edge in (1 - clip, 1 + clip):
        near = ((old_logp - logp).neg().exp() - edge).abs() < 1e-3
        old_logp = torch.where(near, old_logp + 5e-3, old_logp)
    ref_logp = logp + torch.randn(B, T, generator=gen) * 0.3
    adv_shape = (B, T) if per_token_adv else (B,)
    advantages = torch.randn(adv_shape, generator=gen)
    mask = response_mask(B, T, gen)
    # Padding holds garbage that a correct kernel never reads into the loss: -inf log-probs, huge advantages.
    logp = torch.where(mask, logp, torch.full_like(logp, float("-inf")))
    return logp, old_logp, ref_logp, advantages, mask


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    """Norm-wise relative error, in float64."""
    x, truth = x.double(), truth.double()
    scale = truth.norm().item()
    diff = (x - truth).norm().item()
    return diff / scale if scale > 0 else diff
