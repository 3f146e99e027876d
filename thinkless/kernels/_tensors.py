"""What every backend does alike with the tensors it is handed: the dtype it computes in, and views whose tokens
are contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the arithmetic for inputs of `dtype`: fp32 for fp32 and narrower (bf16, fp16), fp64 for fp64,
    so that float64 checks stay exact."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def contiguous_tokens(x: Tensor) -> Tensor:
    """x itself when its tokens are contiguous (any row stride, e.g. a [:, 1:] slice of the logits' log-probs)."""
    return x if x.stride(-1) == 1 else x.contiguous()
