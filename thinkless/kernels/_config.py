"""Block sizes and launch settings for every Triton kernel, in one place.

One tested default per kernel; the AOT compile check (`_compile_check.py`) builds exactly these, so a change here
is caught there for register spills on sm_80 and sm_90a.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchConfig:
    block: int
    num_warps: int


# Group advantages: one program per group; groups are small (G samples per prompt), so one warp-wide block of
# 128 covers a group of up to 128 in a single trip of each loop.
GROUP_ADVANTAGES = LaunchConfig(block=128, num_warps=4)

# DeGRPO token loss: a [row, token-block] grid over [B, T]; 1024 fp32 tokens per program keeps the memory-bound
# loop long enough to hide latency without spilling the seven running sums.
DEGRPO_LOSS = LaunchConfig(block=1024, num_warps=4)

# First response token of each row: one program per row scanning the mask.
FIRST_RESPONSE = LaunchConfig(block=1024, num_warps=4)
