"""thinkless kernels: group advantages, the DeGRPO loss and its fused lm_head form; Triton, native C++ or torch.

Every public function checks its inputs, then dispatches on the device of its tensors: CUDA goes to Triton, CPU
to the compiled extension when it is built and to the torch reference otherwise. `THINKLESS_BACKEND` or the
`backend=` argument forces one. `reference` holds the readable PyTorch ground truth.
"""

from thinkless.kernels import reference
from thinkless.kernels._backend import BACKENDS, select_backend
from thinkless.kernels.advantages import group_advantages
from thinkless.kernels.degrpo_loss import degrpo_loss
from thinkless.kernels.degrpo_weights import DeGRPOParams, Normalizers, sequence_token_weights
from thinkless.kernels.fused_linear import fused_linear_cross_entropy, fused_linear_degrpo_loss, token_logprobs

__all__ = [
    "BACKENDS",
    "DeGRPOParams",
    "Normalizers",
    "degrpo_loss",
    "fused_linear_cross_entropy",
    "fused_linear_degrpo_loss",
    "group_advantages",
    "reference",
    "select_backend",
    "sequence_token_weights",
    "token_logprobs",
]
