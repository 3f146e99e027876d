"""Block sizes and launch settings for every Triton kernel, and the fused loss's chunk budgets, in one place.

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

# Fused linear loss, row statistics: one program per row walks the vocabulary with an online logsumexp; 4096
# elements per trip keeps 16 fp32 values per thread in flight at 8 warps.
ROW_STATS = LaunchConfig(block=4096, num_warps=8)

# Fused linear loss, row gradient: the logsumexp is known, so every [row, vocabulary block] is its own program.
ROW_GRAD = LaunchConfig(block=4096, num_warps=8)

# Logits-chunk budgets when chunk_size is not given. On CPU, every chunk streams W twice and dW once, so fewer,
# larger chunks are faster (2-core EPYC, H=512, V=32000: 1.11x the GEMM floor at 256 rows, 1.09x at 384), while
# 48 MiB keeps the buffer under a fifth of the logits at the benchmark shape. On a GPU the chunk should be large
# enough that the GEMMs run at full speed and the fp32 dW is read and written few times, and small next to the
# 80 GB of an H100.
CHUNK_BYTES_CPU = 48 * 2**20
CHUNK_BYTES_CUDA = 512 * 2**20
